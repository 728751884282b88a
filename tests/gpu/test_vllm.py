"""vLLM backend on a GPU (marker ``gpu``; skipped without CUDA and vLLM).

1. Log-prob parity: the log-probs vLLM reports for the tokens it sampled match transformers'
   teacher-forced log-probs of the same model on the same tokens.
2. The policy that samples is the policy being trained: after ``sync_weights`` of a LoRA student
   (random, non-zero adapter) or of changed full weights, vLLM's log-probs match the *new* model
   and no longer the old one.
3. One full OPD step through ``python -m vopd.train`` with the vLLM backend, LoRA and the IS
   correction on, for every estimator.

Tiny random Llamas with head size 64 (a size every vLLM attention backend supports), saved with
``save_pretrained`` with the toy character tokenizer: no downloads.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
pytest.importorskip("vllm")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from vopd.estimators import ESTIMATORS  # noqa: E402
from vopd.lora import LORA_TARGETS  # noqa: E402
from vopd.rollout import SamplingParams, get_backend  # noqa: E402
from vopd.toy.tokenizer import build_tokenizer  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "config" / "train" / "small.yaml"
PROMPTS = ["12+35+40=", "7+8=", "99+1+1="]
# bf16 engine vs a bf16 transformers forward of the same weights: per-token |Δ log p| stays well
# below these on random tiny models (logits of order 1).
MEAN_TOL, MAX_TOL = 0.02, 0.25


def tiny_llama(tok, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("tiny") / "student"
    tiny_llama(tok, 0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def hf_logprobs(model, rollouts) -> list[list[float]]:
    """Teacher-forced log p(y_t) of each completion token under ``model`` (bf16 on CUDA)."""
    out = []
    for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids, strict=True):
        ids = torch.tensor([p + c], device="cuda")
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        out.append(logits.log_softmax(-1).gather(-1, ids[0, len(p) :, None])[:, 0].tolist())
    return out


def max_mean_diff(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    d = torch.tensor(
        [x - y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    )
    return float(d.abs().max()), float(d.abs().mean())


def sample(backend, n=4, seed=0):
    return backend.generate(
        PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=24, n=n, seed=seed, logprobs=True)
    )


def release(backend):
    backend.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------


def test_logprobs_match_transformers(model_dir):
    backend = get_backend(
        "vllm", model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.2,
        enforce_eager=True,
    )  # fmt: skip
    try:
        ro = sample(backend)
        assert len(ro) == len(PROMPTS) * 4 and ro.prompt_index[:4] == [0, 0, 0, 0]
        assert all(
            len(lp) == len(c) for lp, c in zip(ro.sampler_logprobs, ro.completion_ids, strict=True)
        )
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
        worst, mean = max_mean_diff(ro.sampler_logprobs, hf_logprobs(model, ro))
        assert mean < MEAN_TOL and worst < MAX_TOL, (mean, worst)
        # the same seed gives the same samples; prompts get distinct noise
        again = sample(backend)
        assert again.completion_ids == ro.completion_ids
    finally:
        release(backend)


def test_lora_sync_samples_the_trained_adapter(model_dir):
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    before = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    cfg = LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False,  # random non-zero A and B
        target_modules=list(LORA_TARGETS),
    )  # fmt: skip
    student = get_peft_model(base, cfg).eval()
    backend = get_backend(
        "vllm", model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.2,
        enable_lora=True, max_lora_rank=8, enforce_eager=True,
    )  # fmt: skip
    try:
        backend.sync_weights(student)
        ro = sample(backend, seed=1)
        worst, mean = max_mean_diff(ro.sampler_logprobs, hf_logprobs(student, ro))
        assert mean < MEAN_TOL and worst < MAX_TOL, (mean, worst)
        _, mean_old = max_mean_diff(ro.sampler_logprobs, hf_logprobs(before, ro))
        assert mean_old > 5 * mean  # the adapter really changed the sampler
    finally:
        release(backend)


def test_full_weight_sync_samples_the_new_weights(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    backend = get_backend(
        "vllm", model=str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.2,
        colocate=True, enforce_eager=True,
    )  # fmt: skip
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        backend.sync_weights(model)
        ro = sample(backend, seed=2)
        worst, mean = max_mean_diff(ro.sampler_logprobs, hf_logprobs(model, ro))
        assert mean < MEAN_TOL and worst < MAX_TOL, (mean, worst)
    finally:
        release(backend)


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_one_opd_step_with_vllm_and_lora(tmp_path, model_dir, estimator):
    """``python -m vopd.train`` for one step (own process: one colocated engine each): vLLM
    rollouts, LoRA student, IS correction on, the small config's settings."""
    import subprocess
    import sys

    import pandas as pd

    prompts = tmp_path / "prompts.parquet"
    pd.DataFrame({"prompt": PROMPTS * 4}).to_parquet(prompts)
    teacher = tmp_path / "teacher"
    tok = build_tokenizer()
    tiny_llama(tok, 1).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    out = tmp_path / "run"
    overrides = [
        f"student={model_dir}", f"teacher={teacher}", f"prompts={prompts}",
        f"estimator={estimator}", "top_k=4", "prompts_per_step=8", "max_new_tokens=16",
        "max_steps=1", "lr=1e-3", "lora_r=8", "lora_alpha=16", "micro_batch_size=4",
        "vllm_gpu_memory_utilization=0.2",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "vopd.train", "--config", str(CONFIG), "--out", str(out)]
    res = subprocess.run([*cmd, "--no-progress", *overrides], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and torch.isfinite(torch.tensor(row["train/loss"]))
    # bf16 vLLM vs the bf16 trainer on the same weights: a small but real mismatch
    assert 0.0 <= row["estimator/mismatch_kl"] < 0.05 and row["estimator/is_weight_mean"] > 0
    assert (out / "checkpoints" / "step1" / "adapter_config.json").is_file()
    assert not (out / "checkpoints" / "step1" / "model.safetensors").exists()
