"""Loading a local pipeline folder, its form and its identity, through its family.

A folder's :class:`~rectdiff.stable_diffusion.families.PipelineFamily` (from its
``model_index.json``) says which sub-folders it needs and loads it with diffusers'
``DiffusionPipeline.from_pretrained`` on the local folder with ``local_files_only=True``:
nothing is fetched by name. The form and prediction type come from the checkpoint's own
scheduler config through :func:`rectdiff.forms.from_diffusers` (for SD 1.5 a
:class:`~rectdiff.forms.DiscreteVP` on its ``scaled_linear`` table, predicting ``"eps"``);
the schedule is never switched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .. import forms
from ..errors import ConfigError, StoreError, is_expected, one_line
from .families import family_for

__all__ = [
    "check_pipeline_dir",
    "load_pipeline",
    "pipeline_form",
    "pipeline_fingerprint",
    "vae_scale_factor",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_pipeline_dir(path: str | os.PathLike[str], need_vae: bool = False) -> Path:
    """``path`` as a Path if it is a pipeline folder of a supported family, else a
    ValueError saying why.

    Raises:
        ValueError: naming the folder and what is missing (the folder itself,
            ``model_index.json`` or a component sub-folder) or its unsupported class.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(
            f"pipeline folder {str(root)!r} does not exist; give a local diffusers pipeline "
            "folder (one written by save_pretrained, or `rectdiff sd tiny DIR`)."
        )
    if not (root / "model_index.json").is_file():
        raise ValueError(
            f"{str(root)!r} is not a diffusers pipeline folder: it has no model_index.json. "
            "Give the folder that holds model_index.json, unet/, text_encoder/, tokenizer/, "
            "scheduler/ and vae/ (e.g. a local copy of stable-diffusion-v1-5)."
        )
    family = family_for(root)
    parts = family.required_parts + (("vae",) if need_vae else ())
    missing = [part for part in parts if not (root / part).is_dir()]
    if missing:
        raise ValueError(
            f"pipeline folder {str(root)!r} lacks the sub-folder(s) {', '.join(missing)}; a "
            f"{family.title} pipeline needs " + ", ".join(family.required_parts + ("vae",)) + "."
        )
    return root


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[dtype]


def load_pipeline(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
    with_vae: bool = True,
) -> Any:
    """The folder's pipeline, loaded by its family (``DiffusionPipeline.from_pretrained``
    with ``local_files_only=True``; for Stable Diffusion without safety checker).

    Args:
        path: a local pipeline folder.
        dtype: weights dtype (``torch_dtype``): float32, float16 or bfloat16.
        device: where to move it (default: stays on the CPU).
        with_vae: False skips loading the VAE (pair generation and training need only
            latents); ``pipe.vae`` is then None.

    Returns:
        The pipeline, progress bars off.

    Raises:
        ValueError: if ``path`` is not a pipeline folder of a supported family (see
            :func:`check_pipeline_dir`).
    """
    root = check_pipeline_dir(path, need_vae=with_vae)
    family, dtype, device = family_for(root), _dtype(dtype), check_device(device)
    with _quiet_loading():
        try:
            pipe = family.load(root, dtype, with_vae=with_vae)
        except (OSError, ValueError, SafetensorError) as err:
            if is_expected(err) and not (isinstance(err, OSError) and err.errno is None):
                raise
            # diffusers' and transformers' own: a damaged weights or config file
            raise StoreError(
                f"pipeline folder {str(root)!r} could not be loaded: {one_line(err)} Check "
                "that folder (a damaged or partly copied weights or config file), or write it "
                "again (save_pretrained, or `rectdiff sd tiny DIR`)."
            ) from err
    return pipe.to(device) if device is not None else pipe


def check_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that exists here (None stays None).

    Raises:
        ConfigError: naming it, for a string torch does not know or a device absent here.
    """
    if device is None or isinstance(device, torch.device) and device.type == "cpu":
        return None if device is None else device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"device {device!r} is not a torch device; allowed: cpu, cuda, cuda:N, mps."
        ) from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if dev.type in available and not available[dev.type]():
        raise ConfigError(
            f"device {device!r}: this torch has no {dev.type} device here; use cpu (the "
            "default), or install a torch build with it."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices (0 to "
            f"{torch.cuda.device_count() - 1})."
        )
    return dev


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No loading progress bars and no library notes on stderr while a pipeline loads (what
    went wrong, if anything, is the one line the command prints)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [
        (lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)
    ]
    levels = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in bars:
        lib.disable_progress_bar()
    for lib, _ in levels:
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()
        for lib, level in levels:
            lib.set_verbosity(level)


def pipeline_form(pipe: Any) -> tuple[forms.Form, str]:
    """The pipeline's form and prediction type from its own scheduler config."""
    return family_for(pipe).form(pipe)


def vae_scale_factor(path: str | os.PathLike[str]) -> int:
    """Pixels per latent cell, ``2 ** (len(vae.block_out_channels) - 1)``, from ``vae/config.json``
    (8 for SD) without loading the VAE; 8 when the folder has no VAE config."""
    config = Path(path) / "vae" / "config.json"
    if not config.is_file():
        return 8
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)


def _sha256_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def pipeline_fingerprint(path: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every file of the parts that determine generated latents.

    Returns:
        ``{part: sha256}`` for the family's identity parts (Stable Diffusion: unet,
        text_encoder, tokenizer, scheduler), each over the part's files (names and bytes).
        Reads every weight file once (about 4 GB, a few seconds, for SD 1.5 in float32).
    """
    root = check_pipeline_dir(path)
    return {part: _sha256_files(root / part) for part in family_for(root).identity_parts}
