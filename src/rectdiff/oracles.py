"""Closed-form models: test beds whose predictions and ODE solutions are known exactly.

Both are ``nn.Module`` s called like any rectdiff model, ``model(x_t, model_time)``, and
answer in the prediction type they are built with.

``GaussianOracle``: data ~ N(mean, std^2 I). The posterior mean is
    E[x0 | x_t] = mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean)
and the probability-flow ODE keeps ``z = (x_t - alpha_t mean) / s_t`` constant, with
``s_t = sqrt(alpha_t^2 std^2 + sigma_t^2)`` (the marginal std), so its exact solution is
    x_{t'} = alpha_{t'} mean + (s_{t'} / s_t) (x_t - alpha_t mean).
Its x0-prediction moves along a trajectory: it is *not* first-order.

``PhasedOracle``: the ideal phased student of a ``GaussianOracle`` teacher on window edges
t_0 > ... > t_K. In window (t_e, t_s] the teacher's exact flow map is affine,
``x_e = r x_s + c`` (r = s_e / s_s, c = mean (alpha_e - r alpha_s)); the line through
``(x_s, x_e)`` passes through ``x_t = (A + B r) x_s + B c`` with
``A = (alpha_t sigma_e - sigma_t alpha_e) / D``, ``B = (sigma_t alpha_s - alpha_t sigma_s) / D``,
``D = alpha_s sigma_e - alpha_e sigma_s``, so x_s, and with it the line's (x0*, eps*), is
recovered exactly from x_t: first-order inside every window, and one DDIM step per window
reproduces the teacher's window solve.

``CouplingOracle``: the deterministic coupling x0 = shift + scale * eps (elementwise). From
x_t = alpha x0 + sigma eps = (alpha scale + sigma) eps + alpha shift, eps and hence x0 are
recovered exactly, and both stay constant along every trajectory: the ideal rectified model
(Rectified Diffusion, Theorem 1), first-order in every form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .forms import Form, as_time, broadcast
from .predictions import check_prediction, from_x0_eps

__all__ = ["GaussianOracle", "PhasedOracle", "CouplingOracle"]


class _Oracle(nn.Module):
    def __init__(self, form: Form, prediction: str) -> None:
        super().__init__()
        self.form = form
        self.prediction = check_prediction(prediction)
        self.nfe = 0

    def _coefficients(self, x_t: Tensor, model_time: Any) -> tuple[Tensor, Tensor, Tensor]:
        t = self.form.t_from_model_time(as_time(model_time)).to(x_t.device)
        alpha = broadcast(self.form.alpha(t), x_t)
        sigma = broadcast(self.form.sigma(t), x_t)
        return t, alpha, sigma

    def x0_eps(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x_t: Tensor, model_time: Any, **cond: Any) -> Tensor:
        self.nfe += 1
        t, alpha, sigma = self._coefficients(x_t, model_time)
        x0, eps = self.x0_eps(x_t, alpha, sigma)
        return from_x0_eps(x0, eps, self.prediction, t, self.form)


class GaussianOracle(_Oracle):
    """The exact denoiser of Gaussian data N(mean, std^2 I), in any form and prediction."""

    def __init__(self, form: Form, prediction: str, mean: float | Tensor = 0.0, std: float = 1.0):
        super().__init__(form, prediction)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64))
        self.std = float(std)

    def x0_eps(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.mean.to(x_t.dtype)
        var = self.std**2
        x0 = mean + alpha * var / (alpha**2 * var + sigma**2) * (x_t - alpha * mean)
        return x0, (x_t - alpha * x0) / sigma

    def marginal_std(self, t: Any) -> Tensor:
        """s_t = sqrt(alpha_t^2 std^2 + sigma_t^2), float64."""
        t64 = as_time(t)
        return torch.sqrt(self.form.alpha(t64) ** 2 * self.std**2 + self.form.sigma(t64) ** 2)

    def solve(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """Exact probability-flow ODE solution from ``(x, t_from)`` to time ``t_to``."""
        mean = self.mean.to(torch.float64)
        x64 = x.to(torch.float64)
        ratio = self.marginal_std(t_to) / self.marginal_std(t_from)
        alpha_from, alpha_to = self.form.alpha(float(t_from)), self.form.alpha(float(t_to))
        return (alpha_to * mean + ratio * (x64 - alpha_from * mean)).to(x.dtype)


class PhasedOracle(_Oracle):
    """The exact phased student of a :class:`GaussianOracle` teacher on window ``edges``."""

    def __init__(self, teacher: GaussianOracle, edges: Tensor, prediction: str | None = None):
        super().__init__(teacher.form, prediction or teacher.prediction)
        self.teacher = teacher
        self.register_buffer("edges", torch.as_tensor(edges, dtype=torch.float64))

    def forward(self, x_t: Tensor, model_time: Any, **cond: Any) -> Tensor:
        self.nfe += 1
        form, mean = self.form, self.teacher.mean.to(torch.float64)
        t = form.t_from_model_time(as_time(model_time)).to(x_t.device).expand(x_t.shape[0])
        # window k holds t in (edges[k+1], edges[k]]: k = #(edges >= t) - 1, t up to float32 rounding
        above = torch.searchsorted(-self.edges, -(t - 1e-6), right=True)
        k = (above - 1).clamp(0, len(self.edges) - 2)
        t_s, t_e = self.edges[k], self.edges[k + 1]
        a_t, s_t, a_s, s_s, a_e, s_e = (
            broadcast(c, x_t).to(torch.float64)
            for c in (form.alpha(t), form.sigma(t), form.alpha(t_s), form.sigma(t_s),
                      form.alpha(t_e), form.sigma(t_e))
        )  # fmt: skip
        r = broadcast(self.teacher.marginal_std(t_e) / self.teacher.marginal_std(t_s), x_t)
        c = mean * (a_e - r * a_s)
        det = a_s * s_e - a_e * s_s
        a_coef, b_coef = (a_t * s_e - s_t * a_e) / det, (s_t * a_s - a_t * s_s) / det
        x_s = (x_t.to(torch.float64) - b_coef * c) / (a_coef + b_coef * r)
        x_e = r * x_s + c
        x0 = (s_e * x_s - s_s * x_e) / det
        eps = (a_s * x_e - a_e * x_s) / det
        return from_x0_eps(x0, eps, self.prediction, t, form).to(x_t.dtype)


class CouplingOracle(_Oracle):
    """The first-order model of the coupling x0 = shift + scale * eps (elementwise)."""

    def __init__(self, form: Form, prediction: str, scale: Tensor, shift: Tensor):
        super().__init__(form, prediction)
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float64))
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float64))

    def x0_eps(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        scale, shift = self.scale.to(x_t.dtype), self.shift.to(x_t.dtype)
        eps = (x_t - alpha * shift) / (alpha * scale + sigma)
        return shift + scale * eps, eps

    def coupled_x0(self, eps: Tensor) -> Tensor:
        """The sample this coupling pairs with the standard-normal ``eps``."""
        return self.shift.to(eps.dtype) + self.scale.to(eps.dtype) * eps
