"""How first-order a rectified pipeline's sampling trajectories are, next to its teacher's.

For ``num`` held-out noises ``eps`` (seeded) and prompts, the teacher and the student are
each solved as :func:`~rectdiff.stable_diffusion.eval.teacher_reference` solves, with the
pair solver on the checkpoint's own time steps (what pair generation
uses: for the DDPM families the DPM-Solver timesteps, for SD3 its shifted sigmas), from
``x = sigma(t_0) eps``, keeping every state and every (guided) x0-prediction. The teacher
runs at ``teacher_guidance`` (the pairs' guidance), the student at ``guidance`` (1 unless it
was trained with conditioning dropout). The same measures as the toy diagnostics
(:data:`rectdiff.diagnostics.DIAGNOSTICS`, Rectified Diffusion, Wang et al. 2024, and Liu,
Gong & Liu 2023) are taken of each latent trajectory:

* ``first_order_deviation``: relative RMS movement of the x0-prediction along the trajectory
  (0 for a first-order trajectory, where one DDIM step lands where many do) and its profile
  along t (``x0_drift``);
* ``straightness_t`` and ``straightness_y``: relative straightness of x against t and of
  y = x/alpha against s = sigma/alpha, with their curvature profiles.

Outputs in ``out``: ``diagnose.json`` (numbers, settings, curves) and the figures
``rectdiff plot`` draws for toys (curvature in t and in y, x0-prediction drift; teacher
dashed, student solid), each as PNG, SVG and CSV.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import plots, samplers
from ..diagnostics.model import DIAGNOSTICS, Probe
from ..io.files import check_writable, write_json_atomic
from .eval import teacher_reference
from .families import family_for
from .load import check_pipeline_dir, load_pipeline, vae_scale_factor
from .output import RECORD, load_record
from .pairs import resolution
from .prompts import read_prompts

__all__ = ["COLUMNS", "diagnose_pipelines"]

#: the numbers of one trajectory, in the order the table shows them
COLUMNS = ("first_order_deviation", "straightness_t", "straightness_y")


def _measure(pipe: Any, traj: samplers.Trajectory, eps: Tensor) -> tuple[dict, dict]:
    """The straightness and first-order numbers and curves of one trajectory."""
    form, prediction = family_for(pipe).form(pipe)
    probe = Probe(None, eps, form, prediction, traj, "dopri5", 1e-5, 1e-5, 0)
    numbers: dict[str, float] = {}
    curves: dict[str, Any] = {}
    for name in ("first_order_deviation", "straightness"):
        more_numbers, more_curves = DIAGNOSTICS[name].measure(probe)
        numbers |= more_numbers
        curves |= more_curves
    return numbers, curves


def _student_guidance(student_root: Path, guidance: float | None) -> float:
    """The guidance to sample the student at: given, else its record's, else 1."""
    if guidance is not None:
        return float(guidance)
    if (student_root / RECORD).is_file():
        return float(load_record(student_root).get("sample_with", {}).get("guidance_scale", 1.0))
    return 1.0


def _table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per pipeline, one column per number."""
    lines = ["| pipeline | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for who, numbers in results.items():
        lines.append(f"| {who} | " + " | ".join(f"{numbers[c]:.4g}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def diagnose_pipelines(
    pipeline_dir: str | os.PathLike[str],
    teacher_dir: str | os.PathLike[str],
    prompts: Sequence[str] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    num: int = 16,
    seed: int = 1234,
    steps: int = 25,
    guidance: float | None = None,
    teacher_guidance: float = 5.0,
    solver: str | None = None,
    height: int | None = None,
    width: int | None = None,
    caption_column: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """First-order deviation, straightness and their profiles for a student and its teacher.

    Args:
        pipeline_dir: the rectified pipeline folder (the student).
        teacher_dir: the teacher pipeline folder.
        prompts: held-out prompts (a list, or a .txt/.jsonl/.csv file); sample i gets
            ``prompts[i % len(prompts)]``.
        out: the folder for ``diagnose.json`` and the figures.
        num, seed: trajectories and the seed of their noise.
        steps, solver: the solve (default: the family's pair solver, 25 steps).
        guidance: the student's guidance (default: its ``rectdiff.json``'s, else 1).
        teacher_guidance: the teacher's (the pairs' guidance).
        height, width: pixels (default: the network's sample size x the VAE factor).
        caption_column: of a .jsonl/.csv prompt file.
        dtype, device: of both pipelines' weights.

    Returns:
        ``{"numbers": {"teacher": {...}, "student": {...}}, "table": markdown, "curves",
        "figures", settings...}``, also written to ``out/diagnose.json``.

    Raises:
        ValueError: a folder that is not a pipeline, pipelines of different families, no
            prompts or a bad size (nothing is written then).
    """
    check_writable(out, "out", folder=True)  # found now, not after the sampling
    student_root = check_pipeline_dir(pipeline_dir)
    teacher_root = check_pipeline_dir(teacher_dir)
    family = family_for(teacher_root)
    if family_for(student_root) is not family:
        raise ValueError(
            f"the student {str(student_root)!r} is a {family_for(student_root).title} pipeline "
            f"and the teacher {str(teacher_root)!r} a {family.title} one; give the teacher "
            "the student was rectified from."
        )
    if not isinstance(prompts, (list, tuple)):
        prompts = read_prompts(prompts, caption_column)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt.")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}.")
    pipes = {
        "teacher": load_pipeline(teacher_root, dtype=dtype, device=device, with_vae=False),
        "student": load_pipeline(student_root, dtype=dtype, device=device, with_vae=False),
    }
    network = family.trained_network(pipes["teacher"])
    height, width = resolution(teacher_root, network.config, height, width)
    factor = vae_scale_factor(teacher_root)
    shape = (num, int(network.config.in_channels), height // factor, width // factor)
    eps = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    chosen = [str(prompts[i % len(prompts)]) for i in range(num)]
    scales = {
        "teacher": float(teacher_guidance),
        "student": _student_guidance(student_root, guidance),
    }

    numbers: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, Any]] = {}
    for who, pipe in pipes.items():
        with torch.no_grad():
            traj = teacher_reference(pipe, eps, chosen, steps=steps, guidance=scales[who],
                                     solver=solver, return_trajectory=True)  # fmt: skip
        numbers[who], curves[who] = _measure(pipe, traj, eps)
    root = Path(out)
    figures = _figures(curves, root)
    result = {
        "numbers": numbers,
        "table": _table(numbers),
        "curves": curves,
        "figures": [str(p) for p in figures],
        "num": num,
        "seed": seed,
        "steps": steps,
        "solver": solver or family.pair_solver,
        "guidance": scales,
        "resolution": [height, width],
        "student": str(student_root),
        "teacher": str(teacher_root),
    }
    write_json_atomic(root / "diagnose.json", result)
    return result


def _figures(curves: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """Curvature in t and y and the x0-prediction drift, teacher dashed, student solid."""
    rect = {"student": "teacher"}
    written: list[Path] = []
    for coords in ("t", "y"):
        profiles = {who: c[f"curvature_{coords}"] for who, c in curves.items()}
        written += plots.plot_curvature(
            profiles, out / f"curvature_{coords}", rect, coords=coords, logy=True,
            ylabel=r"$E\,\|(Z_1 - Z_0) - dZ/du\|^2 \,/\, E\,\|Z_1 - Z_0\|^2$",
        )  # fmt: skip
    drift = {who: c["x0_drift"] for who, c in curves.items()}
    written += plots.plot_x0_drift(drift, out / "x0_drift", rect, logy=True)
    return written
