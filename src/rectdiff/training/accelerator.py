"""The ``Accelerator`` a training run makes for its :class:`~rectdiff.training.TrainConfig`,
with the tracker ``log_with`` names (tensorboard or wandb, optional packages), and the calls
its hot loop makes on the prepared optimizer and scheduler (:func:`direct_calls`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, GradientAccumulationPlugin

from ..errors import ConfigError
from .config import TrainConfig

__all__ = ["new_accelerator", "tracker", "tracked_settings", "DirectCalls", "direct_calls"]


def tracker(config: TrainConfig) -> str | None:
    """The accelerate tracker ``config.log_with`` names (None for ``"csv"`` or None).

    Raises:
        ConfigError: there is no ``out_dir`` to log into. (A tracker whose package is not
            installed is refused by ``TrainConfig`` itself.)
    """
    if config.log_with not in ("tensorboard", "wandb"):
        return None
    if config.out_dir is None:
        raise ConfigError(f"log_with = {config.log_with!r} logs into out_dir; set out_dir.")
    if config.log_with == "wandb" and not {"WANDB_MODE", "WANDB_API_KEY"} & set(os.environ):
        os.environ["WANDB_MODE"] = "offline"  # never reach for the network unasked
    return config.log_with


def tracked_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings a tracker records with the run (its scalar ones)."""
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (bool, int, float, str))}


def new_accelerator(config: TrainConfig) -> Accelerator:
    """The ``Accelerator`` a :class:`Trainer` makes for ``config``: its mixed precision,
    ``grad_accum`` micro-batches per optimizer step whatever the loader's length (no step
    forced at an epoch's end), accelerate's seedable sampler (resumable loaders) and the
    tracker of ``config.log_with``, logging into ``out_dir``."""
    name = tracker(config)
    try:
        # the loop cycles loaders itself: an epoch's end must not force an optimizer step
        plugin = GradientAccumulationPlugin(num_steps=config.grad_accum, sync_with_dataloader=False)
        return Accelerator(
            log_with=name,
            project_dir=config.out_dir if name else None,
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


@dataclass(frozen=True)
class DirectCalls:
    """What a training step calls for the optimizer, the scheduler and clipping: the wrapped
    objects themselves where accelerate's wrappers would only delegate to them (``plain``),
    accelerate's wrappers otherwise."""

    plain: bool
    optimizer_step: Callable[[], Any]
    zero_grad: Callable[..., Any]
    scheduler_step: Callable[[], None]
    clip_grad_norm: Callable[..., Any]


def direct_calls(acc: Accelerator, optimizer: Any, scheduler: Any) -> DirectCalls:
    """The calls of a hot training loop on ``acc``'s prepared optimizer and scheduler.

    Without a grad scaler (fp16) or XLA, accelerate's wrappers add only per-call look-ups:
    ``AcceleratedOptimizer.step`` probes for the lomo_optim package and ``zero_grad``
    inspects a signature; ``AcceleratedScheduler.step`` steps the wrapped scheduler once per
    process after an optimizer step that ran (and none is skipped without a scaler);
    ``clip_grad_norm_`` calls torch's unless the model is sharded (FSDP, DeepSpeed,
    Megatron). Then the wrapped objects are called directly, with the same numbers bit for
    bit (tests/training/test_step_path.py).
    """
    plain = acc.scaler is None and acc.distributed_type != DistributedType.XLA
    raw = optimizer.optimizer if plain else optimizer
    inner = getattr(scheduler, "scheduler", None)
    scheduler_step: Callable[[], None] = scheduler.step
    if plain and inner is not None and not hasattr(inner, "total_steps") and not acc.split_batches:
        processes = acc.num_processes
        scheduler_step = inner.step if processes == 1 else _repeated(inner.step, processes)
    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    clip = (
        torch.nn.utils.clip_grad_norm_
        if plain and acc.distributed_type not in sharded
        else acc.clip_grad_norm_
    )
    return DirectCalls(plain, raw.step, raw.zero_grad, scheduler_step, clip)


def _repeated(step: Callable[[], Any], times: int) -> Callable[[], None]:
    def repeated() -> None:
        for _ in range(times):
            step()

    return repeated
