"""Couplings in memory, and the noise a student is trained with so that it reproduces them.

A coupling is ``(eps, x0_hat)``: the standard-normal noise a sampler started from and the
sample it ended at, plus any per-pair conditioning (class labels, token ids). A pair store
always holds the *standard-normal* eps, so couplings made in one form can train another.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..forms import Form
from .store import PairDataset
from .verify import verified_shards

__all__ = ["Couplings", "load_pairs", "start_noise"]


@dataclass
class Couplings:
    """Pairs held in memory.

    Attributes:
        eps: ``(N, ...)`` standard-normal noise the teacher's sampler started from.
        x0: ``(N, ...)`` the samples it reached.
        cond: per-pair conditioning tensors with leading dimension N (e.g. ``class_labels``),
            passed to the model as keyword arguments in training and sampling.
    """

    eps: Tensor
    x0: Tensor
    cond: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.eps.shape != self.x0.shape:
            raise ValueError(
                f"pairs need eps and x0 of one shape, got {tuple(self.eps.shape)} and "
                f"{tuple(self.x0.shape)}."
            )
        for key, value in self.cond.items():
            if not isinstance(value, Tensor) or value.shape[:1] != self.eps.shape[:1]:
                raise ValueError(
                    f"conditioning {key!r} must be a tensor with one row per pair "
                    f"({self.eps.shape[0]}), got {getattr(value, 'shape', type(value).__name__)}."
                )

    def __iter__(self) -> Iterator[Tensor]:
        """``eps, x0 = couplings`` for unconditional pairs; conditional pairs refuse, so that
        no caller drops their labels silently."""
        if self.cond:
            raise ValueError(
                f"these pairs carry conditioning {sorted(self.cond)}; read .eps, .x0 and .cond "
                "instead of unpacking two values."
            )
        return iter((self.eps, self.x0))

    @classmethod
    def of(cls, pairs: Couplings | PairDataset | str | os.PathLike[str] | tuple) -> Couplings:
        """Couplings from a store folder, a :class:`PairDataset`, a tuple ``(eps, x0)`` or
        ``(eps, x0, cond)``, or couplings themselves."""
        if isinstance(pairs, Couplings):
            return pairs
        if isinstance(pairs, tuple):
            if len(pairs) not in (2, 3):
                raise ValueError(
                    f"in-memory pairs are (eps, x0) or (eps, x0, cond), got {len(pairs)} items."
                )
            cond = dict(pairs[2]) if len(pairs) == 3 else {}
            return cls(pairs[0], pairs[1], cond)
        return load_pairs(pairs)


def load_pairs(
    pairs: PairDataset | str | os.PathLike[str], *, verify: bool = True, **checks: Any
) -> Couplings:
    """Every pair of a store in memory, with every stored conditioning tensor.

    A store given by its folder is checked as it is read, each shard file read once
    (:func:`~.verify.verified_shards`: manifest, sizes, sha256 unless ``verify=False``,
    shapes, dtypes, finiteness; and with ``checks`` such as ``model=``, ``form=``,
    ``prediction=`` the store's origin). String conditioning (prompts) stays in the store;
    the Stable Diffusion path reads it.

    Raises:
        PairStoreError: a missing, damaged or (with ``checks``) foreign store, naming the
            shard and field.
    """
    if isinstance(pairs, PairDataset):
        shards = [pairs.shard(k) for k in range(pairs.num_shards)]
    else:
        shards = list(verified_shards(pairs, checksums=verify, **checks))
    keys = [k for k, v in shards[0].items() if k not in ("eps", "x0") and isinstance(v, Tensor)]
    return Couplings(
        eps=torch.cat([s["eps"] for s in shards]),
        x0=torch.cat([s["x0"] for s in shards]),
        cond={key: torch.cat([s[key] for s in shards]) for key in keys},
    )


def start_noise(eps: Tensor, x0_hat: Tensor, form: Form, t_start: float | None = None) -> Tensor:
    """The noise that puts the pair's first-order line through the student's sampling start.

    A sampler in ``form`` starts from ``x_start = sigma(T) eps`` (T = ``t_start``, default
    ``form.t_max``), but the line ``x_t = alpha_t x0_hat + sigma_t eps`` passes through
    ``alpha(T) x0_hat + sigma(T) eps`` there. Wherever ``alpha(T) != 0`` (VE: alpha = 1; VP:
    0.0064; SD 1.5: 0.068) even a perfect student would then miss its own pair. Training on

        eps~ = (x_start - alpha(T) x0_hat) / sigma(T) = eps - (alpha(T) / sigma(T)) x0_hat

    puts ``x_T = sigma(T) eps`` exactly on the line, so one DDIM step from the start returns
    ``x0_hat`` (Rectified Diffusion, Wang et al. 2024, sec. 3: the first-order ODE through the
    sampler's own start). For flow matching with t_max = 1 the correction is 0.
    """
    t = form.t_max if t_start is None else t_start
    ratio = float(form.alpha(t) / form.sigma(t))
    if ratio == 0.0:
        return eps
    return eps - ratio * x0_hat
