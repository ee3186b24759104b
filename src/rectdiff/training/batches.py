"""Resumable batch streams for the trainer: in-memory tensors, or a prepared DataLoader."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "TensorBatches", "LoaderBatches", "process_rows", "draws_per_process", "prepare_whole_batches",
]  # fmt: skip


def process_rows(batch_size: int, accelerator: Accelerator) -> slice | None:
    """The rows of each whole batch that this process computes: the ``r``-th of
    ``num_processes`` equal blocks (None on one process: all of them).

    Every process draws the same batch, times and noise (seeded by step, not by process),
    and the gradients of the blocks' mean losses average (DDP) to the one-process
    gradient of the whole batch, so a run's result does not depend on the process count.

    Raises:
        ConfigError: when ``batch_size`` is not a multiple of the number of processes.
    """
    world = accelerator.num_processes
    if world == 1:
        return None
    if batch_size % world:
        raise ConfigError(
            f"batch_size={batch_size} does not split into {world} processes: it is the whole "
            f"batch of all processes together. Use a multiple of {world}, e.g. "
            f"{batch_size - batch_size % world or world}."
        )
    size = batch_size // world
    return slice(accelerator.process_index * size, (accelerator.process_index + 1) * size)


def draws_per_process(loss_fn: Callable[..., Any], accelerator: Accelerator) -> bool:
    """Whether ``loss_fn`` must be given only this process's rows, drawing its own noise
    (with a warning: its result then depends on the number of processes): on more than one
    process, for a loss that takes neither ``rows=`` nor ``**kwargs``."""
    if accelerator.num_processes == 1:
        return False
    params = inspect.signature(loss_fn).parameters.values()
    if any(p.name == "rows" or p.kind is p.VAR_KEYWORD for p in params):
        return False
    warnings.warn(
        f"the loss {getattr(loss_fn, '__name__', loss_fn)!r} takes no rows= argument: each "
        f"process draws its own noise and t for its rows, so the result depends on the number "
        f"of processes ({accelerator.num_processes}). Add rows=None to it and compute only "
        "x0[rows] after drawing for the whole batch (see training.losses.diffusion_loss).",
        stacklevel=3,
    )
    return True


def prepare_whole_batches(loader: torch.utils.data.DataLoader, accelerator: Accelerator) -> Any:
    """``loader`` prepared by accelerate (device placement, seedable sampler) as on one
    process, so that every process yields the same whole batches; on one process exactly
    what ``accelerator.prepare(loader)`` gives."""
    config = accelerator.dataloader_config
    return prepare_data_loader(
        loader, accelerator.device, num_processes=1, process_index=0,
        split_batches=config.split_batches, put_on_device=accelerator.device_placement,
        rng_types=accelerator.rng_types.copy(), dispatch_batches=config.dispatch_batches,
        even_batches=config.even_batches, use_seedable_sampler=config.use_seedable_sampler,
        data_seed=config.data_seed, non_blocking=config.non_blocking,
        use_stateful_dataloader=config.use_stateful_dataloader,
    )  # fmt: skip


class TensorBatches:
    """Random batches of in-memory tensors (all indexed alike), resumable.

    Every process draws the same permutation (``data_generator`` is seeded alike, so the
    main process's saved state is every process's) and yields the same whole batch of
    ``batch_size`` samples; the loss computes each process's rows of it
    (:func:`process_rows`).
    """

    def __init__(
        self, tensors: tuple[Tensor, ...], batch_size: int, generator: torch.Generator
    ) -> None:
        lengths = {len(t) for t in tensors}
        if len(lengths) != 1:
            raise ValueError(f"data tensors must have the same length, got {sorted(lengths)}.")
        self.tensors, self.batch_size, self.generator = tensors, batch_size, generator
        self.n = lengths.pop()
        self.perm = torch.empty(0, dtype=torch.long, device=tensors[0].device)
        self.pos = 0

    def __next__(self) -> tuple[Tensor, ...]:
        while self.perm.numel() - self.pos < self.batch_size:
            fresh = torch.randperm(self.n, generator=self.generator, device=self.perm.device)
            self.perm, self.pos = torch.cat([self.perm[self.pos :], fresh]), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return tuple(t[idx] for t in self.tensors)

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"].to(self.perm.device), int(state["pos"])


class LoaderBatches:
    """Endless batches from a DataLoader prepared by accelerate as for one process: every
    process iterates the same seeded batches (epochs re-seeded by number) and the loss
    computes its rows of each (:func:`process_rows`)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.epoch, self.seen = loader, 0, 0
        self._it: Iterator[Any] = iter(self.loader)

    def __next__(self) -> Any:
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.seen = self.epoch + 1, 0
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            self._it = iter(self.loader)
            batch = next(self._it)
        self.seen += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any], accelerator: Accelerator) -> None:
        self.epoch, self.seen = int(state["epoch"]), int(state["seen"])
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._it = iter(accelerator.skip_first_batches(self.loader, self.seen))
