"""ODE samplers for any form and prediction, recording their trajectories.

One core: :func:`sample` builds a decreasing time grid, wraps the model into a
:class:`Denoiser` ``(x, t) -> (x0_pred, eps_pred)`` (classifier-free guidance and the NFE count
live there), and hands both to a solver from :data:`SOLVERS`. Every solver is one function with
the k-diffusion signature ``solver(denoise, x, t, callback=None, **options) -> x_end``; a new
solver is one function and one dictionary entry.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint
from tqdm.auto import tqdm

from .forms import Form, as_time
from .predictions import check_prediction, to_x0_eps
from .reparametrize import reparametrize

__all__ = [
    "Trajectory",
    "Denoiser",
    "Callback",
    "Coefficients",
    "sample",
    "time_grid",
    "TIME_GRIDS",
    "SOLVERS",
    "euler",
    "heun",
    "ddim",
    "dpmpp_2m",
    "adaptive",
    "reparametrize",
]

#: the named time grids of :func:`time_grid`; an explicit decreasing sequence also works
TIME_GRIDS = ("uniform", "logsnr", "karras")
#: called by a solver at every grid point ``k < K`` with ``(k, x_k, x0_pred_k, eps_pred_k)``
Callback = Callable[[int, Tensor, Tensor, Tensor], None]
#: ``(alpha, sigma, d_alpha, d_sigma)`` at one time, float64
Coefficients = tuple[float, float, float, float]


@dataclass
class Trajectory:
    """One sampling run: the states on the time grid and the predictions made there.

    Attributes:
        t: ``(K+1,)`` float64 times, decreasing from t_start to t_end.
        x: ``(K+1, B, ...)`` states; ``x[0] = sigma(t[0]) eps``, ``x[-1]`` the sample.
        x0_pred: ``(K, B, ...)`` x0-prediction of the model at ``(x[k], t[k])``.
        eps_pred: ``(K, B, ...)`` eps-prediction at the same evaluation.
        nfe: model evaluations the solve used (classifier-free guidance counts 2 each).
        form, prediction, solver: what produced it.
    """

    t: Tensor
    x: Tensor
    x0_pred: Tensor
    eps_pred: Tensor
    nfe: int
    form: Form
    prediction: str
    solver: str

    @property
    def sample(self) -> Tensor:
        """The final state ``x[-1]``."""
        return self.x[-1]


class Denoiser:
    """A model ``model(x_t, model_time, **cond)`` seen as ``(x, t) -> (x0_pred, eps_pred)``.

    The network is evaluated at ``t`` clamped into ``[form.t_min, form.t_max]`` (its safe
    range; adaptive solvers probe stages past the end time) and its output is converted once
    with float64 coefficients. With ``guidance = w`` the native prediction is
    ``uncond + w (cond - uncond)`` (Ho & Salimans 2022, eq. 6), the two evaluations batched into
    one forward pass when every conditioning tensor has the batch as its first dimension.

    Attributes:
        nfe: model evaluations so far (2 per guided evaluation).
        on_evaluation: called after each counted evaluation (a progress bar's ``update``).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        form: Form,
        prediction: str,
        *,
        cond: dict[str, Any] | None = None,
        guidance: float | None = None,
        uncond: dict[str, Any] | None = None,
        batch_size: int | None = None,
        on_evaluation: Callable[[], Any] | None = None,
    ) -> None:
        self.model = model
        self.on_evaluation = on_evaluation
        self.form = form
        self.prediction = check_prediction(prediction)
        self.cond = dict(cond or {})
        self.uncond = dict(uncond or {})
        self.guidance = None if guidance is None else float(guidance)
        if self.guidance is not None and not self.cond:
            raise ValueError(
                f"guidance={guidance} needs cond=, the conditional keyword arguments of the model "
                "(and uncond=, the unconditional ones); pass guidance=None to sample unguided."
            )
        self._batched = None
        if self.guidance is not None and batch_size is not None:
            self._batched = _concat_kwargs(self.uncond, self.cond, batch_size)
        self._points: dict[float, tuple[Tensor, Coefficients]] = {}
        self.nfe = 0

    def coefficients(self, t: Tensor | float) -> Coefficients:
        """``(alpha, sigma, d_alpha, d_sigma)`` at ``t`` as float64 Python numbers (cached)."""
        return self._point(float(t))[1]

    def precompute(self, t: Tensor, like: Tensor) -> None:
        """Cache coefficients and model times of the grid ``t`` (and of its times clamped into
        the safe range) in one vectorized call, the model times in ``like``'s dtype and device."""
        times = torch.cat([t, t.clamp(self.form.t_min, self.form.t_max)]).unique()
        model_times = self.form.model_time(times).to(device=like.device, dtype=like.dtype)
        alpha, sigma, d_alpha, d_sigma = (c.tolist() for c in self.form.coefficients(times))
        for i, key in enumerate(times.tolist()):
            self._points[key] = model_times[i], (alpha[i], sigma[i], d_alpha[i], d_sigma[i])

    def _point(self, key: float) -> tuple[Tensor, Coefficients]:
        if key not in self._points:
            t64 = as_time(key)
            alpha, sigma, d_alpha, d_sigma = (float(c) for c in self.form.coefficients(t64))
            self._points[key] = self.form.model_time(t64), (alpha, sigma, d_alpha, d_sigma)
        return self._points[key]

    def __call__(self, x: Tensor, t: Tensor | float, count: bool = True) -> tuple[Tensor, Tensor]:
        """``(x0_pred, eps_pred)`` at state ``x`` and time ``t``."""
        t = _clamp(self.form, t)
        model_time = self._point(t)[0].to(device=x.device, dtype=x.dtype)
        out = self._evaluate(x, model_time.expand(x.shape[0]))
        if count:
            self.nfe += 1 if self.guidance is None else 2
            if self.on_evaluation is not None:
                self.on_evaluation()
        return to_x0_eps(out, self.prediction, x, t, self.form, coefficients=self._point(t)[1])

    def _evaluate(self, x: Tensor, model_time: Tensor) -> Tensor:
        if self.guidance is None:
            return self.model(x, model_time, **self.cond)
        if self._batched is not None:
            both = self.model(
                torch.cat([x, x]), torch.cat([model_time, model_time]), **self._batched
            )
            out_uncond, out_cond = both.chunk(2)
        else:
            out_uncond = self.model(x, model_time, **self.uncond)
            out_cond = self.model(x, model_time, **self.cond)
        return out_uncond + self.guidance * (out_cond - out_uncond)


