"""Cost profiler: time and peak memory per estimator, for the loss alone or a full training step.

    python -m vopd.profile --out results/toy/profile/profile.parquet          # modest default sweep
    python -m vopd.profile --mode loss --vocab 31,32000,151936 --seq-len 256,1024,4096 \
        --batch 1 --naive --out results/toy/profile/loss_full.parquet        # the full loss sweep
    python -m vopd.profile --mode train_step --model-config toy --vocab 31,32000,151936 \
        --seq-len 32 --batch 16 --out results/toy/profile/train_step.parquet

Modes:

- ``loss``: one loss + backward on random [B, T, V] logits (no model): the estimator's own cost.
  ``naive_vopd`` (``--naive``) is the reference the official code resembles
  (opd_trainer.py:127-138): two full [B, T, V] log-softmax tensors held by autograd.
- ``hidden``: ``loss`` from random [B, T, H] hidden states and [V, H] heads (``--hidden-size``,
  default the toy model's 128), on both paths (``--path``, default ``logits hidden``): the
  logits h @ W.T of both models materialised and the estimator run on them, and
  ``vopd.estimators.hidden.hidden_loss`` (the trainer's ``loss_from_hidden``), which never holds
  [B, T, V] logits. Rows carry ``mode`` hidden, ``path`` and ``hidden_size``; the report's cost
  table compares the two paths (``vopd.report.cost_summary``).
- ``train_step``: one optimizer step of the OPD loop with the rollout excluded (it is the same for
  every estimator): student forward with grad, teacher forward without, loss, backward, grad-norm
  clip (1.0, the HF default the official run uses) and AdamW step, each segment timed. The models
  are the toy architecture (vopd/toy/sft.py: Llama, hidden 128, 3 layers, 4 heads, MLP 256, tied
  embeddings) or the architecture of ``--model-config DIR`` (e.g. a saved toy model or a hub
  model's ``config.json``), randomly initialised, with the swept vocabulary size: cost does not
  depend on the weights. Prompt + completion are random ids, T completion tokens after a
  ``--prompt-len`` prompt, in the trainer's teacher-forcing layout (``vopd.batch``: logits only at
  the T completion positions, contiguous). Forward calls of each model are counted with hooks
  (claim C5: no estimator needs an extra model call).

Each variant runs in a fresh process (forked from a server that imported torch once), so one
variant's allocator state cannot leak into the next, and a variant that fails (e.g. out of memory)
is recorded with ``status`` and the sweep goes on. On CPU the peak is the process's peak RSS
(``VmHWM``, reset once the inputs exist, so it is the peak during the steps; interpreter and torch
included: ``base_bytes`` is the RSS before the inputs existed) with glibc's mmap threshold pinned
(``MALLOC_MMAP_THRESHOLD_``) so freed buffers return to the OS; on CUDA it is
``torch.cuda.max_memory_allocated`` after a synchronize. ``above_inputs_bytes`` subtracts what the
process held once the inputs (and models) existed: what the step itself costs. Time: after one
warm-up step, the best of ``--repeats`` timings, each the mean of enough back-to-back steps to
last >= 50 ms (tiny variants are otherwise timer noise). Prints a table and one final JSON line;
``--out`` writes Parquet with ``estimator, vocab_size, seq_len, batch, step_s, peak_mem_bytes,
device`` (the results contract (README)) and the extras above.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

NAIVE = "naive_vopd"
# The memory-traffic floor of a loss + backward on [B, T, V] logits: one read of both logits
# tensors and one write of a gradient-sized tensor, freshly allocated (as every estimator's
# backward allocates its gradient; page faults included) or written into an existing buffer.
FLOOR, FLOOR_PREALLOC = "floor", "floor_prealloc"
MODES = ("loss", "hidden", "train_step")
# the loss on [B,T,V] logits, or from hidden states (vopd.estimators.hidden)
PATHS = ("logits", "hidden")
TOY_VOCAB = 31  # vopd.toy tokenizer: 27 characters + <pad> <bos> <eos> <unk>
# The toy Llama that learns 3-term sums on 2 CPU cores (vopd/toy/sft.py).
TOY_ARCH = {
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 256,
    "tie_word_embeddings": True,
}
DEFAULTS = {  # modest sweeps that finish in minutes on 2 CPU cores (see the module docstring)
    "loss": {"vocab": f"{TOY_VOCAB},32000,151936", "seq_len": "256", "batch": "2"},
    "hidden": {"vocab": f"{TOY_VOCAB},32000", "seq_len": "256", "batch": "2"},
    "train_step": {"vocab": f"{TOY_VOCAB},32000,151936", "seq_len": "32", "batch": "16"},
}
_MIN_TIMING_S = 0.05


# ---------------------------------------------------------------------------------------------
# The naive reference: what a direct implementation holds.


def naive_vopd(student_BTV, teacher_BTV, tokens_BT, mask_BT, **_):
    """vOPD written directly: log_softmax of both models over the full vocabulary, as the
    official code does; the gradient equals ``vopd``'s, the memory does not."""
    import torch

    logp_BTV = torch.log_softmax(student_BTV.float(), -1)
    logq_BTV = torch.log_softmax(teacher_BTV.float(), -1)
    kl_BT = (logp_BTV.exp() * (logp_BTV - logq_BTV)).sum(-1)
    logp_y = logp_BTV.gather(-1, tokens_BT[..., None])[..., 0]
    logq_y = logq_BTV.gather(-1, tokens_BT[..., None])[..., 0]
    m = mask_BT.float()
    adv = (logq_y - logp_y + kl_BT).detach()  # sg[r + KL]
    return -(m * adv * logp_y).sum() / m.sum(), {}


