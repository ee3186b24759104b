"""The diffusion loss, one function for every form and prediction.

    x_t = alpha_t x0 + sigma_t eps,   out = model(x_t, form.model_time(t), **cond),
    loss_i = weight(t_i) * d(out_i, target_i),   target = predictions.target(x0, eps, t)

with ``eps`` drawn independently of ``x0`` or, with ``coupling="ot"``, re-paired with the batch
by minibatch optimal transport (:mod:`~rectdiff.training.minibatch_ot`),

with ``d`` the mean squared error over the non-batch dimensions, or the pseudo-Huber
distance ``sqrt(||out - target||^2 + c^2) - c`` of Song & Dhariwal 2023 ("Improved
Techniques for Training Consistency Models", sec. 3.3), whose default
``c = 0.00054 sqrt(dim)`` is theirs for data in [-1, 1]. ``eps`` and ``t`` may be given:
rectification trains on fixed (eps, x0) pairs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..forms import FlowMatching, Form, as_time
from ..predictions import check_prediction, check_time_range
from .minibatch_ot import check_coupling, ot_coupled_noise
from .time_samplers import TimeSampler, time_sampler
from .weightings import Weighting, effective_sample_size, loss_weighting

__all__ = [
    "LOSSES",
    "DiffusionLoss",
    "default_huber_c",
    "diffusion_loss",
    "distance",
    "drop_conditioning",
    "reduce_loss",
    "sampler_for",
    "take_rows",
    "with_cond_dropout",
]

#: distances between the network output and its target
LOSSES = ("mse", "pseudo_huber")


def default_huber_c(x0: Tensor) -> float:
    """Song & Dhariwal 2023's pseudo-Huber constant ``c = 0.00054 sqrt(dim)``, dim per sample."""
    return 0.00054 * math.sqrt(x0[0].numel())


