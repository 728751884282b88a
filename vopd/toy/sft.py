"""Teacher and student for the toy world: one LlamaForCausalLM trained by SFT, two checkpoints.

    python -m vopd.toy sft --world resources/toy --out resources/toy/models [--steps 1500 ...]

The model is a real ``transformers`` ``LlamaForCausalLM`` built from a config (hidden 128, 3
layers, 4 heads, MLP 256, tied embeddings: ~0.5M parameters). SFT is next-token cross-entropy on
the completion only (worked solution + EOS), AdamW, linear warm-up then cosine decay to 10%, on
examples drawn fresh from the world's SFT mixture with every val/test/hard/mcq problem rejected;
a share ``--mcq-share`` (default half) of them in the multiple-choice form of
:mod:`vopd.toy.world`, from the first step on. (Taught afterwards instead, by a fine-tune of the
arithmetic-only models on half multiple-choice examples, the letter was right 0.31 of the time
after 100 steps, hardly above always answering A (0.30), while the fine-tune's arithmetic
lifted the student from 0.55 to 0.78 greedy on toy_test: it would no longer be the weaker model.)

Student and teacher come from the same run, like a base model and its post-trained sibling. Every
``--eval-every`` steps the val split is scored by teacher-forced exact match (greedy decoding
reproduces the worked solution token for token: one forward pass instead of a decode loop, and a
lower bound on greedy accuracy). The **student** is the evaluation closest to ``--student-em``
(the first one at or above it, or the one just before); the **teacher** is the end of training
(early stop at ``--teacher-em``). Selection uses the plain val problems; the same problems in the
multiple-choice form are scored once for both models (``val_em_mcq``). Both are saved with
``save_pretrained`` (+ tokenizer) and from then on load like hub models (:mod:`vopd.models`).
``sft_summary.json`` holds their greedy accuracy (transformers ``generate``) on toy_test, toy_hard
and toy_mcq, and the timings. Checkpoints are selected on val, never on the benchmarks.
"""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from vopd.checkpoint import atomic_dir
from vopd.io import write_json
from vopd.rollout import SamplingParams
from vopd.rollout.hf import HFBackend
from vopd.toy.world import (
    completion_for,
    is_correct,
    load_world_spec,
    mcq_form,
    parse_mcq,
    sample_problem,
)

hf_logging.disable_progress_bar()  # our own bar only: no per-checkpoint "Writing model shards"

# Bump when the training algorithm changes in a way the settings do not show: the shipped models
# (vopd/toy/shipped, vopd.toy.ship) are reused only for the same version, world and settings.
SFT_VERSION = 2  # 2: the multiple-choice share of the examples, the 31-token vocabulary
BENCHMARKS = ("toy_test", "toy_hard", "toy_mcq")  # the final greedy evaluation

# ---------------------------------------------------------------------------------------------
# Model and evaluation.


def toy_model_config(tokenizer, *, hidden=128, layers=3, heads=4, mlp=256) -> LlamaConfig:
    """The toy Llama: known to learn 3-term 2-digit sums on 2 CPU cores in minutes."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=mlp,
        max_position_embeddings=tokenizer.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def greedy_accuracy(
    model, tokenizer, prompts: list[str], answers: list[str], *, max_new_tokens=64, batch_size=256
) -> float:
    """Share of prompts whose greedy completion's last ``\\boxed{}`` equals the answer."""
    backend = HFBackend(model, tokenizer, batch_size=batch_size)
    out = backend.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return float(np.mean([is_correct(t, a) for t, a in zip(out.texts, answers, strict=True)]))


# ---------------------------------------------------------------------------------------------
# Data.


