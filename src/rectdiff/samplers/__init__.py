"""Sampling for any form and prediction: :func:`sample` and its :class:`Trajectory` record.

One core: :func:`sample` builds a decreasing time grid (:mod:`.grids`), wraps the model into a
:class:`~.denoiser.Denoiser` ``(x, t) -> (x0_pred, eps_pred)`` (classifier-free guidance and
the NFE count live there), and hands both to a solver from :data:`~.solvers.SOLVERS`. Every
solver is one function with one signature (:mod:`.solvers`); a new solver is one function and
one registry line.

    denoiser   Denoiser, clamp_time
    grids      time_grid, TIME_GRIDS, scheduler_grid (a diffusers scheduler's own steps)
    solvers    euler, heun, ddim, dpmpp_2m, rk4 / midpoint and the adaptive solvers (torchdiffeq),
               the SOLVERS registry
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..forms import Coefficients, Form
from ..reparametrize import reparametrize
from .denoiser import Denoiser, check_start, clamp_time
from .grids import MAX_STEPS, TIME_GRIDS, check_steps, scheduler_grid, time_grid
from .solvers import SOLVERS, Callback, Solver, adaptive, ddim, dpmpp_2m, euler, fixed_grid, heun

__all__ = [
    "Trajectory",
    "Denoiser",
    "Callback",
    "Coefficients",
    "Solver",
    "sample",
    "time_grid",
    "check_steps",
    "MAX_STEPS",
    "scheduler_grid",
    "clamp_time",
    "check_start",
    "TIME_GRIDS",
    "SOLVERS",
    "euler",
    "heun",
    "ddim",
    "dpmpp_2m",
    "adaptive",
    "fixed_grid",
    "reparametrize",
]


@dataclass
class Trajectory:
    """One sampling run: the states on the time grid and the predictions made there.

    Attributes:
        t: ``(K+1,)`` float64 times, decreasing from t_start to t_end.
        x: ``(K+1, B, ...)`` states; ``x[0] = sigma(t[0]) eps``, ``x[-1]`` the sample.
        x0_pred: ``(K, B, ...)`` x0-prediction of the model at ``(x[k], t[k])``.
        eps_pred: ``(K, B, ...)`` eps-prediction at the same evaluation.
        nfe: model evaluations the solve used (classifier-free guidance counts 2 each).
        form, prediction, solver: what produced it.
    """

    t: Tensor
    x: Tensor
    x0_pred: Tensor
    eps_pred: Tensor
    nfe: int
    form: Form
    prediction: str
    solver: str

    @property
    def sample(self) -> Tensor:
        """The final state ``x[-1]``."""
        return self.x[-1]


class _Recorder:
    def __init__(self) -> None:
        self.x: list[Tensor] = []
        self.x0_pred: list[Tensor] = []
        self.eps_pred: list[Tensor] = []

    def __call__(self, k: int, x: Tensor, x0_pred: Tensor, eps_pred: Tensor) -> None:
        self.x.append(x)
        self.x0_pred.append(x0_pred)
        self.eps_pred.append(eps_pred)


def sample(
    model: Callable[..., Tensor],
    eps: Tensor,
    *,
    form: Form,
    prediction: str,
    solver: str = "ddim",
    steps: int = 10,
    t_grid: str | Sequence[float] | Tensor = "uniform",
    cond: dict[str, Any] | None = None,
    guidance: float | None = None,
    uncond: dict[str, Any] | None = None,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_start: float | None = None,
    t_end: float | None = None,
    progress: bool = False,
) -> Tensor | Trajectory:
    """Sample by solving the probability-flow ODE from ``x = sigma(t_start) eps`` to t_end.

    Args:
        model: called as ``model(x_t, form.model_time(t), **cond)``, returning ``prediction``.
        eps: standard-normal noise ``(B, ...)``; its dtype and device are the sample's.
        form, prediction: the model's diffusion form and prediction type.
        solver: a name in :data:`SOLVERS` (euler, heun, ddim, dpmpp_2m, dopri5, dopri8, bosh3,
            adaptive_heun, rk4, midpoint).
        steps: grid intervals K (model evaluations for ddim, euler, dpmpp_2m).
        t_grid: "uniform", "logsnr", "karras" or an explicit decreasing sequence (see
            :func:`time_grid`).
        cond: keyword arguments of the conditional model.
        guidance: classifier-free guidance scale w (None: no guidance).
        uncond: keyword arguments of the unconditional model (default: none).
        return_trajectory: return a :class:`Trajectory` instead of the sample.
        rtol, atol: tolerances of the adaptive solvers.
        t_start: first time, default ``form.t_max``; t_end: last time, default 0.
        progress: show a tqdm bar counting model evaluations.

    Returns:
        The sample ``(B, ...)``, or the :class:`Trajectory` (states recorded only then).

    Raises:
        ValueError: for an unknown solver or grid, steps < 1, or a bad grid.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}.")
    if not eps.is_floating_point():
        raise ValueError(f"eps must be a floating-point tensor, got dtype {eps.dtype}.")
    t = time_grid(form, steps, t_grid, t_start=t_start, t_end=t_end)
    check_start(form, prediction, float(t[0]) if t_start is not None else None)
    recorder = _Recorder() if return_trajectory else None
    # no bar object at all without progress: a disabled tqdm still costs ~15 us a call
    with torch.no_grad(), tqdm(desc=solver, unit="eval") if progress else nullcontext() as bar:
        denoise = Denoiser(
            model, form, prediction, cond=cond, guidance=guidance, uncond=uncond,
            batch_size=eps.shape[0], on_evaluation=bar.update if progress else None,
        )  # fmt: skip
        denoise.precompute(t, eps)
        x_start = denoise.coefficients(t[0]).sigma * eps
        x_end = SOLVERS[solver](denoise, x_start, t, recorder, rtol=rtol, atol=atol)
    if recorder is None:
        return x_end
    return Trajectory(
        t=t,
        x=torch.stack([*recorder.x, x_end]),
        x0_pred=torch.stack(recorder.x0_pred),
        eps_pred=torch.stack(recorder.eps_pred),
        nfe=denoise.nfe,
        form=form,
        prediction=prediction,
        solver=solver,
    )
