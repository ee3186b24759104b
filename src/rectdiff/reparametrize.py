"""The same network seen in another form: equal-logsnr time and input rescaling.

Two forms with equal logsnr at times ``t_src``, ``t_dst`` describe the same noisy point up to
scale: with ``sigma_src / alpha_src = sigma_dst / alpha_dst``,

    x_src = alpha_src x0 + sigma_src eps = (alpha_src / alpha_dst) x_dst,

so ``y = x / alpha`` is shared and ``(x0, eps)`` are the same in both (Kingma et al. 2021,
sec. 4; the invariance behind DPM-Solver and EDM). A VP-trained network is therefore a
flow-matching model, and the other way round, through :func:`reparametrize`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .forms import Form, as_time, broadcast
from .predictions import check_prediction, from_x0_eps, to_x0_eps

__all__ = ["Reparametrized", "reparametrize"]


class Reparametrized(nn.Module):
    """``model`` (trained as ``src_form`` / ``src_prediction``) answering as ``dst_form`` / ``dst_prediction``.

    Called as ``model(x_t, dst_form.model_time(t), **cond)``: maps ``t`` to
    ``t_src = src_form.t_from_logsnr(dst_form.logsnr(t))``, rescales
    ``x_src = x_t alpha_src / alpha_dst``, evaluates the source model at
    ``src_form.model_time(t_src)`` (fractional timesteps for a ``DiscreteVP``), and converts its
    output to ``(x0, eps)`` and then to ``dst_prediction``. Outside the source form's logsnr
    range the source network is evaluated outside ``[t_min, t_max]``; keep the sampling range
    inside it (e.g. ``t_start = dst_form.t_from_logsnr(src_form.logsnr(src_form.t_max))``).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        src_form: Form,
        src_prediction: str,
        dst_form: Form,
        dst_prediction: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.src_form, self.dst_form = src_form, dst_form
        self.src_prediction = check_prediction(src_prediction)
        self.dst_prediction = check_prediction(dst_prediction)
        self._same_form = src_form == dst_form

    def forward(self, x_t: Tensor, model_time: Any, **cond: Any) -> Tensor:
        t_dst = self.dst_form.t_from_model_time(as_time(model_time)).to(x_t.device)
        if self._same_form:  # nothing to map: the time input and x_t pass through unchanged
            t_src, x_src, src_time = t_dst, x_t, model_time
        else:
            t_src = self.src_form.t_from_logsnr(self.dst_form.logsnr(t_dst))
            x_src = x_t * broadcast(self.src_form.alpha(t_src) / self.dst_form.alpha(t_dst), x_t)
            src_time = self.src_form.model_time(t_src).to(x_t.dtype)
        out = self.model(x_src, src_time, **cond)
        if self._same_form and self.src_prediction == self.dst_prediction:
            return out
        x0, eps = to_x0_eps(out, self.src_prediction, x_src, t_src, self.src_form)
        return from_x0_eps(x0, eps, self.dst_prediction, t_dst, self.dst_form)

    def extra_repr(self) -> str:
        return (
            f"src={self.src_form!r}/{self.src_prediction}, "
            f"dst={self.dst_form!r}/{self.dst_prediction}"
        )


def reparametrize(
    model: Callable[..., Tensor],
    src_form: Form,
    src_prediction: str,
    dst_form: Form,
    dst_prediction: str,
) -> nn.Module:
    """``model`` of ``src_form``/``src_prediction`` seen as a ``dst_form``/``dst_prediction`` model.

    See :class:`Reparametrized`; sample or rectify the result like any model of ``dst_form``.
    """
    return Reparametrized(model, src_form, src_prediction, dst_form, dst_prediction)
