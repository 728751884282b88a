"""``python -m vopd.data prepare --benchmark NAME [--path FILE ...] --out OUT``: a benchmark
from its hub id or local files, in the benchmark Parquet schema (the library: :mod:`vopd.data`)."""

from __future__ import annotations

import argparse
import json
import sys

from vopd.data import (
    REGISTRY,
    TOY_BENCHMARKS,
    _known,
    canonical_name,
    prepare,
    write_benchmark,
)


def _parse_fields(items: list[str]) -> dict:
    fields = {}
    for item in items:
        key, sep, col = item.partition("=")
        if not sep or not key or not col:
            raise SystemExit(f"--field {item!r}: expected KEY=COLUMN, e.g. problem=question")
        fields[key.strip()] = col.strip()
    return fields


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vopd.data", description="Prepare a benchmark file")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="normalise one benchmark to Parquet")
    p.add_argument("--benchmark", required=True, help=f"one of {_known()}")
    p.add_argument(
        "--path",
        nargs="+",
        help="local .jsonl/.json/.parquet/.csv file(s) or a directory of them, instead of the hub",
    )
    p.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN")
    p.add_argument("--hub-id", help="override the hub dataset id")
    p.add_argument("--split")
    p.add_argument("--config", help="hub dataset config (subset) name")
    p.add_argument("--limit", type=int)
    p.add_argument("--out", required=True, help="output .parquet")
    sub.add_parser("list", help="list the registered benchmarks")
    args = ap.parse_args(argv)

    if args.cmd == "list":
        for s in REGISTRY.values():
            print(
                f"{s.name:14s} {s.kind:5s} {s.hub_id} [{s.split}]" + (" (gated)" if s.gated else "")
            )
        for t, kind in TOY_BENCHMARKS.items():
            where = f"resources/toy/benchmarks/{t}.parquet"
            print(f"{t:14s} {kind:5s} {where} (python -m vopd.toy world)")
        return
    try:
        rows = prepare(
            args.benchmark,
            path=args.path,
            fields=_parse_fields(args.field),
            hub_id=args.hub_id,
            split=args.split,
            config=args.config,
            limit=args.limit,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        write_benchmark(rows, args.out)
    except OSError as e:  # e.g. a read-only output directory
        raise SystemExit(f"error: cannot write {args.out}: {e}") from None
    kinds = sorted({r["kind"] for r in rows})
    print(f"{'benchmark':12s} {'rows':>6s}  kind  out", file=sys.stderr)
    print(f"{args.benchmark:12s} {len(rows):6d}  {','.join(kinds):4s}  {args.out}", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": canonical_name(args.benchmark),
                "rows": len(rows),
                "kind": kinds,
                "out": str(args.out),
                "source": rows[0]["source"],
            }
        )
    )


if __name__ == "__main__":
    main()
