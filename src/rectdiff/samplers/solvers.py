"""ODE solvers for the probability-flow ODE, all behind one signature, and their registry.

Every solver is one function with the k-diffusion signature
``solver(denoise, x, t, callback=None, **options) -> x_end`` (``denoise`` a
:class:`~rectdiff.samplers.denoiser.Denoiser`, ``t`` a decreasing float64 grid); a new solver
is one function here and one line in :data:`SOLVERS`.

The probability-flow ODE of ``x_t = alpha_t x0 + sigma_t eps`` is, for any form,

    dx/dt = alpha'_t x0_pred(x, t) + sigma'_t eps_pred(x, t)          (the flow)

(Song et al. 2021, eq. 13, written with the denoiser). Solvers ending at a time with
``sigma = 0`` (t = 0 in every form but VE) finish with the first-order step
``x = alpha x0_pred + sigma eps_pred``, which there returns the x0-prediction E[x0 | x_t] of
the last evaluation, not the ODE endpoint; the model is never evaluated at such a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..errors import ConfigError, SolveError
from ..forms import Coefficients
from .denoiser import Denoiser, clamp_time

__all__ = [
    "Callback", "Solver", "SOLVERS", "euler", "heun", "ddim", "dpmpp_2m", "adaptive", "fixed_grid",
]  # fmt: skip

#: called by a solver at every grid point ``k < K`` with ``(k, x_k, x0_pred_k, eps_pred_k)``
Callback = Callable[[int, Tensor, Tensor, Tensor], None]


def _velocity(coefficients: Coefficients[float], x0_pred: Tensor, eps_pred: Tensor) -> Tensor:
    """The flow ``alpha'_t x0 + sigma'_t eps`` of the probability-flow ODE."""
    _, _, d_alpha, d_sigma = coefficients
    return d_alpha * x0_pred + d_sigma * eps_pred


def _first_order_step(
    coefficients: Coefficients[float], x0_pred: Tensor, eps_pred: Tensor
) -> Tensor:
    """``x_s = alpha_s x0_pred + sigma_s eps_pred`` (Song et al. 2021a, DDIM eq. 12 with
    sigma_t = 0; Lu et al. 2022, DPM-Solver-1): exact when x0_pred is constant along the path."""
    alpha_next, sigma_next, _, _ = coefficients
    return alpha_next * x0_pred + sigma_next * eps_pred


def _leaves_range(denoise: Denoiser, t_next: Tensor) -> bool:
    """Whether a step ends where the model must not be evaluated: sigma = 0 or below t_min."""
    return denoise.coefficients(t_next).sigma == 0.0 or float(t_next) < denoise.form.t_min


def _clamped(denoise: Denoiser, t: Tensor) -> Coefficients[float]:
    """Coefficients at the clamped ``t``, where the model was evaluated."""
    return denoise.coefficients(clamp_time(denoise.form, t))


def _euler_weights(denoise: Denoiser, t: float, t_next: float) -> tuple[float, float]:
    """``(a, b)`` with Euler's step ``x + h (alpha' x0_pred + sigma' eps_pred) = a x + b out``
    in the model's native output ``out`` at ``t`` (:meth:`Denoiser.weights`); a flow
    prediction is the velocity itself: ``(1, h)``."""
    h = t_next - t
    if denoise.prediction == "flow":
        return 1.0, h
    p, q, r, s = denoise.weights(t)
    _, _, d_alpha, d_sigma = _clamped(denoise, t)
    return 1.0 + h * (d_alpha * p + d_sigma * r), h * (d_alpha * q + d_sigma * s)


def _first_order_weights(denoise: Denoiser, t: float, t_next: float) -> tuple[float, float]:
    """``(a, b)`` with the first-order step ``alpha_s x0_pred + sigma_s eps_pred = a x + b out``
    from ``t`` to ``s = t_next``, in the model's native output at ``t``."""
    p, q, r, s = denoise.weights(t)
    alpha_next, sigma_next, _, _ = denoise.coefficients(t_next)
    return alpha_next * p + sigma_next * r, alpha_next * q + sigma_next * s


def _linear_step(a: float, x: Tensor, b: float, out: Tensor) -> Tensor:
    """``a x + b out`` in one fused operation where ``a`` is 1 (an Euler step on a flow)."""
    if a == 1.0:
        return torch.add(x, out, alpha=b)
    return torch.add(a * x, out, alpha=b)


def _record(
    denoise: Denoiser, callback: Callback | None, k: int, x: Tensor, t: float, out: Tensor
) -> None:
    """Hand ``(k, x, x0_pred, eps_pred)`` to ``callback``; the conversion is made only then."""
    if callback is not None:
        callback(k, x, *denoise.convert(out, x, t))


