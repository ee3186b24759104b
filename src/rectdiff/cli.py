"""The ``rectdiff`` command: each subcommand parses its arguments, calls one library function
and prints. No logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _cmd_compare(args: argparse.Namespace) -> int:
    from .apps.compare.config import load_config
    from .apps.compare.report import summary_markdown
    from .apps.compare.run import run_compare

    config = load_config(args.config)
    if args.workers is not None:
        config.workers = args.workers
    results = run_compare(config, args.out, quick=args.quick, progress=not args.no_progress)
    print(summary_markdown(results))
    print(f"\nwrote {Path(args.out) / 'report.md'}, {Path(args.out) / 'results.json'} and "
          f"{len(results.get('figures', []))} figure files in {results['timing']['seconds']:.0f} s")  # fmt: skip
    return 0


def _cmd_pairs(args: argparse.Namespace) -> int:
    from .io.model_dir import generate_pairs_from_dir

    store = generate_pairs_from_dir(
        args.model, args.out, num_pairs=args.num, solver=args.solver, steps=args.steps,
        t_grid=args.t_grid, seed=args.seed, shard_size=args.shard_size,
        batch_size=args.batch_size, progress=not args.no_progress,
    )  # fmt: skip
    print(store)
    return 0


def _cmd_rectify(args: argparse.Namespace) -> int:
    from . import forms
    from .io.model_dir import rectify_from_dir
    from .training.trainer import TrainConfig

    options = {
        "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps, "lr_schedule": args.lr_schedule,
        "ema_decay": args.ema_decay, "seed": args.seed, "time_sampler": args.time_sampler,
        "weighting": args.weighting,
    }  # fmt: skip
    config = TrainConfig.from_dict({k: v for k, v in options.items() if v is not None})
    out = rectify_from_dir(
        args.model, args.pairs, args.out, config=config, distill=args.distill,
        form=None if args.form is None else forms.load(args.form), prediction=args.prediction,
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .apps.compare.report import diagnose_markdown
    from .apps.compare.run import diagnose_dirs

    records = diagnose_dirs(
        args.model, solver=args.solver, steps=args.steps, num=args.num, seed=args.seed,
        rtol=args.rtol, atol=args.atol, out=args.out,
    )  # fmt: skip
    print(diagnose_markdown(records))
    print(f"\nwrote {args.out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .apps.compare.run import plot_model_dirs, plot_results

    if args.results is not None:
        written = plot_results(args.results, args.out)
    else:
        written = plot_model_dirs(args.model, args.out, num=args.num, seed=args.seed)
    print("wrote " + ", ".join(str(p) for p in written if p.suffix == ".png"))
    return 0


def _add_compare_commands(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="train, rectify and evaluate a grid of forms x predictions",
        description="Compare diffusion forms under equal hyperparameters (see experiments/README.md).",
    )  # fmt: skip
    p.add_argument(
        "--config", default=None, help="TOML file (default: experiments/compare_forms.toml)"
    )
    p.add_argument("--out", default="out/compare", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a smoke test: fewer steps and samples")
    p.add_argument("--workers", type=int, default=None, help="override the config's workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("pairs", help="generate (noise, sample) pairs from a saved model")
    p.add_argument(
        "--model", required=True, help="model folder (e.g. out/compare/models/vp_eps/teacher)"
    )
    p.add_argument("--out", required=True, help="pair store folder (resumed if it exists)")
    p.add_argument("--num", type=int, required=True, help="number of pairs")
    p.add_argument("--solver", default="dpmpp_2m", help="sampler (default: %(default)s)")
    p.add_argument("--steps", type=int, default=32, help="solver steps (default: %(default)s)")
    p.add_argument("--t-grid", default="uniform", help="time grid kind (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument(
        "--shard-size", type=int, default=4096, help="pairs per shard (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=2048, help="pairs per solve (default: %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pairs)

    p = sub.add_parser("rectify", help="retrain a saved model on its pairs (rectification)")
    p.add_argument("--model", required=True, help="teacher model folder")
    p.add_argument("--pairs", required=True, help="pair store (from `rectdiff pairs`)")
    p.add_argument("--out", required=True, help="student model folder to write")
    p.add_argument("--steps", type=int, default=None, help="training steps")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="batch size")
    p.add_argument("--warmup-steps", type=int, default=None, help="learning-rate warm-up steps")
    p.add_argument("--lr-schedule", default=None, help="diffusers scheduler name")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay (0 = off)")
    p.add_argument("--time-sampler", default=None, help="training time sampler (timesteps)")
    p.add_argument("--weighting", default=None, help="loss weighting (timesteps)")
    p.add_argument("--seed", type=int, default=None, help="training seed")
    p.add_argument("--distill", action="store_true", help="train only at t = t_max (one step)")
    p.add_argument(
        "--form", default=None, help="train in this form (preset or TOML; classic Reflow: fm)"
    )
    p.add_argument("--prediction", default=None, help="train with this prediction (Reflow: flow)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_rectify)

    p = sub.add_parser("diagnose", help="straightness and first-order diagnostics of saved models")
    p.add_argument("--model", required=True, nargs="+", action="extend", help="model folder(s)")
    p.add_argument("--solver", default="dpmpp_2m", help="trajectory solver (default: %(default)s)")
    p.add_argument("--steps", type=int, default=32, help="trajectory steps (default: %(default)s)")
    p.add_argument("--num", type=int, default=1000, help="trajectories (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="one-step gap reference rtol (default: %(default)s)",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=1e-5,
        help="one-step gap reference atol (default: %(default)s)",
    )
    p.add_argument("--out", default="out/diagnose.json", help="JSON file (default: %(default)s)")
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("plot", help="figures from a results.json or from saved models")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", default=None, help="results.json of `rectdiff compare`")
    source.add_argument("--model", nargs="+", action="extend", default=None, help="model folder(s)")
    p.add_argument("--out", required=True, help="figure folder")
    p.add_argument("--num", type=int, default=1000, help="samples per model (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.set_defaults(func=_cmd_plot)


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
    _add_compare_commands(sub)
    from .stable_diffusion.cli import add_sd_parser  # light: loads no torch or diffusers

    add_sd_parser(sub)
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
