"""One- and few-step results of a rectified pipeline against its teacher's many-step latents.

For ``num`` held-out noises ``eps`` (seeded, independent of any pair store) and prompts:

* the reference: the teacher's ODE solve exactly as pair generation makes it
  (:func:`rectdiff.samplers.sample`, the checkpoint's DPM-Solver time steps,
  ``teacher_steps`` steps, guidance ``teacher_guidance``, from ``x = sigma(t_0) eps``);
* the student at each of ``steps``, through the stock ``StableDiffusionPipeline`` loaded from
  its folder with the family's student scheduler (DDIM, trailing spacing,
  ``set_alpha_to_one=True``: what ``rectify_sd`` saves), at guidance ``guidance``;
* the teacher at the same few steps with the same scheduler at ``teacher_guidance``: the
  baseline a rectified model must beat.

Like is scored with like: the reference ends at the clean endpoint (sigma = 0), and so does
the last DDIM step of both few-step runs (a folder saved with SD's ``set_alpha_to_one=False``,
as rectify wrote before, would stop at timestep 0, sigma = 0.029; it is sampled with the
student scheduler all the same).

Every pipeline call gets ``latents = sigma(t_0) eps`` with t_0 its first time step, so all
runs start where pair generation starts. The numbers are latent mean squared errors to the
reference (over all elements and samples); with ``clip_dir`` also CLIP scores of the decoded
images. An image grid (rows: reference, teacher k steps, student k steps) and a JSON of the
numbers are written to ``out``.

Guidance: pairs made at guidance w have that guidance baked into the student, so the default
``guidance=1.0`` samples it unguided; guiding it again at w would apply it twice. The
Rectified Diffusion paper reports its SD 1.5 results at 1.5 (a little extra guidance for
image quality); for the latent distance to the teacher 1.0 is the matching choice.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import samplers
from ..io.files import check_writable, write_bytes_atomic, write_json_atomic
from .clip_score import ClipScorer
from .families import family_for
from .load import check_pipeline_dir, load_pipeline
from .pairs import resolution, sd_guidance
from .prompts import read_prompts

__all__ = ["evaluate", "teacher_reference", "pipeline_latents", "decode", "save_grid"]


def sampler_name(scheduler: Any) -> str:
    """How the few-step runs are sampled, for metrics.json: the family's student scheduler
    (DDIM trailing with ``set_alpha_to_one``, or SD3's FlowMatchEuler), ending at sigma = 0."""
    spacing = getattr(scheduler.config, "timestep_spacing", None)
    where = f", {spacing} spacing" if spacing else ""
    return f"{type(scheduler).__name__}{where}, last step to sigma = 0"


def teacher_reference(
    pipe: Any,
    eps: Tensor,
    prompts: Sequence[str],
    *,
    steps: int = 25,
    guidance: float = 5.0,
    solver: str | None = None,
    return_trajectory: bool = False,
) -> Tensor | samplers.Trajectory:
    """The pipeline's latents for ``eps`` and ``prompts``, solved as pair generation does:
    ``solver`` (default the family's pair solver) on the family's pair grid from
    ``sigma(t_0) eps``, with classifier-free guidance; with ``return_trajectory`` the whole
    :class:`~rectdiff.samplers.Trajectory` (on the pipeline's device) instead."""
    family = family_for(pipe)
    form, prediction = family.form(pipe)
    out = samplers.sample(
        family.denoiser(pipe),
        eps.to(family.trained_network(pipe).device, torch.float32),
        form=form,
        prediction=prediction,
        solver=solver or family.pair_solver,
        steps=steps,
        t_grid=family.pair_grid(pipe.scheduler, steps, form),
        cond=family.conditioning(pipe, prompts),
        guidance=sd_guidance(guidance),
        uncond=family.unconditional(pipe),
        return_trajectory=return_trajectory,
    )
    return out if return_trajectory else out.cpu()


def pipeline_latents(
    pipe: Any, eps: Tensor, prompts: Sequence[str], steps: int, guidance: float
) -> Tensor:
    """``pipe(prompts, latents=sigma(t_0) eps, num_inference_steps=steps, guidance_scale=guidance,
    output_type="latent")`` with t_0 the scheduler's first time step, and ``height``/``width``
    the latents' size in pixels (SDXL's size conditioning is built from them, not from the
    latents)."""
    family = family_for(pipe)
    form, _ = family.form(pipe)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    t_start = form.t_from_model_time(float(scheduler.timesteps[0]))
    # FlowMatchEulerDiscreteScheduler (SD3) has no init_noise_sigma: its pipeline starts at x = eps
    scale = float(form.sigma(t_start)) / float(getattr(scheduler, "init_noise_sigma", 1.0))
    network = family.trained_network(pipe)
    latents = (scale * eps).to(network.device, network.dtype)
    factor = int(pipe.vae_scale_factor)
    out = pipe(
        list(prompts),
        height=latents.shape[-2] * factor,
        width=latents.shape[-1] * factor,
        latents=latents,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
    )
    return out.images.float().cpu()


@torch.no_grad()
def decode(vae: Any, latents: Tensor, batch_size: int = 8) -> Tensor:
    """``vae.decode(latents / scaling_factor + shift_factor)`` (shift 0 where the VAE has
    none, as SD 1.x/2.x/XL) mapped from [-1, 1] to [0, 1], float32 CPU."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = []
    for start in range(0, len(latents), batch_size):
        batch = latents[start : start + batch_size].to(vae.device, vae.dtype)
        decoded = vae.decode(batch / vae.config.scaling_factor + shift).sample
        images.append(((decoded.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0))
    return torch.cat(images)


def save_grid(rows: dict[str, Tensor], path: str | os.PathLike[str]) -> Path:
    """A PNG grid: one labelled row per entry of ``rows`` (images ``(B, 3, H, W)`` in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(1.2 * columns + 1.4, 1.2 * len(rows)), squeeze=False
    )
    for r, (label, images) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).numpy())
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())


