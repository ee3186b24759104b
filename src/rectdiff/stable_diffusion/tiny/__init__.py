"""Tiny pipelines of every supported family, built offline in seconds on one CPU core.

``build_tiny_pipeline(out, family="sd15")`` writes a pipeline folder with the real
checkpoint's classes, folder layout and scheduler config but a few hundred thousand random
parameters, then fits its network briefly to synthetic prompt-conditioned latents (see
:mod:`.parts`), so that every ``rectdiff sd`` command can be tried and tested without a
download. One :class:`TinyRecipe` per name in :data:`TINY`; adding a family's tiny pipeline
is one module and one entry there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...io.files import named_os_error, publish_folder, temporary_sibling
from .parts import TINY_COLOURS, TINY_OBJECTS, byte_level_vocab, fit_network, tiny_prompts
from .sd import SD2_SCHEDULER_CONFIG, SD2_ZSNR_SCHEDULER_CONFIG, SD15_SCHEDULER_CONFIG, sd_parts
from .sd3 import SD3_SCHEDULER_CONFIG, sd3_parts
from .sdxl import SDXL_SCHEDULER_CONFIG, sdxl_parts

__all__ = [
    "SD15_SCHEDULER_CONFIG",
    "TINY",
    "TINY_COLOURS",
    "TINY_OBJECTS",
    "TinyRecipe",
    "build_tiny_pipeline",
    "byte_level_vocab",
    "tiny_prompts",
]


@dataclass(frozen=True)
class TinyRecipe:
    """How to build one tiny pipeline.

    Attributes:
        pipeline_class: the diffusers pipeline class (its family's registry key).
        parts: ``(scratch, sample_size) -> {component: value}``, the pipeline's keyword
            arguments except the scheduler, random weights created in a fixed order.
        scheduler_config: the real checkpoint's ``scheduler_config.json``, written verbatim.
        description: one line for messages and the README.
    """

    pipeline_class: str
    parts: Callable[[Path, int], dict[str, Any]]
    scheduler_config: dict[str, Any]
    description: str

    def scheduler(self) -> Any:
        import diffusers

        return getattr(diffusers, self.scheduler_config["_class_name"]).from_config(
            self.scheduler_config
        )


#: the tiny pipelines ``rectdiff sd tiny --family NAME`` builds
TINY: dict[str, TinyRecipe] = {
    "sd15": TinyRecipe(
        "StableDiffusionPipeline",
        lambda scratch, size: sd_parts(scratch, size, "1"),
        SD15_SCHEDULER_CONFIG,
        "SD 1.5: eps-prediction, scaled_linear betas, PNDM config",
    ),
    "sd2": TinyRecipe(
        "StableDiffusionPipeline",
        lambda scratch, size: sd_parts(scratch, size, "2"),
        SD2_SCHEDULER_CONFIG,
        "SD 2.1 (768): v-prediction, DDIM config",
    ),
    "sd2-zsnr": TinyRecipe(
        "StableDiffusionPipeline",
        lambda scratch, size: sd_parts(scratch, size, "2"),
        SD2_ZSNR_SCHEDULER_CONFIG,
        "SD 2.1 with zero terminal SNR (rescale_betas_zero_snr, trailing), v-prediction",
    ),
    "sdxl": TinyRecipe(
        "StableDiffusionXLPipeline",
        sdxl_parts,
        SDXL_SCHEDULER_CONFIG,
        "SDXL base 1.0: two text encoders, text_time embedding, Euler config, eps",
    ),
    "sd3": TinyRecipe(
        "StableDiffusion3Pipeline",
        sd3_parts,
        SD3_SCHEDULER_CONFIG,
        "SD3 medium: MMDiT, two CLIP encoders and T5, rectified flow (FlowMatchEuler, shift 3)",
    ),
}


def _check_out(out: Path) -> None:
    """Refuse to build into a folder that holds anything (nothing of the user's is replaced)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{str(out)!r} already exists and is not empty; `rectdiff sd tiny` writes only into "
            "a new or empty folder (it never deletes files). Choose another folder."
        )


def _add_slow_tokenizer_files(folder: Path, scratch: Path) -> None:
    """Copy the byte-level vocabulary into each CLIP tokenizer folder, for slow tokenizers and
    older transformers (``save_pretrained`` writes only ``tokenizer.json``)."""
    for sub in sorted(folder.glob("tokenizer*")):
        config = sub / "tokenizer_config.json"
        if config.is_file() and "CLIP" in json.loads(config.read_text()).get("tokenizer_class", ""):
            for name in ("vocab.json", "merges.txt"):
                if not (sub / name).exists():
                    shutil.copyfile(scratch / name, sub / name)


def build_tiny_pipeline(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    sample_size: int = 8,
    fit_steps: int = 150,
    family: str = "sd15",
) -> Path:
    """Build a tiny pipeline of ``family`` and ``save_pretrained`` it into ``out_dir``.

    Args:
        out_dir: a new or empty folder (built in a temporary sibling and renamed, so it is
            never half-written).
        seed: seeds the random weights and the fit (same seed, same weights).
        sample_size: the network's default latent size; images are ``8 * sample_size`` px.
        fit_steps: AdamW steps fitting the network to the synthetic latents (see
            :mod:`.parts`); 0 keeps the random weights.
        family: a :data:`TINY` name: ``sd15``, ``sd2``, ``sd2-zsnr``, ...

    Returns:
        ``out_dir`` as a Path; load it with ``DiffusionPipeline.from_pretrained``.

    Raises:
        ValueError: for an unknown family, a sample_size the networks cannot halve (odd or
            < 2), a negative fit_steps or a non-empty ``out_dir`` (nothing is written).
    """
    import diffusers

    from ..families import family_named

    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY)}.")
    if (
        isinstance(sample_size, bool)
        or not isinstance(sample_size, int)
        or sample_size < 2
        or sample_size % 2
    ):
        raise ValueError(f"sample_size must be an even integer >= 2, got {sample_size!r}.")
    if isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0:
        raise ValueError(f"fit_steps must be an integer >= 0, got {fit_steps!r}.")
    recipe = TINY[family]
    out = Path(out_dir)
    _check_out(out)
    tmp = temporary_sibling(out)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            parts = recipe.parts(tmp / ".scratch", sample_size)
        pipe = getattr(diffusers, recipe.pipeline_class)(scheduler=recipe.scheduler(), **parts)
        fit_network(pipe, family_named(recipe.pipeline_class), fit_steps, seed)
        pipe.save_pretrained(tmp)
        _add_slow_tokenizer_files(tmp, tmp / ".scratch")
        shutil.rmtree(tmp / ".scratch")
        config_text = json.dumps(recipe.scheduler_config, indent=2) + "\n"
        (tmp / "scheduler" / "scheduler_config.json").write_text(config_text)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        named = named_os_error(err, tmp)  # a full disk: the save says neither file nor folder
        if named is err or not isinstance(err, Exception):
            raise
        raise named from err
    if out.exists():
        out.rmdir()  # empty (checked above)
    return publish_folder(tmp, out)
