"""Forms with alpha given directly: VE (alpha = 1) and flow matching (alpha = 1 - t).

VE            alpha = 1, geometric sigma (Song et al. 2021, eq. 31).
FlowMatching  alpha = 1 - t, sigma = t; SD3's shift (Esser et al. 2024, eq. 23) and
              Lipman et al. (2023)'s OT path with sigma_min.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Form

__all__ = ["VE", "FlowMatching"]


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
    ode_variable = "t"  # nearly straight in t; logsnr is infinite at t = 1

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
        if self.shift == 1.0:  # fast path, the same numbers
            return torch.full_like(t, -1.0)
        return -self._d_tau(t)

    def _d_sigma(self, t: Tensor) -> Tensor:
        if self.sigma_min == 0.0:  # fast path, the same numbers
            return self._d_tau(t)
        return (1.0 - self.sigma_min) * self._d_tau(t)

    def _t_from_logsnr(self, lam: Tensor) -> Tensor:
        # (1 - tau) / (sigma_min + (1 - sigma_min) tau) = r = exp(lam / 2), solved for tau.
        if self.sigma_min == 0.0:
            tau = torch.sigmoid(-0.5 * lam)
        else:
            r = torch.exp(0.5 * lam)
            tau = (1.0 - r * self.sigma_min) / (1.0 + r * (1.0 - self.sigma_min))
        return tau / (self.shift - (self.shift - 1.0) * tau)

    def _model_time(self, t: Tensor) -> Tensor:
        """``time_scale * tau``: the network sees the *shifted* time, as SD3 and diffusers'
        ``FlowMatchEulerDiscreteScheduler`` pass ``timestep = 1000 sigma``; a network trained at
        one shift can then be sampled at another."""
        if self.time_scale == 1.0:  # fast path, the same numbers
            return self._tau(t)
        return self._tau(t) * self.time_scale

    def affine_kernels(self, *names: str) -> tuple[Tensor, Tensor] | None:
        """On the straight path (shift 1, sigma_min 0): model time ``time_scale t``, alpha
        ``1 - t``, sigma ``t``, alpha' = -1 and sigma' = 1 (see :meth:`Form.affine_kernels`)."""
        if (self.shift, self.sigma_min) != (1.0, 0.0):
            return None
        lines = {"model_time": (0.0, self.time_scale), "alpha": (1.0, -1.0), "sigma": (0.0, 1.0),
                 "d_alpha": (-1.0, 0.0), "d_sigma": (1.0, 0.0)}  # fmt: skip
        if not set(names) <= set(lines):
            return None
        c, s = zip(*(lines[name] for name in names), strict=True)
        return (torch.tensor(c, dtype=torch.float64)[:, None],
                torch.tensor(s, dtype=torch.float64)[:, None])  # fmt: skip

    def t_from_model_time(self, model_t: Any) -> Tensor:
        def inverse(s: Tensor) -> Tensor:
            tau = s / self.time_scale
            return tau / (self.shift - (self.shift - 1.0) * tau)

        return self._apply(inverse, model_t)