def _batched(fn: Any, eps: Tensor, prompts: list[str], batch_size: int) -> Tensor:
    return torch.cat(
        [
            fn(eps[start : start + batch_size], prompts[start : start + batch_size])
            for start in range(0, len(eps), batch_size)
        ]
    )


def _clip_scores(
    rows: dict[str, Tensor], prompts: list[str], vae: Any, scorer: ClipScorer, batch_size: int
) -> dict[str, float]:
    """Mean CLIP score of each row's decoded latents, decoded and scored batch by batch."""
    scores = {}
    for label, latents in rows.items():
        parts = [
            scorer(
                decode(vae, latents[start : start + batch_size]),
                prompts[start : start + batch_size],
            )
            for start in range(0, len(latents), batch_size)
        ]
        scores[label] = float(torch.cat(parts).mean())
    return scores


def _latent_metrics(
    reference: Tensor, latents: dict[str, Tensor], steps: list[int]
) -> dict[str, Any]:
    """Latent MSE of every ``"{who} {k}"`` entry to the reference and student/teacher ratios."""
    mse = {
        who: {str(k): float((latents[f"{who} {k}"] - reference).square().mean()) for k in steps}
        for who in ("student", "teacher")
    }
    ratio = {
        str(k): mse["student"][str(k)] / mse["teacher"][str(k)]
        if mse["teacher"][str(k)] > 0
        else None
        for k in steps
    }
    return {"latent_mse": mse, "ratio": ratio, "reference_variance": float(reference.var())}