def _estimator(name: str, vocab_size: int, top_k: int):
    from vopd.estimators import ESTIMATOR_OPTIONS, ESTIMATORS

    fn = naive_vopd if name == NAIVE else ESTIMATORS[name]
    opts = {"top_k": min(top_k, vocab_size)} if "top_k" in ESTIMATOR_OPTIONS.get(name, ()) else {}
    return fn, opts


# ---------------------------------------------------------------------------------------------
# Memory and time, in this process.


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak RSS of this process image (``VmHWM``). Not ``ru_maxrss``: after ``exec`` that one
    keeps the peak of the process that forked us (the kernel folds the old image's high-water
    mark into it), so a variant launched from a big parent (pytest, snakemake) would report the
    parent's memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def _reset_hwm() -> None:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: ``clear_refs`` 5); if the kernel
    refuses, the peak stays the image's lifetime peak (imports included)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Meter:
    """Current and peak memory of this process's device: RSS on CPU, the allocator on CUDA."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = torch.device(device).type == "cuda"

    def now(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else _rss_bytes()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            _reset_hwm()

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else _hwm_bytes()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def _best_time(step, meter: _Meter, repeats: int, warmup: bool = True) -> tuple[float, float, int]:
    """(best, median) seconds per step over ``repeats`` timings, each the mean of ``inner``
    back-to-back steps, ``inner`` chosen from the warm-up so one timing lasts >= 50 ms.
    ``warmup=False`` (steps of seconds, where one more step costs more than it teaches):
    the first step is the first timing, one step per timing."""
    if not warmup:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            meter.sync()
            times.append(time.perf_counter() - t0)
        return min(times), sorted(times)[len(times) // 2], 1
    t0 = time.perf_counter()
    step()  # warm-up: allocator and kernel caches
    meter.sync()
    first = time.perf_counter() - t0
    inner = max(1, min(1000, int(_MIN_TIMING_S / max(first, 1e-6)) + 1))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            step()
        meter.sync()
        times.append((time.perf_counter() - t0) / inner)
    return min(times), sorted(times)[len(times) // 2], inner


def _device_name(device: str) -> str:
    import platform

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Mode "loss": the estimator alone.


def measure_one(
    estimator: str,
    vocab_size: int,
    seq_len: int,
    batch: int,
    *,
    dtype="float32",
    device="cpu",
    top_k=100,
    repeats=3,
    seed=0,
    threads=None,
    path="logits",
    hidden_size=None,
    head_grad=False,
    warmup=True,
) -> dict:
    """Time and peak memory of one loss + backward, in this process: on random [B, T, V] logits
    (``hidden_size`` None), or with ``hidden_size`` H on random [B, T, H] hidden states and
    [V, H] heads, by ``path``: ``logits`` materialises h @ W.T for both models (the student's
    with grad) and runs the estimator; ``hidden`` runs ``vopd.estimators.hidden.hidden_loss``.
    Gradients reach the student's hidden states, and its head when ``head_grad``. ``warmup``
    False: no warm-up step (``_best_time``; the row's ``warmup`` says which)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if path not in PATHS:
        raise ValueError(f"path={path!r}: expected one of {PATHS}")
    if path == "hidden" and not hidden_size:
        raise ValueError("path='hidden' needs hidden_size")
    if estimator in (FLOOR, FLOOR_PREALLOC) and hidden_size:
        raise ValueError(f"{estimator!r} is measured on logits: drop hidden_size")
    dev, meter = torch.device(device), _Meter(device)
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    base = meter.now()
    tokens = torch.randint(0, vocab_size, (batch, seq_len), device=dev)
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=dev)
    if hidden_size:
        step = _hidden_step(estimator, vocab_size, batch, seq_len, hidden_size, dt, dev, top_k,
                            path, head_grad, tokens, mask)  # fmt: skip
    else:
        step = _logits_step(estimator, vocab_size, batch, seq_len, dt, dev, top_k, tokens, mask)
    inputs = meter.now()
    meter.reset_peak()
    best, median, inner = _best_time(step, meter, repeats, warmup)
    peak = meter.peak()
    return {
        "mode": "loss",
        "estimator": estimator,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "batch": batch,
        "dtype": dtype,
        "path": path,
        "hidden_size": hidden_size or 0,
        "head_grad": bool(head_grad and hidden_size),
        "step_s": best,
        "step_s_median": median,
        "inner_steps": inner,
        "warmup": bool(warmup),
        "peak_mem_bytes": int(peak),
        "base_bytes": int(base),
        "input_bytes": int(inputs - base),
        "above_inputs_bytes": int(peak - inputs),
        "device": dev.type,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "top_k": _estimator(estimator, vocab_size, top_k)[1].get("top_k")
        if estimator not in (FLOOR, FLOOR_PREALLOC)
        else None,
        "status": "ok",
    }


