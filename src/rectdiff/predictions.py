"""What a network predicts, and the conversions between eps, x0, v, flow and score.

With ``x_t = alpha x0 + sigma eps`` (all coefficients at the same t):

    eps     the noise                                   (Ho et al. 2020)
    x0      the clean sample                            (Ramesh et al. 2022; EDM's D(x))
    v       alpha eps - sigma x0                         (Salimans & Ho 2022, sec. 4)
    flow    u = dx_t/dt = alpha' x0 + sigma' eps         (Lipman et al. 2023; Liu et al. 2023)
    score   grad log p_t(x_t) = -eps / sigma             (Song et al. 2021), derived, not trained

Every conversion solves the 2x2 linear system {x_t, prediction} -> (x0, eps) once and
then forms the requested quantity, so each formula is written once:

    from v:     x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
                eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
    from flow:  x0 = (sigma' x_t - sigma u) / D,  eps = (alpha u - alpha' x_t) / D,
                D = alpha sigma' - sigma alpha' = -(alpha sigma / 2) dlogsnr/dt > 0

``alpha^2 + sigma^2`` is 1 only for VP forms; it is kept everywhere.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .forms import Form, as_time, broadcast

__all__ = [
    "PREDICTIONS",
    "DERIVED",
    "check_prediction",
    "to_x0_eps",
    "x0_eps_weights",
    "from_x0_eps",
    "convert",
    "target",
]

#: quantities a network can be trained to predict
PREDICTIONS = ("eps", "x0", "v", "flow")
#: quantities that can be converted to/from but are not training targets
DERIVED = ("score",)


def check_prediction(name: str, allow_derived: bool = False) -> str:
    """Return ``name`` if it is a known prediction type, else raise a ValueError listing them."""
    allowed = PREDICTIONS + (DERIVED if allow_derived else ())
    if name not in allowed:
        raise ValueError(f"unknown prediction type {name!r}; allowed: {', '.join(allowed)}.")
    return name


def check_time_range(t: Tensor, form: Form, what: str = "t") -> None:
    """Raise a ValueError unless every ``t`` lies in ``[form.t_min, form.t_max]``."""
    tol = 1e-6  # float32 rounding of the range ends
    lo, hi = float(t.min()), float(t.max())
    if lo < form.t_min - tol or hi > form.t_max + tol:
        raise ValueError(
            f"{what} = [{lo:.6g}, {hi:.6g}] leaves the safe range [t_min, t_max] = "
            f"[{form.t_min:.6g}, {form.t_max:.6g}] of {form!r}, where conversions between "
            "predictions may divide by alpha = 0 or sigma = 0. Sample t inside that range."
        )


def _coefficients(form: Form, t: Any, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    t64 = as_time(t).to(like.device)
    values = (form.alpha(t64), form.sigma(t64), form.d_alpha(t64), form.d_sigma(t64))
    return tuple(broadcast(v, like) for v in values)  # type: ignore[return-value]


def to_x0_eps(
    out: Tensor,
    src: str,
    x_t: Tensor,
    t: Any,
    form: Form,
    coefficients: tuple[Any, Any, Any, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Solve ``{x_t, out}`` for ``(x0, eps)``, where ``out`` is a ``src`` prediction at ``t``.

    ``coefficients`` = ``(alpha, sigma, d_alpha, d_sigma)`` at ``t`` (numbers, or tensors that
    broadcast against ``x_t``) skips recomputing them; samplers pass their cached values.
    """
    if coefficients is None:
        coefficients = _coefficients(form, t, x_t)
    alpha, sigma, d_alpha, d_sigma = coefficients
    if src == "eps":
        return (x_t - sigma * out) / alpha, out
    if src == "x0":
        return out, (x_t - alpha * out) / sigma
    if src == "v":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * out) / norm, (sigma * x_t + alpha * out) / norm
    if src == "flow":
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * x_t - sigma * out) / det, (alpha * out - d_alpha * x_t) / det
    if src == "score":
        eps = -sigma * out
        return (x_t - sigma * eps) / alpha, eps
    check_prediction(src, allow_derived=True)
    raise AssertionError("unreachable")


