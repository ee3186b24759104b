"""Loss weightings, and every training set-up seen as one weight over logsnr.

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
weighting; :func:`.equalization.equalize` builds the time sampler and weighting that give a
form any reference w(lambda), which is what "equal in logsnr" comparisons between forms need.

Time samplers: :mod:`.time_samplers`.
Weightings (multipliers on the prediction's MSE):
    none             1
    snr              exp(lambda)
    x0               c_x0^2 / c_pred^2: the x0-MSE for any prediction (one-step distillation)
    min_snr          x0-MSE weighted by min(SNR, gamma) (Hang et al. 2023, "Efficient Diffusion
                     Training via Min-SNR Weighting Strategy"), i.e. eps-MSE weighted by
                     min(1, gamma / SNR), written for any prediction as min(1, gamma/SNR) / c^2.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..forms import Form, as_time
from ..predictions import check_prediction
from .time_samplers import TimeSampler, check_params, dlogsnr_dt
from .time_samplers import time_sampler as build_time_sampler

__all__ = [
    "Weighting",
    "NoWeighting",
    "SNRWeighting",
    "MinSNRWeighting",
    "InverseFactorWeighting",
    "X0Weighting",
    "WEIGHTINGS",
    "loss_weighting",
    "prediction_factor",
    "implied_weighting",
    "common_logsnr_range",
    "effective_sample_size",
    "weighting_ess",
]


def prediction_factor(form: Form, prediction: str, t: Any) -> Tensor:
    """c(t)^2 with ``pred_hat - pred = c(t) (eps_hat - eps)`` at fixed x_t, float64.

    See the module docstring for c per prediction; it turns a prediction's MSE into eps-MSE.
    """
    check_prediction(prediction)
    t64 = as_time(t)
    if prediction == "eps":
        return torch.ones_like(t64)
    alpha, sigma = form.alpha(t64), form.sigma(t64)
    if prediction == "x0":
        c = sigma / alpha
    elif prediction == "v":
        c = (alpha**2 + sigma**2) / alpha
    else:  # flow
        c = form.d_sigma(t64) - sigma * form.d_alpha(t64) / alpha
    return c**2


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

    def network_weight(self, t: Any, weight: Tensor) -> Tensor:
        """The weight ``weight`` (this weighting's at ``t``) puts on the network's own output
        error: ``weight`` itself, unless the weighting knows the network's output scale
        (:class:`EqualizedWeighting` with ``output_scale``). Its ESS is what the trainer logs."""
        return weight

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
        return torch.exp(form.logsnr(as_time(t)))


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
        eps_weight = torch.clamp(self.gamma * torch.exp(-form.logsnr(t64)), max=1.0)
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


class X0Weighting(Weighting):
    """weight = c_x0(t)^2 / c_pred(t)^2: the loss is the x0-MSE, whatever the network predicts.

    An eps-prediction's error reaches x0 multiplied by sigma / alpha (150x at VP's t_max), so
    one-step distillation is trained on this weighting, where the x0 error is what counts.
    """

    name = "x0"

    def __call__(self, t: Any, *, form: Form, prediction: str) -> Tensor:
        t64 = as_time(t)
        return prediction_factor(form, "x0", t64) / prediction_factor(form, prediction, t64)


WEIGHTINGS: dict[str, type[Weighting]] = {
    "none": NoWeighting,
    "snr": SNRWeighting,
    "min_snr": MinSNRWeighting,
    "inverse_factor": InverseFactorWeighting,
    "x0": X0Weighting,
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
    check_params(cls, params, "weighting")
    return cls(**params)


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
    sampler = build_time_sampler(time_sampler, form)
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


def effective_sample_size(weights: Tensor) -> Tensor:
    """Kish's effective sample size as a fraction of the batch, ``(sum w)^2 / (n sum w^2)``.

    1 when every sample carries the same weight, ``1/n`` when one carries all of it; the
    batch then trains like ``ESS * n`` samples of equal weight.
    """
    weights = weights.detach().flatten()
    return weights.sum() ** 2 / (len(weights) * weights.square().sum())


def weighting_ess(
    form: Form,
    prediction: str,
    time_sampler: str | TimeSampler,
    weighting: str | Weighting,
    n: int = 65536,
    generator: torch.Generator | None = None,
) -> float:
    """The :func:`effective_sample_size` of a training set-up's loss weights over ``n`` times
    drawn from its sampler: what a batch of that size keeps of its samples, with no training.

    1 for an unweighted loss; :func:`equalize`'s importance sampling keeps it near 1 for any
    form, prediction and reference. The weights are those on the network's own output
    (:meth:`Weighting.network_weight`: with an ``output_scale``, times c_out^2).
    """
    check_prediction(prediction)
    weight_fn = loss_weighting(weighting)
    if weight_fn.identity:
        return 1.0
    sampler = build_time_sampler(time_sampler, form)
    t = sampler.sample(n, generator if generator is not None else torch.Generator().manual_seed(0))
    weight = weight_fn(t, form=form, prediction=prediction)
    return float(effective_sample_size(weight_fn.network_weight(t, weight)))