def _concat_kwargs(
    uncond: dict[str, Any], cond: dict[str, Any], batch_size: int
) -> dict[str, Any] | None:
    """``uncond`` and ``cond`` stacked along the batch for one forward pass, or None if they can't be."""
    if uncond.keys() != cond.keys():
        return None
    merged: dict[str, Any] = {}
    for key, value in cond.items():
        other = uncond[key]
        if isinstance(value, Tensor) and isinstance(other, Tensor):
            if value.ndim == 0 or value.shape != other.shape or value.shape[0] != batch_size:
                return None
            merged[key] = torch.cat([other, value])
        elif not isinstance(value, Tensor) and not isinstance(other, Tensor) and other is value:
            merged[key] = value
        else:
            return None
    return merged


# --- time grids ---------------------------------------------------------------------------


def time_grid(
    form: Form,
    steps: int = 10,
    kind: str | Sequence[float] | Tensor = "uniform",
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """A strictly decreasing float64 time grid of ``steps + 1`` points, t_start to t_end.

    ``"uniform"`` is uniform in t. ``"logsnr"`` is uniform in logsnr (DPM-Solver's
    ``skip_type="logSNR"``, Lu et al. 2022, sec. 3.3). ``"karras"`` spaces
    ``s = sigma/alpha`` as ``s_i = (s_0^(1/rho) + i/n (s_n^(1/rho) - s_0^(1/rho)))^rho``
    (Karras et al. 2022, eq. 5, rho = 7) and maps it back with ``t_from_logsnr``. When
    ``logsnr(t_end)`` is infinite (sigma = 0) these two space ``steps`` points from t_start to
    ``form.t_min`` (the last model evaluation) and then step to t_end, as EDM appends sigma = 0.
    An explicit sequence is validated and returned as is (then steps, t_start, t_end unused).

    Raises:
        ValueError: for an unknown kind, steps < 1, bad ends, or a bad explicit grid.
    """
    if not isinstance(kind, str):
        if t_start is not None or t_end is not None:
            raise ValueError(
                "an explicit t_grid fixes its own start and end; drop t_start=/t_end= or put "
                "them into the grid."
            )
        return _explicit_grid(kind)
    if kind not in TIME_GRIDS:
        raise ValueError(
            f"unknown t_grid {kind!r}; allowed: {', '.join(TIME_GRIDS)}, or an explicit "
            "strictly decreasing sequence of times in [0, 1]."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps!r}.")
    t_start = form.t_max if t_start is None else float(t_start)
    t_end = 0.0 if t_end is None else float(t_end)
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(
            f"need 0 <= t_end < t_start <= 1 (sampling runs from noise to data), got "
            f"t_start={t_start}, t_end={t_end}."
        )
    if kind == "uniform":
        return _checked(torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64), kind)
    to_zero_sigma = not math.isfinite(float(form.logsnr(t_end)))
    t_last = form.t_min if to_zero_sigma else t_end
    intervals = steps - 1 if to_zero_sigma else steps
    if intervals == 0:
        return torch.tensor([t_start, t_end], dtype=torch.float64)
    lam_start, lam_last = float(form.logsnr(t_start)), float(form.logsnr(t_last))
    if not math.isfinite(lam_start) or not t_last < t_start:
        raise ValueError(
            f"a {kind!r} grid needs a finite logsnr at t_start and t_start > {t_last:g} (the "
            f"last model time of {form!r}); got t_start={t_start}. Use t_start=form.t_max."
        )
    if kind == "logsnr":
        lam = torch.linspace(lam_start, lam_last, intervals + 1, dtype=torch.float64)
    else:
        s_start, s_last = (
            math.exp(-0.5 * lam_start) ** (1 / rho),
            math.exp(-0.5 * lam_last) ** (1 / rho),
        )
        s = torch.linspace(s_start, s_last, intervals + 1, dtype=torch.float64) ** rho
        lam = -2.0 * torch.log(s)
    grid = form.t_from_logsnr(lam)
    grid[0], grid[-1] = t_start, t_last
    if to_zero_sigma:
        grid = torch.cat([grid, torch.tensor([t_end], dtype=torch.float64)])
    return _checked(grid, kind)


