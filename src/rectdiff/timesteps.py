"""Training time distributions and loss weightings, all seen as one weight over logsnr.

A diffusion loss ``E_t[ weight(t) ||pred - target||^2 ]`` with ``t ~ p_t`` is, in eps-MSE
terms, ``int w(lambda) E||eps_hat - eps||^2 dlambda`` with (Kingma & Gao 2023,
"Understanding Diffusion Objectives", sec. 3)

    w(lambda) = p_t(t(lambda)) |dt/dlambda| * c_pred(t)^2 * weight(t),

where ``c_pred`` converts the prediction's error into the eps error at fixed x_t. From
``x0 = (x_t - sigma eps) / alpha``: ``x0_hat - x0 = -(sigma / alpha)(eps_hat - eps)``, so

    eps   c = 1
    x0    c = sigma / alpha                           (c^2 = exp(-lambda))
    v     c = (alpha^2 + sigma^2) / alpha              (v = alpha eps - sigma x0)
    flow  c = sigma' - sigma alpha' / alpha            (u = alpha' x0 + sigma' eps)

:func:`implied_weighting` computes w(lambda) for any form, prediction, time sampler and
weighting; :func:`equalize` builds the time sampler and weighting that give a form any
reference w(lambda), which is what "equal in logsnr" comparisons between forms need.

Time samplers (``t`` restricted to ``[form.t_min, form.t_max]`` and renormalised):
    uniform          p(t) = const
    logit_normal     logit(t) ~ N(m, s^2) (Esser et al. 2024, SD3, eq. 19)
    u_shaped         p(t) ∝ cosh(a (t - 1/2)) (Lee, Lin & Fanti 2024, sec. 3.2)
    uniform_logsnr   lambda ~ U(form.logsnr_range())
    discrete         uniform over the N integer timesteps of a ``DiscreteVP``
    AtTime           every t at one value (t_max by default): one-step distillation
Weightings (multipliers on the prediction's MSE):
    none             1
    snr              exp(lambda)
    min_snr          x0-MSE weighted by min(SNR, gamma) (Hang et al. 2023, "Efficient Diffusion
                     Training via Min-SNR Weighting Strategy"), i.e. eps-MSE weighted by
                     min(1, gamma / SNR), written for any prediction as min(1, gamma/SNR) / c^2.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .forms import Form, as_time
from .predictions import check_prediction

__all__ = [
    "TimeSampler",
    "Uniform",
    "LogitNormal",
    "UShaped",
    "UniformLogSNR",
    "Discrete",
    "Equalized",
    "AtTime",
    "TIME_SAMPLERS",
    "time_sampler",
    "Weighting",
    "NoWeighting",
    "SNRWeighting",
    "MinSNRWeighting",
    "InverseFactorWeighting",
    "WEIGHTINGS",
    "loss_weighting",
    "dlogsnr_dt",
    "prediction_factor",
    "implied_weighting",
    "equalize",
    "common_logsnr_range",
]

_F64 = torch.float64


def dlogsnr_dt(form: Form, t: Any) -> Tensor:
    """d logsnr / dt = 2 (alpha'/alpha - sigma'/sigma), float64 (negative for every form)."""
    t64 = as_time(t)
    return 2.0 * (form._d_alpha(t64) / form._alpha(t64) - form._d_sigma(t64) / form._sigma(t64))


def prediction_factor(form: Form, prediction: str, t: Any) -> Tensor:
    """c(t)^2 with ``pred_hat - pred = c(t) (eps_hat - eps)`` at fixed x_t, float64.

    See the module docstring for c per prediction; it turns a prediction's MSE into eps-MSE.
    """
    check_prediction(prediction)
    t64 = as_time(t)
    if prediction == "eps":
        return torch.ones_like(t64)
    alpha, sigma = form._alpha(t64), form._sigma(t64)
    if prediction == "x0":
        c = sigma / alpha
    elif prediction == "v":
        c = (alpha**2 + sigma**2) / alpha
    else:  # flow
        c = form._d_sigma(t64) - sigma * form._d_alpha(t64) / alpha
    return c**2


def _check_params(cls: type, params: dict[str, Any], what: str) -> None:
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "form")]
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"unknown parameter {key!r} for {what} {cls.name!r}; allowed: "  # type: ignore[attr-defined]
                f"{', '.join(allowed) or '(none)'}."
            )


# --- time samplers ------------------------------------------------------------------------
class TimeSampler:
    """A training time distribution on ``[form.t_min, form.t_max]``.

    Subclasses define ``density`` (the pdf in t, normalised on the safe range) and either
    ``icdf`` (inverse CDF of the truncated distribution, used by the default ``sample``) or
    ``sample`` itself.
    """

    name: ClassVar[str] = "sampler"

    def __init__(self, form: Form) -> None:
        self.form = form

    def sample(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``batch`` times, float64, shape ``(batch,)``, on ``device``."""
        u = torch.rand(batch, generator=generator, device=device, dtype=_F64)
        return self.icdf(u)

    def icdf(self, u: Tensor) -> Tensor:
        """The time at quantile ``u`` in [0, 1] of the truncated distribution."""
        raise NotImplementedError

    def density(self, t: Any) -> Tensor:
        """The pdf in t (zero outside ``[t_min, t_max]``), float64."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The parameters that rebuild this sampler with :func:`time_sampler`."""
        return {}

    def _inside(self, t: Tensor) -> Tensor:
        return (t >= self.form.t_min) & (t <= self.form.t_max)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({self.form!r}{', ' if args else ''}{args})"


