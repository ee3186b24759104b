"""``rectdiff sd ...``: each subcommand parses its arguments, calls one library function and
prints. Register with :func:`add_sd_parser` on the main parser's subparsers; run alone (and
under ``accelerate launch``) as ``python -m rectdiff.stable_diffusion.cli sd ...``."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from ..errors import run_command
from ..io.configs import field_names
from ..io.flags import add_debug_flag, check_flag_ranges
from .config import SDRectifyConfig

__all__ = ["TINY_FAMILIES", "add_sd_parser", "main"]

#: the names of ``rectdiff.stable_diffusion.tiny.TINY`` (listed here so that parsing does not
#: import torch; a test keeps the two equal)
TINY_FAMILIES = ("sd15", "sd2", "sd2-zsnr", "sdxl", "sd3")


def _is_main_process() -> bool:
    from ..rectify.pairs import process_state

    return process_state().is_main_process


def _cmd_tiny(args: argparse.Namespace) -> int:
    from .tiny import build_tiny_pipeline

    path = build_tiny_pipeline(args.dir, seed=args.seed, sample_size=args.sample_size,
                               fit_steps=args.fit_steps, family=args.family)  # fmt: skip
    print(f"wrote a tiny {args.family} pipeline to {path}")
    return 0


def _cmd_pairs(args: argparse.Namespace) -> int:
    from .pairs import generate_sd_pairs

    store = generate_sd_pairs(
        args.pipeline, args.prompts, args.num, args.out, steps=args.steps,
        guidance=args.guidance, solver=args.solver, height=args.height, width=args.width,
        batch_size=args.batch_size, shard_size=args.shard_size, seed=args.seed,
        dtype=args.dtype, caption_column=args.caption_column, store_eps=not args.no_store_eps,
    )  # fmt: skip
    if _is_main_process():
        print(f"wrote {len(store)} pairs to {store.root} ({store.num_shards} shards)")
    return 0


def _rectify_config(args: argparse.Namespace) -> SDRectifyConfig:
    """The :class:`SDRectifyConfig` of ``sd rectify``'s flags: each field with a flag of the
    same name takes it, ``resume`` is ``not --no-resume`` (``--fresh``), ``verify`` is
    ``not --no-verify``, the rest (``grad_clip``) keep their defaults."""
    names = [name for name in field_names(SDRectifyConfig) if name not in ("resume", "verify")]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return SDRectifyConfig(**values, resume=not args.no_resume, verify=not args.no_verify)


def _cmd_rectify(args: argparse.Namespace) -> int:
    from .rectify import rectify_sd

    result = rectify_sd(args.pipeline, args.pairs, args.out, _rectify_config(args))
    if _is_main_process():
        last = f", last loss {result.losses[-1]:.5g}" if result.losses else ""
        print(f"wrote the rectified pipeline to {result.out_dir} ({result.steps} steps{last})")
        if args.phases > 1:
            print(f"sample it with num_inference_steps={args.phases} (the window edges)")
        if result.lora_dir is not None:
            print(f"LoRA weights: {result.lora_dir} (pipe.load_lora_weights on the teacher)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval import evaluate

    metrics = evaluate(
        args.pipeline, args.teacher, args.prompts, args.out, steps=args.steps,
        guidance=args.guidance, teacher_steps=args.teacher_steps,
        teacher_guidance=args.teacher_guidance, num=args.num, seed=args.seed,
        height=args.height, width=args.width, batch_size=args.batch_size,
        clip_dir=args.clip, caption_column=args.caption_column, dtype=args.dtype,
        device=args.device,
    )  # fmt: skip
    mse = metrics["latent_mse"]
    print(f"latent MSE to the teacher's {args.teacher_steps}-step latents:")
    print("| steps | student | teacher | ratio |\n|---:|---:|---:|---:|")
    for k in mse["student"]:
        print(
            f"| {k} | {mse['student'][k]:.5g} | {mse['teacher'][k]:.5g} | {metrics['ratio'][k]:.3f} |"
        )
    for label, score in metrics.get("clip_score", {}).items():
        print(f"CLIP score {label}: {score:.2f}")
    print(f"wrote {args.out}/metrics.json and {metrics['grid']}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnose import diagnose_pipelines

    result = diagnose_pipelines(
        args.pipeline, args.teacher, args.prompts, args.out, num=args.num, seed=args.seed,
        steps=args.steps, guidance=args.guidance, teacher_guidance=args.teacher_guidance,
        solver=args.solver, height=args.height, width=args.width,
        caption_column=args.caption_column, dtype=args.dtype, device=args.device,
    )  # fmt: skip
    print(result["table"])
    print(f"wrote {args.out}/diagnose.json and {len(result['figures'])} figure files")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out)
    return 0


def _pairs_kept(args: argparse.Namespace) -> str:
    return f"complete shards are kept in {args.out}; rerun the same command to resume."


def _rectify_kept(args: argparse.Namespace) -> str:
    """Asked when Ctrl-C comes: whether a checkpoint is on disk to resume from."""
    latest = Path(args.work_dir or f"{Path(args.out)}.train") / "checkpoints" / "latest"
    if latest.is_file():
        checkpoint = latest.parent / latest.read_text().strip()
        return (
            f"the latest checkpoint, {checkpoint}, is kept; rerun the same command to resume "
            "from it."
        )
    if args.checkpoint_every > 0:
        return (
            f"no checkpoint was written yet (one every {args.checkpoint_every} steps); rerun "
            "the same command to start again."
        )
    return (
        "no checkpoint was kept (--checkpoint-every 0); rerun the same command to start again, "
        "with --checkpoint-every N to make the run resumable."
    )


def _steps(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive step counts, got {text!r}")
    return values


def _add_size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--height", type=int, default=None, help="pixels (default: UNet sample size x 8)"
    )
    p.add_argument("--width", type=int, default=None, help="pixels (default: UNet sample size x 8)")


def _add_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny", help="build a tiny offline SD pipeline (seconds on a CPU)")
    p.add_argument("dir", help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-size", type=int, default=8, help="latent size (default: %(default)s)")
    p.add_argument("--fit-steps", type=int, default=150,
                   help="steps fitting the UNet to synthetic latents (default: %(default)s)")  # fmt: skip
    p.add_argument("--family", default="sd15", choices=TINY_FAMILIES,
                   help="which pipeline (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=_cmd_tiny)


def _add_pairs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pairs", help="generate (noise, latent, prompt) pairs with a pipeline")
    p.add_argument("--pipeline", required=True, help="local diffusers pipeline folder")
    p.add_argument("--prompts", required=True, help=".txt (one per line), .jsonl or .csv")
    p.add_argument("--num", type=int, required=True, help="number of pairs")
    p.add_argument("--out", required=True, help="pair store folder (resumed if it exists)")
    p.add_argument("--steps", type=int, default=25, help="solver steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default: %(default)s)")
    p.add_argument(
        "--solver",
        default=None,
        help="rectdiff solver (default: the family's own, dpmpp_2m for SD 1.x/2.x/XL)",
    )
    _add_size(p)
    p.add_argument("--batch-size", type=int, default=16, help="per process (default: %(default)s)")
    p.add_argument(
        "--shard-size", type=int, default=256, help="pairs per shard (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="UNet/text encoder weights (default: %(default)s)")  # fmt: skip
    p.add_argument("--caption-column", default=None, help="caption column of .jsonl/.csv")
    p.add_argument("--no-store-eps", action="store_true",
                   help="store only latents; the noise is regenerated from the seed on reading")  # fmt: skip
    p.set_defaults(func=_cmd_pairs, interrupted=_pairs_kept)


def _add_rectify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rectify", help="retrain the UNet on its pairs; save a 1-step pipeline")
    p.add_argument("--pipeline", required=True, help="the teacher pipeline folder")
    p.add_argument("--pairs", required=True, help="pair store made with that pipeline")
    p.add_argument("--out", required=True, help="student pipeline folder to write")
    # the defaults, read off the fields (instantiating would import torch before parsing)
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(SDRectifyConfig)})
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="pairs per micro-batch, all processes together (default: %(default)s)",
    )
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--loss", default=d.loss, choices=["mse", "pseudo_huber"])
    p.add_argument("--huber-c", type=float, default=d.huber_c)
    p.add_argument("--loss-prediction", default=d.loss_prediction, choices=["eps", "x0", "v", "flow"],
                   help="prediction the loss compares (default: x0; flow with --target-form fm)")  # fmt: skip
    p.add_argument("--target-form", default=d.target_form, choices=["fm"],
                   help="fm: InstaFlow-style flow-matching loss (default: the checkpoint's form)")  # fmt: skip
    p.add_argument("--time-sampler", default=d.time_sampler, help="default: discrete (fm: uniform)")
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=["no", "fp16", "bf16"],
                   help="default: accelerate launch's --mixed_precision (or no)")  # fmt: skip
    p.add_argument(
        "--gradient-checkpointing", action="store_true", default=d.gradient_checkpointing
    )
    p.add_argument(
        "--ema", action="store_true", default=d.ema, help="keep and save an EMA of the weights"
    )
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="train a LoRA of this rank")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="save a resumable checkpoint every N steps; 0: none, so a stopped run "
                        "starts over (default: %(default)s)")  # fmt: skip
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="newest checkpoints kept; 0: all (default: %(default)s)")  # fmt: skip
    p.add_argument("--work-dir", default=d.work_dir, help="checkpoints (default: OUT.train)")
    p.add_argument("--fresh", "--no-resume", dest="no_resume", action="store_true",
                   help="start over, ignoring the checkpoints in the work folder")  # fmt: skip
    p.add_argument("--no-verify", action="store_true",
                   help="skip the shards' sha256 (sizes, shapes, dtypes, finiteness are still "
                        "checked)")  # fmt: skip
    p.add_argument("--log-with", default=d.log_with, choices=["csv", "tensorboard", "wandb"],
                   help="also log loss, learning rate, gradient norm and ESS through this "
                        "accelerate tracker into the work folder (loss_log.csv is always "
                        "written)")  # fmt: skip
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers")
    p.add_argument("--cond-dropout", type=float, default=d.cond_dropout,
                   help="fraction of pairs trained with the empty prompt, for sampling the "
                        "student with a small guidance such as 1.5 (default: %(default)s)")  # fmt: skip
    p.add_argument("--phases", type=int, default=d.phases,
                   help="K > 1: phased rectification on K windows for K-step sampling; K must "
                        "divide the 1000 timesteps (default: %(default)s, plain)")  # fmt: skip
    p.add_argument("--phase-start-mass", type=float, default=d.phase_start_mass,
                   help="with --phases: fraction of training times placed at the window start, "
                        "where the K stock steps evaluate (default: %(default)s)")  # fmt: skip
    p.add_argument("--phase-starts", choices=["trajectory", "line"], default=d.phase_starts,
                   help="with --phases: windows start on the teacher's own path from each "
                        "pair's noise, or on the pair's line (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=_cmd_rectify, interrupted=_rectify_kept)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="few-step latents vs the teacher's; metrics.json, grid.png")
    p.add_argument("--pipeline", required=True, help="the rectified pipeline folder")
    p.add_argument("--teacher", required=True, help="the teacher pipeline folder")
    p.add_argument("--prompts", required=True, help="held-out prompts (.txt, .jsonl, .csv)")
    p.add_argument("--out", default="out/sd-eval", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=_steps, default=[1, 2, 4], help="e.g. 1,2,4 (default)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="student CFG scale; its pairs' guidance is baked in (default: %(default)s)")  # fmt: skip
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--teacher-guidance", type=float, default=5.0)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    _add_size(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clip", default=None, help="local CLIP model folder for CLIP scores")
    p.add_argument("--caption-column", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.set_defaults(func=_cmd_eval)


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose", help="first-order deviation and straightness, student vs teacher"
    )
    p.add_argument("--pipeline", required=True, help="the rectified pipeline folder")
    p.add_argument("--teacher", required=True, help="the teacher pipeline folder")
    p.add_argument("--prompts", required=True, help="held-out prompts (.txt, .jsonl, .csv)")
    p.add_argument("--out", default="out/sd-diagnose", help="output folder (default: %(default)s)")
    p.add_argument("--num", type=int, default=16, help="trajectories (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=25, help="solver steps (default: %(default)s)")
    p.add_argument("--solver", default=None, help="default: the family's pair solver")
    p.add_argument("--guidance", type=float, default=None,
                   help="student CFG scale (default: its rectdiff.json's, else 1)")  # fmt: skip
    p.add_argument("--teacher-guidance", type=float, default=5.0)
    _add_size(p)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.set_defaults(func=_cmd_diagnose)


def add_sd_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``sd tiny|pairs|rectify|eval|diagnose|demo`` on the main parser's subparsers."""
    sd = subparsers.add_parser("sd", help="rectify a Stable Diffusion pipeline (tiny, pairs, ...)")
    sub = sd.add_subparsers(dest="sd_command", required=True)
    _add_tiny(sub)
    _add_pairs(sub)
    _add_rectify(sub)
    _add_eval(sub)
    _add_diagnose(sub)
    p = sub.add_parser("demo", help="tiny pipeline -> pairs -> rectify -> eval (minutes on a CPU)")
    p.add_argument("--out", default="out/sd-demo", help="demo folder (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    return sd


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rectdiff.stable_diffusion.cli sd ...`` (the same arguments as ``rectdiff``),
    inside the same error boundary (:func:`rectdiff.errors.run_command`)."""
    parser = argparse.ArgumentParser(prog="rectdiff")
    add_sd_parser(parser.add_subparsers(dest="command", required=True))
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    def command() -> int:
        check_flag_ranges(args)
        return int(args.func(args) or 0)

    def hint() -> str:
        return args.interrupted(args) if hasattr(args, "interrupted") else ""

    return run_command(command, f"rectdiff {args.command} {args.sd_command}", debug=args.debug,
                       interrupted=hint)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
