"""How entangled a coupling (eps, x0) is: transport cost and the rate at which its lines cross.

A coupling is the pairs ``(eps, x0)``: ``eps`` the standard-normal noise a sampler started
from and ``x0`` the sample it reached. Rectified-flow papers write ``Z_0`` for the noise end
and ``Z_1`` for the data end; their formulas are quoted in their own variables. All
arithmetic is float64; scalar results are 0-d float64 tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..forms import Form
from ..io.configs import check_choice
from .trajectory import REDUCTIONS

__all__ = ["transport_cost", "relative_transport_cost", "crossing_rate"]

_F64 = torch.float64


def _pairs(eps: Tensor, x0: Tensor, form: Form | None) -> tuple[Tensor, Tensor]:
    """``(x1, x0)`` as float64 ``(N, D)``; x1 is the noise end (see :func:`transport_cost`)."""
    if eps.shape != x0.shape or eps.ndim < 1 or eps.shape[0] < 1:
        raise ValueError(
            "eps and x0 must be batches (N, ...) of the same shape, got "
            f"{tuple(eps.shape)} and {tuple(x0.shape)}."
        )
    x1 = eps.detach().to("cpu", _F64).reshape(eps.shape[0], -1)
    if form is not None:
        x1 = x1 * form.sigma(form.t_max)
    return x1, x0.detach().to("cpu", _F64).reshape(x0.shape[0], -1)


def _reduce_dims(sq: Tensor, reduction: str) -> Tensor:
    check_choice(reduction, REDUCTIONS, "reduction")
    return sq.sum(-1) if reduction == "sum" else sq.mean(-1)


def transport_cost(
    eps: Tensor, x0: Tensor, form: Form | None = None, reduction: str = "sum"
) -> Tensor:
    """Transport cost of a coupling, ``E ||x0 - x1||^2``.

    Convention: the noise end is ``x1 = eps``, the standard-normal noise as stored (the
    rectified-flow papers' ``X_0 ~ N(0, I)``; Liu, Gong & Liu 2023, eq. 1 and Theorem 3.5),
    which makes costs comparable across forms. With ``form`` given, the noise end is
    instead the state the sampler starts from, ``x1 = sigma(t_max) eps`` (e.g. 50 eps in VE).

    Args:
        eps: (N, ...) standard-normal noise.
        x0: (N, ...) the samples paired with it.
        form: optional form whose start state is used as the noise end.
        reduction: squared distance summed (``"sum"``) or averaged (``"mean"``) over dims.

    Returns:
        A 0-d float64 tensor.
    """
    x1, x0 = _pairs(eps, x0, form)
    return _reduce_dims((x0 - x1).square(), reduction).mean()


def _subsample(n: int, max_points: int, seed: int) -> Tensor:
    if n <= max_points:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:max_points]


def relative_transport_cost(
    eps: Tensor,
    x0: Tensor,
    form: Form | None = None,
    reduction: str = "sum",
    *,
    max_points: int = 1000,
    seed: int = 0,
) -> Tensor:
    """Transport cost of the coupling minus the optimal one between the same point clouds.

        C_rel = E ||x0_i - x1_i||^2 - W_2^2(mu_x1, mu_x0),

    with ``W_2^2`` the exact optimal-transport cost between the two empirical measures
    (uniform weights, squared Euclidean cost; POT's ``ot.emd2``). A coupling is a
    permutation, hence a feasible plan, so ``C_rel >= 0``, with equality exactly when the
    pairing is optimal (e.g. the sorted pairing in 1-D). Liu, Gong & Liu (2023, Theorem 3.5)
    show rectification never increases the cost; C_rel is what remains above optimal.

    Args:
        eps, x0, form, reduction: as in :func:`transport_cost`.
        max_points: above this many pairs, both terms are computed on the same random
            subset of pairs (the exact solve is O(N^3)).
        seed: seed of that subset.

    Returns:
        A 0-d float64 tensor.
    """
    import ot  # POT, imported on use: 2 s of every process's start otherwise

    x1, x0 = _pairs(eps, x0, form)
    idx = _subsample(len(x1), max_points, seed)
    x1, x0 = x1[idx], x0[idx]
    coupled = (x0 - x1).square().sum(-1).mean()
    x1_np, x0_np = x1.numpy(), x0.numpy()
    weights = np.full(len(x1_np), 1.0 / len(x1_np))
    cost_matrix = ot.dist(x1_np, x0_np, metric="sqeuclidean")
    optimal = ot.emd2(weights, weights, cost_matrix, numItermax=max(100_000, 50 * len(x1_np) ** 2))
    rel = coupled - torch.as_tensor(float(optimal), dtype=_F64)
    return rel if check_choice(reduction, REDUCTIONS, "reduction") == "sum" else rel / x1.shape[1]


def _segments_cross(p1: Tensor, q1: Tensor, p2: Tensor, q2: Tensor) -> Tensor:
    """Whether 2-D segments [p1, q1] and [p2, q2] cross at a point interior to both.

    The orientation test: the endpoints of each segment lie strictly on opposite sides of
    the other's line (de Berg et al., Computational Geometry, sec. 2.1). Touching or
    collinear overlapping segments (probability zero for continuous data) do not count.
    """

    def orient(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        ab, ac = b - a, c - a
        return ab[..., 0] * ac[..., 1] - ab[..., 1] * ac[..., 0]

    straddle_1 = orient(p1, q1, p2) * orient(p1, q1, q2) < 0
    straddle_2 = orient(p2, q2, p1) * orient(p2, q2, q1) < 0
    return straddle_1 & straddle_2


def _pair_indices(n: int, max_pairs: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """All pairs i < j if there are at most ``max_pairs``, else that many random pairs i != j."""
    if n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
        return i, j
    i = torch.randint(n, (max_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (max_pairs,), generator=generator)) % n
    return i, j


def crossing_rate(
    eps: Tensor,
    x0: Tensor,
    *,
    max_pairs: int = 200_000,
    projections: int = 16,
    seed: int = 0,
) -> Tensor:
    """Fraction of pairs of a coupling whose straight paths eps_i -> x0_i, eps_j -> x0_j cross.

    Crossing straight paths are what rectification removes: where interpolants of
    different pairs meet, the rectified velocity averages them and the new paths bend
    (Liu, Gong & Liu 2023, Fig. 2).

    2-D: the exact rate, the fraction of pairs (i, j) whose segments cross (orientation
    test, see ``_segments_cross``) over all pairs, or over ``max_pairs`` random pairs when
    N (N - 1) / 2 is larger.

    D > 2: straight segments in general position never meet, so a proxy is needed. We use
    the *projected crossing rate*: the same 2-D rate after projecting both point clouds
    onto a random orthonormal 2-D plane, averaged over ``projections`` planes. It needs no
    length scale (unlike a near-collision radius), is invariant to rotations and scale, and
    an orthonormal projection of the plane onto itself preserves crossings, so it reduces
    to the exact rate in 2-D; segments lying in any one 2-D plane of R^D keep their
    crossings under almost every projection. 1-D data (D = 1): the fraction of pairs
    whose order is reversed by the coupling (the segments' overlap test on the line is
    degenerate, and order inversion is the 1-D analogue of crossing).

    Args:
        eps, x0: (N, ...) the pairs, N >= 2.
        max_pairs: largest number of pairs tested per plane.
        projections: random planes for D > 2.
        seed: seed of the pair subset and the planes.

    Returns:
        A 0-d float64 tensor in [0, 1].
    """
    x1, x0 = _pairs(eps, x0, None)
    n, dim = x1.shape
    if n < 2:
        raise ValueError(f"crossing_rate needs at least 2 pairs, got {n}.")
    generator = torch.Generator().manual_seed(seed)
    i, j = _pair_indices(n, max_pairs, generator)
    if dim == 1:
        return ((x1[i, 0] - x1[j, 0]) * (x0[i, 0] - x0[j, 0]) < 0).to(_F64).mean()
    if dim == 2:
        return _segments_cross(x1[i], x0[i], x1[j], x0[j]).to(_F64).mean()
    rates = []
    for _ in range(projections):
        basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=generator, dtype=_F64))
        a, b = x1 @ basis, x0 @ basis
        rates.append(_segments_cross(a[i], b[i], a[j], b[j]).to(_F64).mean())
    return torch.stack(rates).mean()
