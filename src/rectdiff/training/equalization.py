"""``equalize``: the time sampler and weighting that give any form and prediction a chosen
weighting over logsnr, by importance sampling in logsnr (Kingma & Gao 2023, "Understanding
diffusion objectives as the ELBO with simple data augmentation": every objective is a
weighting over logsnr of the eps-MSE).

:class:`Equalized` draws logsnr from a proposal ``q`` and maps it to t;
:class:`EqualizedWeighting` puts the importance weight ``w_ref / (c_pred^2 q)`` on each
sample; :func:`equalize` builds the pair. With the network's output scale the proposal makes
the weight on the network's *own* error constant (``output_scale``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..forms import Form, as_time
from ..predictions import check_prediction
from .time_samplers import TimeSampler, dlogsnr_dt
from .weightings import Weighting, prediction_factor

__all__ = ["Equalized", "EqualizedWeighting", "equalize"]

_F64 = torch.float64
#: what an equalized sampler's uniform draw is the quantile of
QUANTILES = ("logsnr", "t")


class Equalized(TimeSampler):
    """Samples logsnr for a reference weight w_ref(lambda) on [lo, hi] by importance, mapped to t.

    What the loss must integrate is ``int w_ref(lambda) E||eps_hat - eps||^2 dlambda``; the
    network's own error is ``c_pred^2`` times the eps error (``weightings.prediction_factor``).
    logsnr is drawn from the proposal ``q(lambda) ∝ w_ref(lambda) / c_pred(lambda)^2`` (the
    piecewise-linear interpolant of that ratio on ``grid_size`` nodes, its piecewise-quadratic
    CDF inverted exactly), so the weight left on each sample,
    ``w_ref / (c_pred^2 q)`` (:meth:`importance_weight`), is constant up to the
    interpolation error and every sample of a batch counts (effective sample size ~1, see
    ``weightings.effective_sample_size``). Sampling from ``w_ref`` itself and dividing by
    ``c_pred^2`` afterwards, as before, left 0.3-2.5 % of a batch carrying the weight when
    VP / sub-VP / VE with v-prediction were equalized to flow matching's objective.
    ``prediction = "eps"`` (``c = 1``) samples ``w_ref`` itself. Built by :func:`equalize`.

    With ``output_scale`` (the network's c_out(t), e.g. ``Preconditioned.c_out``) the error
    the network itself makes is ``c_pred / c_out`` times the eps error, and the proposal is
    ``q ∝ w_ref c_out^2 / c_pred^2``: every sample then carries the same weight on the
    network's own output (the loss's weight ``w_ref / (c_pred^2 q)`` is ``1 / c_out^2`` up to
    a constant). Without it a VE network with c_out ~ sigma gets per-sample gradient weights
    spread over sigma_max^2.

    ``quantile`` says what the uniform number ``u`` of each draw is the quantile of:
    ``"logsnr"`` (the default, rectdiff's draw since 0.1: logsnr at quantile u, so t runs
    against u) or ``"t"`` (t at quantile u, as every other sampler draws, :meth:`icdf`).
    With ``"t"``, samplers fed the same random numbers draw their times in the same order:
    common random numbers, so that a comparison against flow matching's uniform t is not
    also a comparison of two noise streams (an equalized flow-matching sampler whose
    proposal is uniform in t then draws uniform's times to the interpolation error).
    """

    name = "equalized"

    def __init__(
        self,
        form: Form,
        reference_weight: Callable[[Tensor], Tensor],
        lo: float,
        hi: float,
        grid_size: int = 4097,
        prediction: str = "eps",
        output_scale: Callable[[Tensor], Tensor] | None = None,
        quantile: str = "logsnr",
    ) -> None:
        super().__init__(form)
        if quantile not in QUANTILES:
            raise ValueError(
                f"unknown quantile {quantile!r}; allowed: {', '.join(QUANTILES)} (what each "
                "uniform draw is the quantile of)."
            )
        self.lo, self.hi, self.prediction = float(lo), float(hi), prediction
        self.quantile = quantile
        self.output_scale = output_scale
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
        self.total = float(self._integral(weights)[-1])
        t_nodes = self._t(self.logsnr_nodes)
        self.proposal = weights / prediction_factor(form, prediction, t_nodes)
        if output_scale is not None:
            self.proposal = self.proposal * self.network_factor(t_nodes)
        self._cum = self._integral(self.proposal)
        self.proposal_total = float(self._cum[-1])

    def network_factor(self, t: Tensor) -> Tensor:
        """``c_out(t)^2`` of ``output_scale`` (float64; 1 without it): the loss's error over
        the network's own."""
        t64 = as_time(t)
        if self.output_scale is None:
            return torch.ones_like(t64)
        return torch.as_tensor(self.output_scale(t64), dtype=_F64, device=t64.device) ** 2

    def _integral(self, nodes: Tensor) -> Tensor:
        """Cumulative trapezoid integral of a piecewise-linear function on the nodes."""
        cell_mass = 0.5 * (nodes[1:] + nodes[:-1]) * self._h
        return torch.cat([torch.zeros(1, dtype=_F64), torch.cumsum(cell_mass, 0)])

    def _t(self, lam: Tensor) -> Tensor:
        return self.form.t_from_logsnr(lam).clamp(self.form.t_min, self.form.t_max)

    def _cell(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(k, frac, inside)``: the grid cell of each ``lam``, the position in it, and
        whether ``lam`` is in [lo, hi]."""
        pos = ((lam - self.lo) / self._h).clamp(0, len(self.weights) - 1)
        k = pos.floor().long().clamp(max=len(self.weights) - 2)
        inside = (lam >= self.lo - 1e-12) & (lam <= self.hi + 1e-12)
        return k, pos - k, inside

    @staticmethod
    def _interpolate(nodes: Tensor, cell: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        k, frac, inside = cell
        nodes = nodes.to(frac.device)
        value = nodes[k] + frac * (nodes[k + 1] - nodes[k])
        return torch.where(inside, value, torch.zeros_like(value))

    def interpolate(self, lam: Tensor) -> Tensor:
        """The piecewise-linear reference weight at ``lam`` (zero outside [lo, hi])."""
        return self._interpolate(self.weights, self._cell(lam))

    def proposal_density(self, lam: Tensor) -> Tensor:
        """The density ``q(lambda)`` logsnr is drawn from (normalised on [lo, hi])."""
        return self._interpolate(self.proposal, self._cell(lam)) / self.proposal_total

    def importance_weight(self, t: Any, prediction: str | None = None) -> Tensor:
        """The loss weight ``w_ref(lambda) / (c_pred(t)^2 q(lambda))`` at ``t``, float64.

        With it the implied weighting (``weightings.implied_weighting``) is the reference's
        interpolant exactly, for any ``prediction`` (the sampler's by default); for the
        sampler's own prediction it is ``proposal_total`` up to the interpolation error.
        """
        t64 = as_time(t)
        cell = self._cell(self.form.logsnr(t64))  # shared by both interpolations
        q = self._interpolate(self.proposal, cell) / self.proposal_total
        c2 = prediction_factor(self.form, prediction or self.prediction, t64)
        ratio = self._interpolate(self.weights, cell) / (c2 * q).clamp(min=1e-300)
        return torch.where(q > 0, ratio, torch.zeros_like(ratio))

    def sample(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``batch`` times, float64: logsnr at quantile u (``quantile="logsnr"``) or t at
        quantile u (``"t"``) of float64 uniform draws ``u``."""
        u = torch.rand(batch, generator=generator, device=device, dtype=_F64)
        return self._t(self.logsnr_at(u)) if self.quantile == "logsnr" else self.icdf(u)

    def icdf(self, u: Tensor) -> Tensor:
        """The time at quantile ``u`` of the truncated distribution in t: logsnr at quantile
        ``1 - u`` (logsnr falls as t grows), mapped to t."""
        return self._t(self.logsnr_at(1 - u))

    def logsnr_at(self, u: Tensor) -> Tensor:
        """The logsnr at quantile ``u`` of the proposal ``q`` (its piecewise-quadratic CDF
        inverted exactly)."""
        cum, nodes = self._cum.to(u.device), self.proposal.to(u.device)
        mass = u * self.proposal_total
        k = (torch.searchsorted(cum, mass.contiguous()) - 1).clamp(0, len(nodes) - 2)
        rest = (mass - cum[k]) / self._h  # = q_k x + (q_{k+1} - q_k) x^2 / 2, solve for x
        q0, slope = nodes[k], nodes[k + 1] - nodes[k]
        root = torch.sqrt((q0**2 + 2 * slope * rest).clamp(min=0))
        frac = torch.where(root + q0 > 0, 2 * rest / (q0 + root).clamp(min=1e-300), 0.5)
        return self.lo + (k + frac.clamp(0, 1)) * self._h

    def density(self, t: Any) -> Tensor:
        t64 = as_time(t)
        lam = self.form.logsnr(t64)
        return self.proposal_density(lam) * dlogsnr_dt(self.form, t64).abs()

    def params(self) -> dict[str, Any]:
        return {
            "lo": self.lo, "hi": self.hi, "grid_size": len(self.weights),
            "prediction": self.prediction, "quantile": self.quantile,
        }  # fmt: skip


class EqualizedWeighting(Weighting):
    """weight = ``w_ref / (c_pred^2 q)``: the importance weight of an :class:`Equalized` sampler
    (:meth:`Equalized.importance_weight`), nearly constant for the prediction it was built for.

    Built by :func:`equalize` with its sampler; not in :data:`WEIGHTINGS` (it needs one).
    """

    name = "equalized"

    def __init__(self, sampler: Equalized) -> None:
        self.sampler = sampler

    def params(self) -> dict[str, Any]:
        return {"sampler": self.sampler}

    def __call__(self, t: Any, *, form: Form, prediction: str) -> Tensor:
        if form is not self.sampler.form and form != self.sampler.form:
            raise ValueError(
                f"this equalized weighting was built for {self.sampler.form!r}, not {form!r}; "
                "build it with equalize() for that form."
            )
        return self.sampler.importance_weight(t, prediction)

    def network_weight(self, t: Any, weight: Tensor) -> Tensor:
        """``weight c_out(t)^2``: constant (up to interpolation) for the built prediction."""
        return weight * self.sampler.network_factor(t).to(weight)


def equalize(
    form: Form,
    prediction: str,
    reference_weight: Callable[[Tensor], Tensor],
    *,
    logsnr_range: tuple[float, float] | None = None,
    grid_size: int = 4097,
    output_scale: Callable[[Tensor], Tensor] | None = None,
    quantile: str = "logsnr",
) -> tuple[Equalized, EqualizedWeighting]:
    """The time sampler and weighting that give ``form``/``prediction`` a reference w(lambda).

    Importance sampling in logsnr: lambda is drawn with density ``q ∝ w_ref / c_pred^2``
    (restricted to ``logsnr_range``, piecewise linear on ``grid_size`` nodes) and mapped to
    t, and each sample is weighted by ``w_ref / (c_pred^2 q)`` (:class:`EqualizedWeighting`),
    which is nearly the constant ``int w_ref / c_pred^2 dlambda``: the whole batch carries
    weight (:func:`weighting_ess` ~1). The implied weighting is the reference weight itself
    (its interpolant) on that range, in absolute scale, so losses stay comparable at equal
    learning rates. To compare forms, pass every form the same reference and
    ``logsnr_range=common_logsnr_range(*forms)``.

    Args:
        form: the form to train.
        prediction: its prediction type.
        reference_weight: w_ref(lambda) >= 0 on float64 logsnr tensors, e.g.
            ``lambda lam: implied_weighting(ref_form, "flow", "uniform", "none", lam)``.
        logsnr_range: ``(lo, hi)`` inside the form's range; the form's range by default.
        grid_size: interpolation nodes in logsnr.
        output_scale: the network's output scale c_out(t) on float64 t (e.g. the
            ``c_out`` of its :class:`rectdiff.models.Preconditioned`): importance sampling
            then makes the weight on the network's *own* output error constant, ``q ∝ w_ref
            c_out^2 / c_pred^2`` (:class:`Equalized`); the implied weighting is the same.
            With ``Preconditioned(scaling="fm", time_input="fm")`` in every form, every form
            then draws the same logsnr and puts the same weight on the same network error:
            the training is the same, whatever the form. The scale also sets *where* times
            are drawn: with ``scaling="velocity"`` the network predicts flow matching's
            velocity and draws flow matching's own (uniform) t, which one-step sampling
            favours; the fm scaling's density peaks at t = 1/2 (8 Gaussians, ten seeds:
            1.09x flow matching's energy distance after reflow, against 0.98x;
            ``experiments/bench/peers.py``).
        quantile: ``"logsnr"`` or ``"t"``: what each uniform draw is the quantile of
            (:class:`Equalized`); ``"t"`` gives common random numbers with the other samplers.

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
    sampler = Equalized(form, reference_weight, lo, hi, grid_size, prediction=prediction,
                        output_scale=output_scale, quantile=quantile)  # fmt: skip
    return sampler, EqualizedWeighting(sampler)