class DiffusionLoss:
    """:func:`diffusion_loss` with its form, prediction, time sampler, weighting and distance
    resolved once, at construction: the training step then runs no name look-ups or
    parameter checks, only tensor arithmetic.

    Per step it draws ``eps`` (re-paired with ``x0`` by minibatch OT when ``coupling="ot"``)
    and ``t`` (float64, from the sampler), evaluates the
    coefficients it needs in float64 (``alpha``, ``sigma``, the model time and, for a v or
    flow target, that target's two coefficients), casts them to the data's dtype in one
    call and forms ``x_t = alpha x0 + sigma eps`` and the target
    (:func:`~rectdiff.predictions.target`'s formulas, so the numbers are the same).

    Args:
        form, prediction, time_sampler, weighting, loss, huber_c, coupling: as
            :func:`diffusion_loss`.

    Raises:
        ValueError: for an unknown prediction, loss, time sampler, weighting or coupling.
    """

    def __init__(
        self,
        form: Form,
        prediction: str,
        *,
        time_sampler: str | TimeSampler = "uniform",
        weighting: str | Weighting = "none",
        loss: str = "mse",
        huber_c: float | None = None,
        coupling: str = "independent",
    ) -> None:
        self.form = form
        self.prediction = check_prediction(prediction)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}.")
        self.loss, self.huber_c = loss, huber_c
        self.coupling = check_coupling(coupling)
        self._ot = coupling == "ot"
        self.time_sampler = sampler_for(time_sampler, form)
        self.weighting = loss_weighting(weighting)
        #: an unweighted MSE, whose mean alone (``per_sample=False``) is one global mean
        self._plain_mean = loss == "mse" and self.weighting.identity
        names = ("model_time", "alpha", "sigma")
        flow = self.prediction == "flow"
        # flow matching's straight path (shift 1, sigma_min 0) has alpha' = -1, sigma' = 1:
        # its flow target alpha' x0 + sigma' eps is eps - x0 to the bit, with no rows for them
        self._unit_flow = (
            flow and isinstance(form, FlowMatching) and (form.shift, form.sigma_min) == (1.0, 0.0)
        )
        derivatives = ("d_alpha", "d_sigma") if flow and not self._unit_flow else ()
        self._kernels = form.kernels(*names, *derivatives)
        #: ``(c, s)`` when every kernel is ``c + s t`` exactly: one addcmul for the table
        self._affine = form.affine_kernels(*names, *derivatives)
        #: set ``track_ess`` to keep the effective sample size of each batch's loss weights
        #: (``weightings.effective_sample_size``) in ``last_ess`` (a 0-d tensor; stays None
        #: for an unweighted loss, whose ESS is 1)
        self.track_ess = False
        self.last_ess: Tensor | None = None

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, ...]:
        """``(model_time, alpha, sigma[, a, b])`` at float64 ``t`` in ``like``'s dtype: the model
        time of shape ``(B,)``, the rest shaped to broadcast over ``like``; ``a, b`` are the
        target's coefficients (``alpha, sigma`` for v, ``alpha', sigma'`` for flow, except on
        flow matching's straight path, whose target is ``eps - x0``).

        The form's float64 kernels (resolved at construction) are stacked and cast in one
        call: the numbers of ``form.alpha(t).to(dtype)`` etc., in a few tensor operations; on
        flow matching's straight path, where each is ``c + s t`` (``Form.affine_kernels``), in
        one ``addcmul``."""
        if self._affine is None:
            table = torch.stack([kernel(t) for kernel in self._kernels])
        else:
            c, s = self._affine
            if c.device != t.device:
                self._affine = c, s = c.to(t.device), s.to(t.device)
            table = torch.addcmul(c, s, t)
        batch = like.shape[0]  # not len(): Tensor.__len__ is Python
        rows = table.to(like.dtype).view(table.shape[0], batch, *(1,) * (like.ndim - 1)).unbind(0)
        if self.prediction == "v":  # v = alpha eps - sigma x0
            return rows[0].view(batch), rows[1], rows[2], rows[1], rows[2]
        return rows[0].view(batch), *rows[1:]

    def __call__(
        self,
        model: Any,
        x0: Tensor,
        *,
        eps: Tensor | None = None,
        t: Any = None,
        cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        rows: slice | None = None,
        per_sample: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """``(mean_loss, per_sample_loss)`` of ``model`` on the batch ``x0`` (see
        :func:`diffusion_loss`).

        ``per_sample=False`` (a training step, which needs only the mean): an unweighted MSE
        is then one mean over all elements, ``((out - target)^2).mean()``, as hand-written
        loops compute it, and the second value is None. Its gradient, ``1 / (B D)`` per
        element against the per-sample path's ``(1 / B) / D``, is the same to the bit when
        the batch B or the features D are a power of two (tested); otherwise the two may
        differ in the last bit. Weighted or pseudo-Huber losses keep the per-sample path."""
        form, batch = self.form, x0.shape[0]
        if eps is None:  # randn_like: torch.randn's numbers, dispatched faster
            eps = torch.randn_like(x0) if generator is None else torch.randn(
                x0.shape, generator=generator, device=x0.device, dtype=x0.dtype
            )  # fmt: skip
            if self._ot:
                eps = ot_coupled_noise(x0, eps)
        elif eps.shape != x0.shape:
            raise ValueError(
                f"x0 and eps must have the same shape, got {tuple(x0.shape)} and "
                f"{tuple(eps.shape)}."
            )
        if t is None:
            t = self.time_sampler.sample(batch, generator, x0.device)
        else:
            t = as_time(t).to(x0.device)
            check_time_range(t, form)
            if t.ndim == 0:
                t = t.expand(batch)
            elif t.shape != (batch,):
                raise ValueError(
                    f"t must be a scalar or have shape (B,) = ({batch},) to match a batch of "
                    f"shape {tuple(x0.shape)}; got shape {tuple(t.shape)}."
                )
        if rows is not None:  # this process's rows of the whole batch's draws
            x0, eps, t, cond = take_rows((x0, eps, t, cond), rows, batch)
        model_time, alpha, sigma, *ab = self.coefficients(t, x0)
        x_t = alpha * x0 + sigma * eps
        out = model(x_t, model_time, **(cond or {}))
        if self.prediction == "eps":
            diff = out - eps
        elif self.prediction == "x0":
            diff = out - x0
        elif self.prediction == "v":  # v = alpha eps - sigma x0
            diff = out - (ab[0] * eps - ab[1] * x0)
        elif self._unit_flow:  # u = -x0 + eps
            diff = out - (eps - x0)
        else:  # flow u = alpha' x0 + sigma' eps
            diff = out - (ab[0] * x0 + ab[1] * eps)
        if not per_sample and self._plain_mean:
            return diff.square().mean(), None
        losses = distance(diff, self.loss, self.huber_c)  # one per sample
        if not self.weighting.identity:
            weight = self.weighting(t, form=form, prediction=self.prediction)
            losses = losses * weight.to(losses)
            if self.track_ess:
                self.last_ess = effective_sample_size(self.weighting.network_weight(t, weight))
        return losses.mean(), losses

    def __repr__(self) -> str:
        return (
            f"DiffusionLoss({self.form!r}, {self.prediction!r}, time_sampler="
            f"{self.time_sampler!r}, weighting={self.weighting!r}, loss={self.loss!r}, "
            f"coupling={self.coupling!r})"
        )


def diffusion_loss(
    model: Any,
    x0: Tensor,
    *,
    form: Form,
    prediction: str,
    time_sampler: str | TimeSampler = "uniform",
    weighting: str | Weighting = "none",
    loss: str = "mse",
    huber_c: float | None = None,
    coupling: str = "independent",
    eps: Tensor | None = None,
    t: Any = None,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    rows: slice | None = None,
) -> tuple[Tensor, Tensor]:
    """The diffusion loss of ``model`` on the batch ``x0``.

    A hot loop builds a :class:`DiffusionLoss` once instead (or passes sampler and
    weighting objects, never names, as :class:`~rectdiff.training.trainer.Trainer` does).

    Args:
        model: called as ``model(x_t, form.model_time(t), **cond)``.
        x0: clean data, shape ``(B, ...)``.
        form: the diffusion form.
        prediction: what the model predicts: ``"eps"``, ``"x0"``, ``"v"`` or ``"flow"``.
        time_sampler: name or sampler for t when ``t`` is not given.
        weighting: name or :class:`~rectdiff.training.weightings.Weighting` multiplying each sample.
        loss: ``"mse"`` or ``"pseudo_huber"``.
        huber_c: the pseudo-Huber constant; ``0.00054 sqrt(dim)`` by default.
        coupling: how drawn noise is paired with ``x0``: ``"independent"`` (as drawn) or
            ``"ot"``, re-paired within the batch by the exact optimal assignment under the
            squared Euclidean cost, ``eps_i <- eps_pi*(i)`` with ``pi*`` minimising
            ``sum_i ||x0_i - eps_pi(i)||^2`` (minibatch OT: Tong et al. 2023's OT-CFM,
            Pooladian et al. 2023), before ``x_t`` and the target are formed, in any form
            and prediction; ``x0``, ``cond`` and ``t`` keep their rows. A given ``eps`` is a
            fixed coupling and is never re-paired. See :mod:`~rectdiff.training.minibatch_ot`.
        eps: the standard-normal noise (drawn when None), same shape as ``x0``.
        t: times, scalar or ``(B,)`` inside ``[form.t_min, form.t_max]`` (sampled when None).
        cond: extra keyword arguments for the model (e.g. ``class_labels``).
        generator: random generator for eps and t.
        rows: the rows of the batch to compute (multi-process training: every process
            draws eps, t and the coupling for the whole batch ``x0`` alike, then computes
            only its own rows, so the mean gradient over processes is the one-process
            gradient of the whole batch); None for all.

    Returns:
        ``(mean_loss, per_sample_loss)`` over the computed rows; the second has shape
        ``(B,)`` (``(len(rows),)`` with ``rows``).

    Raises:
        ValueError: for an unknown prediction, loss or coupling, or given t outside the safe
            range.
    """
    objective = DiffusionLoss(
        form, prediction, time_sampler=time_sampler, weighting=weighting, loss=loss,
        huber_c=huber_c, coupling=coupling,
    )  # fmt: skip
    return objective(model, x0, eps=eps, t=t, cond=cond, generator=generator, rows=rows)


def take_rows(value: Any, rows: slice, batch: int) -> Any:
    """``value[rows]`` for a batch tensor (first dimension ``batch``), recursively through
    tuples, lists and dicts; anything else (a scalar, a shared tensor, None) as it is."""
    if isinstance(value, Tensor):
        return value[rows] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: take_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(item, rows, batch) for item in value)
    return value