def encode_examples(tokenizer, problems: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[BOS] prompt completion EOS`` ids [B, L] and labels [B, L] that hold the
    completion tokens (worked solution + EOS) at their own positions and -100 elsewhere; a prompt
    is a plain problem or one in the multiple-choice form (:func:`completion_for`)."""
    prompts = tokenizer(problems)["input_ids"]
    solutions = tokenizer([completion_for(p)[0] for p in problems], add_special_tokens=False)[
        "input_ids"
    ]
    L = max(len(a) + len(b) + 1 for a, b in zip(prompts, solutions, strict=True))
    input_BL = torch.full((len(problems), L), tokenizer.pad_token_id, dtype=torch.long)
    labels_BL = torch.full((len(problems), L), -100, dtype=torch.long)  # -100: ignored
    for i, (a, b) in enumerate(zip(prompts, solutions, strict=True)):
        completion = [*b, tokenizer.eos_token_id]
        input_BL[i, : len(a) + len(completion)] = torch.tensor(a + completion)
        labels_BL[i, len(a) : len(a) + len(completion)] = torch.tensor(completion)
    return input_BL, labels_BL


@torch.no_grad()
def exact_match_rate(model, tokenizer, problems: list[str]) -> float:
    """Teacher-forced exact match: the share of problems where the argmax at every completion
    position is the worked solution's token, i.e. greedy decoding reproduces the solution exactly
    (a lower bound on greedy accuracy, from one forward pass instead of a decode loop)."""
    input_BL, labels_BL = encode_examples(tokenizer, problems)
    pred_BL = model(input_ids=input_BL).logits[:, :-1].argmax(-1)
    target_BL = labels_BL[:, 1:]
    ok_BL = (pred_BL == target_BL) | (target_BL == -100)
    return float(ok_BL.all(-1).float().mean())


class SFTStream:
    """Fresh SFT examples from the world's SFT mixture, held-out problems rejected; a share
    ``mcq_share`` of them in the multiple-choice form."""

    def __init__(
        self, world_dir: Path, tokenizer, seed: int, exclude: set[str], mcq_share: float = 0.0
    ):
        self.specs = load_world_spec(world_dir).sft_specs()
        self.rng = np.random.default_rng([seed, 1])
        self.exclude = exclude
        self.tok = tokenizer
        self.mcq_share = mcq_share

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example from a uniformly drawn mixture component. (One component per batch would
        save the padding compute, but measured it learns several times slower per step.) With
        ``mcq_share`` 0 no other random number is drawn: the arithmetic stream is unchanged."""
        problems = []
        while len(problems) < size:
            p = sample_problem(self.rng, self.specs[self.rng.integers(len(self.specs))])
            if p in self.exclude:
                continue
            if self.mcq_share and self.rng.random() < self.mcq_share:
                p = mcq_form(p)
            problems.append(p)
        return encode_examples(self.tok, problems)


def _split(world_dir: Path, rel: str) -> pd.DataFrame:
    path = world_dir / rel
    if not path.exists():
        raise ValueError(f"{path} does not exist: run `python -m vopd.toy world` first")
    return pd.read_parquet(path)


# ---------------------------------------------------------------------------------------------
# Training.


def sft_settings(*, threads: int, progress: bool = True, **given) -> dict:
    """Everything of an SFT run that determines its models, as ``sft_summary.json`` records it
    under ``settings`` (``progress`` does not; ``threads`` does: it orders the float reductions).
    The defaults are :data:`SFT_DEFAULTS`, read from :func:`run_sft`'s signature, their one home."""
    del progress
    unknown = sorted(set(given) - set(SFT_DEFAULTS))
    if unknown:
        raise TypeError(f"sft_settings() got unexpected keyword arguments {unknown}")
    return {**SFT_DEFAULTS, **given, "threads": threads}


def warmup_cosine(warmup: int, steps: int):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, cosine decay to 10 % at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def _train_step(model, optimizer, scheduler, batch) -> float:
    """One next-token cross-entropy step on the completion tokens (gradient norm clipped at 1)."""
    input_BL, labels_BL = batch
    logits_BLV = model(input_ids=input_BL).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits_BLV.reshape(-1, logits_BLV.shape[-1]), labels_BL[:, 1:].reshape(-1)
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def _save(model, tokenizer, path: Path) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def run_sft(
    world_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 3e-3,
    warmup: int = 50,
    seed: int = 0,
    eval_every: int = 10,
    eval_size: int = 256,
    student_em: float = 0.55,
    teacher_em: float = 0.97,
    mcq_share: float = 0.5,
    progress: bool = True,
) -> dict:
    """Train, save ``student/`` and ``teacher/`` under ``out_dir``, return the summary."""
    from vopd.models import load_tokenizer

    world_dir, out_dir = Path(world_dir), Path(out_dir)
    if steps < 1 or batch_size < 1 or eval_every < 1 or lr <= 0:
        raise ValueError(
            f"steps={steps}, batch_size={batch_size}, eval_every={eval_every}, lr={lr}: "
            "expected positive values"
        )
    if not 0.0 <= mcq_share < 1.0:
        raise ValueError(f"mcq_share={mcq_share}: expected a share in [0, 1)")
    if not 0.0 < student_em < teacher_em <= 1.0:
        raise ValueError(
            f"student_em={student_em}, teacher_em={teacher_em}: expected "
            "0 < student_em < teacher_em <= 1"
        )
    load_world_spec(world_dir)  # a missing or foreign world directory fails here, clearly
    tokenizer = load_tokenizer(str(world_dir / "tokenizer"))
    val, test, hard, mcq = (
        _split(world_dir, r)
        for r in (
            "prompts/val.parquet",
            "benchmarks/toy_test.parquet",
            "benchmarks/toy_hard.parquet",
            "benchmarks/toy_mcq.parquet",
        )
    )
    mcq_questions = {parse_mcq(p)[0] for p in mcq.prompt}
    exclude = set(val.problem) | set(test.problem) | set(hard.problem) | mcq_questions
    stream = SFTStream(world_dir, tokenizer, seed, exclude, mcq_share)
    val_problems = list(val.problem[:eval_size])
    val_mcq = [mcq_form(p) for p in val_problems]  # the same problems, multiple choice

    torch.manual_seed(seed)
    model = LlamaForCausalLM(toy_model_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps))
    history, student_step, student_state, previous = [], None, None, None
    t0, eval_s = time.perf_counter(), 0.0
    bar = tqdm(range(1, steps + 1), desc="sft", disable=not progress, mininterval=2)
    for step in bar:
        loss = _train_step(model, optimizer, scheduler, stream.batch(batch_size))
        if step % eval_every and step != steps:
            continue
        te = time.perf_counter()
        acc = exact_match_rate(model, tokenizer, val_problems)
        eval_s += time.perf_counter() - te
        history.append({"step": step, "loss": loss, "val_em": acc})
        bar.set_postfix(loss=f"{loss:.3f}", val_em=f"{acc:.3f}")
        if student_step is None and acc >= student_em:
            # the student: this evaluation or the previous one, whichever is closer to the target
            if previous and student_em - previous[1] < acc - student_em:
                student_step, _, student_state = previous
            else:
                student_step = step
                student_state = {k: v.clone() for k, v in model.state_dict().items()}
        elif student_step is None:
            previous = (step, acc, {k: v.clone() for k, v in model.state_dict().items()})
        if acc >= teacher_em and student_step is not None:
            break
    if student_step is None:
        raise ValueError(
            f"val exact match never reached student_em={student_em} in {steps} steps "
            f"(history {history}): train longer or lower --student-em"
        )
    teacher_step = history[-1]["step"]
    _save(model, tokenizer, out_dir / "teacher")
    student = LlamaForCausalLM(model.config)
    student.load_state_dict(student_state)
    _save(student, tokenizer, out_dir / "student")
    te = time.perf_counter()
    val_em_mcq = {
        "teacher": exact_match_rate(model, tokenizer, val_mcq),
        "student": exact_match_rate(student, tokenizer, val_mcq),
    }
    eval_s += time.perf_counter() - te
    train_s = time.perf_counter() - t0

    from vopd.models import load_model

    te = time.perf_counter()
    accuracy = {}
    for role in ("teacher", "student"):
        m = load_model(str(out_dir / role))  # exactly as the trainer will load it
        for name, df in zip(BENCHMARKS, (test, hard, mcq), strict=True):
            accuracy[f"{role}/{name}"] = greedy_accuracy(
                m, tokenizer, list(df.prompt), list(df.answer)
            )
    summary = {
        "greedy_accuracy": accuracy,
        "teacher": {
            "step": teacher_step,
            "val_em": history[-1]["val_em"],
            "val_em_mcq": val_em_mcq["teacher"],
        },
        "student": {
            "step": student_step,
            "val_em": next(h["val_em"] for h in history if h["step"] == student_step),
            "val_em_mcq": val_em_mcq["student"],
        },
        "params": sum(p.numel() for p in model.parameters()),
        "time_s": {
            "sft_total": train_s,
            "sft_train": train_s - eval_s,
            "sft_val_eval": eval_s,
            "final_eval": time.perf_counter() - te,
        },
        "settings": sft_settings(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup=warmup,
            seed=seed,
            eval_every=eval_every,
            eval_size=eval_size,
            student_em=student_em,
            teacher_em=teacher_em,
            mcq_share=mcq_share,
            threads=torch.get_num_threads(),
        ),
        "history": history,
    }
    write_json(out_dir / "sft_summary.json", summary)
    return summary


# run_sft's keyword defaults, taken once at import (a test that replaces run_sft keeps them)
SFT_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(run_sft).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name != "progress"
}