class Uniform(TimeSampler):
    """t ~ U(t_min, t_max)."""

    name = "uniform"

    def icdf(self, u: Tensor) -> Tensor:
        return self.form.t_min + u * (self.form.t_max - self.form.t_min)

    def density(self, t: Any) -> Tensor:
        t64 = as_time(t)
        return self._inside(t64).to(_F64) / (self.form.t_max - self.form.t_min)


class _Truncated(TimeSampler):
    """A distribution on [0, 1] with closed-form CDF ``cdf`` and inverse ``_icdf01``,
    truncated to the form's safe range by mapping u into [cdf(t_min), cdf(t_max)]."""

    def _setup(self) -> None:
        lo, hi = as_time(self.form.t_min), as_time(self.form.t_max)
        self._u_lo, self._u_hi = float(self.cdf(lo)), float(self.cdf(hi))
        self._mass = self._u_hi - self._u_lo

    def cdf(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _icdf01(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _pdf01(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def icdf(self, u: Tensor) -> Tensor:
        t = self._icdf01(self._u_lo + u * self._mass)
        return t.clamp(self.form.t_min, self.form.t_max)

    def density(self, t: Any) -> Tensor:
        t64 = as_time(t)
        inside = self._inside(t64)
        safe = torch.where(inside, t64, torch.full_like(t64, 0.5))
        return torch.where(inside, self._pdf01(safe) / self._mass, torch.zeros_like(t64))


class LogitNormal(_Truncated):
    """logit(t) ~ N(m, s^2): p(t) = exp(-(logit t - m)^2 / 2s^2) / (s sqrt(2 pi) t (1 - t)).

    Esser et al. 2024 (SD3), eq. 19; SD3 uses m = 0, s = 1.
    """

    name = "logit_normal"

    def __init__(self, form: Form, m: float = 0.0, s: float = 1.0) -> None:
        if s <= 0:
            raise ValueError(f"logit_normal needs s > 0, got s={s} (SD3 uses s = 1).")
        super().__init__(form)
        self.m, self.s = float(m), float(s)
        self._setup()

    def params(self) -> dict[str, Any]:
        return {"m": self.m, "s": self.s}

    def cdf(self, t: Tensor) -> Tensor:
        return torch.special.ndtr((torch.logit(t) - self.m) / self.s)

    def _icdf01(self, u: Tensor) -> Tensor:
        return torch.sigmoid(self.m + self.s * torch.special.ndtri(u))

    def _pdf01(self, t: Tensor) -> Tensor:
        open_interval = (t > 0) & (t < 1)  # the density vanishes at t = 0 and t = 1
        t = torch.where(open_interval, t, torch.full_like(t, 0.5))
        z = (torch.logit(t) - self.m) / self.s
        pdf = torch.exp(-0.5 * z**2) / (self.s * math.sqrt(2 * math.pi) * t * (1 - t))
        return torch.where(open_interval, pdf, torch.zeros_like(pdf))


class UShaped(_Truncated):
    """p(t) ∝ cosh(a (t - 1/2)) on [0, 1] (Lee, Lin & Fanti 2024, sec. 3.2; they use a = 4).

    CDF ``F(t) = (sinh(a (t - 1/2)) + sinh(a/2)) / (2 sinh(a/2))``, inverted in closed form:
    ``t = 1/2 + asinh((2u - 1) sinh(a/2)) / a``.
    """

    name = "u_shaped"

    def __init__(self, form: Form, a: float = 4.0) -> None:
        if a <= 0:
            raise ValueError(
                f"u_shaped needs a > 0, got a={a}; a -> 0 is the uniform sampler, use 'uniform'."
            )
        super().__init__(form)
        self.a = float(a)
        self._sinh_half = math.sinh(self.a / 2)
        self._setup()

    def params(self) -> dict[str, Any]:
        return {"a": self.a}

    def cdf(self, t: Tensor) -> Tensor:
        return (torch.sinh(self.a * (t - 0.5)) + self._sinh_half) / (2 * self._sinh_half)

    def _icdf01(self, u: Tensor) -> Tensor:
        return 0.5 + torch.asinh((2 * u - 1) * self._sinh_half) / self.a

    def _pdf01(self, t: Tensor) -> Tensor:
        return self.a * torch.cosh(self.a * (t - 0.5)) / (2 * self._sinh_half)


class UniformLogSNR(TimeSampler):
    """logsnr ~ U(lo, hi), by default the form's whole range; p(t) = |dlogsnr/dt| / (hi - lo)."""

    name = "uniform_logsnr"

    def __init__(self, form: Form, lo: float | None = None, hi: float | None = None) -> None:
        super().__init__(form)
        range_lo, range_hi = form.logsnr_range()
        self.lo = range_lo if lo is None else float(lo)
        self.hi = range_hi if hi is None else float(hi)
        if not range_lo - 1e-9 <= self.lo < self.hi <= range_hi + 1e-9:
            raise ValueError(
                f"uniform_logsnr needs {range_lo:.6g} <= lo < hi <= {range_hi:.6g} (the logsnr "
                f"range of {form!r}), got lo={self.lo}, hi={self.hi}."
            )

    def params(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi}

    def icdf(self, u: Tensor) -> Tensor:
        t = self.form.t_from_logsnr(self.hi - u * (self.hi - self.lo))
        return t.clamp(self.form.t_min, self.form.t_max)

    def density(self, t: Any) -> Tensor:
        t64 = as_time(t)
        lam = self.form.logsnr(t64)
        inside = (lam >= self.lo - 1e-12) & (lam <= self.hi + 1e-12) & self._inside(t64)
        return torch.where(inside, dlogsnr_dt(self.form, t64).abs() / (self.hi - self.lo), 0.0)


class Discrete(TimeSampler):
    """Uniform over the integer timesteps n of a ``DiscreteVP`` with t_n in [t_min, t_max].

    ``t_n = form.t_from_model_time(n)``. ``density`` is the continuum limit, uniform on
    ``[t_min, t_max]``, which is what ``implied_weighting`` integrates.
    """

    name = "discrete"

    def __init__(self, form: Form) -> None:
        n_train = getattr(form, "num_train_timesteps", None)
        if n_train is None:
            raise ValueError(
                f"the 'discrete' time sampler needs a DiscreteVP form (one with integer "
                f"timesteps), got {form!r}; use 'uniform' for continuous forms."
            )
        super().__init__(form)
        steps = torch.arange(n_train, dtype=_F64)
        t_steps = form.t_from_model_time(steps)
        keep = (t_steps >= form.t_min - 1e-12) & (t_steps <= form.t_max + 1e-12)
        self.timesteps = steps[keep]
        self.n_train = int(n_train)

    def sample(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        idx = torch.randint(len(self.timesteps), (batch,), generator=generator, device=device)
        return self.form.t_from_model_time(self.timesteps.to(device)[idx])

    def density(self, t: Any) -> Tensor:
        t64 = as_time(t)
        return self._inside(t64).to(_F64) / (self.form.t_max - self.form.t_min)


class Equalized(TimeSampler):
    """Samples logsnr from a reference weight w_ref(lambda) on [lo, hi], mapped to t.

    The density in logsnr is the piecewise-linear interpolant of w_ref on ``grid_size`` nodes,
    divided by its integral ``total``; sampling inverts its (piecewise-quadratic) CDF exactly.
    Paired with ``InverseFactorWeighting(total)`` the implied weighting is that interpolant.
    Built by :func:`equalize`.
    """

    name = "equalized"

    def __init__(
        self,
        form: Form,
        reference_weight: Callable[[Tensor], Tensor],
        lo: float,
        hi: float,
        grid_size: int = 4097,
    ) -> None:
        super().__init__(form)
        self.lo, self.hi = float(lo), float(hi)
        self.logsnr_nodes = torch.linspace(self.lo, self.hi, grid_size, dtype=_F64)
        weights = torch.as_tensor(reference_weight(self.logsnr_nodes), dtype=_F64)
        if weights.shape != self.logsnr_nodes.shape or not bool(torch.isfinite(weights).all()):
            raise ValueError(
                "reference_weight must map a (G,) float64 logsnr tensor to G finite weights."
            )
        if bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(
                f"reference_weight must be >= 0 and not all zero on logsnr [{lo:.4g}, {hi:.4g}]."
            )
        self.weights = weights
        self._h = (self.hi - self.lo) / (grid_size - 1)
        cell_mass = 0.5 * (weights[1:] + weights[:-1]) * self._h
        self._cum = torch.cat([torch.zeros(1, dtype=_F64), torch.cumsum(cell_mass, 0)])
        self.total = float(self._cum[-1])

    def interpolate(self, lam: Tensor) -> Tensor:
        """The piecewise-linear reference weight at ``lam`` (zero outside [lo, hi])."""
        pos = ((lam - self.lo) / self._h).clamp(0, len(self.weights) - 1)
        k = pos.floor().long().clamp(max=len(self.weights) - 2)
        frac = pos - k
        value = self.weights[k] + frac * (self.weights[k + 1] - self.weights[k])
        inside = (lam >= self.lo - 1e-12) & (lam <= self.hi + 1e-12)
        return torch.where(inside, value, torch.zeros_like(value))

    def icdf(self, u: Tensor) -> Tensor:
        cum, weights = self._cum.to(u.device), self.weights.to(u.device)
        mass = u * self.total
        k = (torch.searchsorted(cum, mass.contiguous()) - 1).clamp(0, len(weights) - 2)
        rest = (mass - cum[k]) / self._h  # = w_k x + (w_{k+1} - w_k) x^2 / 2, solve for x
        w0, slope = weights[k], weights[k + 1] - weights[k]
        root = torch.sqrt((w0**2 + 2 * slope * rest).clamp(min=0))
        frac = torch.where(root + w0 > 0, 2 * rest / (w0 + root).clamp(min=1e-300), 0.5)
        lam = self.lo + (k + frac.clamp(0, 1)) * self._h
        return self.form.t_from_logsnr(lam).clamp(self.form.t_min, self.form.t_max)

    def density(self, t: Any) -> Tensor:
        t64 = as_time(t)
        lam = self.form.logsnr(t64)
        return self.interpolate(lam) / self.total * dlogsnr_dt(self.form, t64).abs()

    def params(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "grid_size": len(self.weights)}


class AtTime(TimeSampler):
    """Every training time at one value ``t`` (``form.t_max`` by default): distillation."""

    name = "at_time"

    def __init__(self, form: Form, t: float | None = None) -> None:
        super().__init__(form)
        self.t = form.t_max if t is None else float(t)

    def sample(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        return torch.full((batch,), self.t, dtype=torch.float64, device=device)

    def density(self, t: Any) -> Tensor:  # a point mass has no density in t
        raise ValueError("AtTime is a point mass at one t; it has no implied logsnr weighting.")

    def params(self) -> dict[str, Any]:
        return {"t": self.t}


TIME_SAMPLERS: dict[str, type[TimeSampler]] = {
    "uniform": Uniform,
    "logit_normal": LogitNormal,
    "u_shaped": UShaped,
    "uniform_logsnr": UniformLogSNR,
    "discrete": Discrete,
}


def time_sampler(name_or_obj: str | TimeSampler, form: Form, **params: Any) -> TimeSampler:
    """A time sampler by name (with its parameters) for ``form``, or the given one checked.

    Raises:
        ValueError: for an unknown name or parameter, or a sampler built for another form.
    """
    if isinstance(name_or_obj, TimeSampler):
        if params:
            raise ValueError(f"parameters {sorted(params)} go with a sampler name, not an object.")
        if name_or_obj.form != form:
            raise ValueError(
                f"time sampler {name_or_obj!r} was built for another form than {form!r}; "
                "build it with that form."
            )
        return name_or_obj
    if name_or_obj not in TIME_SAMPLERS:
        raise ValueError(
            f"unknown time sampler {name_or_obj!r}; allowed: {', '.join(TIME_SAMPLERS)}."
        )
    cls = TIME_SAMPLERS[name_or_obj]
    _check_params(cls, params, "time sampler")
    return cls(form, **params)


_build_sampler = time_sampler  # for functions whose argument is named time_sampler


# --- loss weightings ----------------------------------------------------------------------
class Weighting:
    """A per-sample multiplier on the prediction's MSE, as a function of t (through logsnr)."""

    name: ClassVar[str] = "weighting"
    #: True when the weight is identically 1 (the loss then skips the multiplication)
    identity: ClassVar[bool] = False

    def __call__(self, t: Any, *, form: Form, prediction: str) -> Tensor:
        """The weight at times ``t``, float64."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The parameters that rebuild this weighting with :func:`loss_weighting`."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class NoWeighting(Weighting):
    """weight = 1: the plain MSE of the prediction."""

    name = "none"
    identity = True

    def __call__(self, t: Any, *, form: Form, prediction: str) -> Tensor:
        return torch.ones_like(as_time(t))


class SNRWeighting(Weighting):
    """weight = SNR = exp(logsnr) on the prediction's MSE (eps-prediction then equals x0-MSE)."""

    name = "snr"

    def __call__(self, t: Any, *, form: Form, prediction: str) -> Tensor:
        return torch.exp(form._logsnr(as_time(t)))


class MinSNRWeighting(Weighting):
    """Min-SNR-gamma (Hang et al. 2023): x0-MSE weighted by min(SNR, gamma), any prediction.

    As eps-MSE weight this is min(1, gamma / SNR); divided by the prediction factor c^2 it is
    the paper's min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and
    min(SNR, gamma) / (SNR + 1) for v in VP forms, and the same rule for every other form.
    """

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"min_snr needs gamma > 0, got gamma={gamma} (the paper uses 5).")
        self.gamma = float(gamma)

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def __call__(self, t: Any, *, form: Form, prediction: str) -> Tensor:
        t64 = as_time(t)
        eps_weight = torch.clamp(self.gamma * torch.exp(-form._logsnr(t64)), max=1.0)
        return eps_weight / prediction_factor(form, prediction, t64)


class InverseFactorWeighting(Weighting):
    """weight = scale / c_pred(t)^2: makes the eps-MSE weight the constant ``scale``."""

    name = "inverse_factor"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def __call__(self, t: Any, *, form: Form, prediction: str) -> Tensor:
        return self.scale / prediction_factor(form, prediction, t)


WEIGHTINGS: dict[str, type[Weighting]] = {
    "none": NoWeighting,
    "snr": SNRWeighting,
    "min_snr": MinSNRWeighting,
    "inverse_factor": InverseFactorWeighting,
}


def loss_weighting(name_or_obj: str | Weighting, **params: Any) -> Weighting:
    """A loss weighting by name (with its parameters), or the given one.

    Raises:
        ValueError: for an unknown name or parameter.
    """
    if isinstance(name_or_obj, Weighting):
        if params:
            raise ValueError(
                f"parameters {sorted(params)} go with a weighting name, not an object."
            )
        return name_or_obj
    if name_or_obj not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name_or_obj!r}; allowed: {', '.join(WEIGHTINGS)}.")
    cls = WEIGHTINGS[name_or_obj]
    _check_params(cls, params, "weighting")
    return cls(**params)


# --- weight over logsnr -------------------------------------------------------------------
def implied_weighting(
    form: Form,
    prediction: str,
    time_sampler: str | TimeSampler,
    weighting: str | Weighting,
    logsnr_grid: Any,
) -> Tensor:
    """The eps-MSE weight over logsnr that a training set-up amounts to, float64.

    ``w(lambda) = p_t(t(lambda)) |dt/dlambda| c_pred(t)^2 weight(t)`` (Kingma & Gao 2023,
    sec. 3), so that ``E_t[weight(t) ||pred_hat - pred||^2] = int w(lambda)
    E||eps_hat - eps||^2 dlambda``. Zero outside the form's logsnr range.

    Args:
        form: the diffusion form.
        prediction: what the network predicts.
        time_sampler: a name (default parameters) or a sampler built for ``form``.
        weighting: a name (default parameters) or a :class:`Weighting`.
        logsnr_grid: the logsnr values to evaluate at.
    """
    check_prediction(prediction)
    sampler = _build_sampler(time_sampler, form)
    weight_fn = loss_weighting(weighting)
    lam = as_time(logsnr_grid)
    lo, hi = form.logsnr_range()
    inside = (lam >= lo) & (lam <= hi)
    t = form.t_from_logsnr(lam.clamp(lo, hi)).clamp(form.t_min, form.t_max)
    w = (
        sampler.density(t)
        / dlogsnr_dt(form, t).abs()
        * prediction_factor(form, prediction, t)
        * weight_fn(t, form=form, prediction=prediction)
    )
    return torch.where(inside, w, torch.zeros_like(w))


def common_logsnr_range(*forms: Form) -> tuple[float, float]:
    """The logsnr interval every one of ``forms`` is trained on (the intersection).

    Raises:
        ValueError: if the ranges do not overlap.
    """
    ranges = [f.logsnr_range() for f in forms]
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    if not lo < hi:
        raise ValueError(f"the logsnr ranges {ranges} of {list(forms)} do not overlap.")
    return lo, hi


def equalize(
    form: Form,
    prediction: str,
    reference_weight: Callable[[Tensor], Tensor],
    *,
    logsnr_range: tuple[float, float] | None = None,
    grid_size: int = 4097,
) -> tuple[Equalized, InverseFactorWeighting]:
    """The time sampler and weighting that give ``form``/``prediction`` a reference w(lambda).

    logsnr is sampled from ``reference_weight`` restricted to ``logsnr_range`` (normalised,
    piecewise linear on ``grid_size`` nodes) and mapped to t; the weighting
    ``total / c_pred(t)^2`` cancels the prediction factor. The implied weighting is then the
    reference weight itself (its interpolant) on that range, in absolute scale, so losses
    stay comparable at equal learning rates. To compare forms, pass every form the same
    reference and ``logsnr_range=common_logsnr_range(*forms)``.

    Args:
        form: the form to train.
        prediction: its prediction type.
        reference_weight: w_ref(lambda) >= 0 on float64 logsnr tensors, e.g.
            ``lambda lam: implied_weighting(ref_form, "flow", "uniform", "none", lam)``.
        logsnr_range: ``(lo, hi)`` inside the form's range; the form's range by default.
        grid_size: interpolation nodes in logsnr.

    Raises:
        ValueError: if the range leaves the form's range or the weight is invalid.
    """
    check_prediction(prediction)
    range_lo, range_hi = form.logsnr_range()
    lo, hi = (range_lo, range_hi) if logsnr_range is None else map(float, logsnr_range)
    if not range_lo - 1e-9 <= lo < hi <= range_hi + 1e-9:
        raise ValueError(
            f"logsnr_range ({lo:.6g}, {hi:.6g}) must lie inside the range "
            f"({range_lo:.6g}, {range_hi:.6g}) of {form!r}; use common_logsnr_range(*forms)."
        )
    sampler = Equalized(form, reference_weight, lo, hi, grid_size)
    return sampler, InverseFactorWeighting(sampler.total)
