"""Resumable batch streams for the trainer: in-memory tensors, or a prepared DataLoader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

__all__ = ["TensorBatches", "LoaderBatches"]


class TensorBatches:
    """Random batches of in-memory tensors (all indexed alike), resumable.

    Every process draws the same permutation (``data_generator`` is seeded alike, so the
    main process's saved state is every process's) and takes its own ``batch_size`` slice
    of each global batch, so processes see disjoint samples.
    """

    def __init__(
        self, tensors: tuple[Tensor, ...], batch_size: int, generator: torch.Generator,
        rank: int, world: int,
    ) -> None:  # fmt: skip
        lengths = {len(t) for t in tensors}
        if len(lengths) != 1:
            raise ValueError(f"data tensors must have the same length, got {sorted(lengths)}.")
        self.tensors, self.batch_size, self.generator = tensors, batch_size, generator
        self.rank, self.world, self.n = rank, world, lengths.pop()
        self.perm = torch.empty(0, dtype=torch.long, device=tensors[0].device)
        self.pos = 0

    def __next__(self) -> tuple[Tensor, ...]:
        need = self.batch_size * self.world
        while self.perm.numel() - self.pos < need:
            fresh = torch.randperm(self.n, generator=self.generator, device=self.perm.device)
            self.perm, self.pos = torch.cat([self.perm[self.pos :], fresh]), 0
        start = self.pos + self.rank * self.batch_size
        idx = self.perm[start : start + self.batch_size]
        self.pos += need
        return tuple(t[idx] for t in self.tensors)

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.cpu(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"].to(self.perm.device), int(state["pos"])


class LoaderBatches:
    """Endless batches from an accelerate-prepared DataLoader (epochs re-seeded by number)."""

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