def _explicit_grid(values: Sequence[float] | Tensor) -> Tensor:
    grid = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or len(grid) < 2 or not bool(torch.isfinite(grid).all()):
        raise ValueError(
            f"an explicit t_grid must be a 1-D sequence of at least 2 finite times, got {values!r}."
        )
    if float(grid.min()) < 0.0 or float(grid.max()) > 1.0:
        raise ValueError(
            f"explicit t_grid times must lie in [0, 1] (t = 0 data, t = 1 noise), got "
            f"[{float(grid.min()):.6g}, {float(grid.max()):.6g}]."
        )
    return _checked(grid, "explicit")


def _checked(grid: Tensor, kind: str) -> Tensor:
    steps = torch.diff(grid)
    if bool((steps >= 0).any()):
        k = int((steps >= 0).nonzero()[0, 0])
        raise ValueError(
            f"the {kind} t_grid must be strictly decreasing (from noise to data), but "
            f"t[{k}] = {float(grid[k]):.9g} <= t[{k + 1}] = {float(grid[k + 1]):.9g}. "
            "Reverse it or drop repeated times."
        )
    return grid


# --- solvers --------------------------------------------------------------------------------


def _velocity(coefficients: Coefficients, x0_pred: Tensor, eps_pred: Tensor) -> Tensor:
    """The flow ``alpha'_t x0 + sigma'_t eps`` of the probability-flow ODE."""
    _, _, d_alpha, d_sigma = coefficients
    return d_alpha * x0_pred + d_sigma * eps_pred


def _first_order_step(coefficients: Coefficients, x0_pred: Tensor, eps_pred: Tensor) -> Tensor:
    """``x_s = alpha_s x0_pred + sigma_s eps_pred`` (Song et al. 2021a, DDIM eq. 12 with
    sigma_t = 0; Lu et al. 2022, DPM-Solver-1): exact when x0_pred is constant along the path."""
    alpha_next, sigma_next, _, _ = coefficients
    return alpha_next * x0_pred + sigma_next * eps_pred


def _leaves_range(denoise: Denoiser, t_next: Tensor) -> bool:
    """Whether a step ends where the model must not be evaluated: sigma = 0 or below t_min."""
    return denoise.coefficients(t_next)[1] == 0.0 or float(t_next) < denoise.form.t_min