def euler(
    denoise: Denoiser, x: Tensor, t: Tensor, callback: Callback | None = None, **_: Any
) -> Tensor:
    """Euler's method on the probability-flow ODE in t; first order, one NFE per step.

    Each step ``x + h (alpha' x0_pred + sigma' eps_pred)`` is taken in the model's own
    prediction as ``a x + b out`` (:func:`_euler_weights`; ``x + h out`` for a flow model),
    the weights float64 numbers from the cached coefficients.

    Endpoint: the ODE solution at t_end, except that a last step to sigma = 0 or below t_min
    is the first-order step ``alpha x0_pred + sigma eps_pred`` (EDM's last Euler step in
    sigma/alpha), returning E[x0 | x_t] at sigma = 0.
    """
    times = t.tolist()
    for k in range(len(times) - 1):
        out = denoise.output(x, times[k])
        _record(denoise, callback, k, x, times[k], out)
        if k == len(times) - 2 and _leaves_range(denoise, t[k + 1]):
            a, b = _first_order_weights(denoise, times[k], times[k + 1])
        else:
            a, b = _euler_weights(denoise, times[k], times[k + 1])
        x = _linear_step(a, x, b, out)
    return x


def heun(
    denoise: Denoiser, x: Tensor, t: Tensor, callback: Callback | None = None, **_: Any
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE in t (Karras et al. 2022, Alg. 1).

    Two NFE per step. Endpoint: the ODE solution at t_end; a last step to sigma = 0 or below
    t_min falls back to the first-order step (EDM's Euler step to sigma = 0), returning
    E[x0 | x_t] at sigma = 0.
    """
    for k in range(len(t) - 1):
        x0_pred, eps_pred = denoise(x, t[k])
        if callback is not None:
            callback(k, x, x0_pred, eps_pred)
        if k == len(t) - 2 and _leaves_range(denoise, t[k + 1]):
            return _first_order_step(denoise.coefficients(t[k + 1]), x0_pred, eps_pred)
        h = float(t[k + 1] - t[k])
        velocity = _velocity(_clamped(denoise, t[k]), x0_pred, eps_pred)
        x_euler = x + h * velocity
        velocity_next = _velocity(_clamped(denoise, t[k + 1]), *denoise(x_euler, t[k + 1]))
        x = x + 0.5 * h * (velocity + velocity_next)
    return x


def ddim(
    denoise: Denoiser, x: Tensor, t: Tensor, callback: Callback | None = None, **_: Any
) -> Tensor:
    """The first-order exponential integrator ``x_s = alpha_s x0_pred + sigma_s eps_pred``.

    DDIM (Song et al. 2021a, eq. 12, eta = 0) = DPM-Solver-1 (Lu et al. 2022, eq. 3.7) = Euler
    in ``y = x/alpha`` against ``s = sigma/alpha``; exact in any form whenever x0_pred is
    constant along the trajectory. Taken in the model's own prediction as ``a x + b out``
    (:func:`_first_order_weights`). One NFE per step. Endpoint: at sigma(t_end) = 0 the
    x0-prediction E[x0 | x_t] of the last evaluation.
    """
    times = t.tolist()
    for k in range(len(times) - 1):
        out = denoise.output(x, times[k])
        _record(denoise, callback, k, x, times[k], out)
        a, b = _first_order_weights(denoise, times[k], times[k + 1])
        x = _linear_step(a, x, b, out)
    return x


def _half_logsnr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), -inf at alpha = 0."""
    return -math.inf if alpha == 0.0 else math.log(alpha / sigma)


def dpmpp_2m(
    denoise: Denoiser, x: Tensor, t: Tensor, callback: Callback | None = None, **_: Any
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), in lambda = logsnr/2 for any form.

    With h_i = lambda_i - lambda_{i-1}, r_i = h_{i-1}/h_i,
    ``D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}`` and
    ``x_i = (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i``; the first step uses
    ``D = x0_pred`` (DDIM), as does a last step to sigma = 0 (diffusers' ``lower_order_final``).
    One NFE per step. Endpoint: the ODE solution at t_end, E[x0 | x_t] when sigma(t_end) = 0.
    A start at alpha = 0 (flow matching's t = 1) has lambda = -inf: h = inf, ``e^{-h} = 0``
    makes that step DDIM's, and r = inf makes the next one first order too.
    """
    x0_prev, h_prev = None, 0.0
    for k in range(len(t) - 1):
        x0_pred, eps_pred = denoise(x, t[k])
        if callback is not None:
            callback(k, x, x0_pred, eps_pred)
        alpha, sigma, _, _ = denoise.coefficients(t[k])
        alpha_next, sigma_next, _, _ = denoise.coefficients(t[k + 1])
        if sigma_next == 0.0:
            return alpha_next * x0_pred
        h = _half_logsnr(alpha_next, sigma_next) - _half_logsnr(alpha, sigma)
        if x0_prev is None:
            data = x0_pred
        else:
            half_inv_r = 0.5 * h / h_prev
            data = (1.0 + half_inv_r) * x0_pred - half_inv_r * x0_prev
        x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * data
        x0_prev, h_prev = x0_pred, h
    return x


def _finish(
    denoise: Denoiser, t: Tensor, ode_t: Tensor, states: Tensor, final_jump: bool,
    callback: Callback | None, last: list[Any] | None = None,
) -> Tensor:  # fmt: skip
    """The end of an odeint solve: the first-order step to ``t[-1]`` when the solve stopped
    short of it, and the grid states with their (uncounted) predictions for ``callback``.

    ``last`` = ``[t, state, prediction]`` of the solve's last evaluation: dopri5 evaluates the
    accepted end state ("first same as last"), so when it is the final step's input (same t up
    to rounding, equal state) the step reuses it instead of another NFE. A solve ending at
    t = 0 evaluates its last stage at a subnormal t (5e-324), hence the absolute tolerance."""
    if final_jump:
        t_last, x_last = float(ode_t[-1]), states[-1]
        reuse = last and math.isclose(last[0], t_last, rel_tol=1e-12, abs_tol=1e-300)
        if reuse and torch.equal(last[1], x_last):
            prediction = last[2]
        else:
            prediction = denoise(x_last, ode_t[-1])
        x_end = _first_order_step(denoise.coefficients(t[-1]), *prediction)
    else:
        x_end = states[-1]
    if callback is not None:
        for k in range(len(t) - 1):
            callback(k, states[k], *denoise(states[k], t[k], count=False))
    return x_end


def adaptive(
    denoise: Denoiser,
    x: Tensor,
    t: Tensor,
    callback: Callback | None = None,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    **_: Any,
) -> Tensor:
    """An adaptive Runge-Kutta solve of the probability-flow ODE with ``torchdiffeq.odeint``.

    The ODE is integrated in the variable the form names in ``form.ode_variable``:

    * ``"logsnr"`` (VP, sub-VP, VE, DiscreteVP):
      ``dx/dlogsnr = (alpha' x0 + sigma' eps) / (dlogsnr/dt)``, the same solution at the grid
      times as in t, but smooth for a :class:`DiscreteVP`, whose piecewise-linear log(alpha)
      makes dx/dt jump at every knot (in t, dopri5 needs ~20x the NFE there and still misses
      its tolerance), and scale-free for VE's geometric sigma;
    * ``"t"`` (flow matching, custom schedules): ``dx/dt`` itself. A flow-matching ODE is
      nearly straight in t, so the step controller takes the steps the flow-matching
      libraries' dopri5 takes (in logsnr it took 2.2x their NFE); t also stays finite where
      logsnr does not (alpha = 0 at t_max = 1).

    The state is float64; the solver is made to step exactly onto the last time (``step_t``),
    since it otherwise probes stages far past the end time, and the model time is clamped into
    ``[t_min, t_max]`` as a safeguard.
    When t_end has sigma = 0 or lies below t_min, the ODE is solved to ``min(t[-2], t_min)``
    and a first-order step finishes.

    Endpoint: the ODE solution at t_end to rtol/atol, or E[x0 | x_{t_min}] when
    sigma(t_end) = 0. nfe counts the solve; recording the predictions at the K grid states
    (``callback``) costs K evaluations that are not counted.
    """
    ok = [math.isfinite(tol) and tol >= 0 for tol in (rtol, atol)]
    if not all(ok) or rtol == atol == 0:
        raise ConfigError(
            f"rtol = {rtol!r}, atol = {atol!r}: the adaptive solver {method!r} needs finite "
            "tolerances >= 0, at least one > 0 (a zero tolerance can never be met); e.g. "
            "rtol = atol = 1e-5."
        )
    form = denoise.form
    final_jump = _leaves_range(denoise, t[-1])
    ode_t = t[:-1] if final_jump else t
    if final_jump and float(ode_t[-1]) > form.t_min:
        ode_t = torch.cat([ode_t, torch.tensor([form.t_min], dtype=torch.float64)])
    last: list[Any] = []  # the last evaluation [t, state, prediction], for _finish

    def predict(y: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        state = y.to(x.dtype)
        last[:] = [float(s), state, denoise(state, s)]
        return last[2]

    if form.ode_variable == "t":
        grid = ode_t

        def flow(s: Tensor, y: Tensor) -> Tensor:
            return _velocity(_clamped(denoise, s), *predict(y, s)).to(torch.float64)
    else:
        grid = form.logsnr(ode_t)

        def flow(lam: Tensor, y: Tensor) -> Tensor:
            s = form.t_from_logsnr(lam.detach().cpu()).clamp(form.t_min, form.t_max)
            alpha, sigma, d_alpha, d_sigma = denoise.coefficients(s)
            x0_pred, eps_pred = predict(y, s)
            d_logsnr = 2.0 * (d_alpha / alpha - d_sigma / sigma)
            return ((d_alpha * x0_pred + d_sigma * eps_pred) / d_logsnr).to(torch.float64)

    try:
        ys = odeint(
            flow,
            x.to(torch.float64),
            grid.to(x.device),
            rtol=rtol,
            atol=atol,
            method=method,
            options={"step_t": grid[-1:].to(x.device)},
        )
    except AssertionError as err:  # torchdiffeq's step-size controller gave up
        if "underflow in dt" not in str(err):
            raise
        finite = bool(torch.isfinite(x).all()) and (
            not last or bool(torch.isfinite(last[2][0]).all())
        )
        why = ("the model returned non-finite values (nan or inf): check its weights, form and "
               "prediction" if not finite else f"rtol = {rtol}, atol = {atol} cannot be met: "
               "loosen them (e.g. 1e-5)")  # fmt: skip
        raise SolveError(
            f"the adaptive solver {method!r} stopped: its step size underflowed to 0; {why}."
        ) from None
    states = ys.to(x.dtype)
    return _finish(denoise, t, ode_t, states, final_jump, callback, last)


def fixed_grid(
    denoise: Denoiser,
    x: Tensor,
    t: Tensor,
    callback: Callback | None = None,
    *,
    method: str = "rk4",
    **_: Any,
) -> Tensor:
    """A fixed-step Runge-Kutta solve in t with ``torchdiffeq.odeint`` on exactly the grid ``t``.

    ``method="rk4"`` is torchdiffeq's fourth-order Runge-Kutta (its 3/8-rule variant; 4 NFE a
    step), what the flow-matching tutorials sample with (``odeint(..., method="rk4")``);
    ``"midpoint"`` is the explicit midpoint rule (2 NFE a step), flow_matching's default
    ``ODESolver`` method. The state is float64. Endpoint: the ODE solution at t_end; a last
    step to sigma = 0 or below t_min is the first-order step from ``t[-2]`` (one more NFE),
    returning E[x0 | x_t] there. Recording the predictions at the grid states (``callback``)
    costs evaluations that are not counted.
    """
    final_jump = _leaves_range(denoise, t[-1])
    ode_t = t[:-1] if final_jump else t

    def flow(s: Tensor, y: Tensor) -> Tensor:
        return _velocity(_clamped(denoise, s), *denoise(y.to(x.dtype), s)).to(torch.float64)

    if len(ode_t) > 1:
        states = odeint(flow, x.to(torch.float64), ode_t.to(x.device), method=method).to(x.dtype)
    else:
        states = x[None]
    return _finish(denoise, t, ode_t, states, final_jump, callback)


@dataclass(frozen=True)
class Solver:
    """A registry entry: the solver function and whether its step size is adaptive.

    Calling the entry calls the function, so ``SOLVERS[name](denoise, x, t)`` solves.
    """

    fn: Callable[..., Tensor]
    adaptive: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(*args, **kwargs)


#: solver name -> :class:`Solver`; every function has the signature of :func:`euler`
SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler),
    "heun": Solver(heun),
    "ddim": Solver(ddim),
    "dpmpp_2m": Solver(dpmpp_2m),
    "dopri5": Solver(functools.partial(adaptive, method="dopri5"), adaptive=True),
    "dopri8": Solver(functools.partial(adaptive, method="dopri8"), adaptive=True),
    "bosh3": Solver(functools.partial(adaptive, method="bosh3"), adaptive=True),
    "adaptive_heun": Solver(functools.partial(adaptive, method="adaptive_heun"), adaptive=True),
    "rk4": Solver(functools.partial(fixed_grid, method="rk4")),
    "midpoint": Solver(functools.partial(fixed_grid, method="midpoint")),
}
