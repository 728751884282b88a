"""``python -m vopd.experiments copy-run SRC DST``: copy a run whose resolved trainer config an
earlier experiment already trained (:func:`vopd.experiments.copy_run`)."""

from __future__ import annotations

import argparse
import json
import sys

from vopd.experiments import copy_run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vopd.experiments",
        description="Copy a run that an earlier experiment trained",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("copy-run", help="copy a run with the same resolved config (copy_run)")
    c.add_argument("src", help="the complete run directory that trained it")
    c.add_argument("dst", help="the run directory of the reusing experiment")
    args = parser.parse_args(argv)
    try:
        out = copy_run(args.src, args.dst)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps({"source": args.src, "run_dir": str(out)}), file=sys.stdout)


if __name__ == "__main__":
    main()