def _clamp(form: Form, t: Tensor | float) -> float:
    """``t`` clamped into the safe range ``[t_min, t_max]``, where the model is evaluated."""
    return min(max(float(t), form.t_min), form.t_max)


def _clamped(denoise: Denoiser, t: Tensor) -> Coefficients:
    """Coefficients at the clamped ``t``, where the model was evaluated."""
    return denoise.coefficients(_clamp(denoise.form, t))


def euler(
    denoise: Denoiser, x: Tensor, t: Tensor, callback: Callback | None = None, **_: Any
) -> Tensor:
    """Euler's method on the probability-flow ODE in t; first order, one NFE per step.

    Endpoint: the ODE solution at t_end, except that a last step to sigma = 0 or below t_min
    is the first-order step ``alpha x0_pred + sigma eps_pred`` (EDM's last Euler step in
    sigma/alpha), returning E[x0 | x_t] at sigma = 0.
    """
    for k in range(len(t) - 1):
        x0_pred, eps_pred = denoise(x, t[k])
        if callback is not None:
            callback(k, x, x0_pred, eps_pred)
        if k == len(t) - 2 and _leaves_range(denoise, t[k + 1]):
            return _first_order_step(denoise.coefficients(t[k + 1]), x0_pred, eps_pred)
        x = x + float(t[k + 1] - t[k]) * _velocity(_clamped(denoise, t[k]), x0_pred, eps_pred)
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
    constant along the trajectory. One NFE per step. Endpoint: at sigma(t_end) = 0 the
    x0-prediction E[x0 | x_t] of the last evaluation.
    """
    for k in range(len(t) - 1):
        x0_pred, eps_pred = denoise(x, t[k])
        if callback is not None:
            callback(k, x, x0_pred, eps_pred)
        x = _first_order_step(denoise.coefficients(t[k + 1]), x0_pred, eps_pred)
    return x


def dpmpp_2m(
    denoise: Denoiser, x: Tensor, t: Tensor, callback: Callback | None = None, **_: Any
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), in lambda = logsnr/2 for any form.

    With h_i = lambda_i - lambda_{i-1}, r_i = h_{i-1}/h_i,
    ``D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2}`` and
    ``x_i = (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i``; the first step uses
    ``D = x0_pred`` (DDIM), as does a last step to sigma = 0 (diffusers' ``lower_order_final``).
    One NFE per step. Endpoint: the ODE solution at t_end, E[x0 | x_t] when sigma(t_end) = 0.
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
        h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
        if x0_prev is None:
            data = x0_pred
        else:
            half_inv_r = 0.5 * h / h_prev
            data = (1.0 + half_inv_r) * x0_pred - half_inv_r * x0_prev
        x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * data
        x0_prev, h_prev = x0_pred, h
    return x


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

    The ODE is integrated in logsnr, ``dx/dlogsnr = (alpha' x0 + sigma' eps) / (dlogsnr/dt)``:
    the same solution at the grid times as in t, but smooth for a :class:`DiscreteVP`, whose
    piecewise-linear log(alpha) makes dx/dt jump at every knot (in t, dopri5 needs ~20x the
    NFE there and still misses its tolerance). The state is float64; the solver is made to
    step exactly onto the last time (``step_t``), since it otherwise probes stages far past
    the end time, and the model time is clamped into ``[t_min, t_max]`` as a safeguard.
    When t_end has sigma = 0 or lies below t_min, the ODE is solved to ``min(t[-2], t_min)``
    and a first-order step finishes.

    Endpoint: the ODE solution at t_end to rtol/atol, or E[x0 | x_{t_min}] when
    sigma(t_end) = 0. nfe counts the solve; recording the predictions at the K grid states
    (``callback``) costs K evaluations that are not counted.
    """
    form = denoise.form
    final_jump = _leaves_range(denoise, t[-1])
    ode_t = t[:-1] if final_jump else t
    if final_jump and float(ode_t[-1]) > form.t_min:
        ode_t = torch.cat([ode_t, torch.tensor([form.t_min], dtype=torch.float64)])
    logsnr = form.logsnr(ode_t)

    def flow(lam: Tensor, y: Tensor) -> Tensor:
        s = form.t_from_logsnr(lam.detach().cpu()).clamp(form.t_min, form.t_max)
        alpha, sigma, d_alpha, d_sigma = denoise.coefficients(s)
        x0_pred, eps_pred = denoise(y.to(x.dtype), s)
        d_logsnr = 2.0 * (d_alpha / alpha - d_sigma / sigma)
        return ((d_alpha * x0_pred + d_sigma * eps_pred) / d_logsnr).to(torch.float64)

    ys = odeint(
        flow,
        x.to(torch.float64),
        logsnr.to(x.device),
        rtol=rtol,
        atol=atol,
        method=method,
        options={"step_t": logsnr[-1:]},
    )
    states = ys.to(x.dtype)
    if final_jump:
        x_end = _first_order_step(denoise.coefficients(t[-1]), *denoise(states[-1], ode_t[-1]))
    else:
        x_end = states[-1]
    if callback is not None:
        for k in range(len(t) - 1):
            callback(k, states[k], *denoise(states[k], t[k], count=False))
    return x_end


