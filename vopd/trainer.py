"""The OPD trainer (library): the student samples, the teacher scores, an estimator turns the
two into a gradient (arXiv 2605.07865; estimators in :mod:`vopd.estimators`). Its command line
is :mod:`vopd.train`; :func:`train` is the entry point for code (benchmarks, tests).

GPU scale (LoRA, bf16, vLLM rollouts, several processes): docs/scale.md.

Each optimizer step:

1. draw ``prompts_per_step`` prompts (a seeded permutation per epoch, so the data order is a
   function of (seed, step)) and sample ``samples_per_prompt`` completions from the current
   student through the rollout backend (T = 1.0; seeded per step);
2. one no-grad teacher forward (eval mode) on the same prompt + completion tokens;
3. one student forward; the estimator's loss on the completion positions only (logits at
   position t predict completion token t; prompt positions are never projected to the
   vocabulary); backward (steps 2-3: :mod:`vopd.loss`), grad-norm clip, Adam/AdamW step, LR
   schedule.

Deviations from the official trainer (holi-lab/vOPD on TRL v1.2.0; docs/method.md):
- the student forward runs once, not twice (the official code recomputes log p in a second pass);
- no PPO ratio / clip: with one update per rollout batch the ratio is 1 and clipping is
  inactive (docs/method.md §2). The vLLM importance-sampling weight is an option (``is_correction``,
  vopd.is_correction; the hf backend samples the exact training policy: nothing to correct);
- every estimator shares one normalisation (``normalize``); the official Full OPD runs at 64x
  the PG methods' scale (docs/method.md §2). ``detach_reward=False`` reproduces the released
  sample-OPD advantage.

Outputs (RUN_DIR, the run directory of the results contract ``vopd.results``): ``config.yaml``
(resolved), ``env.json``, ``metrics.jsonl`` (one object per step, keys ``train/``,
``estimator/``, ``perf/``), ``checkpoints/step{N}/`` (step0 = the initial student; the newest
holds the resume state), ``done.json`` last. Rerunning the same command resumes from the newest
checkpoint and ends with the same numbers as an uninterrupted run (CPU, same seed).

Several runs in one process (:func:`train_runs`, ``python -m vopd.train --seeds``): one after the
other, each from the process state a fresh process starts it from (global RNG states, torch
threads, grad mode), so each ends exactly as it would alone; a finished run is skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from vopd import catalog, policy, results
from vopd import checkpoint as ckpt
from vopd import distributed as dist
from vopd.batch import make_batch
from vopd.chat import chat_prompt
from vopd.config import TrainConfig, dump_config, load_config
from vopd.estimators.hidden import check_head
from vopd.gradstats import adam_moment_proxy
from vopd.io import append_jsonl, environment, read_jsonl, write_json, write_text
from vopd.lock import run_lock
from vopd.loss import compute_loss, train_step  # noqa: F401  (re-exported: the seams)
from vopd.models import load_model, load_tokenizer, resolve_model_path
from vopd.rollout import SamplingParams
from vopd.vocab import logit_rows, shared_vocab

hf_logging.disable_progress_bar()  # our own bar only: no per-checkpoint "Writing model shards"

# ---------------------------------------------------------------------------------------------
# Set-up: prompts, models, optimizer. Every check runs here, before the first step.


def load_prompts(cfg: TrainConfig) -> list[str]:
    path = Path(cfg.prompts)
    if not path.exists():
        raise ValueError(f"prompts file {cfg.prompts!r} does not exist")
    df = pd.read_parquet(path)
    if cfg.prompt_column not in df.columns:
        raise ValueError(
            f"prompts file {cfg.prompts!r} has no column {cfg.prompt_column!r} "
            f"(columns: {list(df.columns)})"
        )
    prompts = [str(p) for p in df[cfg.prompt_column] if isinstance(p, str) and p.strip()]
    if not prompts:
        raise ValueError(
            f"prompts file {cfg.prompts!r} holds no non-empty prompts: nothing to train"
        )
    return prompts


def num_steps(cfg: TrainConfig, n_prompts: int) -> int:
    if cfg.max_steps != -1:
        return cfg.max_steps
    steps = n_prompts // cfg.prompts_per_step  # one epoch (official num_train_epochs: 1)
    if steps < 1:
        raise ValueError(
            f"one epoch of {n_prompts} prompts at prompts_per_step={cfg.prompts_per_step} is 0 "
            "steps: set max_steps or lower prompts_per_step"
        )
    return steps


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available")
    return torch.device(cfg.device)


def load_models(cfg: TrainConfig, student_path: str, device: torch.device, *, adapter=None):
    """Student (trainable: full or LoRA, ``adapter`` resumed; dropout off), frozen teacher (eval
    mode), tokenizer, shared vocab V (vopd.vocab: one tokenizer, logits sliced to shared rows)."""
    for path in (student_path, cfg.teacher):
        resolve_model_path(path)  # a missing path fails before anything is loaded
    tokenizer, teacher_tok = load_tokenizer(student_path), load_tokenizer(cfg.teacher)
    shared_vocab(tokenizer, teacher_tok)  # a tokenizer mismatch fails before weights load
    student = load_model(student_path, dtype=policy.student_dtype(cfg), device=device)
    teacher = load_model(cfg.teacher, dtype=cfg.dtype, device=device)
    plan = shared_vocab(tokenizer, teacher_tok, logit_rows(student), logit_rows(teacher))
    for note in plan.notes:
        print(f"vocab: {note}", file=sys.stderr)
    V = plan.rows
    if catalog.get(cfg.estimator).top_k and cfg.top_k >= V:
        raise ValueError(
            f"top_k={cfg.top_k} >= vocabulary size {V}: estimator {cfg.estimator!r} would cover "
            f"the whole vocabulary; set top_k < {V}"
        )
    teacher.eval().requires_grad_(False)
    student = policy.prepare_student(cfg, student, adapter=adapter)  # LoRA/full, dropout off
    student.train()
    if cfg.loss_from_hidden:  # the hidden-state loss needs logits = last hidden @ head.T
        ids = torch.arange(min(V, 8), device=device)[None]
        for model in (student, teacher):
            check_head(model, ids)
    return student, teacher, tokenizer, V


def build_optimizer(cfg: TrainConfig, model, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = cls(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))  # cosine to 0 (HF schedule)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Data order and rollouts.


def prompt_indices(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """Prompts of optimizer step ``step`` (1-based): positions [(step−1)·P, step·P) of the
    concatenation of per-epoch permutations (epoch e shuffled by seed (seed, e))."""
    out, pos = [], (step - 1) * per_step
    for p in range(pos, pos + per_step):
        epoch, i = divmod(p, n)
        out.append(int(_permutation(n, seed, epoch)[i]))
    return out


_PERMS: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    if (n, seed, epoch) not in _PERMS:
        _PERMS[(n, seed, epoch)] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[(n, seed, epoch)]


def step_seed(seed: int, step: int) -> int:
    """The rollout sampler's seed at ``step``: a function of (seed, step) only, so a resumed run
    draws the same samples."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# The run: resume, loop, checkpoints, done.json.


