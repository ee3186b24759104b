"""The one-object API (:class:`Diffusion`) and online rectification on it (:class:`Reflow`).

A network, a form and a prediction type, trained and sampled together:

    diffusion = Diffusion(net, form=forms.VP(), prediction="eps")
    loss = diffusion(x0)                       # the diffusion loss of one batch
    loss.backward()
    samples = diffusion.sample(batch_size=64, steps=10, solver="ddim")

This is what users of rectified-flow-pytorch know (``loss = rectified_flow(images);
rectified_flow.sample()``), here for any form; it is a thin layer over
:func:`rectdiff.training.losses.diffusion_loss` and :func:`rectdiff.samplers.sample`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..forms import Form
from ..predictions import check_prediction
from ..training.losses import DiffusionLoss
from ..training.time_samplers import TimeSampler
from ..training.weightings import Weighting
from .coupling import start_noise

__all__ = ["Diffusion", "Reflow"]


class Diffusion(nn.Module):
    """A network trained and sampled as a diffusion model in one form and prediction type.

    Args:
        net: called as ``net(x_t, form.model_time(t), **cond)``.
        form: the forward process.
        prediction: what ``net`` predicts: ``"eps"``, ``"x0"``, ``"v"`` or ``"flow"``.
        time_sampler: training time distribution (name or object, see :mod:`rectdiff.training`).
        weighting: loss weighting over logsnr (see :mod:`rectdiff.training`).
        loss: ``"mse"`` or ``"pseudo_huber"``.
        coupling: ``"independent"`` or ``"ot"`` (drawn noise re-paired with each batch by
            minibatch optimal transport; see :func:`~rectdiff.training.losses.diffusion_loss`).
            Noise passed as ``eps=`` is a fixed coupling and used as given.
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
        coupling: str = "independent",
        sample_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.form = form
        self.prediction = check_prediction(prediction)
        # names, parameters and coefficient functions resolved here, once, not every step
        self.objective = DiffusionLoss(
            form, self.prediction, time_sampler=time_sampler, weighting=weighting, loss=loss,
            coupling=coupling,
        )  # fmt: skip
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None

    @property
    def time_sampler(self) -> TimeSampler:
        """The training time sampler (resolved for ``form``)."""
        return self.objective.time_sampler

    @property
    def weighting(self) -> Weighting:
        """The loss weighting."""
        return self.objective.weighting

    @property
    def loss_type(self) -> str:
        """``"mse"`` or ``"pseudo_huber"``."""
        return self.objective.loss

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
        if self.sample_shape is None:
            self.sample_shape = tuple(x0.shape[1:])
        mean, _ = self.objective(
            self.net, x0, eps=eps, t=t, cond=cond, generator=generator, per_sample=False
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
        from ..samplers import sample

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


class Reflow(nn.Module):
    """Online rectification for the one-object API: ``loss = reflow(batch_size)``.

    Pairs come on the fly from a frozen copy of the teacher, solved with ``solver`` /
    ``steps`` from fresh standard-normal noise; the loss is the student's diffusion loss on
    them. This is rectified-flow-pytorch's ``Reflow`` for any form; the offline pair store
    (:func:`rectify_rounds`) is what scales.

    Args:
        diffusion: the teacher, as a :class:`Diffusion`; the student is a
            deep copy (``self.student``) trained in the same form and prediction.
        solver, steps: how the teacher's pairs are made.
    """

    def __init__(self, diffusion: Diffusion, *, solver: str = "dpmpp_2m", steps: int = 25) -> None:
        super().__init__()
        if diffusion.sample_shape is None:
            raise ValueError(
                "Reflow needs the teacher's sample_shape; pass sample_shape= to Diffusion."
            )
        self.teacher = copy.deepcopy(diffusion).requires_grad_(False).eval()
        self.student = copy.deepcopy(diffusion)
        self.solver, self.steps = solver, steps

    @torch.no_grad()
    def pairs(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        cond: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` fresh couplings ``(eps, x0_hat)`` from the frozen teacher (given
        ``cond``, e.g. ``{"class_labels": labels}``, for a conditional teacher)."""
        param = next(self.student.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        shape = (batch_size, *self.teacher.sample_shape)
        eps = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        x0 = self.teacher.sample(eps=eps, steps=self.steps, solver=self.solver, cond=cond)
        return eps, x0

    def forward(
        self,
        batch_size: int = 256,
        generator: torch.Generator | None = None,
        cond: dict[str, Any] | None = None,
    ) -> Tensor:
        """The student's diffusion loss on ``batch_size`` fresh teacher pairs, on the line
        through the student's own sampling start (:func:`~.coupling.start_noise`)."""
        eps, x0 = self.pairs(batch_size, generator, cond)
        noise = start_noise(eps, x0, self.student.form)
        return self.student(x0, eps=noise, cond=cond)
