"""Diffusion forms: the one forward process ``x_t = alpha_t x0 + sigma_t eps``.

Every diffusion model in rectdiff is a :class:`Form`: a pair of functions ``alpha(t)``,
``sigma(t)`` on continuous time ``t in [0, 1]`` with **t = 0 data and t = 1 noise**, and
``logsnr(t) = log(alpha_t^2 / sigma_t^2)`` strictly decreasing. The concrete forms only
supply ``alpha``, ``sigma``, their analytic derivatives and the exact inverse of ``logsnr``;
everything else (noising, prediction conversions, samplers, losses) is written once on top.

All schedule arithmetic runs in float64 and is cast back to the caller's dtype, because
float32 loses digits exactly where it matters (VP near t = 0, flow matching near t = 1).

Forms:
    VP            score-SDE VPSDE, linear beta (Song et al. 2021, eq. 33; DPM-Solver's
                  ``NoiseScheduleVP('linear')``).
    VPCosine      cosine schedule (Nichol & Dhariwal 2021, eq. 17; DPM-Solver's 'cosine').
    SubVP         score-SDE sub-VP: alpha as VP, sigma = 1 - alpha^2 (Song et al. 2021, eq. 34).
    VE            alpha = 1, geometric sigma (Song et al. 2021, eq. 31).
    FlowMatching  alpha = 1 - t, sigma = t; SD3's shift (Esser et al. 2024, eq. 23) and
                  Lipman et al. (2023)'s OT path with sigma_min.
    DiscreteVP    a DDPM-style table of alphas_cumprod made continuous by piecewise-linear
                  interpolation of log(alpha) (Lu et al. 2022, DPM-Solver appendix D).
    Custom        the user's own alpha(t), sigma(t), from callables or whitelisted expressions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._expr import compile_expression

__all__ = [
    "Form",
    "VarPreserving",
    "VP",
    "VPCosine",
    "SubVP",
    "VE",
    "FlowMatching",
    "DiscreteVP",
    "Custom",
    "FORMS",
    "as_time",
    "broadcast",
    "from_diffusers",
    "load",
    "from_config",
    "presets",
    "preset_table",
]

_F64 = torch.float64


def as_time(t: Any) -> Tensor:
    """``t`` as a float64 tensor (scalars become 0-d tensors)."""
    if isinstance(t, Tensor):
        return t.to(_F64)
    return torch.as_tensor(t, dtype=_F64)


def _out_dtype(t: Any) -> torch.dtype:
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.dtype
    return _F64


def broadcast(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient of shape ``()`` or ``(B,)`` to broadcast over ``x``.

    Raises:
        ValueError: if ``coef`` is neither a scalar nor a ``(B,)`` vector matching ``x``.
    """
    if coef.ndim == 0:
        return coef.to(x.dtype)
    if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
        raise ValueError(
            f"t must be a scalar or have shape (B,) = ({x.shape[0]},) to match a batch of "
            f"shape {tuple(x.shape)}; got shape {tuple(coef.shape)}. Pass one time per sample."
        )
    return coef.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class Form:
    """A diffusion form ``x_t = alpha(t) x0 + sigma(t) eps`` on ``t in [0, 1]``.

    Subclasses implement the float64 kernels ``_alpha``, ``_sigma``, ``_d_alpha``,
    ``_d_sigma`` and ``_t_from_logsnr``; the public methods accept floats or tensors, compute
    in float64 and return the caller's floating dtype (float64 for Python numbers).

    Attributes:
        t_min: smallest time at which a network is evaluated (training and sampling).
        t_max: largest such time; samplers start from ``x = sigma(t_max) * eps``.
    """

    name: str = "form"
    family: str = ""

    def __init__(self, t_min: float, t_max: float) -> None:
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(
                f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}. "
                "t = 0 is data and t = 1 is noise."
            )
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    # --- float64 kernels, supplied by subclasses --------------------------------------
    def _alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _logsnr(self, t: Tensor) -> Tensor:
        return 2.0 * (torch.log(self._alpha(t)) - torch.log(self._sigma(t)))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        raise NotImplementedError

    # --- public API ---------------------------------------------------------------------
    def _apply(self, kernel: Callable[[Tensor], Tensor], t: Any) -> Tensor:
        return kernel(as_time(t)).to(_out_dtype(t))

    def alpha(self, t: Any) -> Tensor:
        """Signal coefficient alpha_t."""
        return self._apply(self._alpha, t)

    def sigma(self, t: Any) -> Tensor:
        """Noise coefficient sigma_t."""
        return self._apply(self._sigma, t)

    def d_alpha(self, t: Any) -> Tensor:
        """d alpha_t / dt, analytic."""
        return self._apply(self._d_alpha, t)

    def d_sigma(self, t: Any) -> Tensor:
        """d sigma_t / dt, analytic."""
        return self._apply(self._d_sigma, t)

    def logsnr(self, t: Any) -> Tensor:
        """log(alpha_t^2 / sigma_t^2), strictly decreasing in t."""
        return self._apply(self._logsnr, t)

    def t_from_logsnr(self, lam: Any) -> Tensor:
        """Exact inverse of :meth:`logsnr` (up to float64 rounding)."""
        return self._apply(self._t_from_logsnr, lam)

    def model_time(self, t: Any) -> Tensor:
        """What the network receives as its time input; ``t`` itself for continuous forms."""
        return self._apply(lambda s: s, t)

    def t_from_model_time(self, model_t: Any) -> Tensor:
        """Inverse of :meth:`model_time`."""
        return self._apply(lambda s: s, model_t)

    def coefficients(self, t: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha, sigma, d_alpha, d_sigma)`` at ``t`` in one call."""
        return self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Any) -> Tensor:
        """``x_t = alpha_t x0 + sigma_t eps`` with ``t`` a scalar or of shape ``(B,)``."""
        if x0.shape != eps.shape:
            raise ValueError(
                f"x0 and eps must have the same shape, got {tuple(x0.shape)} and "
                f"{tuple(eps.shape)}."
            )
        t64 = as_time(t).to(x0.device)
        alpha = broadcast(self._alpha(t64), x0)
        sigma = broadcast(self._sigma(t64), x0)
        return alpha * x0 + sigma * eps

    def logsnr_range(self) -> tuple[float, float]:
        """``(logsnr(t_max), logsnr(t_min))``: the logsnr interval a network is trained on."""
        lo = float(self.logsnr(self.t_max))
        hi = float(self.logsnr(self.t_min))
        return lo, hi

    def config(self) -> dict[str, Any]:
        """The parameters that rebuild this form with :func:`from_config` (TOML-ready)."""
        return {"family": self.family, **self._params(), "t_min": self.t_min, "t_max": self.t_max}

    def _params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Form)
            and type(self) is type(other)
            and self.config() == other.config()
        )

    def __hash__(self) -> int:
        return hash(repr(self.config()))


class VarPreserving(Form):
    """A variance-preserving form: alpha_t^2 + sigma_t^2 = 1, given through log(alpha_t).

    Subclasses supply ``_log_alpha``, ``_d_log_alpha`` and ``_t_from_log_alpha``; then
    ``sigma = sqrt(1 - alpha^2)``, ``logsnr = 2 log(alpha) - log(1 - alpha^2)`` and its inverse
    ``log(alpha) = -softplus(-logsnr) / 2`` are computed without cancellation.
    """

    def _log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _d_log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self._log_alpha(t))

    def _one_minus_alpha2(self, t: Tensor) -> Tensor:
        return -torch.expm1(2.0 * self._log_alpha(t))

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(self._one_minus_alpha2(t))

    def _d_alpha(self, t: Tensor) -> Tensor:
        return self._alpha(t) * self._d_log_alpha(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        alpha2 = torch.exp(2.0 * self._log_alpha(t))
        return -alpha2 * self._d_log_alpha(t) / self._sigma(t)

    def _logsnr(self, t: Tensor) -> Tensor:
        return 2.0 * self._log_alpha(t) - torch.log(self._one_minus_alpha2(t))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        return self._t_from_log_alpha(-0.5 * torch.nn.functional.softplus(-lam))


class VP(VarPreserving):
    """Score-SDE VP with linear beta(t) = beta_min + t (beta_max - beta_min).

    log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2 (Song et al. 2021, eq. 33;
    identical to DPM-Solver's ``NoiseScheduleVP(schedule='linear')``), sigma_t^2 = 1 - alpha_t^2.
    """

    name = "vp"
    family = "vp"

    def __init__(
        self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0
    ) -> None:
        if not 0.0 <= beta_min < beta_max:
            raise ValueError(
                f"VP needs 0 <= beta_min < beta_max, got beta_min={beta_min}, "
                f"beta_max={beta_max} (score-SDE uses beta_min=0.1, beta_max=20)."
            )
        if t_min <= 0.0:
            raise ValueError(f"VP needs t_min > 0 (sigma(0) = 0), got t_min={t_min}.")
        super().__init__(t_min, t_max)
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _params(self) -> dict[str, Any]:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _d_log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        # Root of (b1 - b0) t^2 / 4 + b0 t / 2 = -log_alpha, written as in DPM-Solver's
        # inverse_lambda to avoid cancellation.
        tmp = -4.0 * (self.beta_max - self.beta_min) * log_alpha
        delta = self.beta_min**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_min) / (self.beta_max - self.beta_min)


class VPCosine(VarPreserving):
    """Cosine VP: alpha_t = f(t) / f(0), f(t) = cos(pi/2 (t + s) / (1 + s)).

    Nichol & Dhariwal (2021), eq. 17 with s = 0.008; alpha reaches 0 at t = 1, so the safe
    range ends at t_max = 0.9946 as in DPM-Solver's cosine ``NoiseScheduleVP``.
    """

    name = "vp-cosine"
    family = "vp-cosine"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946) -> None:
        if s < 0:
            raise ValueError(f"VPCosine needs s >= 0, got s={s} (Nichol & Dhariwal use 0.008).")
        super().__init__(t_min, t_max)
        self.s = float(s)
        self._log_f0 = math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))

    def _params(self) -> dict[str, Any]:
        return {"s": self.s}

    def _theta(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def _log_alpha(self, t: Tensor) -> Tensor:
        # clamp: at t = 0 rounding can give log(alpha) = +1e-20, i.e. sigma^2 < 0
        return (torch.log(torch.cos(self._theta(t))) - self._log_f0).clamp(max=0.0)

    def _d_log_alpha(self, t: Tensor) -> Tensor:
        return -torch.tan(self._theta(t)) * (math.pi / 2) / (1 + self.s)

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        theta = torch.arccos(torch.exp(log_alpha + self._log_f0))
        return theta * 2 * (1 + self.s) / math.pi - self.s


class SubVP(VP):
    """Score-SDE sub-VP: alpha_t as :class:`VP`, sigma_t = 1 - alpha_t^2 (Song et al. 2021, eq. 34)."""

    name = "subvp"
    family = "subvp"

    def _sigma(self, t: Tensor) -> Tensor:
        return self._one_minus_alpha2(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return -2.0 * torch.exp(2.0 * self._log_alpha(t)) * self._d_log_alpha(t)

    def _logsnr(self, t: Tensor) -> Tensor:
        return 2.0 * self._log_alpha(t) - 2.0 * torch.log(self._one_minus_alpha2(t))

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        # alpha / (1 - alpha^2) = r = exp(lam / 2)  =>  log alpha = -asinh(1 / (2 r)).
        return self._t_from_log_alpha(-torch.asinh(0.5 * torch.exp(-0.5 * lam)))


class VE(Form):
    """Score-SDE VE: alpha_t = 1, sigma_t = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, eq. 31)."""

    name = "ve"
    family = "ve"

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        t_min: float = 0.0,
        t_max: float = 1.0,
    ) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(
                f"VE needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max} (score-SDE uses 0.01 and 50)."
            )
        super().__init__(t_min, t_max)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _params(self) -> dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def _d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return self._sigma(t) * self._log_ratio

    def _logsnr(self, t: Tensor) -> Tensor:
        return -2.0 * (math.log(self.sigma_min) + t * self._log_ratio)

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio


class FlowMatching(Form):
    """Flow matching / rectified flow: alpha_t = 1 - tau, sigma_t = sigma_min + (1 - sigma_min) tau.

    ``tau = shift t / (1 + (shift - 1) t)`` is SD3's timestep shift (Esser et al. 2024, eq. 23;
    diffusers' ``FlowMatchEulerDiscreteScheduler``), ``tau = t`` for ``shift = 1``. With
    ``sigma_min > 0`` this is Lipman et al. (2023)'s OT path, eq. 20, written with t = 0 data:
    their ``psi_t(x) = (1 - (1 - sigma_min) t) x + t x1`` at their time ``1 - t``.
    The rectified-flow papers write ``X_t = t X1 + (1 - t) X0`` with t = 1 data; their time is
    ``1 - t`` here. The network's time input is ``time_scale * tau`` (1000 sigma for SD3).
    """

    name = "fm"
    family = "fm"

    def __init__(
        self,
        shift: float = 1.0,
        sigma_min: float = 0.0,
        t_min: float = 1e-3,
        t_max: float = 1.0 - 1e-3,
        time_scale: float = 1.0,
    ) -> None:
        if shift <= 0:
            raise ValueError(f"FlowMatching needs shift > 0, got shift={shift} (SD3 uses 3.0).")
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(
                f"FlowMatching needs 0 <= sigma_min < 1, got sigma_min={sigma_min} "
                "(Lipman et al. use 1e-4; 0 is rectified flow)."
            )
        if time_scale <= 0:
            raise ValueError(f"FlowMatching needs time_scale > 0, got time_scale={time_scale}.")
        super().__init__(t_min, t_max)
        self.shift = float(shift)
        self.sigma_min = float(sigma_min)
        self.time_scale = float(time_scale)

    def _params(self) -> dict[str, Any]:
        return {"shift": self.shift, "sigma_min": self.sigma_min, "time_scale": self.time_scale}

    def _tau(self, t: Tensor) -> Tensor:
        if self.shift == 1.0:  # fast path: this sits in every training step
            return t
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def _d_tau(self, t: Tensor) -> Tensor:
        if self.shift == 1.0:
            return torch.ones_like(t)
        return self.shift / (1.0 + (self.shift - 1.0) * t) ** 2

    def _alpha(self, t: Tensor) -> Tensor:
        return 1.0 - self._tau(t)

    def _sigma(self, t: Tensor) -> Tensor:
        if self.sigma_min == 0.0:
            return self._tau(t)
        return self.sigma_min + (1.0 - self.sigma_min) * self._tau(t)

    def _d_alpha(self, t: Tensor) -> Tensor:
        return -self._d_tau(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return (1.0 - self.sigma_min) * self._d_tau(t)

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        # (1 - tau) / (sigma_min + (1 - sigma_min) tau) = r = exp(lam / 2), solved for tau.
        if self.sigma_min == 0.0:
            tau = torch.sigmoid(-0.5 * lam)
        else:
            r = torch.exp(0.5 * lam)
            tau = (1.0 - r * self.sigma_min) / (1.0 + r * (1.0 - self.sigma_min))
        return tau / (self.shift - (self.shift - 1.0) * tau)

    def model_time(self, t: Any) -> Tensor:
        """``time_scale * tau``: the network sees the *shifted* time, as SD3 and diffusers'
        ``FlowMatchEulerDiscreteScheduler`` pass ``timestep = 1000 sigma``; a network trained at
        one shift can then be sampled at another."""
        return self._apply(lambda s: self._tau(s) * self.time_scale, t)

    def t_from_model_time(self, model_t: Any) -> Tensor:
        def inverse(s: Tensor) -> Tensor:
            tau = s / self.time_scale
            return tau / (self.shift - (self.shift - 1.0) * tau)

        return self._apply(inverse, model_t)


class DiscreteVP(VarPreserving):
    """A discrete DDPM schedule (``alphas_cumprod`` over N steps) as a continuous VP form.

    Timestep n = 0..N-1 sits at t_n = (n + 1) / N and log(alpha) is interpolated linearly in
    t between knots, with the data end (t = 0, alpha = 1) as an extra knot; this is
    DPM-Solver's discrete ``NoiseScheduleVP`` (Lu et al. 2022, appendix D). ``model_time``
    returns the (fractional) scheduler timestep ``N t - 1``, so at the knots the network sees
    exactly the integer timesteps it was trained on, and ``add_noise`` at t_n agrees with
    ``DDPMScheduler.add_noise`` at timestep n.
    """

    name = "discrete-vp"
    family = "discrete-vp"

    def __init__(
        self,
        betas: Any = None,
        alphas_cumprod: Any = None,
        t_min: float | None = None,
        t_max: float = 1.0,
        label: str | None = None,
    ) -> None:
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("DiscreteVP needs exactly one of betas= or alphas_cumprod=.")
        if betas is not None:
            betas = as_time(betas)
            if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError(
                    "DiscreteVP betas must be a 1-D sequence of at least 2 values in (0, 1)."
                )
            log_alpha = 0.5 * torch.cumsum(torch.log1p(-betas), 0)
        else:
            acp = as_time(alphas_cumprod)
            if acp.ndim != 1 or len(acp) < 2 or not bool(((acp > 0) & (acp < 1)).all()):
                raise ValueError(
                    "DiscreteVP alphas_cumprod must be a 1-D sequence of at least 2 values in "
                    "(0, 1); a zero-terminal-SNR schedule (alphas_cumprod[-1] = 0) must be "
                    "clipped first, as diffusers does with 2**-24."
                )
            log_alpha = 0.5 * torch.log(acp)
        if not bool((torch.diff(log_alpha) < 0).all()):
            raise ValueError("DiscreteVP needs strictly decreasing alphas_cumprod.")
        self.num_train_timesteps = n = len(log_alpha)
        super().__init__(1.0 / n if t_min is None else t_min, t_max)
        self.label = label
        self._t_knots = torch.linspace(0.0, 1.0, n + 1, dtype=_F64)
        self._log_alpha_knots = torch.cat([torch.zeros(1, dtype=_F64), log_alpha])

    @property
    def alphas_cumprod(self) -> Tensor:
        """The N table values, float64."""
        return torch.exp(2.0 * self._log_alpha_knots[1:])

    def _params(self) -> dict[str, Any]:
        if self.label is not None:
            return {"label": self.label}
        return {"alphas_cumprod": self.alphas_cumprod.tolist()}

    def config(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "alphas_cumprod": self.alphas_cumprod.tolist(),
            "t_min": self.t_min,
            "t_max": self.t_max,
        }

    def __repr__(self) -> str:
        what = self.label or f"{self.num_train_timesteps} steps"
        return f"DiscreteVP({what})"

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor]:
        n = self.num_train_timesteps
        k = torch.clamp(torch.floor(t * n).long(), 0, n - 1)
        slope = (self._log_alpha_knots[k + 1] - self._log_alpha_knots[k]) * n
        return k, slope

    def _log_alpha(self, t: Tensor) -> Tensor:
        k, slope = self._segment(t)
        return self._log_alpha_knots[k] + slope * (t - self._t_knots[k])

    def _d_log_alpha(self, t: Tensor) -> Tensor:
        return self._segment(t)[1]

    def _t_from_log_alpha(self, log_alpha: Tensor) -> Tensor:
        knots = -self._log_alpha_knots  # increasing
        n = self.num_train_timesteps
        k = torch.clamp(torch.searchsorted(knots, (-log_alpha).contiguous()) - 1, 0, n - 1)
        frac = (-log_alpha - knots[k]) / (knots[k + 1] - knots[k])
        return self._t_knots[k] + frac / n

    def model_time(self, t: Any) -> Tensor:
        return self._apply(lambda s: s * self.num_train_timesteps - 1.0, t)

    def t_from_model_time(self, model_t: Any) -> Tensor:
        return self._apply(lambda s: (s + 1.0) / self.num_train_timesteps, model_t)


class Custom(Form):
    """A user's own ``alpha(t)``, ``sigma(t)``: callables on float64 tensors, or expression strings.

    Strings are parsed with a whitelist (numbers, ``t``, ``pi``, ``+ - * / **``, ``exp``,
    ``log``, ``sqrt``, ``sin``, ``cos``, ``tan``) and never evaluated as Python. Derivatives are
    exact (automatic differentiation of the expression); ``t_from_logsnr`` is a float64
    bisection, exact to rounding. The schedule is checked for alpha > 0, sigma > 0 and
    strictly decreasing logsnr on ``[t_min, t_max]``.
    """

    name = "custom"
    family = "custom"

    def __init__(
        self,
        alpha: str | Callable[[Tensor], Tensor],
        sigma: str | Callable[[Tensor], Tensor],
        t_min: float = 1e-3,
        t_max: float = 1.0 - 1e-3,
        check_points: int = 2001,
    ) -> None:
        super().__init__(t_min, t_max)
        self.alpha_expr = alpha if isinstance(alpha, str) else None
        self.sigma_expr = sigma if isinstance(sigma, str) else None
        self._alpha_fn = compile_expression(alpha, "alpha") if isinstance(alpha, str) else alpha
        self._sigma_fn = compile_expression(sigma, "sigma") if isinstance(sigma, str) else sigma
        self._check(check_points)

    def _params(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha_expr or getattr(self._alpha_fn, "__name__", "callable"),
            "sigma": self.sigma_expr or getattr(self._sigma_fn, "__name__", "callable"),
        }

    def _check(self, points: int) -> None:
        t = torch.linspace(self.t_min, self.t_max, points, dtype=_F64)
        alpha, sigma = self._alpha(t), self._sigma(t)
        for label, value in (("alpha", alpha), ("sigma", sigma)):
            bad = ~(torch.isfinite(value) & (value > 0))
            if bad.any():
                t_bad = float(t[bad.nonzero()[0, 0]])
                raise ValueError(
                    f"custom schedule: {label}(t) must be finite and > 0 on [t_min, t_max] = "
                    f"[{self.t_min}, {self.t_max}], but {label}({t_bad:.6g}) = "
                    f"{float(value[bad][0]):.6g}. Narrow t_min/t_max or fix the expression."
                )
        lam = self._logsnr(t)
        rising = torch.diff(lam) >= 0
        if rising.any():
            i = int(rising.nonzero()[0, 0])
            raise ValueError(
                "custom schedule: logsnr(t) = log(alpha^2 / sigma^2) must be strictly decreasing, "
                f"but logsnr({float(t[i]):.6g}) = {float(lam[i]):.6g} <= logsnr({float(t[i + 1]):.6g})"
                f" = {float(lam[i + 1]):.6g}. alpha/sigma must fall as t goes from data (0) to "
                "noise (1)."
            )

    def _alpha(self, t: Tensor) -> Tensor:
        return torch.as_tensor(self._alpha_fn(t), dtype=_F64).expand_as(t)

    def _sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(self._sigma_fn(t), dtype=_F64).expand_as(t)

    def _derivative(self, fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            value = fn(tt)
            if not value.requires_grad:  # constant expression
                return torch.zeros_like(t)
            (grad,) = torch.autograd.grad(value.sum(), tt)
        return grad.detach()

    def _d_alpha(self, t: Tensor) -> Tensor:
        return self._derivative(self._alpha, t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        return self._derivative(self._sigma, t)

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(64):  # bisection: the bracket halves to float64 resolution
            mid = 0.5 * (lo + hi)
            above = self._logsnr(mid) > lam  # logsnr decreases: the root lies to the right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)


FORMS: dict[str, type[Form]] = {
    "vp": VP,
    "vp-cosine": VPCosine,
    "subvp": SubVP,
    "ve": VE,
    "fm": FlowMatching,
    "discrete-vp": DiscreteVP,
    "custom": Custom,
}

# Re-exported here so users find every way to build a form in one module.
from ._form_io import from_config, from_diffusers, load, preset_table, presets  # noqa: E402
