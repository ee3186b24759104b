"""(noise, latent, prompt) pairs from a Stable Diffusion pipeline, in rectdiff's pair store.

Each pair is the standard-normal latent noise ``eps`` (shape ``(4, h/8, w/8)``), the latent
``x0_hat`` the teacher's probability-flow ODE solve ends at (before the VAE decoder), the
prompt's conditioning as the pipeline's family defines it (for Stable Diffusion the CLIP
token ids ``input_ids``, stored as a tensor and given to the model) and the prompt itself
(``prompt``, in the shard's side file). Pair ``i`` has prompt ``prompts[i % len(prompts)]``.

The solve is :func:`rectdiff.samplers.sample` through
:func:`rectdiff.rectify.pairs.generate_pairs` (sharded, resumable, deterministic noise per
shard, checksummed, ``accelerate launch``-ready), with the family's denoiser (for SD the UNet
and frozen text encoder as one model,
:class:`~rectdiff.stable_diffusion.model.TextConditionedUNet`), classifier-free guidance
``uncond + w (cond - uncond)`` against the empty prompt, and the checkpoint's own time steps:
those ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`` uses for ``steps``
(t = (timestep + 1) / 1000) and then t = 0. With ``solver="dpmpp_2m"`` this is the
pipeline's own DPM-Solver++(2M) (diffusers' ``lower_order_final`` included):
``pipe(prompt, latents=sigma(t_0) eps, scheduler=DPMSolverMultistepScheduler, ...)`` gives
the same latents to float32 rounding. The one convention that differs from the pipeline:
the solve starts at ``x = sigma(t_0) eps`` (rectdiff's coupling convention) where diffusers
starts at ``x = eps`` (``init_noise_sigma = 1``); sigma(t_0) = 0.9977 for SD 1.5.

The manifest records the pipeline's identity (sha256 of the unet, text_encoder, tokenizer and
scheduler files), the resolution, the prompts' sha256, the weights dtype, and (as every
store) solver, steps, guidance, the time grid, seed and count; resuming into a store made
with anything else is refused with an error naming each differing setting.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..rectify.pairs import generate_pairs
from ..rectify.store import MANIFEST, PairDataset, load_manifest
from .families import family_for
from .families.base import dpm_solver_grid as sd_time_grid
from .load import check_pipeline_dir, load_pipeline, pipeline_fingerprint, vae_scale_factor
from .prompts import read_prompts

__all__ = [
    "generate_sd_pairs",
    "sd_time_grid",
    "sd_guidance",
    "pair_description",
    "store_description",
    "check_store",
    "pipeline_differences",
    "resolution",
]


def sd_guidance(guidance: float) -> float | None:
    """The guidance scale as the sampler takes it: None (no guidance) for ``guidance <= 1``,
    as ``StableDiffusionPipeline`` skips classifier-free guidance there."""
    return float(guidance) if guidance > 1.0 else None


def resolution(
    path: str | os.PathLike[str], network_config: Any, height: int | None, width: int | None
) -> tuple[int, int]:
    """``(height, width)`` in pixels, defaulting to the network's ``sample_size`` (latent
    cells; the UNet's for SD) x the VAE factor.

    Raises:
        ValueError: when a side is not a positive multiple of the VAE factor (8 for SD).
    """
    factor = vae_scale_factor(path)
    size = network_config.sample_size
    default_h, default_w = (size, size) if isinstance(size, int) else tuple(size)
    height = default_h * factor if height is None else int(height)
    width = default_w * factor if width is None else int(width)
    for name, value in (("height", height), ("width", width)):
        if value < factor or value % factor:
            raise ValueError(
                f"{name} = {value} must be a positive multiple of {factor} (the VAE's "
                f"downsampling factor); e.g. {max(factor, value // factor * factor)}."
            )
    return height, width


def _prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def pair_description(
    fingerprint: dict[str, str], prompts: Sequence[str], size: tuple[int, int], dtype: torch.dtype
) -> dict[str, Any]:
    """What the manifest's ``model_description`` records for SD pairs (as JSON)."""
    return {
        "kind": "rectdiff.stable_diffusion pairs",
        "pipeline": dict(fingerprint),
        "resolution": [int(size[0]), int(size[1])],
        "prompts": {"count": len(prompts), "sha256": _prompts_sha256(prompts)},
        "weights_dtype": str(dtype).removeprefix("torch."),
    }


