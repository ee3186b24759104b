"""The ``Accelerator`` a training run makes for its :class:`~rectdiff.training.TrainConfig`."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin

from .config import TrainConfig

__all__ = ["new_accelerator"]


def new_accelerator(config: TrainConfig) -> Accelerator:
    """The ``Accelerator`` a :class:`Trainer` makes for ``config``: its mixed precision,
    ``grad_accum`` micro-batches per optimizer step whatever the loader's length (no step
    forced at an epoch's end), and accelerate's seedable sampler (resumable loaders)."""
    try:
        # the loop cycles loaders itself: an epoch's end must not force an optimizer step
        plugin = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
        return Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_plugin=plugin,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # resumable
        )
    except ValueError as err:  # accelerate fixes mixed precision once per process
        if "already been initialized" not in str(err):
            raise
        raise ValueError(
            f"mixed_precision={config.mixed_precision!r} differs from the precision this process "
            "already set up with accelerate, which allows one per process. Use the same "
            "mixed_precision for every train() in a process, or pass accelerator=."
        ) from err