def _check_run_dir(cfg: TrainConfig, out: Path) -> None:
    """A rerun must use the config the run directory was started with (read-only check). A run
    that never saved a checkpoint holds nothing to protect: its config.yaml is replaced."""
    path = out / "config.yaml"
    if path.exists() and ckpt.list_checkpoints(out):
        try:
            old = load_config(path)
        except ValueError as e:
            raise ValueError(f"{path} is not a valid run config ({e}): delete {out}") from None
        diff = {k: (v, getattr(cfg, k)) for k, v in old.to_dict().items() if v != getattr(cfg, k)}
        if diff:
            raise ValueError(
                f"{out} holds a run with a different config {diff} (old, new): use a new --out "
                "or delete the directory"
            )


def _init_run_dir(cfg: TrainConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.yaml").exists() or not ckpt.list_checkpoints(out):
        write_json(out / "env.json", environment())
        write_text(out / "config.yaml", dump_config(cfg))


def generate_rollouts(backend, student, prompts: list[str], cfg: TrainConfig, step: int):
    """The step's prompts (seeded data order; this rank's contiguous share) and the current
    student's samples (seeded per step and rank)."""
    idx = prompt_indices(len(prompts), cfg.prompts_per_step, cfg.seed, step)
    rank = dist.from_env()
    idx = idx[slice(*dist.shard_bounds(len(idx), rank.rank, rank.world_size))]
    backend.sync_weights(student)
    sampling = rollout_sampling(
        cfg,
        seed=dist.rank_seed(step_seed(cfg.seed, step), rank.rank),
        logprobs=cfg.is_correction or cfg.rollout_backend == "vllm",  # mismatch metrics
    )
    return backend.generate([prompts[i] for i in idx], sampling)


def rollout_sampling(cfg: TrainConfig, **extra) -> SamplingParams:
    """The run's rollout sampler (temperature, top-p/k, length, samples per prompt) + ``extra``:
    what the trainer samples with, and what ``vopd.variance`` must sample with too."""
    return SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.sampling_top_k,
        max_new_tokens=cfg.max_new_tokens,
        n=cfg.samples_per_prompt,
        **extra,
    )