def _logits_step(estimator, V, B, T, dt, dev, top_k, tokens, mask):
    import torch

    student = torch.randn(B, T, V, dtype=dt, device=dev, requires_grad=True)
    teacher = torch.randn(B, T, V, dtype=dt, device=dev)
    if estimator in (FLOOR, FLOOR_PREALLOC):
        grad = torch.empty_like(student) if estimator == FLOOR_PREALLOC else None

        def floor():  # read both tensors once, write one gradient-sized tensor once
            student.detach().sum()
            teacher.sum()
            (torch.empty_like(student) if grad is None else grad).fill_(1.0)

        return floor
    fn, opts = _estimator(estimator, V, top_k)

    def step():
        loss, _ = fn(student, teacher, tokens, mask, **opts)
        loss.backward()
        student.grad = None

    return step


def _hidden_step(estimator, V, B, T, H, dt, dev, top_k, path, head_grad, tokens, mask):
    import torch

    from vopd.estimators.hidden import hidden_loss

    fn, opts = _estimator(estimator, V, top_k)
    scale = H**-0.5  # logits ~ N(0, 1), as the random-logits mode
    h_s = torch.randn(B, T, H, dtype=dt, device=dev, requires_grad=True)
    h_t = torch.randn(B, T, H, dtype=dt, device=dev)
    W_s = (scale * torch.randn(V, H, dtype=dt, device=dev)).requires_grad_(bool(head_grad))
    W_t = scale * torch.randn(V, H, dtype=dt, device=dev)

    def step():
        if path == "hidden":
            loss, _ = hidden_loss(estimator, h_s, W_s, h_t, W_t, tokens, mask, **opts)
        else:
            with torch.no_grad():
                teacher_BTV = h_t @ W_t.T
            loss, _ = fn(h_s @ W_s.T, teacher_BTV, tokens, mask, **opts)
            del teacher_BTV
        loss.backward()
        h_s.grad = W_s.grad = None

    return step