def reduce_loss(
    diff: Tensor,
    t: Tensor,
    *,
    form: Form,
    prediction: str,
    loss: str = "mse",
    huber_c: float | None = None,
    weighting: str | Weighting = "none",
) -> tuple[Tensor, Tensor]:
    """``(mean, per_sample)`` loss of a ``(B, ...)`` prediction error: the MSE over the
    dimensions, or the pseudo-Huber ``sqrt(||diff||^2 + c^2) - c`` (Song & Dhariwal 2023),
    times the weighting at ``t``."""
    per_sample = distance(diff, loss, huber_c)
    weight_fn = weighting if isinstance(weighting, Weighting) else loss_weighting(weighting)
    if not weight_fn.identity:
        per_sample = per_sample * weight_fn(t, form=form, prediction=prediction).to(per_sample)
    return per_sample.mean(), per_sample


def distance(diff: Tensor, loss: str = "mse", huber_c: float | None = None) -> Tensor:
    """The per-sample distance of a ``(B, ...)`` prediction error: the MSE over the dimensions,
    or the pseudo-Huber ``sqrt(||diff||^2 + c^2) - c`` (Song & Dhariwal 2023)."""
    if diff.ndim != 2:  # (B, D) needs no flatten (and no view node in the backward)
        diff = diff.flatten(1)
    if loss == "mse":
        return diff.square().mean(1)
    c = default_huber_c(diff) if huber_c is None else float(huber_c)
    return torch.sqrt(diff.square().sum(1) + c * c) - c