def opd_step(cfg, step, student, teacher, tokenizer, backend, optimizer, scheduler, prompts, V):
    """One optimizer step; returns its metrics.jsonl row (keys namespaced: vopd.results)."""
    device = student.device
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    t0 = time.perf_counter()
    rollouts = generate_rollouts(backend, student, prompts, cfg, step)
    batch = make_batch(rollouts, tokenizer.pad_token_id, device)
    sync()
    t_rollout = time.perf_counter() - t0
    optimizer.zero_grad(set_to_none=True)
    where = f"step {step}, estimator {cfg.estimator!r}"
    try:
        m = train_step(cfg, student, teacher, batch, V, sync)
    except FloatingPointError as e:
        raise FloatingPointError(f"{where}: {e}") from None
    t1 = time.perf_counter()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"{where}: non-finite gradient norm {float(grad_norm)}")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    sync()
    m["time_update_s"] += time.perf_counter() - t1
    step_s = time.perf_counter() - t0
    n_tokens = int(dist.global_sum(float(batch.mask_BT.sum()), device))
    n_seqs = dist.global_sum(len(rollouts), device)
    return results.namespaced(
        step,
        {
            **m,
            "adv_mean": m.get("adv_mean"),  # None for the exact (non-PG) estimators
            "adv_std": m.get("adv_std"),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "response_len": n_tokens / n_seqs,
            "truncated_frac": dist.global_sum(sum(rollouts.truncated), device) / n_seqs,
            **adam_moment_proxy(optimizer),
            "num_tokens": n_tokens,
            "time_rollout_s": t_rollout,
            "step_s": step_s,
            "tokens_per_s": n_tokens / step_s,
        },
    )


def _state(optimizer, scheduler, step: int, cfg: TrainConfig) -> dict:
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data_position": step * cfg.prompts_per_step,  # prompts consumed so far
    }


def _start(out: Path, resume, cfg, student, tokenizer, optimizer, scheduler, main: bool) -> int:
    """Fresh run: seed, save step0. Resume: restore optimizer, scheduler and RNG states and cut
    metrics.jsonl back to the checkpoint. Returns the number of steps already done. Only the
    ``main`` rank writes files."""
    metrics = out / "metrics.jsonl"
    if resume is None:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if main:
            metrics.unlink(missing_ok=True)
            state = _state(optimizer, scheduler, 0, cfg)
            ckpt.save_checkpoint(out, 0, student, tokenizer, state=state)
        return 0
    state = ckpt.load_state(resume)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    if main:
        rows = ckpt.metrics_rows(metrics, state["step"])  # steps 1..N exactly, or a clear error
        write_text(metrics, "".join(json.dumps(r) + "\n" for r in rows))  # drop the lost tail
        append_jsonl(out / "resumes.jsonl", {"from_step": state["step"], "time": time.time()})
    return state["step"]


def train(cfg: TrainConfig, out: str | Path, *, progress: bool = True, stop_after=None) -> dict:
    """Run (or resume) OPD into ``out``; return done.json. ``stop_after=k`` returns after step k
    without finishing, like a killed job (used by the resume test). The main process holds the
    run directory's lock (vopd.lock) throughout: a second trainer on it refuses, naming this one."""
    lock = run_lock(out, "vopd.train") if dist.from_env().is_main else contextlib.nullcontext()
    with lock:
        return _train(cfg, Path(out), progress=progress, stop_after=stop_after)


def read_done(out: str | Path) -> dict | None:
    """``out``'s done.json (the run finished), or None when there is none. An unreadable one
    raises ValueError: it is not overwritten silently."""
    path = Path(out) / "done.json"
    if not path.exists():
        return None
    try:
        done = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): delete it to rerun the run") from None
    if not isinstance(done, dict) or "steps" not in done:
        raise ValueError(f"{path} is not a run's done.json (no 'steps'): delete it to rerun")
    return done


