"""rectdiff: diffusion models seen the Rectified Diffusion way.

Every diffusion model is one forward process ``x_t = alpha_t x0 + sigma_t eps`` (t = 0 data,
t = 1 noise) with a choice of what the network predicts; rectification retrains it on the
deterministic (noise, sample) pairs it generates, in any form, making its sampling
trajectories first-order.

The modules, in the order data flows through them::

    forms -> predictions -> timesteps -> losses / samplers -> couplings -> rectify
          -> diagnostics -> metrics -> plots            (and train, nets, data, compare)

Submodules are imported on first use, so ``import rectdiff`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "forms", "predictions", "timesteps", "losses", "samplers", "reparametrize", "oracles",
    "couplings", "pair_store", "rectify", "diagnostics", "metrics", "plots", "nets", "data", "train",
    "diffusion", "checkpoints", "compare", "stable_diffusion",
)  # fmt: skip
__all__ = [*_SUBMODULES, "Diffusion", "Reflow", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "Diffusion":
        return importlib.import_module(".diffusion", __name__).Diffusion
    if name == "Reflow":
        return importlib.import_module(".rectify", __name__).Reflow
    raise AttributeError(f"module 'rectdiff' has no attribute {name!r}")
