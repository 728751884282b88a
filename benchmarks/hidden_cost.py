"""Cost benchmark: the logits kernels against the memory-traffic floor, and the loss
from hidden states (``vopd.estimators.hidden.hidden_loss``) against the loss on materialised logits.

    python benchmarks/hidden_cost.py --issue --out-dir DIR # the measurement below, sized to
                                                           # finish in ~10 min on 2 idle cores
    python benchmarks/hidden_cost.py                       # everything, 5 repeats (longer)
    python benchmarks/hidden_cost.py --skip-hidden         # the logits kernels only (minutes)
    python benchmarks/hidden_cost.py --md docs/results/hidden_cost.md

``--issue`` is exactly this measurement: V = 151,936, H = 2048, fp32 CPU, 2 threads, all
estimators; section 1 at B·T = 512 with 3 repeats; sections 2 and 3 at B·T in {512, 2048, 8192}
with one timed step and no warm-up step (steps of seconds, dominated by the [B·T, H] x [H, V]
matmuls; freed buffers go back to the OS, so a warm-up would not make later steps cheaper);
the logits path only where it fits ``--max-gib`` (24). ``--out-dir`` writes
``hidden_cost.json`` (everything), ``rows.csv`` (every measured variant), ``scaling.csv`` and
``hidden_cost.md``. Its run time is set by the head matmuls (2·B·T·H·V FLOP each, three per
step on either path: ~1 TFLOP per step at B·T = 512, ~59 TFLOP over the run); at 100-150
GFLOP/s on 2 cores that is 7-10 minutes of matmuls plus a few of kernels and input set-up: an
estimate from the operation count, not a measurement (``--journal`` resumes a cut run).

Every variant runs in a fresh process (``vopd.profile.measure_isolated``: forked from a server
that imported torch once, glibc's mmap threshold pinned so peak RSS is the step's own), fp32 on
CPU (or ``--device cuda``), ``--threads`` torch threads (default 2), V = 151,936 (Qwen3):

1. **Kernels** at B·T = 512 on random [B, T, V] logits: the floor (read both logits tensors
   once, write one gradient-sized tensor once; ``floor`` allocates that tensor as every backward
   does, ``floor_prealloc`` writes an existing one), every estimator and the naive
   two-log-softmax reference. Targets: vopd <= 1.10x sample_opd; every estimator <= 4x the floor;
   none slower than the naive reference.
2. **Hidden vs logits** at B·T = 512, H = 2048: every estimator from [B, T, H] hidden states and
   [V, H] heads, on the logits path (h @ W.T materialised for both models, the estimator, backward
   into the hidden states) and on the hidden path (``hidden_loss``): time and peak memory above
   the weights and inputs.
3. **Scaling** of one estimator (``--scale-estimator``, vopd) at B·T in ``--sizes`` (512, 2048,
   8192): hidden/logits memory above the inputs (target <= 0.1x at 8192) and time (target <=
   1.3x). The logits path runs only where its predicted peak (inputs + 3 [B·T, V] float32
   tensors: 5 GB each at B·T = 8192) fits ``min(--max-gib, available memory) - --margin-gib``;
   elsewhere its numbers are extrapolated linearly in B·T from the largest two measured sizes,
   and the output (stdout, JSON ``skipped``, the scaling table) says so.

All ratios come from this one run (``--journal FILE`` resumes an interrupted one from the rows
it measured). On a shared machine, label the numbers as loaded-machine numbers. This is a
measurement, not a test: it never fails the build; read its verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from vopd.estimators import ESTIMATORS
from vopd.profile import FLOOR, FLOOR_PREALLOC, NAIVE, format_table, measure_isolated

QWEN3_VOCAB = 151_936
GIB = 2**30


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


_JOURNAL: str | None = None  # --journal: every measured row is appended here at once
_SKIPPED: list[dict] = []  # variants not measured (too large for the memory budget), and why


def _key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def _journal() -> dict[str, dict]:
    """Rows already measured by an earlier, interrupted run with the same --journal."""
    if not _JOURNAL or not os.path.exists(_JOURNAL):
        return {}
    with open(_JOURNAL) as f:
        return {e["spec"]: e["row"] for e in map(json.loads, f) if e["row"].get("status") == "ok"}


def _run(specs: list[dict], desc: str, timeout: float) -> list[dict]:
    done, rows = _journal(), []
    for spec in tqdm(specs, desc=desc, file=sys.stderr):
        row = done.get(_key(spec))
        if row is None:
            row = measure_isolated(spec, timeout=timeout)
            if _JOURNAL:
                with open(_JOURNAL, "a") as f:
                    f.write(json.dumps({"spec": _key(spec), "row": row}) + "\n")
        rows.append(row)
    for r in rows:
        if r.get("status", "ok") != "ok":
            print(f"FAILED {r}", file=sys.stderr)
    return rows


def _ok(rows):
    return [r for r in rows if r.get("status", "ok") == "ok"]


def _verdict(name: str, value: float, target: float) -> dict:
    ok = value <= target
    print(f"{name:<44} {value:7.3f}  target <= {target:<5} {'PASS' if ok else 'MISS'}")
    return {"name": name, "value": value, "target": target, "pass": ok}


def _budget_bytes(args) -> int:
    """Memory a variant may use: min(--max-gib, available now) minus --margin-gib."""
    return int(min(args.max_gib * GIB, _available_bytes()) - args.margin_gib * GIB)


def kernels(args) -> tuple[list[dict], list[dict]]:
    names = [FLOOR, FLOOR_PREALLOC, *args.estimators, NAIVE]
    common = {
        "vocab_size": args.vocab,
        "seq_len": args.kernel_tokens // 2,
        "batch": 2,
        "repeats": args.repeats,
        "threads": args.threads,
        "device": args.device,
    }
    rows = _run([{"estimator": n, **common} for n in names], "kernels", args.timeout)
    print("\n## 1. Logits kernels (loss + backward on random [B, T, V] logits)\n")
    print(format_table(rows))
    r = {row["estimator"]: row for row in _ok(rows)}
    print(
        f"\n{'estimator':<15}{'step_s':>9}{'x floor':>9}{'x prealloc':>11}{'x naive':>9}"
        f"{'x sample':>10}{'peak MiB':>10}{'above MiB':>11}"
    )
    ratio_keys = (FLOOR, FLOOR_PREALLOC, NAIVE, "sample_opd")
    for n in [FLOOR, FLOOR_PREALLOC, *args.estimators, NAIVE]:
        if n in r:
            t = r[n]["step_s"]
            ratios = (t / r[k]["step_s"] if k in r else float("nan") for k in ratio_keys)
            f0, f1, nv, sx = ratios
            print(
                f"{n:<15}{t:>9.4f}{f0:>9.2f}{f1:>11.2f}{nv:>9.2f}{sx:>10.2f}"
                f"{r[n]['peak_mem_bytes'] / 2**20:>10.0f}{_mib(r[n]):>11}"
            )
    verdicts = []
    if {"vopd", "sample_opd"} <= set(r):
        verdicts.append(
            _verdict(
                "vopd time / sample_opd", r["vopd"]["step_s"] / r["sample_opd"]["step_s"], 1.10
            )
        )
    worst = max(args.estimators, key=lambda n: r[n]["step_s"] if n in r else 0.0)
    if worst in r:
        for floor in (FLOOR, FLOOR_PREALLOC):
            verdicts.append(
                _verdict(
                    f"slowest ({worst}) / {floor}", r[worst]["step_s"] / r[floor]["step_s"], 4.0
                )
            )
        verdicts.append(
            _verdict(f"slowest ({worst}) / naive", r[worst]["step_s"] / r[NAIVE]["step_s"], 1.0)
        )
    return rows, verdicts


def hidden_vs_logits(args) -> tuple[list[dict], list[dict]]:
    common = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden_size,
        "repeats": 1,
        "threads": args.threads,
        "device": args.device,
        "head_grad": args.train_head,
        "warmup": not args.no_warmup_hidden,
    }
    N = args.sizes[0]
    specs = [
        {"estimator": n, "seq_len": N, "batch": 1, "path": p, **common}
        for n in args.estimators
        for p in ("logits", "hidden")
    ]
    rows = _run(specs, f"hidden vs logits, B·T={N}", args.timeout)
    print(
        f"\n## 2. Hidden vs logits path, B·T = {N}, H = {args.hidden_size} "
        f"(head {'trains' if args.train_head else 'frozen'})\n"
    )
    print(format_table(rows))
    by = {(r["estimator"], r["path"]): r for r in _ok(rows)}
    print(
        f"\n{'estimator':<15}{'logits s':>10}{'hidden s':>10}{'time x':>8}"
        f"{'logits MiB':>12}{'hidden MiB':>12}{'mem x':>8}"
    )
    for n in args.estimators:
        lo, hi = by.get((n, "logits")), by.get((n, "hidden"))
        if lo and hi:
            tx = hi["step_s"] / lo["step_s"]
            mx = hi["above_inputs_bytes"] / lo["above_inputs_bytes"]
            print(
                f"{n:<15}{lo['step_s']:>10.3f}{hi['step_s']:>10.3f}{tx:>8.2f}"
                f"{_mib(lo):>12}{_mib(hi):>12}{mx:>8.3f}"
            )
    verdicts = []
    for path in ("logits", "hidden"):
        vopd, sample = by.get(("vopd", path)), by.get(("sample_opd", path))
        if vopd and sample:
            verdicts.append(
                _verdict(
                    f"vopd time / sample_opd, {path} path", vopd["step_s"] / sample["step_s"], 1.10
                )
            )
    return rows, verdicts


def scaling(args, first: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    name = args.scale_estimator
    common = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden_size,
        "repeats": 1,
        "threads": args.threads,
        "device": args.device,
        "head_grad": args.train_head,
        "warmup": not args.no_warmup_hidden,
    }
    have = {(r["seq_len"], r["path"]): r for r in _ok(first) if r["estimator"] == name}
    rows, table = list(have.values()), []
    for N in args.sizes:
        for path in ("hidden", "logits"):
            if (N, path) in have:
                continue
            if path == "logits" and args.device == "cpu":
                # inputs (two [V, H] heads, with room for a head gradient) + 3 [B·T, V] tensors
                need = (3 * N * args.vocab + 4 * args.vocab * args.hidden_size) * 4
                budget = _budget_bytes(args)
                if need > budget:
                    why = (
                        f"logits path at B·T={N} not measured: its predicted peak ~"
                        f"{need / GIB:.1f} GiB exceeds the budget {budget / GIB:.1f} GiB "
                        f"(min(--max-gib {args.max_gib:g}, {_available_bytes() / GIB:.1f} GiB "
                        f"available) - --margin-gib {args.margin_gib:g}): extrapolated"
                    )
                    print(why)
                    _SKIPPED.append({"estimator": name, "seq_len": N, "path": path, "why": why})
                    continue
            spec = {"estimator": name, "seq_len": N, "batch": 1, "path": path, **common}
            rows += _run([spec], f"scaling {path} B·T={N}", args.timeout)
    by = {(r["seq_len"], r["path"]): r for r in _ok(rows) if r["estimator"] == name}
    measured = sorted(N for (N, p) in by if p == "logits")
    print(f"\n## 3. Scaling of {name}, V = {args.vocab}, H = {args.hidden_size}\n")
    print(
        f"{'B·T':>6}{'logits s':>10}{'hidden s':>10}{'time x':>8}{'logits MiB':>12}"
        f"{'hidden MiB':>12}{'mem x':>8}  logits path"
    )
    verdicts = []
    for N in args.sizes:
        hi, lo, how = by.get((N, "hidden")), by.get((N, "logits")), "measured"
        if hi is None:
            continue
        if lo is None and len(measured) >= 2:  # linear in B·T through the largest two
            a, b = measured[-2], measured[-1]
            lo = {
                k: by[(a, "logits")][k]
                + (by[(b, "logits")][k] - by[(a, "logits")][k]) * (N - a) / (b - a)
                for k in ("step_s", "above_inputs_bytes")
            }
            how = f"extrapolated from B·T = {a}, {b}"
        if lo is None:
            continue
        tx, mx = hi["step_s"] / lo["step_s"], hi["above_inputs_bytes"] / lo["above_inputs_bytes"]
        print(
            f"{N:>6}{lo['step_s']:>10.2f}{hi['step_s']:>10.2f}{tx:>8.2f}"
            f"{_mib(lo):>12}{_mib(hi):>12}{mx:>8.3f}  {how}"
        )
        table.append(
            {
                "tokens": N,
                "logits_s": lo["step_s"],
                "hidden_s": hi["step_s"],
                "time_x": tx,
                "logits_above_inputs_bytes": lo["above_inputs_bytes"],
                "hidden_above_inputs_bytes": hi["above_inputs_bytes"],
                "mem_x": mx,
                "logits_path": how,
            }
        )
    if table:
        last = table[-1]
        print()
        verdicts.append(
            _verdict(f"hidden/logits memory at B·T={last['tokens']}", last["mem_x"], 0.1)
        )
        verdicts.append(
            _verdict(f"hidden/logits time at B·T={last['tokens']}", last["time_x"], 1.3)
        )
    return rows, table, verdicts


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _mib(row) -> str:
    return f"{row['above_inputs_bytes'] / 2**20:.0f}"


def markdown(kernel_rows, hidden_rows, table, args) -> str:
    """The measured tables as Markdown (for docs/)."""
    out = []
    r = {row["estimator"]: row for row in _ok(kernel_rows)}
    if r:
        out += [
            f"Logits kernels, V = {args.vocab}, B·T = {args.kernel_tokens}, fp32, "
            f"{args.threads} threads (loss + backward; ratios from this run):",
            "",
            _md_row(
                [
                    "estimator",
                    "time (s)",
                    "x floor",
                    "x floor (prealloc)",
                    "x naive",
                    "x sample_opd",
                    "peak above inputs (MiB)",
                ]
            ),
            _md_row(["---"] * 7),
        ]
        for n in [FLOOR, FLOOR_PREALLOC, *args.estimators, NAIVE]:
            if n not in r:
                continue
            t = r[n]["step_s"]
            ref = r.get("sample_opd", r[n])["step_s"]
            ratios = (t / r[k]["step_s"] for k in (FLOOR, FLOOR_PREALLOC, NAIVE))
            out.append(
                _md_row(
                    [n, f"{t:.3f}", *(f"{x:.2f}" for x in ratios), f"{t / ref:.2f}", _mib(r[n])]
                )
            )
        out.append("")
    N = args.sizes[0]
    by = {(x["estimator"], x["path"]): x for x in _ok(hidden_rows) if x["seq_len"] == N}
    if by:
        out += [
            f"Hidden-state path vs logits path, B·T = {N}, H = {args.hidden_size}, "
            f"head {'trained' if args.train_head else 'frozen'}:",
            "",
            _md_row(
                [
                    "estimator",
                    "logits (s)",
                    "hidden (s)",
                    "time x",
                    "logits above inputs (MiB)",
                    "hidden above inputs (MiB)",
                    "memory x",
                ]
            ),
            _md_row(["---"] * 7),
        ]
        for n in args.estimators:
            lo, hi = by.get((n, "logits")), by.get((n, "hidden"))
            if lo and hi:
                mx = hi["above_inputs_bytes"] / lo["above_inputs_bytes"]
                out.append(
                    _md_row(
                        [
                            n,
                            f"{lo['step_s']:.2f}",
                            f"{hi['step_s']:.2f}",
                            f"{hi['step_s'] / lo['step_s']:.2f}",
                            _mib(lo),
                            _mib(hi),
                            f"{mx:.3f}",
                        ]
                    )
                )
        out.append("")
    if table:
        out += [
            f"Scaling of {args.scale_estimator}, H = {args.hidden_size}:",
            "",
            _md_row(
                [
                    "B·T",
                    "logits (s)",
                    "hidden (s)",
                    "time x",
                    "logits above inputs (MiB)",
                    "hidden above inputs (MiB)",
                    "memory x",
                    "logits path",
                ]
            ),
            _md_row(["---"] * 8),
        ]
        for t in table:
            out.append(
                _md_row(
                    [
                        t["tokens"],
                        f"{t['logits_s']:.2f}",
                        f"{t['hidden_s']:.2f}",
                        f"{t['time_x']:.2f}",
                        f"{t['logits_above_inputs_bytes'] / 2**20:.0f}",
                        f"{t['hidden_above_inputs_bytes'] / 2**20:.0f}",
                        f"{t['mem_x']:.3f}",
                        t["logits_path"],
                    ]
                )
            )
    if _SKIPPED:
        out += ["", "Not measured (extrapolated where two smaller sizes were measured):", ""]
        out += [f"- {skip['why']}" for skip in _SKIPPED]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    ap.add_argument("--hidden-size", type=int, default=2048)
    ap.add_argument("--kernel-tokens", type=int, default=512, help="B·T of section 1")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192], help="B·T")
    ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    ap.add_argument("--scale-estimator", default="vopd")
    ap.add_argument("--repeats", type=int, default=5, help="timings per kernel variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-head", action="store_true", help="the student's head gets grad")
    ap.add_argument("--margin-gib", type=float, default=4.0, help="memory left to others")
    ap.add_argument(
        "--max-gib",
        type=float,
        default=24.0,
        help="memory the benchmark may use (the logits path runs only where it fits)",
    )
    ap.add_argument(
        "--no-warmup-hidden",
        action="store_true",
        help="sections 2 and 3: time the first step, no warm-up step (seconds-long steps)",
    )
    ap.add_argument(
        "--issue",
        action="store_true",
        help="the issue's measurement (see the docstring): overrides vocab, hidden size, sizes, "
        "estimators, repeats, threads, device, head, memory cap and warm-up",
    )
    ap.add_argument("--out-dir", help="write hidden_cost.json, rows.csv, scaling.csv, .md here")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per variant")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-hidden", action="store_true")
    ap.add_argument("--md", help="also write the tables as Markdown here")
    ap.add_argument(
        "--journal",
        help="JSON-lines file: each row is appended as measured, and a rerun with the same file "
        "reuses the rows it holds (a long run on a shared machine can be resumed)",
    )
    args = ap.parse_args()
    if args.issue:
        args.vocab, args.hidden_size, args.kernel_tokens = QWEN3_VOCAB, 2048, 512
        args.sizes, args.estimators, args.scale_estimator = [512, 2048, 8192], [*ESTIMATORS], "vopd"
        args.repeats, args.threads, args.device, args.train_head = 3, 2, "cpu", False
        args.max_gib, args.no_warmup_hidden = 24.0, True
        args.skip_kernels = args.skip_hidden = False
    global _JOURNAL
    _JOURNAL = args.journal
    unknown = [n for n in [*args.estimators, args.scale_estimator] if n not in ESTIMATORS]
    if unknown:
        raise SystemExit(f"unknown estimator(s) {unknown}: expected names from {list(ESTIMATORS)}")
    verdicts, kernel_rows, hidden_rows, table = [], [], [], []
    if not args.skip_kernels:
        kernel_rows, v = kernels(args)
        verdicts += v
    if not args.skip_hidden:
        hidden_rows, v = hidden_vs_logits(args)
        verdicts += v
        scale_rows, table, v = scaling(args, hidden_rows)
        hidden_rows += [r for r in scale_rows if r not in hidden_rows]
        verdicts += v
    if _SKIPPED:
        print("\nNot measured (extrapolated where two smaller sizes were measured):")
        for skip in _SKIPPED:
            print(f"  {skip['why']}")
    md = markdown(kernel_rows, hidden_rows, table, args)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    result = {
        "benchmark": "hidden_cost",
        "args": vars(args),
        "verdicts": verdicts,
        "scaling": table,
        "skipped": _SKIPPED,
        "rows": kernel_rows + hidden_rows,
    }
    if args.out_dir:
        _write_outputs(args.out_dir, result, md)
    print(json.dumps(result))


def _write_outputs(out_dir: str, result: dict, md: str) -> None:
    """hidden_cost.json (everything), rows.csv (one line per variant), scaling.csv, .md."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "hidden_cost.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "hidden_cost.md"), "w") as f:
        f.write(md)
    for name, rows in (("rows.csv", result["rows"]), ("scaling.csv", result["scaling"])):
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(os.path.join(out_dir, name), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
