"""Bring your own model: networks trained elsewhere, in rectdiff's calling convention.

Each adapter undoes one outside convention (time direction, call signature, output sign;
see :mod:`.base`) and returns an :class:`Adapted` ``(model, form, prediction)`` that every
rectdiff sampler, pair generator, trainer and diagnostic takes as it is::

    model, form, prediction = adapters.flow_tutorial(net)          # t = 0 noise, dx/dt
    pairs = rectify.generate_pairs(model, form=form, prediction=prediction, ...)

===========================  ===============================================================
:data:`CONVENTIONS` name     adapter
===========================  ===============================================================
``rectdiff``                 :func:`native`: already ``net(x_t, model_time)`` in ``form=``
``flow-tutorial``            :func:`flow_tutorial`: the flow-matching tutorials' ``net(x, t)``
``torchcfm``                 :func:`torchcfm`: torchcfm's MLP / UNet wrapper and matcher
``flow-matching``            :func:`flow_matching`: facebookresearch/flow_matching's
                             ``ModelWrapper`` and ``AffineProbPath``
``rectified-flow-pytorch``   :func:`rectified_flow_pytorch`: lucidrains' ``RectifiedFlow``
``diffusers``                :func:`diffusers_unet`: ``UNet2DModel`` + a DDPM-family scheduler
===========================  ===============================================================

A new convention is one function returning :class:`Adapted` plus one line in
:data:`CONVENTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..io.configs import check_choice
from .base import CALLS, Adapted, OutsideModel
from .diffusers import diffusers_unet, native
from .flows import (
    FLOW_MATCHING_SCHEDULERS,
    T_MIN,
    TARGETS,
    TORCHCFM_MATCHERS,
    flow_matching,
    flow_tutorial,
    rectified_flow_pytorch,
    torchcfm,
)  # fmt: skip

__all__ = [
    "Adapted", "OutsideModel", "CALLS", "CONVENTIONS", "adapt", "native", "flow_tutorial",
    "torchcfm", "flow_matching", "rectified_flow_pytorch", "diffusers_unet", "TARGETS", "T_MIN",
    "TORCHCFM_MATCHERS", "FLOW_MATCHING_SCHEDULERS",
]  # fmt: skip

#: convention name -> adapter ``fn(net, **options) -> Adapted``
CONVENTIONS: dict[str, Callable[..., Adapted]] = {
    "rectdiff": native,
    "flow-tutorial": flow_tutorial,
    "torchcfm": torchcfm,
    "flow-matching": flow_matching,
    "rectified-flow-pytorch": rectified_flow_pytorch,
    "diffusers": diffusers_unet,
}


def adapt(net: nn.Module, convention: str, /, *args: Any, **options: Any) -> Adapted:
    """``CONVENTIONS[convention](net, *args, **options)``, with a clear error for a bad name or
    option (the allowed names, or the adapter's own parameters)."""
    import inspect

    fn = CONVENTIONS[check_choice(convention, list(CONVENTIONS), "model convention")]
    try:
        inspect.signature(fn).bind(net, *args, **options)
    except TypeError as err:
        allowed = [p for p in inspect.signature(fn).parameters if p not in ("net", "model")]
        raise ValueError(
            f"bad options {options} for convention {convention!r}: {err}; its options are "
            f"{', '.join(allowed)}."
        ) from None
    return fn(net, *args, **options)
