"""A diffusers ``UNet2DModel`` with its scheduler, and a network already in rectdiff's convention.

diffusers' DDPM/DDIM/PNDM/DPM-Solver/Euler schedulers share the discrete ``alphas_cumprod``
table: the form is :class:`~rectdiff.forms.DiscreteVP` on that table, the prediction comes
from ``scheduler.config.prediction_type`` (``epsilon`` -> eps, ``v_prediction`` -> v,
``sample`` -> x0) and the UNet sees the scheduler's integer timesteps
(``form.model_time``); :func:`rectdiff.forms.from_diffusers` does the mapping.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..forms import Form, from_diffusers
from ..models import UNet
from ..predictions import check_prediction
from .base import Adapted

__all__ = ["diffusers_unet", "native"]


def diffusers_unet(unet: nn.Module, scheduler: Any) -> Adapted:
    """A diffusers ``UNet2DModel`` (e.g. ``DDPMPipeline.from_pretrained(folder).unet``) and the
    scheduler it was trained with (its config dict also works).

    The model is :class:`rectdiff.models.UNet` around ``unet`` (``model.unet``) with
    ``time_scale = 1``: rectdiff's ``model_time`` is already the scheduler timestep.
    """
    form, prediction = from_diffusers(scheduler)
    if not hasattr(unet, "config") or not hasattr(unet.config, "sample_size"):
        raise ValueError(
            f"diffusers_unet expects a diffusers UNet2DModel, got {type(unet).__name__}."
        )
    num_classes = getattr(unet.config, "num_class_embeds", None)
    return Adapted(UNet(unet=unet, time_scale=1.0, num_classes=None if num_classes is None
                        else num_classes - 1), form, prediction)  # fmt: skip


def native(net: nn.Module, *, form: Form, prediction: str) -> Adapted:
    """A network already called as ``net(x_t, form.model_time(t), **cond)`` and answering
    ``prediction`` in ``form`` (rectdiff's own convention): nothing to undo."""
    return Adapted(net, form, check_prediction(prediction))
