"""Variance-preserving forms: alpha_t^2 + sigma_t^2 = 1 (and sub-VP, which shares VP's alpha).

VP            score-SDE VPSDE, linear beta (Song et al. 2021, eq. 33; DPM-Solver's
              ``NoiseScheduleVP('linear')``).
VPCosine      cosine schedule (Nichol & Dhariwal 2021, eq. 17; DPM-Solver's 'cosine').
SubVP         score-SDE sub-VP: alpha as VP, sigma = 1 - alpha^2 (Song et al. 2021, eq. 34).
DiscreteVP    a DDPM-style table of alphas_cumprod made continuous by piecewise-linear
              interpolation of log(alpha) (Lu et al. 2022, DPM-Solver appendix D).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Form, as_time

__all__ = ["VarPreserving", "VP", "VPCosine", "SubVP", "DiscreteVP"]

_F64 = torch.float64


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

    def _model_time(self, t: Tensor) -> Tensor:
        return t * self.num_train_timesteps - 1.0

    def t_from_model_time(self, model_t: Any) -> Tensor:
        return self._apply(lambda s: (s + 1.0) / self.num_train_timesteps, model_t)
