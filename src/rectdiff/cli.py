"""The ``rectdiff`` command: each subcommand parses its arguments, calls one library function
and prints. No logic lives here.

A flag whose default the library defines is left out of the namespace when not given
(``argparse.SUPPRESS``), so the library's default applies; ``--help`` looks that default up
in the library (importing it only then) and shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import run_command
from .io.flags import OneLineParser, add_debug_flag, check_flag_ranges, parse_one_line

__all__ = ["main", "build_parser"]

# where each subcommand's library defaults live ("module:attribute", a function or dataclass)
_SCHEDULES = "rectdiff.forms:preset_table"
_PAIRS = "rectdiff.apps.model_dirs:generate_pairs_from_dir"
_TRAIN = "rectdiff.training.config:TrainConfig"
_DIAGNOSE = "rectdiff.apps.compare.saved:diagnose_dirs"
_PLOT = "rectdiff.apps.compare.saved:plot_model_dirs"
#: TrainConfig fields ``rectdiff rectify`` has flags for
_TRAIN_FLAGS = ("steps", "lr", "batch_size", "warmup_steps", "lr_schedule", "ema_decay", "seed",
                "time_sampler", "weighting", "checkpoint_every", "log_with", "sample_every",
                "sample_steps")  # fmt: skip
#: ``rectdiff rectify``'s checkpoint interval (the library's TrainConfig keeps none by default)
RECTIFY_CHECKPOINT_EVERY = 500
#: commands that hold their --out's lock (rectdiff.io.locks) while they run
_LOCKED = ("rectdiff compare", "rectdiff pairs", "rectdiff rectify", "rectdiff sd pairs",
           "rectdiff sd rectify")  # fmt: skip


def _library_default(target: str, name: str) -> Any:
    """The default of parameter or field ``name`` of ``target``; ``inspect.Parameter.empty``
    when it has none."""
    module, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if dataclasses.is_dataclass(obj):
        fields = {f.name: f.default for f in dataclasses.fields(obj)}
        default = fields.get(name, dataclasses.MISSING)
        return inspect.Parameter.empty if default is dataclasses.MISSING else default
    parameter = inspect.signature(obj).parameters.get(name)
    return inspect.Parameter.empty if parameter is None else parameter.default


class _LibraryDefaults(argparse.HelpFormatter):
    """Help that shows the library's default of every flag left to the library."""

    def __init__(self, prog: str, *, target: str, **kwargs: Any) -> None:
        super().__init__(prog, **kwargs)
        self.target = target

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS and action.option_strings and action.dest != "help":
            default = _library_default(self.target, action.dest)
            if default is not inspect.Parameter.empty:
                text += f" (default: {default})"
        return text


