"""Samples drawn while a model trains: every ``TrainConfig.sample_every`` steps the model (its
EMA weights when it keeps them) samples from one fixed noise with ``sample_steps`` DDIM steps,
so that successive snapshots differ only by training. A 2-D model's samples are a scatter
plot, an image model's a mosaic (:func:`rectdiff.plots.plot_samples`), written as
``out_dir/samples/step_N.png`` (with ``.svg`` and the samples' numbers as ``.csv``) and, with
``log_with``, logged to the tracker as an image. With one DDIM step the snapshots show what
rectification is for: the one-step sample sharpening as the model becomes first-order.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..forms import Form

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["SNAPSHOTS", "drawable", "snapshot_noise", "draw_snapshot", "save_snapshot",
           "take_snapshot"]  # fmt: skip

#: the folder of ``out_dir`` the snapshots go in
SNAPSHOTS = "samples"


def drawable(shape: tuple[int, ...]) -> bool:
    """Whether samples of one-item ``shape`` can be drawn: 2-D points or (C, H, W) images
    with C in (1, 3)."""
    return shape == (2,) or (len(shape) == 3 and shape[0] in (1, 3))


def snapshot_noise(shape: tuple[int, ...], seed: int, device: torch.device | str) -> Tensor:
    """The fixed standard-normal noise of every snapshot: 1000 points, or 16 images."""
    generator = torch.Generator().manual_seed(seed + 7919)
    n = 1000 if shape == (2,) else 16
    return torch.randn((n, *shape), generator=generator).to(device)


@torch.no_grad()
def draw_snapshot(
    model: nn.Module, noise: Tensor, *, form: Form, prediction: str, steps: int
) -> Tensor:
    """``steps`` DDIM steps of ``model`` from ``noise`` on the form's default grid (the model
    is put in eval mode for the solve and back after)."""
    from .. import samplers

    was_training = model.training
    model.eval()
    try:
        return samplers.sample(model, noise, form=form, prediction=prediction, solver="ddim",
                               steps=steps)  # fmt: skip
    finally:
        model.train(was_training)


def save_snapshot(
    samples: Tensor, out_dir: str | Path, step: int, accelerator: Accelerator | None = None
) -> Path:
    """Draw ``samples`` as ``out_dir/samples/step_N.png`` (``.svg``, ``.csv``) and log the
    image to ``accelerator``'s trackers (tensorboard, wandb) at ``step``; returns the PNG."""
    from matplotlib.image import imread

    from ..plots.samples import plot_samples

    stem = Path(out_dir) / SNAPSHOTS / f"step_{step:07d}"
    png = plot_samples({f"step {step}": samples}, stem)[0]
    for tracker in accelerator.trackers if accelerator is not None else []:
        image = imread(png)[..., :3]  # RGB in [0, 1]
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": image}, step=step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [image]}, step=step)
    return png


def take_snapshot(trainer: Trainer) -> Path | None:
    """Draw and save ``trainer``'s samples now (main process; its EMA weights when kept); the
    PNG, or None when its samples cannot be drawn (neither 2-D points nor images, or a
    conditional model: said once, as a warning)."""
    acc, shape, conditional = trainer.accelerator, trainer._item_shape, trainer._conditional
    if shape is None or not drawable(shape) or conditional:
        if not trainer._snapshot_refused:
            trainer._snapshot_refused = True
            why = "a conditional model" if conditional else f"items of shape {shape}"
            warnings.warn(
                f"sample_every={trainer.config.sample_every}: snapshots draw unconditional 2-D "
                f"points or (C, H, W) images, not {why}; none are written.",
                stacklevel=3,
            )
        return None
    png = None
    if acc.is_main_process:
        if trainer._snapshot_noise is None:
            trainer._snapshot_noise = snapshot_noise(shape, trainer.config.seed, acc.device)
        ema, params = trainer.ema, trainer.params
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        try:
            samples = draw_snapshot(
                acc.unwrap_model(trainer.model), trainer._snapshot_noise, form=trainer.form,
                prediction=trainer.prediction, steps=trainer.config.sample_steps,
            )  # fmt: skip
        finally:
            if ema is not None:
                ema.restore(params)
        png = save_snapshot(samples, trainer.config.out_dir, trainer.step_count, acc)
    acc.wait_for_everyone()
    return png