def evaluate(
    pipeline_dir: str | os.PathLike[str],
    teacher_dir: str | os.PathLike[str],
    prompts: Sequence[str] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    steps: Sequence[int] = (1, 2, 4),
    guidance: float = 1.0,
    teacher_steps: int = 25,
    teacher_guidance: float = 5.0,
    teacher_solver: str | None = None,
    num: int = 16,
    seed: int = 1234,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    clip_dir: str | os.PathLike[str] | None = None,
    caption_column: str | None = None,
    grid_columns: int = 8,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Latent MSE (and CLIP score) of a rectified pipeline and its teacher at few steps.

    Args:
        pipeline_dir: the student pipeline folder (e.g. the output of ``rectify_sd``).
        teacher_dir: the teacher pipeline folder.
        prompts: prompts or a prompt file; sample i gets prompt ``i % len(prompts)``. Use
            prompts the student was not trained on.
        out: folder for ``metrics.json`` and ``grid.png``.
        steps: the few-step counts to evaluate.
        guidance: the student's guidance scale (see the module docstring; 1.0 = none).
        teacher_steps, teacher_guidance, teacher_solver: the reference solve (as the pairs).
        num: number of samples.
        seed: seed of the held-out noise (``torch.Generator("cpu").manual_seed(seed)``).
        height, width: image size in pixels (default: the UNet's sample size x 8).
        batch_size: samples per pipeline call.
        clip_dir: a local CLIP model folder; CLIP scores are computed only when given.
        caption_column: the caption column of a .jsonl/.csv prompt file.
        grid_columns: samples shown in the grid.
        dtype, device: weights dtype and device of both pipelines.

    Returns:
        The metrics (also written to ``out/metrics.json``): ``latent_mse`` of the student and
        the teacher per step count, their ``ratio``, the reference and sampling settings,
        and ``clip_score`` when ``clip_dir`` is given.

    Raises:
        ValueError: for a folder that is not a pipeline, empty prompts or bad settings.
    """
    check_writable(out, "out", folder=True)  # found now, not after the sampling
    student_root = check_pipeline_dir(pipeline_dir, need_vae=True)
    teacher_root = check_pipeline_dir(teacher_dir)
    family = family_for(teacher_root)
    if not isinstance(prompts, (list, tuple)):
        prompts = read_prompts(prompts, caption_column)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt.")
    steps = sorted({int(k) for k in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be positive step counts, got {steps}.")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    student = load_pipeline(student_root, dtype=dtype, device=device)
    teacher = load_pipeline(teacher_root, dtype=dtype, device=device, with_vae=False)
    network_config = family.trained_network(teacher).config
    height, width = resolution(teacher_root, network_config, height, width)
    factor = student.vae_scale_factor
    shape = (num, int(network_config.in_channels), height // factor, width // factor)
    eps = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    chosen = [str(prompts[i % len(prompts)]) for i in range(num)]

    reference = _batched(
        lambda e, p: teacher_reference(
            teacher, e, p, steps=teacher_steps, guidance=teacher_guidance, solver=teacher_solver
        ),
        eps, chosen, batch_size,
    )  # fmt: skip
    # both few-step runs on the same scheduler, ending at sigma = 0 as the reference does
    teacher.scheduler = family.student_scheduler(teacher.scheduler)
    student.scheduler = family.student_scheduler(student.scheduler)
    latents: dict[str, Tensor] = {}
    for who, pipe, scale in (
        ("teacher", teacher, teacher_guidance),
        ("student", student, guidance),
    ):
        for k in steps:
            latents[f"{who} {k}"] = _batched(
                lambda e, p, pipe=pipe, k=k, scale=scale: pipeline_latents(pipe, e, p, k, scale),
                eps, chosen, batch_size,
            )  # fmt: skip
    metrics: dict[str, Any] = _latent_metrics(reference, latents, steps) | {
        "num": num,
        "seed": seed,
        "resolution": [height, width],
        "student": {
            "pipeline": str(student_root),
            "guidance": guidance,
            "sampler": sampler_name(student.scheduler),
        },
        "teacher": {
            "pipeline": str(teacher_root),
            "guidance": teacher_guidance,
            "few_step_sampler": sampler_name(teacher.scheduler),
            "reference": {"solver": teacher_solver or family.pair_solver, "steps": teacher_steps},
        },
    }
    rows = {f"teacher {teacher_steps}": reference, **latents}
    shown = slice(0, min(num, grid_columns))
    images = {label: decode(student.vae, value[shown]) for label, value in rows.items()}
    if clip_dir is not None:
        metrics["clip_score"] = _clip_scores(
            rows, chosen, student.vae, ClipScorer(clip_dir, device), batch_size
        )
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    save_grid(images, root / "grid.png")
    metrics["grid"] = str(root / "grid.png")
    write_json_atomic(root / "metrics.json", metrics)
    return metrics
