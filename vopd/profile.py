"""Cost profiler: time and peak memory of each estimator's loss + backward.

    python -m vopd.profile --out results/toy/profile/profile.parquet \
        --vocab 27,32000,151936 --seq-len 256,1024 --batch 2 --estimators all --naive

Each (estimator, V, T, B) variant runs in a fresh Python process, so one variant's allocator
state cannot leak into the next. On CPU the peak is the process's peak RSS (``ru_maxrss``) with
glibc's dynamic mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so freed buffers go back to
the OS; on CUDA it is ``torch.cuda.max_memory_allocated`` after a synchronize. ``above_inputs``
subtracts what the process held once the logits existed: it is what the estimator itself costs.

``naive_vopd`` is the reference the official code resembles (opd_trainer.py:127-138): two full
[B,T,V] log-softmax tensors held by autograd. Time is the best of ``--repeats`` loss + backward
passes after one warm-up pass. Prints a table and one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

NAIVE = "naive_vopd"


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
    adv = (logq_y - logp_y + kl_BT).detach()
    return -(m * adv * logp_y).sum() / m.sum(), {}


# ---------------------------------------------------------------------------------------------
# One variant, in this process.


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
) -> dict:
    """Time (best of ``repeats``) and peak memory of one loss + backward, in this process."""
    import torch

    from vopd.estimators import ESTIMATOR_OPTIONS, ESTIMATORS

    fn = naive_vopd if estimator == NAIVE else ESTIMATORS[estimator]
    opts = (
        {"top_k": min(top_k, vocab_size)} if "top_k" in ESTIMATOR_OPTIONS.get(estimator, ()) else {}
    )
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    student = torch.randn(batch, seq_len, vocab_size, dtype=dt, device=dev, requires_grad=True)
    teacher = torch.randn(batch, seq_len, vocab_size, dtype=dt, device=dev)
    tokens = torch.randint(0, vocab_size, (batch, seq_len), device=dev)
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=dev)
    inputs = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss, _ = fn(student, teacher, tokens, mask, **opts)
        loss.backward()
        student.grad = None
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up: allocator and kernel caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "estimator": estimator,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "batch": batch,
        "dtype": dtype,
        "step_s": min(times),
        "step_s_median": sorted(times)[len(times) // 2],
        "peak_mem_bytes": int(peak),
        "input_bytes": int(inputs - base),
        "above_inputs_bytes": int(peak - inputs),
        "device": device,
        "threads": torch.get_num_threads(),
        "top_k": opts.get("top_k"),
    }


# ---------------------------------------------------------------------------------------------
# Many variants, each in a fresh process.


def measure_isolated(spec: dict, timeout: float = 1800) -> dict:
    """Run ``measure_one(**spec)`` in a fresh interpreter and return its result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, "-m", "vopd.profile", "--one", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"profiling {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], ref: str = "sample_opd") -> str:
    """A fixed-width table with ratios to ``ref`` at the same (V, T, B)."""
    by_key = {(r["vocab_size"], r["seq_len"], r["batch"], r["estimator"]): r for r in rows}
    head = (
        f"{'estimator':<13}{'V':>8}{'T':>6}{'B':>4}{'step_s':>9}{'x ref':>7}"
        f"{'peak_MiB':>10}{'x ref':>7}{'above_in_MiB':>14}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        base = by_key.get((r["vocab_size"], r["seq_len"], r["batch"], ref))
        rt = r["step_s"] / base["step_s"] if base else float("nan")
        rm = r["peak_mem_bytes"] / base["peak_mem_bytes"] if base else float("nan")
        lines.append(
            f"{r['estimator']:<13}{r['vocab_size']:>8}{r['seq_len']:>6}{r['batch']:>4}"
            f"{r['step_s']:>9.3f}{rt:>7.2f}{r['peak_mem_bytes'] / 2**20:>10.0f}{rm:>7.2f}"
            f"{r['above_inputs_bytes'] / 2**20:>14.0f}"
        )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    from vopd.estimators import ESTIMATORS

    ap = argparse.ArgumentParser(prog="python -m vopd.profile", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="Parquet file for the results")
    ap.add_argument("--vocab", default="27,32000,151936")
    ap.add_argument("--seq-len", default="256,1024")
    ap.add_argument("--batch", default="2")
    ap.add_argument("--estimators", default="all", help="comma list, or 'all'")
    ap.add_argument("--naive", action="store_true", help="also profile the naive reference")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one variant, in this process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(**json.loads(args.one))))
        return
    names = list(ESTIMATORS) if args.estimators == "all" else args.estimators.split(",")
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown:
        raise SystemExit(f"unknown estimator(s) {unknown}: expected names from {list(ESTIMATORS)}")
    names += [NAIVE] if args.naive else []
    specs = [
        {
            "estimator": n,
            "vocab_size": v,
            "seq_len": t,
            "batch": b,
            "dtype": args.dtype,
            "device": args.device,
            "top_k": args.top_k,
            "repeats": args.repeats,
        }
        for v in _ints(args.vocab)
        for t in _ints(args.seq_len)
        for b in _ints(args.batch)
        for n in names
    ]
    from tqdm import tqdm

    rows = []
    for spec in tqdm(specs, desc="profile", file=sys.stderr):
        rows.append(measure_isolated(spec))
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
