"""The whole Stable Diffusion workflow on a tiny pipeline, end to end, in minutes on a CPU.

tiny pipeline -> 25-step DPM-Solver++ pairs at guidance 5 on half of the tiny prompts ->
rectification of the UNet in its own form (eps-prediction, SD 1.5's schedule) -> evaluation
on the other half of the prompts and fresh noise: latent MSE of 1/2/4/8-step sampling against
the teacher's 25-step latents, student against teacher, and an image grid.

The defaults (512 pairs, 600 steps at lr 1e-3, an EMA of the weights) are what the tiny UNet
needs for its few-step error to fall below the teacher's at 4 steps too: at a constant
learning rate of 1e-3 the last weights of a run are noisy (without EMA two training seeds
gave 4-step ratios of 1.07 and 1.60 after 300 steps; with it 0.90 and 0.87 after 600).
diffusers' ``EMAModel`` warms up with decay ``(1 + n) / (10 + n)`` after n steps (0.985 at
600, below the 0.9999 cap), so the saved weights average roughly the last tenth of the run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .config import SDRectifyConfig
from .eval import evaluate
from .pairs import generate_sd_pairs
from .rectify import rectify_sd
from .tiny import build_tiny_pipeline, tiny_prompts

__all__ = ["EVAL_STEPS", "run_demo"]

#: the few-step counts the demo evaluates
EVAL_STEPS = (1, 2, 4, 8)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


#: what a demo writes in its folder (a rerun may write there again)
DEMO_FILES = ("prompts_train.txt", "prompts_eval.txt", "tiny", "pairs", "student", "student.train",
              "eval")  # fmt: skip


def _check_out(root: Path) -> None:
    """Refuse a file, or a folder holding anything a demo does not write (nothing of the
    user's is overwritten or mixed with the demo's)."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {str(root)!r} is a file; give a folder for the demo.")
    if root.is_dir():
        foreign = sorted(p.name for p in root.iterdir()
                         if p.name not in DEMO_FILES and not p.name.startswith("."))  # fmt: skip
        if foreign:
            raise ConfigError(
                f"--out {str(root)!r} holds files the demo did not write "
                f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); choose a new "
                "or empty folder (nothing there is overwritten)."
            )


def run_demo(
    out: str | os.PathLike[str] = "out/sd-demo",
    num_pairs: int = 512,
    max_steps: int = 600,
    lr: float = 1e-3,
    ema: bool = True,
    num_eval: int = 32,
    threads: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run tiny pipeline, pairs, rectification and evaluation into ``out``; print a summary.

    Args:
        out: the demo folder (``tiny/``, ``pairs/``, ``student/``, ``eval/``, prompt files).
        num_pairs: pairs to generate.
        max_steps, lr: rectification steps and learning rate (a tiny UNet trains at a much
            larger rate than SD 1.5's 5e-6).
        ema: save an EMA of the trained weights (see the module docstring) instead of the
            last ones.
        num_eval: held-out samples in the evaluation.
        threads: torch CPU threads while the demo runs (restored after). The tiny models are
            bound by per-operation overhead, where a second thread mostly adds contention
            (several times slower on a busy 2-core machine); None keeps torch's setting.
        progress: show progress bars.

    Returns:
        The evaluation metrics plus ``"seconds"`` (wall time per stage) and ``"paths"``.
    """
    root = Path(out)
    _check_out(root)
    root.mkdir(parents=True, exist_ok=True)
    train_prompts = _write_lines(root / "prompts_train.txt", tiny_prompts("train"))
    eval_prompts = _write_lines(root / "prompts_eval.txt", tiny_prompts("held_out"))
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    config = SDRectifyConfig(max_steps=max_steps, lr=lr, batch_size=32, ema=ema)
    try:
        return _run(root, train_prompts, eval_prompts, num_pairs, config, num_eval, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    root: Path,
    train_prompts: Path,
    eval_prompts: Path,
    num_pairs: int,
    config: SDRectifyConfig,
    num_eval: int,
    progress: bool,
) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    teacher = root / "tiny"
    if not (teacher / "model_index.json").is_file():  # a rerun reuses the demo's own teacher
        build_tiny_pipeline(teacher)
    seconds["tiny"] = time.perf_counter() - start

    start = time.perf_counter()
    generate_sd_pairs(
        teacher, train_prompts, num_pairs, root / "pairs", steps=25, guidance=5.0,
        batch_size=32, shard_size=64, progress=progress,
    )  # fmt: skip
    seconds["pairs"] = time.perf_counter() - start

    start = time.perf_counter()
    result = rectify_sd(teacher, root / "pairs", root / "student", config, progress=progress)
    seconds["rectify"] = time.perf_counter() - start

    start = time.perf_counter()
    metrics = evaluate(result.out_dir, teacher, eval_prompts, root / "eval", steps=EVAL_STEPS,
                       num=num_eval, batch_size=16)  # fmt: skip
    seconds["eval"] = time.perf_counter() - start
    seconds["total"] = sum(seconds.values())

    paths = {
        "teacher": str(teacher),
        "pairs": str(root / "pairs"),
        "student": str(result.out_dir),
        "metrics": str(root / "eval" / "metrics.json"),
        "grid": metrics["grid"],
    }
    print("\n".join(f"{name:>8}: {path}" for name, path in paths.items()))
    print("latent MSE to the teacher's 25-step latents (held-out noise and prompts):")
    print("  steps  student  teacher  ratio")
    for k, student_mse in metrics["latent_mse"]["student"].items():
        teacher_mse = metrics["latent_mse"]["teacher"][k]
        print(f"  {k:>5}  {student_mse:7.4f}  {teacher_mse:7.4f}  {metrics['ratio'][k]:5.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return metrics | {"seconds": seconds, "paths": paths}
