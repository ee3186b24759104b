"""The ``rectdiff`` command: each subcommand parses its arguments, calls one library function
and prints. No logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_schedules(args: argparse.Namespace) -> int:
    from . import forms, plots

    out = Path(args.out)
    rows = forms.preset_table(tuple(args.t))
    lines = ["| preset | t | alpha | sigma | logsnr |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['preset']} | {r['t']:.4g} | {r['alpha']:.6g} | {r['sigma']:.6g} | {r['logsnr']:.4f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "schedules.md").write_text(table + "\n")
    written = plots.plot_schedules({n: forms.load(n) for n in forms.presets()}, out / "schedules")
    print("\nwrote " + ", ".join(str(p) for p in [out / "schedules.md", *written]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rectdiff",
        description="Diffusion forms, rectification and first-order trajectory diagnostics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schedules", help="table and plot of every schedule preset")
    p.add_argument("--out", default="out/schedules", help="output folder (default: %(default)s)")
    p.add_argument(
        "--t", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="times at which to tabulate (clipped to each form's safe range)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_schedules)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"rectdiff {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
