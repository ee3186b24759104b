"""Diffusion forms: the one forward process ``x_t = alpha_t x0 + sigma_t eps``.

t = 0 is data and t = 1 is noise. A form supplies ``alpha(t)``, ``sigma(t)``, their
derivatives and the inverse of ``logsnr``; everything else is written once on top.

    base      Form, Coefficients, as_time, broadcast
    vp        VP, VPCosine, SubVP, DiscreteVP (variance preserving, and sub-VP)
    ve_fm     VE, FlowMatching
    custom    Custom (callables or whitelisted expressions)
    io        FORMS (the registry), presets, load, from_config, from_diffusers

A new form is one class in one of these files plus one line in ``io.FORMS``.
"""

from __future__ import annotations

from .base import Coefficients, Form, as_time, broadcast
from .custom import Custom
from .io import FORMS, ddpm_betas, from_config, from_diffusers, load, preset_table, presets
from .ve_fm import VE, FlowMatching
from .vp import VP, DiscreteVP, SubVP, VarPreserving, VPCosine

__all__ = [
    "Form",
    "Coefficients",
    "VarPreserving",
    "VP",
    "VPCosine",
    "SubVP",
    "VE",
    "FlowMatching",
    "DiscreteVP",
    "Custom",
    "FORMS",
    "as_time",
    "broadcast",
    "from_diffusers",
    "load",
    "from_config",
    "presets",
    "preset_table",
    "ddpm_betas",
]