def train_runs(runs, *, progress: bool = True, stop_after=None) -> list[dict]:
    """Train several ``(cfg, out)`` runs in this process, one after the other; return their
    done.json. Each starts from the global state this call found (torch CPU, numpy and Python
    RNG states, torch threads, grad mode), the state a fresh process would start it from, so each
    run's metrics and checkpoints equal those of its own ``train(cfg, out)`` in a new process.
    A finished run (done.json) is skipped, a killed one resumes. One process only (no torchrun)
    and the hf rollout backend only: a vLLM engine is not freed between runs. ``stop_after`` is
    passed to every run (the resume test)."""
    runs = [(cfg, Path(out)) for cfg, out in runs]
    outs = [out.resolve() for _, out in runs]
    if len(set(outs)) != len(outs):
        raise ValueError(f"the runs' directories are not distinct: {[str(o) for _, o in runs]}")
    if len(runs) > 1:
        if dist.from_env().enabled:
            raise ValueError("several runs in one process need one process, not torchrun")
        vllm = [str(out) for cfg, out in runs if cfg.rollout_backend == "vllm"]
        if vllm:
            raise ValueError(f"several runs in one process need rollout_backend=hf: {vllm}")
    for _, out in runs:
        read_done(out)  # an unreadable done.json fails before any run starts
    if len(runs) == 1:  # as before: nothing to restore (and no CUDA context made for it)
        return [train(runs[0][0], runs[0][1], progress=progress, stop_after=stop_after)]
    state = _process_state()
    done = []
    for cfg, out in runs:
        _restore_process_state(state)
        done.append(train(cfg, out, progress=progress, stop_after=stop_after))
    return done


def _process_state() -> tuple:
    """The global state a run reads before it seeds itself: the CPU RNG states (torch, numpy,
    Python), torch's thread count, grad mode. CUDA RNG states are not read: a fresh run seeds
    every device (``torch.manual_seed`` in ``_start``), a resumed one restores them."""
    return (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
    )


def _restore_process_state(state: tuple) -> None:
    torch_rng, numpy_rng, python_rng, threads, grad = state
    torch.set_rng_state(torch_rng)
    np.random.set_state(numpy_rng)
    random.setstate(python_rng)
    torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)


def _train(cfg: TrainConfig, out: Path, *, progress: bool, stop_after) -> dict:
    finished = read_done(out)
    if finished is not None:
        return finished
    prompts = load_prompts(cfg)
    total = num_steps(cfg, len(prompts))
    rank = dist.from_env()  # torchrun: one process per GPU (vopd.distributed)
    if cfg.prompts_per_step < rank.world_size:
        raise ValueError(
            f"prompts_per_step={cfg.prompts_per_step} < {rank.world_size} processes: every "
            "process needs at least one prompt per step"
        )
    device = dist.init(cfg.device)[1] if rank.enabled else pick_device(cfg)
    _check_run_dir(cfg, out)
    resume = ckpt.latest_resumable(out, metrics=out / "metrics.jsonl")  # metrics cover it
    resume = dist.broadcast_object(resume)  # rank 0's view, for everyone
    lora = cfg.finetune == "lora"  # a LoRA checkpoint is an adapter on cfg.student
    student, teacher, tokenizer, V = load_models(
        cfg, str(resume or cfg.student) if not lora else cfg.student, device,
        adapter=resume if lora else None,
    )  # fmt: skip
    if cfg.chat_template:
        prompts = [chat_prompt(tokenizer, p) for p in prompts]
    if rank.is_main:
        _init_run_dir(cfg, out)  # only now, after every check passed
    optimizer, scheduler = build_optimizer(cfg, student, total)
    backend = policy.make_backend(cfg, student, tokenizer, V)
    start = _start(out, resume, cfg, student, tokenizer, optimizer, scheduler, rank.is_main)
    t_run = time.perf_counter()
    bar = tqdm(
        range(start + 1, total + 1),
        initial=start,
        total=total,
        desc=f"opd {cfg.estimator}",
        disable=not progress or not rank.is_main,
        mininterval=1.0,
        file=sys.stderr,
    )
    for step in bar:
        row = opd_step(
            cfg, step, student, teacher, tokenizer, backend, optimizer, scheduler, prompts, V
        )
        if rank.is_main:  # every rank ran the step; rank 0 alone writes
            append_jsonl(out / "metrics.jsonl", row)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", kl=f"{row['estimator/kl_mean']:.4f}")
            if step % cfg.save_every == 0 or step == total:
                state = _state(optimizer, scheduler, step, cfg)
                ckpt.save_checkpoint(out, step, student, tokenizer, state=state)
        if stop_after is not None and stop_after <= step < total:
            return {}
    bar.close()
    if not rank.is_main:
        dist.barrier()  # rank 0 writes done.json, then joins
        return json.loads((out / "done.json").read_text())
    rows = read_jsonl(out / "metrics.jsonl")
    done = {
        "steps": total,
        "estimator": cfg.estimator,
        "seed": cfg.seed,
        "checkpoints": sorted(ckpt.list_checkpoints(out)),
        "final": {
            k: rows[-1][results.metric_name(k)]
            for k in ("loss", "kl_mean", "reward_mean", "entropy")
        },
        "time_s_this_process": time.perf_counter() - t_run,
        "mean_step_s": float(np.mean([r["perf/step_s"] for r in rows])),
    }
    write_json(out / "done.json", done)  # last: its presence means the run finished
    dist.barrier()
    return done