def store_description(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The SD description of a store's manifest, or None if the store was not made here."""
    try:
        description = json.loads(manifest["settings"]["model_description"])
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(description, dict) or "pipeline" not in description:
        return None
    return description


def _short(digest: str) -> str:
    return digest[:12] + "..."


def pipeline_differences(stored: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per part whose sha256 differs between two pipeline fingerprints."""
    return [
        f"{part} files sha256 {_short(stored.get(part, '?'))} in the store, "
        f"{_short(current.get(part, '?'))} now"
        for part in sorted(set(stored) | set(current))
        if stored.get(part) != current.get(part)
    ]


def check_store(
    out: str | os.PathLike[str], description: dict[str, Any], pipeline_dir: str | os.PathLike[str]
) -> None:
    """Refuse an existing store at ``out`` made by another pipeline, resolution, prompts or dtype.

    Raises:
        ValueError: naming each differing setting with both values.
    """
    if not (Path(out) / MANIFEST).exists():
        return
    stored = store_description(load_manifest(out))
    if stored is None:
        raise ValueError(
            f"{str(out)!r} holds a pair store that was not made by `rectdiff sd pairs`; "
            "write the Stable Diffusion pairs into another folder."
        )
    problems = []
    pipeline_diff = pipeline_differences(stored["pipeline"], description["pipeline"])
    if pipeline_diff:
        problems.append(
            f"it was made by another pipeline than {str(pipeline_dir)!r} ("
            + "; ".join(pipeline_diff)
            + ")"
        )
    if stored.get("resolution") != description["resolution"]:
        h, w = stored.get("resolution", ["?", "?"])
        problems.append(
            f"resolution {h}x{w} in the store, {description['resolution'][0]}x"
            f"{description['resolution'][1]} now"
        )
    if stored.get("prompts") != description["prompts"]:
        problems.append(
            f"prompts differ ({stored.get('prompts', {}).get('count')} prompts with sha256 "
            f"{_short(str(stored.get('prompts', {}).get('sha256')))} in the store, "
            f"{description['prompts']['count']} with {_short(description['prompts']['sha256'])} now)"
        )
    if stored.get("weights_dtype") != description["weights_dtype"]:
        problems.append(
            f"weights dtype {stored.get('weights_dtype')} in the store, "
            f"{description['weights_dtype']} now"
        )
    if problems:
        raise ValueError(
            f"pair store {str(out)!r} does not match this run: " + "; ".join(problems) + ". "
            "Generate into another folder, or rerun with the store's settings to resume it."
        )


def generate_sd_pairs(
    pipeline_dir: str | os.PathLike[str],
    prompts: Sequence[str] | str | os.PathLike[str],
    num: int,
    out: str | os.PathLike[str],
    *,
    steps: int = 25,
    guidance: float = 5.0,
    solver: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 16,
    shard_size: int = 256,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    caption_column: str | None = None,
    store_eps: bool = True,
    accelerator: Any = None,
    progress: bool = True,
) -> PairDataset:
    """Generate ``num`` (noise, latent, prompt) pairs with a pipeline's UNet into a pair store.

    Args:
        pipeline_dir: a local pipeline folder of a supported family (the teacher).
        prompts: a list of prompts, or a .txt/.jsonl/.csv file of them (see
            :func:`~rectdiff.stable_diffusion.prompts.read_prompts`); pair i gets prompt
            ``i % len(prompts)``.
        num: number of pairs.
        out: the store's folder; a store made with the same settings is resumed.
        steps: solver steps (the Rectified Diffusion paper: 25).
        guidance: classifier-free guidance scale (paper: 5.0); <= 1 means none.
        solver: a :data:`rectdiff.samplers.SOLVERS` name; default the family's
            ``pair_solver`` (``dpmpp_2m``, the pipeline's DPM-Solver++(2M), for the DDPM
            families).
        height, width: image size in pixels (default: the UNet's sample size x 8).
        batch_size: pairs per solver call (the pairs do not depend on it).
        shard_size: pairs per shard file.
        seed: the store's seed (noise of shard k from
            ``rectdiff.rectify.store.shard_seed(seed, k)``).
        dtype: the UNet and text encoder's weights dtype (float16 on GPUs); the noise, the
            solve's state and the stored latents are float32.
        caption_column: the caption column of a .jsonl/.csv prompt file.
        store_eps: False stores only the latents (half the size); the noise is regenerated
            bit-identically from the shard seed when the store is read.
        accelerator: an accelerate ``Accelerator``/``PartialState``; by default accelerate's
            process state (one process, or all the processes of ``accelerate launch``).
        progress: tqdm bar on the main process.

    Returns:
        The finished store as a :class:`rectdiff.rectify.store.PairDataset`.

    Raises:
        ValueError: a folder that is not a pipeline, no prompts, a bad size, or a store at
            ``out`` made by another pipeline, resolution, prompts or settings (nothing is
            written then).
    """
    root = check_pipeline_dir(pipeline_dir)
    family = family_for(root)
    if not isinstance(prompts, (list, tuple)):
        prompts = read_prompts(prompts, caption_column)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt.")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}.")
    pipe = load_pipeline(root, dtype=dtype, with_vae=False)
    network = family.trained_network(pipe)
    size = resolution(root, network.config, height, width)
    factor = vae_scale_factor(root)
    shape = (int(network.config.in_channels), size[0] // factor, size[1] // factor)
    description = pair_description(pipeline_fingerprint(root), prompts, size, network.dtype)
    check_store(out, description, root)

    form, prediction = family.form(pipe)

    def cond_fn(shard: int, indices: Tensor) -> dict[str, Any]:
        chosen = [prompts[int(i) % len(prompts)] for i in indices]
        return family.conditioning(pipe, chosen) | {"prompt": chosen}

    return generate_pairs(
        family.denoiser(pipe),
        form=form,
        prediction=prediction,
        num_pairs=num,
        out=out,
        solver=solver or family.pair_solver,
        steps=steps,
        shard_size=shard_size,
        seed=seed,
        batch_size=batch_size,
        shape=shape,
        cond_fn=cond_fn,
        guidance=sd_guidance(guidance),
        uncond=family.unconditional(pipe),
        solver_options={"t_grid": family.pair_grid(pipe.scheduler, steps, form)},
        model_description=json.dumps(description, sort_keys=True),
        store_eps=store_eps,
        dtype=torch.float32,
        accelerator=accelerator,
        progress=progress,
    )
