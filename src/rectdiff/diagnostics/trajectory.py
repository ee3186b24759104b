"""How first-order and how straight sampling trajectories are.

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
                    line traversed at constant speed in s, in every form. Needs alpha > 0;
                    a starting point with alpha = 0 (flow matching from t = 1, where y is at
                    infinity) is left out and the rest of the trajectory is measured.

All arithmetic is float64. Scalar results are 0-d float64 tensors (use ``float()``).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import Tensor

from ..forms import Form
from ..io.configs import check_choice

__all__ = [
    "MIN_STEPS",
    "window_first_order_deviation",
    "COORDS",
    "REDUCTIONS",
    "TrajectoryLike",
    "first_order_deviation",
    "straightness",
    "curvature_profile",
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


def _path(traj: TrajectoryLike, coords: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, u, z)``: times, normalised time in [0, 1] and float64 states ``(K+1, B, D)``."""
    check_choice(coords, COORDS, "coords")
    t = _times(traj)
    z = _flat(traj.x, 1).cpu()
    if coords == "t":
        clock = t
    else:
        alpha, sigma = traj.form.alpha(t), traj.form.sigma(t)
        keep = alpha > 0  # y = x / alpha is at infinity where alpha = 0: a start at t = 1
        if int(keep.sum()) < 2 or not bool(keep[int((~keep).sum()) :].all()):
            raise ValueError(
                f"coords='y' divides by alpha_t, which is {float(alpha.min()):.3g} on this "
                f"trajectory (t in [{float(t.min()):.4g}, {float(t.max()):.4g}]) of "
                f"{traj.form!r} at more than its starting point; start the sampler inside the "
                f"safe range, t_start <= form.t_max = {traj.form.t_max}."
            )
        t, z, alpha, sigma = t[keep], z[keep], alpha[keep], sigma[keep]
        z = z / alpha[:, None, None]
        clock = sigma / alpha
    u = (clock[0] - clock) / (clock[0] - clock[-1])
    return t, u, z


def _velocity_deviation(u: Tensor, z: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """Per-segment ``||(z_K - z_0) - (z_{k+1} - z_k) / du_k||^2``, shape ``(K, B)``, and
    the squared chord ``||z_K - z_0||^2``, shape ``(B,)``."""
    check_choice(reduction, REDUCTIONS, "reduction")
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
    deviation is its average uniformly in logsnr over the span where the model was evaluated,
    by the trapezoid rule on the evaluation points ``lambda_k = logsnr(t_k)``:

        D = sum_k (d_k + d_{k+1}) / 2 (lambda_{k+1} - lambda_k) / (lambda_{K-1} - lambda_0).

    logsnr is what makes it a property of the model and not of the form it is written in: a
    network seen in another form through :func:`rectdiff.reparametrize.reparametrize` makes
    the same predictions at the same logsnr, so on grids with equal logsnr it gets the same D
    in every form (weights in t would differ). ``D = 0`` exactly when every trajectory is
    first-order; the trapezoid weights make it converge under grid refinement. With a single
    evaluation, D is ``d_0`` (zero). An evaluation at alpha = 0 (flow matching sampled from
    t = 1, logsnr = -inf) has no place on the logsnr axis and is left out of the average
    (its prediction still serves as the eps reference).

    Args:
        traj: the trajectories; reads ``x0_pred`` or ``eps_pred`` of shape (K, B, ...).
        which: ``"x0"`` or ``"eps"``.
        per_step: return the curve ``(t_k, d_k)`` (two (K,) tensors) instead of D.

    Returns:
        A 0-d float64 tensor D, or ``(t[:-1], d)`` with ``per_step``.
    """
    check_choice(which, ("x0", "eps"), "which")
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
    if len(drift) == 1:
        return drift[0]
    logsnr = traj.form.logsnr(t[:-1]).to(_F64)
    finite = torch.isfinite(logsnr)  # an evaluation at alpha = 0 (t = 1) has no logsnr weight
    drift, logsnr = drift[finite], logsnr[finite]
    if len(drift) == 1:
        return drift[0]
    span = logsnr[-1] - logsnr[0]
    return (0.5 * (drift[1:] + drift[:-1]) * torch.diff(logsnr)).sum() / span


def window_first_order_deviation(traj: TrajectoryLike, edges: Tensor) -> Tensor:
    """How first-order a phased sampler's trajectory is inside each window, shape (K,).

    In window k (from ``edges[k]`` to ``edges[k + 1]`` = t_e) every evaluation predicts where
    one first-order step lands at the window's end, ``p = alpha_e x0_pred + sigma_e eps_pred``
    (the x0-prediction in a last window ending at t = 0). The window is first-order when that
    prediction does not move along the trajectory; its deviation is
    :func:`first_order_deviation` of ``p`` (relative RMS movement against the last evaluation
    of the window, averaged in logsnr). Unlike the raw x0-prediction, ``p`` weighs each
    prediction by what it does to the sample: in a high-noise window (alpha_e small) the
    x0-prediction of an eps-network is noisy and barely matters. ``edges`` (e.g.
    ``rectify.phase_edges``) must all lie on the trajectory's grid
    (``rectify.window_grid``).
    """
    t = _times(traj)
    edges = torch.as_tensor(edges, dtype=_F64)
    where = [int(torch.argmin((t - e).abs())) for e in edges.tolist()]
    off = [float((t[i] - e).abs()) for i, e in zip(where, edges.tolist(), strict=True)]
    if max(off) > 1e-9 or where != sorted(where) or len(set(where)) != len(where):
        raise ValueError(
            f"window edges {edges.tolist()} must lie on the trajectory's time grid in order; "
            "sample on a grid that contains them (rectify.phased.window_grid)."
        )
    values = []
    for lo, hi in zip(where[:-1], where[1:], strict=True):
        a_e, s_e = float(traj.form.alpha(t[hi])), float(traj.form.sigma(t[hi]))
        endpoint = a_e * traj.x0_pred[lo:hi].to(_F64) + s_e * traj.eps_pred[lo:hi].to(_F64)
        part = _Window(t[lo : hi + 1], traj.x[lo : hi + 1], endpoint, traj.form)
        values.append(first_order_deviation(part, which="x0"))
    return torch.stack(values)


class _Window:
    """A window of a trajectory with its endpoint predictions in place of ``x0_pred``."""

    def __init__(self, t: Tensor, x: Tensor, endpoint: Tensor, form: Form):
        self.t, self.x, self.x0_pred, self.eps_pred, self.form = t, x, endpoint, endpoint, form
