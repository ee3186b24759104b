"""Closed-form models: test beds whose predictions and ODE solutions are known exactly.

Both are ``nn.Module`` s called like any rectdiff model, ``model(x_t, model_time)``, and
answer in the prediction type they are built with.

``GaussianOracle``: data ~ N(mean, std^2 I). The posterior mean is
    E[x0 | x_t] = mean + alpha std^2 / (alpha^2 std^2 + sigma^2) (x_t - alpha mean)
and the probability-flow ODE keeps ``z = (x_t - alpha_t mean) / s_t`` constant, with
``s_t = sqrt(alpha_t^2 std^2 + sigma_t^2)`` (the marginal std), so its exact solution is
    x_{t'} = alpha_{t'} mean + (s_{t'} / s_t) (x_t - alpha_t mean).
Its x0-prediction moves along a trajectory: it is *not* first-order.

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

__all__ = ["GaussianOracle", "CouplingOracle"]


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