def _counter(calls: dict, role: str):
    def hook(*_):
        calls[role] += 1

    return hook


# ---------------------------------------------------------------------------------------------
# Mode "train_step": student forward + teacher forward + loss + backward + optimizer step.


def build_model(model_config: str, vocab_size: int, *, seed: int, dtype, device, max_len: int):
    """A randomly initialised causal LM: the toy architecture (``"toy"``) or the architecture of a
    local ``config.json`` directory, with ``vocab_size`` logit rows and dropout off."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if model_config == "toy":
        config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_len, **TOY_ARCH)
    else:
        config = AutoConfig.from_pretrained(model_config)
        config.vocab_size = vocab_size
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    return model


def measure_train_step(
    estimator: str,
    vocab_size: int,
    seq_len: int,
    batch: int,
    *,
    model_config="toy",
    prompt_len=12,
    dtype="float32",
    device="cpu",
    top_k=100,
    repeats=3,
    seed=0,
    threads=None,
    lr=1e-5,
    max_grad_norm=1.0,
    path="logits",
) -> dict:
    """Time (per segment) and peak memory of one OPD optimizer step without the rollout: the
    trainer's own pieces (``vopd.batch`` forwards, ``vopd.loss.estimator_loss``, backward,
    clip, AdamW), timed segment by segment (``vopd.loss.train_step`` runs them as one block);
    ``path="hidden"``: both forwards stop at the last hidden states and the loss comes from
    them and the heads (``vopd.estimators.hidden.hidden_loss``, as ``loss_from_hidden`` trains)."""
    import torch

    from vopd.batch import RolloutBatch, completion_hidden, completion_logits
    from vopd.loss import estimator_loss

    if path not in PATHS:
        raise ValueError(f"path={path!r}: expected one of {PATHS}")

    if threads:
        torch.set_num_threads(threads)
    _, opts = _estimator(estimator, vocab_size, top_k)
    dev, meter = torch.device(device), _Meter(device)
    dt = getattr(torch, dtype)
    base = meter.now()
    L = prompt_len + seq_len
    student = build_model(model_config, vocab_size, seed=seed, dtype=dt, device=dev, max_len=L)
    teacher = build_model(model_config, vocab_size, seed=seed + 1, dtype=dt, device=dev, max_len=L)
    student.train()
    teacher.eval().requires_grad_(False)
    # lr 1e-5, weight decay 0: official configs/training/default.yaml (cost does not depend on it)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    calls = {"student": 0, "teacher": 0}
    for role, model in (("student", student), ("teacher", teacher)):
        model.get_decoder().register_forward_hook(_counter(calls, role))  # either path
    gen = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(0, vocab_size, (batch, L), generator=gen)
    ones_BL = torch.ones(batch, L - 1, dtype=torch.long)
    # The trainer's teacher-forcing layout (vopd.batch): prompt + completion minus its last
    # token in, logits_to_keep=T out, so the [B, T, V] logits are contiguous as in training.
    rb = RolloutBatch(
        ids_BS[:, :-1].to(dev),
        ones_BL.to(dev),
        (ones_BL.cumsum(-1) - 1).to(dev),
        ids_BS[:, prompt_len:].to(dev),
        torch.ones(batch, seq_len, dtype=torch.long, device=dev),
    )
    inputs = meter.now()
    meter.reset_peak()
    seg = dict.fromkeys(("student_fwd_s", "teacher_fwd_s", "loss_s", "backward_s", "optim_s"), 0.0)

    def tick(key, t0):
        meter.sync()
        t1 = time.perf_counter()
        seg[key] += t1 - t0
        return t1

    def step():
        t = time.perf_counter()
        forward = completion_hidden if path == "hidden" else completion_logits
        s_out = forward(student, rb, vocab_size)
        t = tick("student_fwd_s", t)
        with torch.no_grad():
            q_out = forward(teacher, rb, vocab_size)
        t = tick("teacher_fwd_s", t)
        loss, _ = estimator_loss(
            estimator, opts, s_out, q_out, rb.tokens_BT, rb.mask_BT, from_hidden=path == "hidden"
        )
        t = tick("loss_s", t)
        loss.backward()
        t = tick("backward_s", t)
        torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tick("optim_s", t)

    step()  # warm-up outside the timing: the first AdamW step allocates its moments
    meter.sync()
    for k in seg:
        seg[k] = 0.0
    calls.update(student=0, teacher=0)
    best, median, inner = _best_time(step, meter, repeats)
    n_steps = 1 + inner * repeats  # _best_time's own warm-up + the timed steps
    peak = meter.peak()
    return {
        "mode": "train_step",
        "estimator": estimator,
        "path": path,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "batch": batch,
        "dtype": dtype,
        "step_s": best,
        "step_s_median": median,
        "inner_steps": inner,
        **{k: v / n_steps for k, v in seg.items()},  # mean per step of each segment
        "student_forwards_per_step": calls["student"] / n_steps,
        "teacher_forwards_per_step": calls["teacher"] / n_steps,
        "peak_mem_bytes": int(peak),
        "base_bytes": int(base),
        "input_bytes": int(inputs - base),  # models + optimizer-free inputs
        "above_inputs_bytes": int(peak - inputs),
        "device": dev.type,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "top_k": opts.get("top_k"),
        "model_config": model_config,
        "prompt_len": prompt_len,
        "params": sum(p.numel() for p in student.parameters()),
        "status": "ok",
    }


# ---------------------------------------------------------------------------------------------
# Many variants, each in a fresh process.
#
# Fresh processes are forked from one forkserver that imported torch once (about 1.7 s saved
# per variant on 2 CPU cores). The server starts with glibc's mmap threshold pinned in its
# environment (this process's environment is restored afterwards), so every child inherits it;
# it never touches CUDA, so a child may. A child's VmHWM starts at the server's RSS (torch
# imported, no tensors), exactly what ``base_bytes`` reports, and the server's own memory never
# grows, so no variant inherits another's heap.

_MMAP_THRESHOLD = ("MALLOC_MMAP_THRESHOLD_", "65536")  # freed buffers go back to the OS
_CONTEXT = None


def _forkserver():
    global _CONTEXT
    if _CONTEXT is None:
        import multiprocessing
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "vopd.estimators", "vopd.profile"])
        key, value = _MMAP_THRESHOLD
        before = os.environ.get(key)
        os.environ[key] = value
        try:
            forkserver.ensure_running()  # the server copies the environment now
        finally:
            if before is None:
                del os.environ[key]
            else:
                os.environ[key] = before
        _CONTEXT = ctx
    return _CONTEXT


def _run_variant(spec: dict, conn) -> None:
    """Child side: measure one variant and send its row (or the error) back."""
    try:
        spec = dict(spec)
        mode = spec.pop("mode", "loss")
        row = (measure_train_step if mode == "train_step" else measure_one)(**spec)
        conn.send(("ok", row | {"mode": mode}))
    except BaseException as e:  # every failure becomes a recorded row
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def measure_isolated(spec: dict, timeout: float = 1800) -> dict:
    """Run one variant (``spec["mode"]``, default ``loss``) in a fresh process. A failure
    (an exception, a killed child, a timeout) comes back as a row with ``status`` != "ok" and
    no numbers."""
    failed = {k: spec.get(k) for k in ("estimator", "vocab_size", "seq_len", "batch")}
    failed |= {"mode": spec.get("mode", "loss"), "device": spec.get("device", "cpu")}
    ctx = _forkserver()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_run_variant, args=(spec, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            child.kill()
            return failed | {"status": f"timeout after {timeout:.0f} s"}
        status, payload = receive.recv()
    except EOFError:  # the child died without a word: killed
        child.join()
        why = "killed (SIGKILL: out of memory?)" if child.exitcode == -9 else "died"
        return failed | {"status": f"failed: {why} (exit code {child.exitcode})"}
    finally:
        receive.close()
    child.join()
    if status != "ok":
        return failed | {"status": f"failed: {payload[-300:]}"}
    return payload


def format_table(rows: list[dict], ref: str = "sample_opd") -> str:
    """A fixed-width table with ratios to ``ref`` at the same (mode, V, T, B)."""

    def key(r, name):
        return (r.get("mode", "loss"), r["vocab_size"], r["seq_len"], r["batch"],
                r.get("path", "logits"), r.get("hidden_size", 0), name)  # fmt: skip

    ok = {key(r, r["estimator"]): r for r in rows if r.get("status", "ok") == "ok"}
    head = (
        f"{'mode':<11}{'estimator':<15}{'V':>8}{'T':>6}{'B':>4}{'step_s':>9}{'x ref':>7}"
        f"{'peak_MiB':>10}{'x ref':>7}{'above_in_MiB':>14}  {'path':<7}{'H':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = (
            f"{r.get('mode', 'loss'):<11}{r['estimator']:<15}{r['vocab_size']:>8}"
            f"{r['seq_len']:>6}{r['batch']:>4}"
        )
        tail = f"  {r.get('path', 'logits'):<7}{r.get('hidden_size') or '-':>5}"
        if r.get("status", "ok") != "ok":
            lines.append(f"{lead}  {r['status']}{tail}")
            continue
        base = ok.get(key(r, ref))
        rt = r["step_s"] / base["step_s"] if base else float("nan")
        rm = r["peak_mem_bytes"] / base["peak_mem_bytes"] if base else float("nan")
        lines.append(
            f"{lead}{r['step_s']:>9.4f}{rt:>7.2f}{r['peak_mem_bytes'] / 2**20:>10.0f}{rm:>7.2f}"
            f"{r['above_inputs_bytes'] / 2**20:>14.0f}{tail}"
        )
    return "\n".join(lines)


def _items(values: list[str] | str) -> list[str]:
    """``["27,32000", "151936"]`` (commas, spaces or both) -> ``["27", "32000", "151936"]``."""
    values = [values] if isinstance(values, str) else values
    return [x.strip() for v in values for x in str(v).split(",") if x.strip()]


def _ints(values: list[str] | str, what: str, lo: int) -> list[int]:
    try:
        out = [int(x) for x in _items(values)]
    except ValueError:
        raise SystemExit(f"{what}: expected integers, got {values!r}") from None
    if not out or any(v < lo for v in out):
        raise SystemExit(f"{what} {values!r}: expected integers >= {lo}")
    return out


def main(argv: list[str] | None = None) -> None:
    from vopd.estimators import ESTIMATORS

    ap = argparse.ArgumentParser(prog="python -m vopd.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="Parquet file for the results")
    ap.add_argument("--mode", default="loss", choices=MODES, help="what one step is (see above)")
    ap.add_argument("--vocab", nargs="+", help="vocabulary sizes (default: see DEFAULTS)")
    ap.add_argument("--seq-len", nargs="+", help="completion tokens T per sequence")
    ap.add_argument("--batch", nargs="+", help="sequences B")
    ap.add_argument("--estimators", nargs="+", default=["all"], help="names (or commas), or all")
    ap.add_argument("--naive", action="store_true", help="also profile the naive reference")
    ap.add_argument(
        "--floor", action="store_true", help="loss mode: also the memory-traffic floors"
    )
    ap.add_argument(
        "--path", nargs="+", help="logits, hidden, or both (default: logits; hidden mode: both)"
    )
    ap.add_argument(
        "--hidden-size",
        type=int,
        help="loss mode: inputs are [B,T,H] hidden states and [V,H] heads (for --path hidden)",
    )
    ap.add_argument("--train-head", action="store_true", help="loss mode: the head gets grad too")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument(
        "--top-k", type=int, default=100, help="k of the top-k estimators (capped at V)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timings per variant (best is kept)")
    ap.add_argument("--threads", type=int, help="torch threads per variant (default: torch's)")
    ap.add_argument("--model-config", default="toy", help="train_step: 'toy' or a config dir")
    ap.add_argument("--prompt-len", type=int, default=12, help="train_step: prompt tokens")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    args = ap.parse_args(argv)
    names = _items(args.estimators)
    names = list(ESTIMATORS) if names == ["all"] else list(dict.fromkeys(names))
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise SystemExit(f"unknown estimator(s) {unknown}: expected names from {list(ESTIMATORS)}")
    if args.device.startswith("cuda") and not _cuda():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if args.top_k < 1 or args.repeats < 1 or args.prompt_len < 1:
        raise SystemExit("--top-k, --repeats and --prompt-len: expected integers >= 1")
    if (
        args.mode == "train_step"
        and args.model_config != "toy"
        and not os.path.isfile(os.path.join(args.model_config, "config.json"))
    ):
        raise SystemExit(f"--model-config {args.model_config!r}: no config.json there")
    default_paths = ["logits", "hidden"] if args.mode == "hidden" else ["logits"]
    paths = list(dict.fromkeys(_items(args.path or default_paths)))
    if args.mode == "hidden":
        args.hidden_size = args.hidden_size or TOY_ARCH["hidden_size"]
    if any(p not in PATHS for p in paths):
        raise SystemExit(f"--path {args.path}: expected names from {list(PATHS)}")
    if args.mode == "loss" and "hidden" in paths and not args.hidden_size:
        raise SystemExit("--path hidden in loss mode needs --hidden-size (e.g. 2048)")
    d = DEFAULTS[args.mode]
    vocab = _ints(args.vocab or d["vocab"], "--vocab", 2)
    seq_len = _ints(args.seq_len or d["seq_len"], "--seq-len", 1)
    batch = _ints(args.batch or d["batch"], "--batch", 1)
    names += [NAIVE] if args.naive else []
    if args.mode in ("loss", "hidden") and args.hidden_size:
        common_h = {"hidden_size": args.hidden_size, "head_grad": args.train_head}
        names = [n for n in names if n != NAIVE]  # the naive reference takes logits
    else:
        common_h = {}
    floors = [FLOOR, FLOOR_PREALLOC] if args.floor and args.mode == "loss" else []
    common = {
        "mode": args.mode,
        "dtype": args.dtype,
        "device": args.device,
        "top_k": args.top_k,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    if args.mode == "train_step":
        common |= {"model_config": args.model_config, "prompt_len": args.prompt_len}
    specs = [
        {"estimator": n, "vocab_size": v, "seq_len": t, "batch": b, **common, **extra}
        for v in vocab
        for t in seq_len
        for b in batch
        for n, extra in [(f, {}) for f in floors]
        + [(n, {"path": p, **common_h}) for p in paths for n in names]
    ]
    from tqdm import tqdm

    rows = []
    bar = tqdm(specs, desc=f"profile {args.mode}", file=sys.stderr)
    for spec in bar:
        bar.set_postfix_str(f"{spec['estimator']} V={spec['vocab_size']} T={spec['seq_len']}")
        rows.append(measure_isolated(spec, timeout=args.timeout))
    print(format_table(rows))
    if args.out:
        import pandas as pd

        from vopd.io import write_parquet

        write_parquet(args.out, pd.DataFrame(rows))
    print(json.dumps({"profile": rows}))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
