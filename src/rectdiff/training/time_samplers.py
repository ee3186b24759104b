"""Training time distributions p(t); see :mod:`.weightings` for how each becomes a weight over logsnr.

Time samplers (``t`` restricted to ``[form.t_min, form.t_max]`` and renormalised):
    uniform          p(t) = const
    logit_normal     logit(t) ~ N(m, s^2) (Esser et al. 2024, SD3, eq. 19)
    u_shaped         p(t) ∝ cosh(a (t - 1/2)) (Lee, Lin & Fanti 2024, sec. 3.2)
    uniform_logsnr   lambda ~ U(form.logsnr_range())
    discrete         uniform over the N integer timesteps of a ``DiscreteVP``
    equalized        lambda drawn by importance for a reference weight over logsnr
                     (see ``equalization.equalize``)
    AtTime           every t at one value (t_max by default): one-step distillation
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..forms import Form, as_time
from ..io.configs import parameter_names, reject_unknown

__all__ = [
    "TimeSampler",
    "Uniform",
    "LogitNormal",
    "UShaped",
    "UniformLogSNR",
    "Discrete",
    "AtTime",
    "TIME_SAMPLERS",
    "time_sampler",
    "check_params",
    "dlogsnr_dt",
]

_F64 = torch.float64


def dlogsnr_dt(form: Form, t: Any) -> Tensor:
    """d logsnr / dt = 2 (alpha'/alpha - sigma'/sigma), float64 (negative for every form)."""
    t64 = as_time(t)
    return 2.0 * (form.d_alpha(t64) / form.alpha(t64) - form.d_sigma(t64) / form.sigma(t64))


@functools.cache
def _parameter_names(cls: type) -> tuple[str, ...]:
    """``cls.__init__``'s keyword parameters, inspected once per class."""
    return tuple(parameter_names(cls.__init__, skip=("self", "form")))  # type: ignore[misc]


def check_params(cls: type, params: dict[str, Any], what: str) -> None:
    """Reject keyword parameters that ``cls.__init__`` does not take (``form`` is supplied)."""
    if params:
        allowed = list(_parameter_names(cls))
        reject_unknown(params, allowed, "parameter", f"for {what} {cls.name!r}")  # type: ignore[attr-defined]


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

    def sample(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """:meth:`icdf` of ``torch.rand``'s float64 draw, the same numbers to the bit, without
        its temporaries: ``uniform_(0, w)`` computes ``u w`` from the same 53-bit ``u`` (its
        ``u w + 0``, fused or not, rounds once), then ``+ t_min`` in place; on ``[0, 1]``
        (flow matching) that is ``torch.rand`` itself, one call."""
        t_min, width = self.form.t_min, self.form.t_max - self.form.t_min
        if t_min == 0.0 and width == 1.0:
            return torch.rand(batch, generator=generator, device=device, dtype=_F64)
        t = torch.empty(batch, device=device, dtype=_F64)
        t.uniform_(0.0, width, generator=generator)
        return t.add_(t_min) if t_min != 0.0 else t

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
    check_params(cls, params, "time sampler")
    return cls(form, **params)
