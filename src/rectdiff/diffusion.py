"""The one-object API: a network, a form and a prediction type, trained and sampled together.

    diffusion = Diffusion(net, form=forms.VP(), prediction="eps")
    loss = diffusion(x0)                       # the diffusion loss of one batch
    loss.backward()
    samples = diffusion.sample(batch_size=64, steps=10, solver="ddim")

This is what users of rectified-flow-pytorch know (``loss = rectified_flow(images);
rectified_flow.sample()``), here for any form; it is a thin layer over
:func:`rectdiff.losses.diffusion_loss` and :func:`rectdiff.samplers.sample`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .forms import Form
from .predictions import check_prediction

__all__ = ["Diffusion"]


class Diffusion(nn.Module):
    """A network trained and sampled as a diffusion model in one form and prediction type.

    Args:
        net: called as ``net(x_t, form.model_time(t), **cond)``.
        form: the forward process.
        prediction: what ``net`` predicts: ``"eps"``, ``"x0"``, ``"v"`` or ``"flow"``.
        time_sampler: training time distribution (name or object, see :mod:`rectdiff.timesteps`).
        weighting: loss weighting over logsnr (see :mod:`rectdiff.timesteps`).
        loss: ``"mse"`` or ``"pseudo_huber"``.
        sample_shape: shape of one sample; taken from the first training batch when omitted.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        form: Form,
        prediction: str,
        time_sampler: Any = "uniform",
        weighting: Any = "none",
        loss: str = "mse",
        sample_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.form = form
        self.prediction = check_prediction(prediction)
        self.time_sampler = time_sampler
        self.weighting = weighting
        self.loss_type = loss
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None

    def forward(
        self,
        x0: Tensor,
        *,
        eps: Tensor | None = None,
        t: Tensor | None = None,
        cond: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The mean diffusion loss of the batch ``x0`` (``eps`` and ``t`` drawn unless given)."""
        from .losses import diffusion_loss

        if self.sample_shape is None:
            self.sample_shape = tuple(x0.shape[1:])
        mean, _ = diffusion_loss(
            self.net,
            x0,
            form=self.form,
            prediction=self.prediction,
            time_sampler=self.time_sampler,
            weighting=self.weighting,
            loss=self.loss_type,
            eps=eps,
            t=t,
            cond=cond,
            generator=generator,
        )
        return mean

    @torch.no_grad()
    def sample(
        self,
        batch_size: int | None = None,
        *,
        eps: Tensor | None = None,
        steps: int = 10,
        solver: str = "ddim",
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Any:
        """Samples from standard-normal ``eps`` (drawn when only ``batch_size`` is given).

        Keyword arguments go to :func:`rectdiff.samplers.sample` (``t_grid``, ``cond``,
        ``guidance``, ``return_trajectory``, ...).
        """
        from .samplers import sample

        if eps is None:
            if batch_size is None or self.sample_shape is None:
                raise ValueError(
                    "Diffusion.sample needs eps=..., or batch_size=... together with a known "
                    "sample_shape (pass sample_shape= at construction or train on a batch first)."
                )
            param = next(self.net.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            dtype = param.dtype if param is not None else torch.float32
            eps = torch.randn(
                (batch_size, *self.sample_shape), generator=generator, device="cpu", dtype=dtype
            ).to(device)
        return sample(
            self.net,
            eps,
            form=self.form,
            prediction=self.prediction,
            solver=solver,
            steps=steps,
            **kwargs,
        )