def sampler_for(name_or_obj: str | TimeSampler, form: Form) -> TimeSampler:
    """``name_or_obj`` as a sampler for ``form`` (a sampler object is used as it is)."""
    if isinstance(name_or_obj, TimeSampler):
        return name_or_obj
    return time_sampler(name_or_obj, form)


def drop_conditioning(
    cond: dict[str, Tensor], uncond: dict[str, Tensor], drop: Tensor
) -> dict[str, Tensor]:
    """``cond`` with the rows where ``drop`` is True replaced by ``uncond`` (a batch of one,
    broadcast): the conditioning dropout of classifier-free guidance (Ho & Salimans 2022)."""
    missing = sorted(set(cond) ^ set(uncond))
    if missing:
        raise ValueError(
            f"the unconditional conditioning must have the same keys as the conditioning; "
            f"keys in only one of them: {', '.join(missing)}."
        )
    out = {}
    for key, value in cond.items():
        empty = uncond[key].to(value.device, value.dtype).expand_as(value)
        mask = drop.to(value.device).reshape(-1, *([1] * (value.dim() - 1)))
        out[key] = torch.where(mask, empty, value)
    return out


def with_cond_dropout(loss_fn: Any, p: float, uncond: dict[str, Tensor]) -> Any:
    """``loss_fn`` (e.g. :func:`diffusion_loss`) training on batches whose conditioning is
    dropped to ``uncond`` for each sample with probability ``p``.

    The drop mask is drawn first, for the whole batch, from the loss's own ``generator``
    (the trainer seeds it per step), so a run is reproducible, resumes exactly and does
    not depend on the number of processes (``rows`` reaches ``loss_fn`` unchanged).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"the conditioning dropout must be in [0, 1), got {p!r}.")

    def dropped(model: Any, x0: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        cond, generator = kwargs.get("cond") or {}, kwargs.get("generator")
        if p > 0 and cond:
            device = generator.device if generator is not None else x0.device
            u = torch.rand(len(x0), generator=generator, device=device)
            kwargs["cond"] = drop_conditioning(cond, uncond, u < p)
        return loss_fn(model, x0, **kwargs)

    return dropped
