"""How first-order, how straight and how entangled sampling trajectories and couplings are.

Trajectory measures take a :class:`rectdiff.samplers.Trajectory` (or any object with the
same fields ``t`` (K+1,), ``x`` (K+1, B, ...), ``x0_pred`` / ``eps_pred`` (K, B, ...) and
``form``); coupling measures take the pairs ``(eps, x0)`` of a coupling, ``eps`` the
standard-normal noise a sampler started from and ``x0`` the sample it reached.

Time conventions: rectdiff's t runs from 1 (noise) to 0 (data); a trajectory is recorded in
that order. The rectified-flow papers (Liu, Gong & Liu 2023) write ``Z_0`` for the noise end
and ``Z_1`` for the data end, i.e. their time is ``u = 1 - t`` (after normalisation below);
all their formulas are quoted in their own variable ``u``. Straightness is unchanged by
reversing time, so nothing depends on that choice.

Two coordinate systems:
    ``coords="t"``  the states ``x_k`` against the sampler's time ``t_k``, normalised to
                    ``u_k = (t_0 - t_k) / (t_0 - t_K)`` in [0, 1].
    ``coords="y"``  the form-independent coordinates ``y = x_t / alpha_t`` against
                    ``s = sigma_t / alpha_t`` (normalised the same way). Since
                    ``y = x0 + s eps``, a first-order trajectory (x0- and eps-prediction
                    constant; Rectified Diffusion, Wang et al. 2024, Theorem 1) is a straight
                    line traversed at constant speed in s, in every form. Needs alpha > 0 on
                    the whole trajectory (flow matching's t = 1 is excluded by its
                    ``t_max = 0.999``).

All arithmetic is float64. Scalar results are 0-d float64 tensors (use ``float()``).
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import numpy as np
import ot
import torch
from torch import Tensor

from ..forms import Form

__all__ = [
    "MIN_STEPS",
    "TrajectoryLike",
    "first_order_deviation",
    "straightness",
    "curvature_profile",
    "transport_cost",
    "relative_transport_cost",
    "crossing_rate",
    "one_step_gap",
]

_F64 = torch.float64
#: trajectories with fewer steps than this give a straightness estimate that is mostly
#: discretisation (a 1-step trajectory is always "straight"); a warning says so.
MIN_STEPS = 8
COORDS = ("t", "y")
REDUCTIONS = ("sum", "mean")


class TrajectoryLike(Protocol):
    """The fields of :class:`rectdiff.samplers.Trajectory` that the diagnostics read."""

    t: Tensor
    x: Tensor
    x0_pred: Tensor
    eps_pred: Tensor
    form: Form


# --- input checks ---------------------------------------------------------------------


def _choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")
    return value


def _flat(x: Tensor, lead: int) -> Tensor:
    """``(lead..., B, ...)`` -> float64 ``(lead..., B, D)``."""
    if x.ndim < lead + 1:
        raise ValueError(
            f"expected a tensor with at least {lead + 1} dimensions (steps, batch, ...), got "
            f"shape {tuple(x.shape)}."
        )
    x = x.detach().to(_F64)
    return x.reshape(*x.shape[: lead + 1], -1)


def _times(traj: TrajectoryLike) -> Tensor:
    t = torch.as_tensor(traj.t).detach().to("cpu", _F64)
    steps = t.numel() - 1
    if t.ndim != 1 or steps < 1 or traj.x.shape[0] != steps + 1:
        raise ValueError(
            f"a trajectory needs t of shape (K+1,) with K >= 1 and x of shape (K+1, B, ...); got "
            f"t {tuple(t.shape)} and x {tuple(traj.x.shape)}."
        )
    if not bool((torch.diff(t) < 0).all()):
        raise ValueError(
            "trajectory times must decrease strictly from noise (t_start) to data (t_end); got "
            f"t = {t.tolist()[:6]}..."
        )
    return t


def _warn_few_steps(steps: int, what: str) -> None:
    if steps < MIN_STEPS:
        warnings.warn(
            f"{what} from a trajectory of {steps} step(s) is mostly discretisation error (a "
            f"single step is always straight); record at least {MIN_STEPS} steps, e.g. "
            "samplers.sample(..., steps=32, return_trajectory=True).",
            stacklevel=3,
        )


# --- trajectory measures ----------------------------------------------------------------


def _path(traj: TrajectoryLike, coords: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, u, z)``: times, normalised time in [0, 1] and float64 states ``(K+1, B, D)``."""
    _choice(coords, COORDS, "coords")
    t = _times(traj)
    z = _flat(traj.x, 1).cpu()
    if coords == "t":
        clock = t
    else:
        alpha, sigma = traj.form.alpha(t), traj.form.sigma(t)
        if not bool((alpha > 0).all()):
            raise ValueError(
                f"coords='y' divides by alpha_t, which is {float(alpha.min()):.3g} on this "
                f"trajectory (t in [{float(t.min()):.4g}, {float(t.max()):.4g}]) of "
                f"{traj.form!r}; start the sampler inside the safe range, t_start <= "
                f"form.t_max = {traj.form.t_max}."
            )
        z = z / alpha[:, None, None]
        clock = sigma / alpha
    u = (clock[0] - clock) / (clock[0] - clock[-1])
    return t, u, z


