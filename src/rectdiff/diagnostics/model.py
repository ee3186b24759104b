"""Model-level diagnostics: one model's sampling trajectories measured end to end.

:func:`diagnose_model` samples a model once and applies the diagnostics named in ``which``;
each is one entry of :data:`DIAGNOSTICS`, which says what the entry measures and which report
columns it fills. A new diagnostic is one function (in :mod:`.trajectory`, :mod:`.coupling`
or here) plus one registry line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import samplers
from ..forms import Form
from .coupling import crossing_rate, relative_transport_cost, transport_cost
from .trajectory import curvature_profile, first_order_deviation, straightness

__all__ = ["one_step_gap", "Diagnostic", "DIAGNOSTICS", "Diagnosis", "diagnose_model"]

_F64 = torch.float64
#: sample paths kept in a :class:`Diagnosis` for figures
KEPT_PATHS = 48


def one_step_gap(
    model: Any,
    eps: Tensor,
    *,
    form: Form,
    prediction: str,
    reference_solver: str = "dopri5",
    reference_steps: int = 256,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    cond: dict[str, Any] | None = None,
    per_sample: bool = False,
) -> Tensor:
    """Distance between one DDIM step and a converged solve from the same noise.

        gap = E_b sqrt(mean_d (x_ddim1 - x_ref)^2)

    (root-mean-square over dimensions per sample, then the batch mean). It is zero for a
    first-order model, where DDIM is exact (Rectified Diffusion, Wang et al. 2024, sec. 3),
    up to the reference solver's tolerance.

    Args:
        model: called as ``model(x_t, model_time, **cond)``.
        eps: (B, ...) standard-normal noise.
        form, prediction: the model's form and prediction type.
        reference_solver: the converged solver (``"dopri5"``, adaptive; or a fixed-step one
            with ``reference_steps`` steps).
        reference_steps, rtol, atol: passed to :func:`rectdiff.samplers.sample`.
        cond: conditioning passed to the model.
        per_sample: return the (B,) distances instead of their mean.

    Returns:
        A 0-d float64 tensor (or (B,) with ``per_sample``).
    """
    common = {"form": form, "prediction": prediction, "cond": cond}
    one = samplers.sample(model, eps, solver="ddim", steps=1, **common)
    ref = samplers.sample(
        model, eps, solver=reference_solver, steps=reference_steps, rtol=rtol, atol=atol, **common
    )
    diff = (one.detach().to(_F64) - ref.detach().to(_F64)).reshape(len(eps), -1)
    gap = diff.square().mean(-1).sqrt()
    return gap if per_sample else gap.mean()


@dataclass
class Probe:
    """What one diagnosis has to work with: the model, its noise and its recorded solve."""

    model: Any
    noise: Tensor
    form: Form
    prediction: str
    trajectory: samplers.Trajectory
    reference_solver: str
    rtol: float
    atol: float
    seed: int


Curves = dict[str, tuple[list[float], list[float]]]
Measure = Callable[[Probe], tuple[dict[str, float], Curves]]


@dataclass(frozen=True)
class Diagnostic:
    """A registry entry: the report columns it fills (lower is more first-order / straighter
    for each) and the measure that fills them, with the curves it draws."""

    columns: tuple[str, ...]
    measure: Measure


def _straightness(p: Probe) -> tuple[dict[str, float], Curves]:
    numbers, curves = {}, {}
    for coords in ("t", "y"):
        value = straightness(p.trajectory, reduction="mean", coords=coords, relative=True)
        numbers[f"straightness_{coords}"] = float(value)
        t_mid, profile = curvature_profile(
            p.trajectory, coords=coords, reduction="mean", relative=True
        )
        curves[f"curvature_{coords}"] = (t_mid.tolist(), profile.tolist())
    return numbers, curves


def _first_order(p: Probe) -> tuple[dict[str, float], Curves]:
    value = float(first_order_deviation(p.trajectory))
    t_k, drift = first_order_deviation(p.trajectory, per_step=True)
    return {"first_order_deviation": value}, {"x0_drift": (t_k.tolist(), drift.tolist())}


def _crossing(p: Probe) -> tuple[dict[str, float], Curves]:
    return {"crossing_rate": float(crossing_rate(p.noise, p.trajectory.sample, seed=p.seed))}, {}


def _transport(p: Probe) -> tuple[dict[str, float], Curves]:
    value = transport_cost(p.noise, p.trajectory.sample, reduction="mean")
    return {"transport_cost": float(value)}, {}


def _relative_transport(p: Probe) -> tuple[dict[str, float], Curves]:
    value = relative_transport_cost(p.noise, p.trajectory.sample, reduction="mean", seed=p.seed)
    return {"relative_transport_cost": float(value)}, {}


def _one_step_gap(p: Probe) -> tuple[dict[str, float], Curves]:
    value = one_step_gap(
        p.model, p.noise, form=p.form, prediction=p.prediction,
        reference_solver=p.reference_solver, rtol=p.rtol, atol=p.atol,
    )  # fmt: skip
    return {"one_step_gap": float(value)}, {}


#: name -> :class:`Diagnostic`; a new diagnostic is one function and one line here
DIAGNOSTICS: dict[str, Diagnostic] = {
    "straightness": Diagnostic(("straightness_y", "straightness_t"), _straightness),
    "first_order_deviation": Diagnostic(("first_order_deviation",), _first_order),
    "crossing_rate": Diagnostic(("crossing_rate",), _crossing),
    "transport_cost": Diagnostic(("transport_cost",), _transport),
    "relative_transport_cost": Diagnostic(("relative_transport_cost",), _relative_transport),
    "one_step_gap": Diagnostic(("one_step_gap",), _one_step_gap),
}


@dataclass
class Diagnosis:
    """What :func:`diagnose_model` measures: numbers, curves and a few trajectories."""

    numbers: dict[str, float]
    curves: Curves
    trajectory: samplers.Trajectory
    sample: Tensor


def diagnose_model(
    model: Any,
    *,
    form: Form,
    prediction: str,
    noise: Tensor,
    which: Sequence[str] = (
        "straightness",
        "first_order_deviation",
        "crossing_rate",
        "one_step_gap",
    ),
    solver: str = "dpmpp_2m",
    steps: int = 32,
    reference_solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    seed: int = 0,
) -> Diagnosis:
    """First-order and straightness diagnostics of one model's sampling trajectories.

    The trajectories are ``solver`` solves with ``steps`` steps on a grid uniform in logsnr
    (``samplers.time_grid(kind="logsnr")``) from ``noise``. Numbers (see :data:`DIAGNOSTICS`):

    * ``straightness_t``, ``straightness_y``: :func:`.straightness` with ``reduction="mean"``,
      ``relative=True`` in t and in y = x / alpha against s = sigma / alpha (Liu, Gong & Liu
      2023, eq. 4, divided by E||Z_1 - Z_0||^2);
    * ``first_order_deviation``: of the x0-prediction (Rectified Diffusion, Theorem 1);
    * ``crossing_rate``, ``transport_cost`` (mean over dimensions, noise end = eps),
      ``relative_transport_cost``: of the model's coupling (noise, sample);
    * ``one_step_gap``: RMS distance of one DDIM step to a ``reference_solver`` solve.

    Returns:
        A :class:`Diagnosis`; its curves are ``curvature_t``, ``curvature_y``
        (:func:`.curvature_profile`, relative) and ``x0_drift``
        (``first_order_deviation(per_step=True)``), each ``(t, value)`` lists.

    Raises:
        ValueError: for a name in ``which`` that is not in :data:`DIAGNOSTICS`.
    """
    unknown = [name for name in which if name not in DIAGNOSTICS]
    if unknown:
        raise ValueError(f"unknown diagnostic {unknown[0]!r}; allowed: {', '.join(DIAGNOSTICS)}.")
    traj = samplers.sample(
        model, noise, form=form, prediction=prediction, solver=solver, steps=steps,
        t_grid="logsnr", return_trajectory=True,
    )  # fmt: skip
    probe = Probe(model, noise, form, prediction, traj, reference_solver, rtol, atol, seed)
    numbers: dict[str, float] = {}
    curves: Curves = {}
    for name, entry in DIAGNOSTICS.items():
        if name in which:
            more_numbers, more_curves = entry.measure(probe)
            numbers.update(more_numbers)
            curves.update(more_curves)
    keep = slice(0, KEPT_PATHS)
    small = dataclasses.replace(
        traj, x=traj.x[:, keep].clone(), x0_pred=traj.x0_pred[:, keep].clone(),
        eps_pred=traj.eps_pred[:, keep].clone(),
    )  # fmt: skip
    return Diagnosis(numbers, curves, small, traj.sample)