#: solver name -> solver function, all with the signature of :func:`euler`
SOLVERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "heun": heun,
    "ddim": ddim,
    "dpmpp_2m": dpmpp_2m,
    **{
        name: functools.partial(adaptive, method=name)
        for name in ("dopri5", "dopri8", "bosh3", "adaptive_heun")
    },
}


# --- the core -------------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.x: list[Tensor] = []
        self.x0_pred: list[Tensor] = []
        self.eps_pred: list[Tensor] = []

    def __call__(self, k: int, x: Tensor, x0_pred: Tensor, eps_pred: Tensor) -> None:
        self.x.append(x)
        self.x0_pred.append(x0_pred)
        self.eps_pred.append(eps_pred)


def sample(
    model: Callable[..., Tensor],
    eps: Tensor,
    *,
    form: Form,
    prediction: str,
    solver: str = "ddim",
    steps: int = 10,
    t_grid: str | Sequence[float] | Tensor = "uniform",
    cond: dict[str, Any] | None = None,
    guidance: float | None = None,
    uncond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_start: float | None = None,
    t_end: float | None = None,
    progress: bool = False,
) -> Tensor | Trajectory:
    """Sample by solving the probability-flow ODE from ``x = sigma(t_start) eps`` to t_end.

    Args:
        model: called as ``model(x_t, form.model_time(t), **cond)``, returning ``prediction``.
        eps: standard-normal noise ``(B, ...)``; its dtype and device are the sample's.
        form, prediction: the model's diffusion form and prediction type.
        solver: a name in :data:`SOLVERS` (euler, heun, ddim, dpmpp_2m, dopri5, dopri8, bosh3,
            adaptive_heun).
        steps: grid intervals K (model evaluations for ddim, euler, dpmpp_2m).
        t_grid: "uniform", "logsnr", "karras" or an explicit decreasing sequence (see
            :func:`time_grid`).
        cond: keyword arguments of the conditional model.
        guidance: classifier-free guidance scale w (None: no guidance).
        uncond: keyword arguments of the unconditional model (default: none).
        return_trajectory: return a :class:`Trajectory` instead of the sample.
        rtol, atol: tolerances of the adaptive solvers.
        t_start: first time, default ``form.t_max``; t_end: last time, default 0.
        progress: show a tqdm bar counting model evaluations.

    Returns:
        The sample ``(B, ...)``, or the :class:`Trajectory` (states recorded only then).

    Raises:
        ValueError: for an unknown solver or grid, steps < 1, or a bad grid.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}.")
    if not eps.is_floating_point():
        raise ValueError(f"eps must be a floating-point tensor, got dtype {eps.dtype}.")
    t = time_grid(form, steps, t_grid, t_start=t_start, t_end=t_end)
    recorder = _Recorder() if return_trajectory else None
    with torch.no_grad(), tqdm(disable=not progress, desc=solver, unit="eval") as bar:
        denoise = Denoiser(
            model, form, prediction, cond=cond, guidance=guidance, uncond=uncond,
            batch_size=eps.shape[0], on_evaluation=bar.update,
        )  # fmt: skip
        denoise.precompute(t, eps)
        x_start = denoise.coefficients(t[0])[1] * eps
        x_end = SOLVERS[solver](denoise, x_start, t, recorder, rtol=rtol, atol=atol)
    if recorder is None:
        return x_end
    return Trajectory(
        t=t,
        x=torch.stack([*recorder.x, x_end]),
        x0_pred=torch.stack(recorder.x0_pred),
        eps_pred=torch.stack(recorder.eps_pred),
        nfe=denoise.nfe,
        form=form,
        prediction=prediction,
        solver=solver,
    )