def _velocity_deviation(u: Tensor, z: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """Per-segment ``||(z_K - z_0) - (z_{k+1} - z_k) / du_k||^2``, shape ``(K, B)``, and
    the squared chord ``||z_K - z_0||^2``, shape ``(B,)``."""
    _choice(reduction, REDUCTIONS, "reduction")
    du = torch.diff(u)
    chord = z[-1] - z[0]
    velocity = torch.diff(z, dim=0) / du[:, None, None]
    deviation = (chord - velocity).square()
    chord_sq = chord.square()
    if reduction == "sum":
        return deviation.sum(-1), chord_sq.sum(-1)
    return deviation.mean(-1), chord_sq.mean(-1)


def straightness(
    traj: TrajectoryLike,
    reduction: str = "sum",
    coords: str = "t",
    *,
    relative: bool = False,
    per_sample: bool = False,
) -> Tensor:
    """Liu, Gong & Liu's straightness of the recorded trajectories.

    Definition (Liu, Gong & Liu 2023, "Flow straight and fast", eq. 4 / Def. 3.3):

        S(Z) = int_0^1 E ||(Z_1 - Z_0) - dZ_u/du||^2 du,

    zero exactly when every path is a straight line traversed at constant speed.

    Estimator: the path through the recorded states, linear between them, in normalised
    time ``u`` (see the module docstring for ``coords``). Its velocity on step k is
    ``(z_{k+1} - z_k) / du_k``, so

        S = sum_k du_k ||(z_K - z_0) - (z_{k+1} - z_k) / du_k||^2
          = sum_k ||z_{k+1} - z_k||^2 / du_k - ||z_K - z_0||^2.

    It is exact for piecewise-linear paths, a lower bound for smooth ones (by Jensen), and
    converges as O(max du^2) under refinement (computed from the first form, without
    cancellation).

    Args:
        traj: the trajectories, ``x`` of shape (K+1, B, ...).
        reduction: ``"sum"`` over dimensions (the paper) or ``"mean"`` (per dimension, as
            the rectified-flow codebases report it).
        coords: ``"t"`` (sampler time) or ``"y"`` (y = x / alpha against s = sigma / alpha).
        relative: divide by ``E ||Z_1 - Z_0||^2`` (same reduction), a scale-free number
            comparable across forms and coordinates.
        per_sample: return the value of each trajectory, shape (B,), instead of the mean.

    Returns:
        A 0-d float64 tensor (or (B,) with ``per_sample``).

    Warns:
        UserWarning: when the trajectory has fewer than :data:`MIN_STEPS` steps.
    """
    _, u, z = _path(traj, coords)
    _warn_few_steps(len(u) - 1, "straightness")
    deviation, chord_sq = _velocity_deviation(u, z, reduction)
    per_traj = (torch.diff(u)[:, None] * deviation).sum(0)
    if relative:
        per_traj = per_traj / chord_sq.mean()
    return per_traj if per_sample else per_traj.mean()


def curvature_profile(
    traj: TrajectoryLike,
    coords: str = "t",
    reduction: str = "sum",
    *,
    relative: bool = False,
) -> tuple[Tensor, Tensor]:
    """The integrand of :func:`straightness` step by step, for plotting against t.

    ``value_k = E ||(Z_1 - Z_0) - (z_{k+1} - z_k) / du_k||^2``: how far the local velocity on
    step k departs from the chord (Liu, Gong & Liu 2023, eq. 4, before integration), so that
    ``straightness = sum_k du_k value_k``.

    Args:
        traj: the trajectories.
        coords: ``"t"`` or ``"y"``; the abscissa is the sampler's time t in both.
        reduction: ``"sum"`` or ``"mean"`` over dimensions.
        relative: divide by ``E ||Z_1 - Z_0||^2``.

    Returns:
        ``(t_mid, value)``: float64 tensors of shape (K,), the midpoints
        ``(t_k + t_{k+1}) / 2`` of the steps and the batch-mean deviation on each.
    """
    t, u, z = _path(traj, coords)
    _warn_few_steps(len(u) - 1, "curvature_profile")
    deviation, chord_sq = _velocity_deviation(u, z, reduction)
    value = deviation.mean(1)
    if relative:
        value = value / chord_sq.mean()
    return 0.5 * (t[1:] + t[:-1]), value


def first_order_deviation(
    traj: TrajectoryLike, which: str = "x0", per_step: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """How much the x0-prediction (or eps-prediction) moves along the trajectories.

    A trajectory is first-order when the model's x0-prediction, equivalently its
    eps-prediction, is constant along it (Rectified Diffusion, Wang et al. 2024, Theorem 1);
    then one DDIM step lands exactly where many do. With ``p_k`` the prediction made at
    ``(x_k, t_k)``, k = 0..K-1, and ``p_ref`` the prediction at the end where it is best
    determined (the last x0-prediction, at the data end; the first eps-prediction, at the
    noise end), the relative RMS movement at step k is

        d_k = sqrt(E_b ||p_k - p_ref||^2) / sqrt(E_b ||p_ref||^2)

    (a ratio of batch means, so a sample near the origin cannot blow it up), and the
    deviation is its time average, each evaluation weighted by the length of the step it
    drives:

        D = sum_k d_k (t_k - t_{k+1}) / (t_0 - t_K).

    ``D = 0`` exactly when every trajectory is first-order; the weights make it converge
    under grid refinement (it is the mean over steps on a uniform grid).

    Args:
        traj: the trajectories; reads ``x0_pred`` or ``eps_pred`` of shape (K, B, ...).
        which: ``"x0"`` or ``"eps"``.
        per_step: return the curve ``(t_k, d_k)`` (two (K,) tensors) instead of D.

    Returns:
        A 0-d float64 tensor D, or ``(t[:-1], d)`` with ``per_step``.
    """
    _choice(which, ("x0", "eps"), "which")
    t = _times(traj)
    pred = _flat(traj.x0_pred if which == "x0" else traj.eps_pred, 1).cpu()
    if pred.shape[0] != len(t) - 1:
        raise ValueError(
            f"{which}_pred has {pred.shape[0]} steps but t has {len(t)} entries; expected "
            "one prediction per step, made at (x[k], t[k]) for k = 0..K-1."
        )
    ref = pred[-1] if which == "x0" else pred[0]
    drift = (pred - ref).square().sum(-1).mean(-1).sqrt() / ref.square().sum(-1).mean().sqrt()
    if per_step:
        return t[:-1], drift
    weights = -torch.diff(t) / (t[0] - t[-1])
    return (weights * drift).sum()


# --- coupling measures ------------------------------------------------------------------


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
    _choice(reduction, REDUCTIONS, "reduction")
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
    x1, x0 = _pairs(eps, x0, form)
    idx = _subsample(len(x1), max_points, seed)
    x1, x0 = x1[idx], x0[idx]
    coupled = (x0 - x1).square().sum(-1).mean()
    x1_np, x0_np = x1.numpy(), x0.numpy()
    weights = np.full(len(x1_np), 1.0 / len(x1_np))
    cost_matrix = ot.dist(x1_np, x0_np, metric="sqeuclidean")
    optimal = ot.emd2(weights, weights, cost_matrix, numItermax=max(100_000, 50 * len(x1_np) ** 2))
    rel = coupled - torch.as_tensor(float(optimal), dtype=_F64)
    return rel if _choice(reduction, REDUCTIONS, "reduction") == "sum" else rel / x1.shape[1]


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


# --- sampler measures -------------------------------------------------------------------


def one_step_gap(
    model: Any,
    eps: Tensor,
    *,
    form: Form,
    prediction: str,
    reference_solver: str = "dopri5",
    reference_steps: int = 256,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    cond: dict[str, Any] | None = None,
    per_sample: bool = False,
) -> Tensor:
    """Distance between one DDIM step and a converged solve from the same noise.

        gap = E_b sqrt(mean_d (x_ddim1 - x_ref)^2)

    (root-mean-square over dimensions per sample, then the batch mean). It is zero for a
    first-order model, where DDIM is exact (Rectified Diffusion, Wang et al. 2024, sec. 3),
    up to the reference solver's tolerance.

    Args:
        model: called as ``model(x_t, model_time, **cond)``.
        eps: (B, ...) standard-normal noise.
        form, prediction: the model's form and prediction type.
        reference_solver: the converged solver (``"dopri5"``, adaptive; or a fixed-step one
            with ``reference_steps`` steps).
        reference_steps, rtol, atol: passed to :func:`rectdiff.samplers.sample`.
        cond: conditioning passed to the model.
        per_sample: return the (B,) distances instead of their mean.

    Returns:
        A 0-d float64 tensor (or (B,) with ``per_sample``).
    """
    from .. import samplers  # samplers imports nothing from here; lazy to keep import light

    common = {"form": form, "prediction": prediction, "cond": cond}
    one = samplers.sample(model, eps, solver="ddim", steps=1, **common)
    ref = samplers.sample(
        model, eps, solver=reference_solver, steps=reference_steps, rtol=rtol, atol=atol, **common
    )
    diff = (one.detach().to(_F64) - ref.detach().to(_F64)).reshape(len(eps), -1)
    gap = diff.square().mean(-1).sqrt()
    return gap if per_sample else gap.mean()