def x0_eps_weights(src: str, coefficients: tuple[float, float, float, float]) -> tuple[
    float, float, float, float
]:  # fmt: skip
    """``(p, q, r, s)`` with ``x0 = p x_t + q out`` and ``eps = r x_t + s out``: the solution
    of :func:`to_x0_eps` as weights, for a ``src`` prediction ``out`` at one time.

    A sampler step that is linear in ``(x0, eps)`` is then linear in ``(x_t, out)``, so it can
    be taken directly in the model's prediction (two tensor operations, no round trip).
    ``coefficients`` = ``(alpha, sigma, d_alpha, d_sigma)`` at that time, as floats.
    """
    alpha, sigma, d_alpha, d_sigma = coefficients
    if src == "eps":
        return 1.0 / alpha, -sigma / alpha, 0.0, 1.0
    if src == "x0":
        return 0.0, 1.0, 1.0 / sigma, -alpha / sigma
    if src == "v":
        norm = alpha**2 + sigma**2
        return alpha / norm, -sigma / norm, sigma / norm, alpha / norm
    if src == "flow":
        det = alpha * d_sigma - sigma * d_alpha
        return d_sigma / det, -sigma / det, -d_alpha / det, alpha / det
    if src == "score":  # eps = -sigma out
        return 1.0 / alpha, sigma**2 / alpha, 0.0, -sigma
    check_prediction(src, allow_derived=True)
    raise AssertionError("unreachable")


def from_x0_eps(x0: Tensor, eps: Tensor, dst: str, t: Any, form: Form) -> Tensor:
    """The ``dst`` quantity of the pair ``(x0, eps)`` at time ``t``."""
    if dst == "x0":
        return x0
    if dst == "eps":
        return eps
    t64 = as_time(t).to(x0.device)  # only the coefficients each quantity needs: hot path
    if dst == "v":
        return broadcast(form.alpha(t64), x0) * eps - broadcast(form.sigma(t64), x0) * x0
    if dst == "flow":
        return broadcast(form.d_alpha(t64), x0) * x0 + broadcast(form.d_sigma(t64), x0) * eps
    if dst == "score":
        return -eps / broadcast(form.sigma(t64), x0)
    check_prediction(dst, allow_derived=True)
    raise AssertionError("unreachable")


def convert(
    out: Tensor,
    src: str,
    dst: str,
    *,
    x_t: Tensor,
    t: Any,
    form: Form,
    check_range: bool = True,
) -> Tensor:
    """Convert a ``src`` prediction at ``(x_t, t)`` into the ``dst`` quantity.

    Args:
        out: the network output, a ``src`` prediction.
        src, dst: one of ``"eps"``, ``"x0"``, ``"v"``, ``"flow"``, ``"score"``.
        x_t: the noisy input the prediction was made at.
        t: scalar or ``(B,)`` times.
        form: the diffusion form.
        check_range: raise unless t lies in ``[form.t_min, form.t_max]``, where every
            conversion is finite.

    Raises:
        ValueError: for an unknown name or t outside the form's safe range.
    """
    check_prediction(src, allow_derived=True)
    check_prediction(dst, allow_derived=True)
    if check_range:
        check_time_range(as_time(t), form)
    if src == dst:
        return out
    x0, eps = to_x0_eps(out, src, x_t, t, form)
    return from_x0_eps(x0, eps, dst, t, form)


def target(x0: Tensor, eps: Tensor, t: Any, *, prediction: str, form: Form) -> Tensor:
    """The regression target of a ``prediction`` network for ``x_t = form.add_noise(x0, eps, t)``."""
    check_prediction(prediction)
    return from_x0_eps(x0, eps, prediction, t, form)
