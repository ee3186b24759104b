"""rectdiff: diffusion models seen the Rectified Diffusion way.

Every diffusion model is one forward process ``x_t = alpha_t x0 + sigma_t eps`` (t = 0 data,
t = 1 noise) with a choice of what the network predicts; rectification retrains it on the
deterministic (noise, sample) pairs it generates, in any form, making its sampling
trajectories first-order.
"""

from . import forms, predictions

__version__ = "0.1.0"
__all__ = ["forms", "predictions", "__version__"]