def _library_parser(sub: Any, name: str, target: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand whose flags with ``default=argparse.SUPPRESS`` take ``target``'s defaults."""
    return sub.add_parser(
        name, formatter_class=functools.partial(_LibraryDefaults, target=target), **kwargs
    )


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags among ``names`` that were given (the others keep the library's defaults)."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _cmd_schedules(args: argparse.Namespace) -> int:
    from .apps.schedules import write_schedules

    table, written = write_schedules(args.out, **_given(args, ("ts",)))
    print(table)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .apps.compare.config import load_config
    from .apps.compare.report import summary_markdown
    from .apps.compare.run import run_compare

    config = load_config(args.config)
    if args.workers is not None:
        config.workers = args.workers
    results = run_compare(
        config, args.out, quick=args.quick, progress=not args.no_progress, overwrite=args.overwrite
    )
    print(summary_markdown(results))
    print(f"\nwrote {Path(args.out) / 'report.md'}, {Path(args.out) / 'results.json'} and "
          f"{len(results.get('figures', []))} figure files in {results['timing']['seconds']:.0f} s")  # fmt: skip
    return 0


def _source(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--model-factory`` flags, as :func:`rectdiff.apps.model_sources.open_source` takes them."""
    return {"factory": args.model_factory, "weights": args.weights, "convention": args.convention,
            "convention_args": args.convention_arg, "shape": args.shape}  # fmt: skip


def _cmd_pairs(args: argparse.Namespace) -> int:
    from .apps.model_dirs import generate_pairs_from_dir

    store = generate_pairs_from_dir(
        args.model, args.out, num_pairs=args.num, progress=not args.no_progress,
        **_given(args, ("solver", "steps", "t_grid", "seed", "shard_size", "batch_size")),
        **_source(args),
    )  # fmt: skip
    print(store)
    return 0


def _cmd_rectify(args: argparse.Namespace) -> int:
    from . import forms
    from .apps.model_dirs import rectify_from_dir
    from .training.config import TrainConfig

    out = rectify_from_dir(
        args.model, args.pairs, args.out, config=TrainConfig.from_dict(_given(args, _TRAIN_FLAGS)),
        distill=args.distill, form=None if args.form is None else forms.load(args.form),
        prediction=args.prediction, progress=not args.no_progress, verify=not args.no_verify,
        allow_other_teacher=args.allow_other_teacher, fresh=args.fresh, **_source(args),
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .io.configs import check_choice
    from .io.files import check_writable
    from .samplers import SOLVERS, check_steps

    # found now, not after the trajectories are solved
    check_writable(args.out, "--out", folder=False, what="JSON file")
    if hasattr(args, "solver"):
        check_choice(args.solver, list(SOLVERS), "solver")
    if hasattr(args, "steps"):
        check_steps(args.steps)
    from .apps.compare.report import diagnose_markdown
    from .apps.compare.saved import diagnose_dirs
    from .apps.model_sources import open_sources

    records = diagnose_dirs(
        open_sources(args.model, **_source(args)), out=args.out,
        **_given(args, ("solver", "steps", "num", "seed", "rtol", "atol")),
        progress=not args.no_progress,
    )  # fmt: skip
    print(diagnose_markdown(records))
    print(f"\nwrote {args.out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .apps.compare.saved import plot_model_dirs, plot_results
    from .io.files import check_writable

    check_writable(args.out, "--out", folder=True)  # found now, not after the plots are drawn

    if args.loss_log is not None:
        from .plots.training import plot_loss_logs

        written = plot_loss_logs(args.loss_log, args.out)
    elif args.results is not None:
        written = plot_results(args.results, args.out)
    else:
        written = plot_model_dirs(args.model, args.out, **_given(args, ("num", "seed")),
                                  progress=not args.no_progress)  # fmt: skip
    print("wrote " + ", ".join(str(p) for p in written if p.suffix == ".png"))
    return 0


_MODEL_HELP = ("rectdiff model folder, diffusers UNet2DModel folder (a DDPMPipeline save), or a "
               "factory student folder; required unless --model-factory is given")  # fmt: skip


def _add_factory_flags(p: argparse.ArgumentParser) -> None:
    """``--model-factory`` and its companions: the user's own network."""
    p.add_argument(
        "--model-factory",
        default=None,
        metavar="MODULE:FUNCTION",
        help="FUNCTION() in MODULE (importable from here) builds your network",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="its state dict (.safetensors, or .pt read with weights_only=True)",
    )
    p.add_argument(
        "--convention",
        default=None,
        metavar="NAME",
        help="how it is called and what it predicts: rectdiff, flow-tutorial, "
        "torchcfm, flow-matching, rectified-flow-pytorch",
    )
    p.add_argument(
        "--convention-arg",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an option of the convention (repeatable), e.g. sigma_min=0.0, call=t_x",
    )
    p.add_argument(
        "--shape",
        default=None,
        help="one sample's shape, e.g. 2 or 1,8,8 (default: the net's sample_shape)",
    )


def _add_model_dir_commands(sub: Any) -> None:
    library = argparse.SUPPRESS
    p = _library_parser(
        sub, "pairs", _PAIRS, help="generate (noise, sample) pairs from a saved model"
    )
    p.add_argument("--model", default=None, help=_MODEL_HELP)
    _add_factory_flags(p)
    p.add_argument("--out", required=True, help="pair store folder (resumed if it exists)")
    p.add_argument("--num", type=int, required=True, help="number of pairs")
    p.add_argument("--solver", default=library, help="sampler")
    p.add_argument("--steps", type=int, default=library, help="solver steps")
    p.add_argument("--t-grid", default=library, help="time grid kind")
    p.add_argument("--seed", type=int, default=library, help="noise seed")
    p.add_argument("--shard-size", type=int, default=library, help="pairs per shard")
    p.add_argument("--batch-size", type=int, default=library, help="pairs per solve")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pairs, interrupted=_pairs_kept)

    p = _library_parser(
        sub, "rectify", _TRAIN, help="retrain a saved model on its pairs (rectification)"
    )
    p.add_argument("--model", default=None, help="teacher: " + _MODEL_HELP)
    _add_factory_flags(p)
    p.add_argument("--pairs", required=True, help="pair store (from `rectdiff pairs`)")
    p.add_argument("--out", required=True, help="student model folder to write")
    p.add_argument("--steps", type=int, default=library, help="training steps")
    p.add_argument("--lr", type=float, default=library, help="learning rate")
    p.add_argument("--batch-size", type=int, default=library, help="batch size")
    p.add_argument("--warmup-steps", type=int, default=library, help="learning-rate warm-up steps")
    p.add_argument("--lr-schedule", default=library, help="diffusers scheduler name")
    p.add_argument("--ema-decay", type=float, default=library, help="EMA decay (0 = off)")
    p.add_argument("--time-sampler", default=library, help="training time sampler (timesteps)")
    p.add_argument("--weighting", default=library, help="loss weighting (timesteps)")
    p.add_argument("--seed", type=int, default=library, help="training seed")
    p.add_argument("--distill", action="store_true", help="train only at t = t_max (one step)")
    p.add_argument(
        "--form", default=None, help="train in this form (preset or TOML; classic Reflow: fm)"
    )
    p.add_argument("--prediction", default=None, help="train with this prediction (Reflow: flow)")
    p.add_argument(
        "--no-verify", action="store_true",
        help="skip the shards' sha256 (sizes, shapes, dtypes, finiteness are still checked)",
    )  # fmt: skip
    p.add_argument(
        "--allow-other-teacher", action="store_true",
        help="train on pairs made by another model, form or prediction than --model's",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int, default=RECTIFY_CHECKPOINT_EVERY,
        help="save a resumable checkpoint in OUT.train every N steps; 0: none (default: "
        "%(default)s). A rerun resumes only under the same teacher, pairs and settings",
    )  # fmt: skip
    p.add_argument(
        "--log-with", default=library, choices=("csv", "tensorboard", "wandb"),
        help="also log loss, lr, gradient norm and ESS to tensorboard or wandb (optional "
        "packages) in OUT.train; loss_log.csv is always kept there",
    )  # fmt: skip
    p.add_argument(
        "--sample-every", type=int, default=library,
        help="draw the student's samples every N steps into OUT.train/samples (and the "
        "tracker); 0: never",
    )  # fmt: skip
    p.add_argument("--sample-steps", type=int, default=library, help="DDIM steps of those samples")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_rectify, interrupted=_rectify_kept)

    p = _library_parser(
        sub, "diagnose", _DIAGNOSE, help="straightness and first-order diagnostics of saved models"
    )
    p.add_argument("--model", nargs="+", action="extend", default=None, help=_MODEL_HELP)
    _add_factory_flags(p)
    p.add_argument("--solver", default=library, help="trajectory solver")
    p.add_argument("--steps", type=int, default=library, help="trajectory steps")
    p.add_argument("--num", type=int, default=library, help="trajectories")
    p.add_argument("--seed", type=int, default=library, help="noise seed")
    p.add_argument("--rtol", type=float, default=library, help="one-step gap reference rtol")
    p.add_argument("--atol", type=float, default=library, help="one-step gap reference atol")
    p.add_argument("--out", default="out/diagnose.json", help="JSON file (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_diagnose)

    p = _library_parser(sub, "plot", _PLOT, help="figures from a results.json or from saved models")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--results", default=None, help="results.json of `rectdiff compare`")
    source.add_argument("--model", nargs="+", action="extend", default=None, help="model folder(s)")
    source.add_argument(
        "--loss-log", nargs="+", action="extend", default=None, metavar="FILE",
        help="training loss log(s): loss_log.csv, or the run folder holding it (e.g. OUT.train)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="figure folder")
    p.add_argument("--num", type=int, default=library, help="samples per model")
    p.add_argument("--seed", type=int, default=library, help="noise seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="rectdiff",
        description="Diffusion forms, rectification and first-order trajectory diagnostics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = _library_parser(
        sub, "schedules", _SCHEDULES, help="table and plot of every schedule preset"
    )
    p.add_argument("--out", default="out/schedules", help="output folder (default: %(default)s)")
    p.add_argument(
        "--t", dest="ts", metavar="T", type=float, nargs="+", default=argparse.SUPPRESS,
        help="times at which to tabulate (clipped to each form's safe range)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_schedules)

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
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier compare's output in --out (only the files compare wrote)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    _add_model_dir_commands(sub)
    from .stable_diffusion.cli import add_sd_parser  # light: loads no torch or diffusers

    add_sd_parser(sub)
    add_debug_flag(parser)
    return parser


def interrupt_hint(args: argparse.Namespace) -> Callable[[], str]:
    """What a subcommand stopped by Ctrl-C kept and how to resume (its ``interrupted``), asked
    when the interrupt comes."""
    hint = getattr(args, "interrupted", None)
    return lambda: hint(args) if callable(hint) else ""


def _pairs_kept(args: argparse.Namespace) -> str:
    return f"complete shards are kept in {args.out}; rerun the same command to resume."


def _rectify_kept(args: argparse.Namespace) -> str:
    """Asked when Ctrl-C comes: whether a checkpoint is on disk to resume from."""
    from .io.resume import latest_checkpoint

    checkpoint = latest_checkpoint(f"{Path(args.out)}.train")
    if checkpoint is not None:
        return f"the latest checkpoint, {checkpoint}, is kept; rerun the same command to resume."
    every = args.checkpoint_every
    why = f"no checkpoint yet: one every {every} steps" if every else "--checkpoint-every 0"
    return f"nothing was written to {args.out} ({why}); rerun the same command to start again."


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, range-check the flags (before any heavy import) and run the subcommand inside the
    error boundary (:func:`rectdiff.errors.run_command`): an expected error is one line on
    stderr and exit code 2, Ctrl-C says how to resume and exits 130. The commands that write
    an output folder hold its lock (:func:`rectdiff.io.locks.output_lock`) meanwhile."""
    args = parse_one_line(build_parser(), argv)
    prog = " ".join(
        ["rectdiff", args.command, *([args.sd_command] if args.command == "sd" else [])]
    )

    def command() -> int:
        check_flag_ranges(args)
        if prog not in _LOCKED:
            return int(args.func(args) or 0)
        from .io.locks import output_lock

        called = " ".join(["rectdiff", *(sys.argv[1:] if argv is None else argv)])
        with output_lock(args.out, called):  # a second writer is refused, naming the lock
            return int(args.func(args) or 0)

    return run_command(command, prog, debug=args.debug, interrupted=interrupt_hint(args))


if __name__ == "__main__":
    raise SystemExit(main())
