"""The denoiser: a model of any prediction seen as ``(x, t) -> (x0_pred, eps_pred)``.

Every solver talks to the network only through :class:`Denoiser`: it clamps t into the
form's safe range, maps t to the network's time input, applies classifier-free guidance,
counts evaluations and converts the output once with cached float64 coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..forms import Coefficients, Form, as_time
from ..predictions import check_prediction, to_x0_eps, x0_eps_weights

__all__ = ["Denoiser", "check_start", "clamp_time"]


def clamp_time(form: Form, t: Tensor | float) -> float:
    """``t`` clamped into the safe range ``[t_min, t_max]``, where the model is evaluated."""
    return min(max(float(t), form.t_min), form.t_max)


def check_start(form: Form, prediction: str, t_start: float | None = None) -> None:
    """Refuse a start where the sampler's first conversion divides by zero.

    An eps (or score) prediction is turned into ``x0 = (x - sigma eps) / alpha``, undefined
    where ``alpha = 0``: flow matching's ``t = 1``. Flow, v and x0 predictions convert there
    without dividing by alpha (SD3 and outside flow models start at ``t_max = 1``).

    Raises:
        ValueError: naming ``t_max`` (or ``t_start``), the allowed range and the fix.
    """
    if prediction not in ("eps", "score"):
        return
    start = form.t_max if t_start is None else clamp_time(form, t_start)
    if float(form.alpha(start)) != 0.0:
        return
    where = f"t_max={form.t_max}" if t_start is None else f"t_start={t_start}"
    raise ValueError(
        f"{form!r} with {where}: alpha({start}) = 0, so an {prediction!r} prediction cannot "
        f"be converted to x0 (x0 = (x - sigma eps) / alpha divides by zero and samples NaN). "
        f"An {prediction!r} model needs a start where alpha > 0, i.e. t_max < {start} (flow "
        "matching's default is t_max = 0.999); or use a 'flow', 'v' or 'x0' prediction."
    )


class Denoiser:
    """A model ``model(x_t, model_time, **cond)`` seen as ``(x, t) -> (x0_pred, eps_pred)``.

    The network is evaluated at ``t`` clamped into ``[form.t_min, form.t_max]`` (its safe
    range; adaptive solvers probe stages past the end time) and its output is converted once
    with float64 coefficients. With ``guidance = w`` the native prediction is
    ``uncond + w (cond - uncond)`` (Ho & Salimans 2022, eq. 6), the two evaluations batched into
    one forward pass when every conditioning tensor has the batch as its first dimension.

    Attributes:
        nfe: model evaluations so far (2 per guided evaluation).
        on_evaluation: called after each counted evaluation (a progress bar's ``update``).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        form: Form,
        prediction: str,
        *,
        cond: dict[str, Any] | None = None,
        guidance: float | None = None,
        uncond: dict[str, Any] | None = None,
        batch_size: int | None = None,
        on_evaluation: Callable[[], Any] | None = None,
    ) -> None:
        self.model = model
        self.on_evaluation = on_evaluation
        self.form = form
        self.prediction = check_prediction(prediction)
        self.cond = dict(cond or {})
        self.uncond = dict(uncond or {})
        self.guidance = None if guidance is None else float(guidance)
        if self.guidance is not None and not self.cond:
            raise ValueError(
                f"guidance={guidance} needs cond=, the conditional keyword arguments of the model "
                "(and uncond=, the unconditional ones); pass guidance=None to sample unguided."
            )
        self._batched = None
        if self.guidance is not None and batch_size is not None:
            self._batched = _concat_kwargs(self.uncond, self.cond, batch_size)
        # by t: Coefficients (plain float tuples until first used) and 0-d model times (their
        # index into the precomputed grid's until first used); see precompute
        self._coefficients: dict[float, Any] = {}
        self._model_time: dict[float, Any] = {}
        self._model_times: Tensor | None = None  # of the precomputed grid
        self._inputs: dict[float, Tensor] = {}  # model time per batch, by clamped t
        self._weights: dict[float, tuple[float, float, float, float]] = {}
        self.nfe = 0

    def coefficients(self, t: Tensor | float) -> Coefficients[float]:
        """``(alpha, sigma, d_alpha, d_sigma)`` at ``t`` as float64 Python numbers (cached)."""
        return self._coefficients_at(float(t))

    def precompute(self, t: Tensor, like: Tensor) -> None:
        """Cache coefficients and model times of the grid ``t`` (and of its times clamped into
        the safe range) in one vectorized call, the model times in ``like``'s dtype and device,
        each also as the ``(B,)`` input of a batch like ``like``: a constant number of tensor
        operations per sampling call (the batch inputs in one ``unbind``), none per step."""
        times = torch.cat([t, t.clamp(self.form.t_min, self.form.t_max)]).unique()
        model_times = self.form.model_time(times).to(device=like.device, dtype=like.dtype)
        self._model_times = model_times
        batched = model_times[:, None].expand(-1, like.shape[0]).unbind(0)
        # plain floats and an index here, made Coefficients and 0-d tensors on first use: a
        # 100-step Euler call on a flow model uses two of each
        rows = zip(*(c.tolist() for c in self.form.coefficients(times)), strict=True)
        for i, (key, batch, row) in enumerate(zip(times.tolist(), batched, rows, strict=True)):
            self._coefficients[key], self._model_time[key], self._inputs[key] = row, i, batch

    def _coefficients_at(self, key: float) -> Coefficients[float]:
        found = self._coefficients.get(key)
        if found is None:
            t64 = as_time(key)
            found = Coefficients(*(float(c) for c in self.form.coefficients(t64)))
            self._coefficients[key] = found
        elif not isinstance(found, Coefficients):  # precomputed plain floats
            found = self._coefficients[key] = Coefficients(*found)
        return found

    def _model_time_at(self, key: float) -> Tensor:
        found = self._model_time.get(key)
        if found is None:
            found = self._model_time[key] = self.form.model_time(as_time(key))
        elif isinstance(found, int):  # precomputed: its index into the grid's model times
            found = self._model_time[key] = self._model_times[found]  # type: ignore[index]
        return found

    def weights(self, t: Tensor | float) -> tuple[float, float, float, float]:
        """``(p, q, r, s)`` with ``x0_pred = p x + q out`` and ``eps_pred = r x + s out`` for the
        native output ``out`` at ``t`` (clamped), float64 numbers
        (:func:`~rectdiff.predictions.x0_eps_weights`; cached)."""
        key = clamp_time(self.form, t)
        found = self._weights.get(key)
        if found is None:
            found = x0_eps_weights(self.prediction, tuple(self._coefficients_at(key)))
            self._weights[key] = found
        return found

    def output(self, x: Tensor, t: Tensor | float, count: bool = True) -> Tensor:
        """The model's native (guided) prediction at state ``x`` and time ``t`` (clamped)."""
        key = clamp_time(self.form, t)
        model_time = self._inputs.get(key)
        if model_time is None or model_time.shape[0] != x.shape[0] or model_time.dtype != x.dtype:
            model_time = self._model_time_at(key).to(device=x.device, dtype=x.dtype)
            model_time = self._inputs[key] = model_time.expand(x.shape[0])
        out = self._evaluate(x, model_time)
        if count:
            self.nfe += 1 if self.guidance is None else 2
            if self.on_evaluation is not None:
                self.on_evaluation()
        return out

    def convert(self, out: Tensor, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(x0_pred, eps_pred)`` of the native output ``out`` at ``(x, t)``."""
        key = clamp_time(self.form, t)
        return to_x0_eps(
            out, self.prediction, x, key, self.form, coefficients=self._coefficients_at(key)
        )

    def __call__(self, x: Tensor, t: Tensor | float, count: bool = True) -> tuple[Tensor, Tensor]:
        """``(x0_pred, eps_pred)`` at state ``x`` and time ``t``."""
        return self.convert(self.output(x, t, count), x, t)

    def _evaluate(self, x: Tensor, model_time: Tensor) -> Tensor:
        if self.guidance is None:
            return self.model(x, model_time, **self.cond)
        if self._batched is not None:
            both = self.model(
                torch.cat([x, x]), torch.cat([model_time, model_time]), **self._batched
            )
            out_uncond, out_cond = both.chunk(2)
        else:
            out_uncond = self.model(x, model_time, **self.uncond)
            out_cond = self.model(x, model_time, **self.cond)
        return out_uncond + self.guidance * (out_cond - out_uncond)


def _concat_kwargs(
    uncond: dict[str, Any], cond: dict[str, Any], batch_size: int
) -> dict[str, Any] | None:
    """``uncond`` and ``cond`` stacked along the batch for one forward pass, or None if they can't be."""
    if uncond.keys() != cond.keys():
        return None
    merged: dict[str, Any] = {}
    for key, value in cond.items():
        other = uncond[key]
        if isinstance(value, Tensor) and isinstance(other, Tensor):
            if value.ndim == 0 or value.shape != other.shape or value.shape[0] != batch_size:
                return None
            merged[key] = torch.cat([other, value])
        elif not isinstance(value, Tensor) and not isinstance(other, Tensor) and other is value:
            merged[key] = value
        else:
            return None
    return merged
