"""rectdiff: diffusion models seen the Rectified Diffusion way.

Every diffusion model is one forward process ``x_t = alpha_t x0 + sigma_t eps`` (t = 0 data,
t = 1 noise) with a choice of what the network predicts; rectification retrains it on the
deterministic (noise, sample) pairs it generates, in any form, making its sampling
trajectories first-order.

The packages, in the order data flows through them::

    forms -> predictions -> training / samplers -> rectify -> diagnostics -> metrics -> plots
    (models, oracles, data, reparametrize beside them; io for files; apps and
    stable_diffusion on top; cli the command)

Submodules are imported on first use, so ``import rectdiff`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "forms", "predictions", "reparametrize", "training", "samplers", "rectify", "couplings",
    "diagnostics", "metrics", "models", "oracles", "data", "plots", "io", "apps",
    "stable_diffusion", "errors",
)  # fmt: skip
__all__ = [*_SUBMODULES, "Diffusion", "Reflow", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in ("Diffusion", "Reflow"):
        return getattr(importlib.import_module(".rectify.online", __name__), name)
    raise AttributeError(f"module 'rectdiff' has no attribute {name!r}")
