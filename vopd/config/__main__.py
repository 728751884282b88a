"""``python -m vopd.config resolve``: write a run config with every default spelled out."""

from __future__ import annotations

import argparse

from vopd.config import dump_config, load_config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vopd.config", description=__doc__.split("\n")[0].strip("`")
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resolve", help="write the fully resolved config (all defaults spelled out)")
    r.add_argument("--config", required=True, help="YAML config")
    r.add_argument("--out", help="where to write the resolved YAML (default: stdout)")
    r.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.out:
        from vopd.io import write_text

        write_text(args.out, dump_config(cfg))
    else:
        print(dump_config(cfg), end="")


if __name__ == "__main__":
    main()
