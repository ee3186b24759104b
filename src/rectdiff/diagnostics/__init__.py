"""How first-order, how straight and how entangled sampling trajectories and couplings are.

trajectory   first_order_deviation (and per phased window), straightness, curvature_profile
             (in t and in y = x/alpha)
coupling     transport_cost, relative_transport_cost, crossing_rate
model        one_step_gap, diagnose_model and the DIAGNOSTICS registry (report columns)
"""

from __future__ import annotations

from .coupling import crossing_rate, relative_transport_cost, transport_cost
from .model import DIAGNOSTICS, Diagnosis, Diagnostic, diagnose_model, one_step_gap
from .trajectory import (
    COORDS,
    MIN_STEPS,
    REDUCTIONS,
    TrajectoryLike,
    curvature_profile,
    first_order_deviation,
    straightness,
    window_first_order_deviation,
)

__all__ = [
    "MIN_STEPS", "COORDS", "REDUCTIONS", "TrajectoryLike", "first_order_deviation",
    "straightness", "curvature_profile", "transport_cost", "relative_transport_cost",
    "crossing_rate", "one_step_gap", "DIAGNOSTICS", "Diagnostic", "Diagnosis", "diagnose_model",
    "window_first_order_deviation",
]  # fmt: skip
