"""A tiny arithmetic world for the evaluation tests: the toy character tokenizer, a Llama model,
seconds of SFT, and a toy benchmark in the benchmark schema. Built from configs; nothing is
downloaded.

Problems are ``a+b=`` with one-digit a, b; the completion is ``a+b=s;\\boxed{s}`` then EOS (the toy
world's format). Correctness is plain arithmetic, so tests can check grades independently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vopd.toy.tokenizer import build_tokenizer  # the toy world's character tokenizer


def completion(a: int, b: int) -> str:
    return f"{a}+{b}={a + b};\\boxed{{{a + b}}}"


def true_sum(problem: str) -> int:
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", problem).groups()
    return int(a) + int(b)


def sft_model(tok, *, steps: int, seed: int = 0) -> LlamaForCausalLM:
    """Teacher-forced SFT on all 100 one-digit sums (loss on the completion and EOS)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    ids, labels = [], []
    for a, b in pairs:
        p = tok(f"{a}+{b}=")["input_ids"]
        c = tok(completion(a, b), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, ids))
    x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids])
    y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in ids])[:, None]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def build_toy(root: Path, *, steps: int = 60, num_problems: int = 24) -> tuple[Path, Path]:
    """(model dir, benchmark parquet) under ``root``; the benchmark sits where the registry looks
    for ``toy_test`` (``root/resources/toy/benchmarks/toy_test.parquet``)."""
    tok = build_tokenizer()
    model = sft_model(tok, steps=steps)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(1)
    picks = torch.randperm(100, generator=g)[:num_problems].tolist()
    problems = [f"{i // 10}+{i % 10}=" for i in picks]
    bench = pd.DataFrame(
        {
            "id": [f"toy-{i}" for i in picks],
            "problem": problems,
            "prompt": problems,
            "answer": [str(true_sum(p)) for p in problems],
            "choices": None,
            "kind": "math",
            "source": "eval-test toy",
        }
    )
    path = root / "resources" / "toy" / "benchmarks" / "toy_test.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    bench.to_parquet(path, index=False)
    return model_dir, path


def cached_toy(request, *, steps: int = 80) -> tuple[Path, Path]:
    """:func:`build_toy` once per source version, kept in pytest's cache directory (SFT takes
    seconds to a minute on a busy CPU; later sessions reuse it)."""
    import hashlib

    key = hashlib.sha256(Path(__file__).read_bytes() + str(steps).encode()).hexdigest()[:12]
    root = Path(request.config.cache.mkdir(f"vopd-eval-toy-{key}"))
    model_dir = root / "model"
    bench = root / "resources" / "toy" / "benchmarks" / "toy_test.parquet"
    if not (model_dir / "config.json").is_file() or not bench.is_file():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: one thread is faster on a shared CPU
        try:
            build_toy(root, steps=steps)
        finally:
            torch.set_num_threads(threads)
    return model_dir, bench
