"""Decreasing time grids for sampling: uniform in t, uniform in logsnr, Karras, or explicit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..forms import Form

__all__ = ["TIME_GRIDS", "MAX_STEPS", "check_steps", "time_grid", "scheduler_grid"]

#: the most steps of a solve: beyond, building the grid alone takes minutes and gigabytes,
#: and no fixed-step solve needs them (an adaptive solver reaches any accuracy sooner)
MAX_STEPS = 100_000


def check_steps(steps: Any) -> None:
    """Refuse a step count a solve cannot use.

    Raises:
        ConfigError: naming it, for a non-integer, < 1, or > :data:`MAX_STEPS`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got steps={steps!r}.")
    if steps > MAX_STEPS:
        raise ConfigError(
            f"steps={steps}: too many; allowed: an integer from 1 to {MAX_STEPS} (for a "
            "reference solve, use an adaptive solver such as dopri5 with rtol/atol)."
        )


#: the named time grids of :func:`time_grid`; an explicit decreasing sequence also works
TIME_GRIDS = ("uniform", "logsnr", "karras")


def time_grid(
    form: Form,
    steps: int = 10,
    kind: str | Sequence[float] | Tensor = "uniform",
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """A strictly decreasing float64 time grid of ``steps + 1`` points, t_start to t_end.

    ``"uniform"`` is uniform in t. ``"logsnr"`` is uniform in logsnr (DPM-Solver's
    ``skip_type="logSNR"``, Lu et al. 2022, sec. 3.3). ``"karras"`` spaces
    ``s = sigma/alpha`` as ``s_i = (s_0^(1/rho) + i/n (s_n^(1/rho) - s_0^(1/rho)))^rho``
    (Karras et al. 2022, eq. 5, rho = 7) and maps it back with ``t_from_logsnr``. When
    ``logsnr(t_end)`` is infinite (sigma = 0) these two space ``steps`` points from t_start to
    ``form.t_min`` (the last model evaluation) and then step to t_end, as EDM appends sigma = 0;
    when ``logsnr(t_start)`` is infinite (alpha = 0, flow matching's t = 1) the first step is
    the uniform grid's, from t_start to ``t_start - (t_start - t_last) / intervals``, and the
    rest is spaced from there.
    An explicit sequence is validated and returned as is (then steps, t_start, t_end unused).

    Raises:
        ValueError: for an unknown kind, steps < 1, bad ends, or a bad explicit grid.
    """
    if not isinstance(kind, str):
        if t_start is not None or t_end is not None:
            raise ValueError(
                "an explicit t_grid fixes its own start and end; drop t_start=/t_end= or put "
                "them into the grid."
            )
        return _explicit_grid(kind)
    if kind not in TIME_GRIDS:
        raise ValueError(
            f"unknown t_grid {kind!r}; allowed: {', '.join(TIME_GRIDS)}, or an explicit "
            "strictly decreasing sequence of times in [0, 1]."
        )
    check_steps(steps)
    t_start = form.t_max if t_start is None else float(t_start)
    t_end = 0.0 if t_end is None else float(t_end)
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(
            f"need 0 <= t_end < t_start <= 1 (sampling runs from noise to data), got "
            f"t_start={t_start}, t_end={t_end}."
        )
    if kind == "uniform":
        return _checked(torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64), kind)
    to_zero_sigma = not math.isfinite(float(form.logsnr(t_end)))
    t_last = form.t_min if to_zero_sigma else t_end
    intervals = steps - 1 if to_zero_sigma else steps
    if intervals == 0:
        return torch.tensor([t_start, t_end], dtype=torch.float64)
    if not t_last < t_start:
        raise ValueError(
            f"a {kind!r} grid needs t_start > {t_last:g} (the last model time of {form!r}); "
            f"got t_start={t_start}. Use t_start=form.t_max."
        )
    from_zero_alpha = not math.isfinite(float(form.logsnr(t_start)))
    if from_zero_alpha and intervals > 1:  # alpha = 0 (flow matching's t = 1): one step in t
        first = t_start - (t_start - t_last) / intervals
        rest = time_grid(form, steps - 1, kind, t_start=first, t_end=t_end, rho=rho)
        return _checked(torch.cat([torch.tensor([t_start], dtype=torch.float64), rest]), kind)
    if from_zero_alpha:
        return _checked(
            torch.tensor([t_start, t_last, t_end][: steps + 1], dtype=torch.float64), kind
        )
    lam_start, lam_last = float(form.logsnr(t_start)), float(form.logsnr(t_last))
    if kind == "logsnr":
        lam = torch.linspace(lam_start, lam_last, intervals + 1, dtype=torch.float64)
    else:
        s_start, s_last = (
            math.exp(-0.5 * lam_start) ** (1 / rho),
            math.exp(-0.5 * lam_last) ** (1 / rho),
        )
        s = torch.linspace(s_start, s_last, intervals + 1, dtype=torch.float64) ** rho
        lam = -2.0 * torch.log(s)
    grid = form.t_from_logsnr(lam)
    grid[0], grid[-1] = t_start, t_last
    if to_zero_sigma:
        grid = torch.cat([grid, torch.tensor([t_end], dtype=torch.float64)])
    return _checked(grid, kind)


def _explicit_grid(values: Sequence[float] | Tensor) -> Tensor:
    grid = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or len(grid) < 2 or not bool(torch.isfinite(grid).all()):
        raise ValueError(
            f"an explicit t_grid must be a 1-D sequence of at least 2 finite times, got {values!r}."
        )
    if float(grid.min()) < 0.0 or float(grid.max()) > 1.0:
        raise ValueError(
            f"explicit t_grid times must lie in [0, 1] (t = 0 data, t = 1 noise), got "
            f"[{float(grid.min()):.6g}, {float(grid.max()):.6g}]."
        )
    return _checked(grid, "explicit")


def _checked(grid: Tensor, kind: str) -> Tensor:
    steps = torch.diff(grid)
    if bool((steps >= 0).any()):
        k = int((steps >= 0).nonzero()[0, 0])
        raise ValueError(
            f"the {kind} t_grid must be strictly decreasing (from noise to data), but "
            f"t[{k}] = {float(grid[k]):.9g} <= t[{k + 1}] = {float(grid[k + 1]):.9g}. "
            "Reverse it or drop repeated times."
        )
    return grid


def scheduler_grid(scheduler: Any, form: Form, steps: int, t_end: float = 0.0) -> Tensor:
    """The times a diffusers scheduler visits in ``steps`` steps, as an explicit rectdiff grid.

    ``scheduler.set_timesteps(steps)`` is called and its timesteps are mapped to t with
    ``form.t_from_model_time`` (t = sigma for ``FlowMatchEulerDiscreteScheduler``, whose shift
    lives in these timesteps; t_n = (n + 1) / N for the DDPM family), followed by ``t_end``.
    Sampling ``form`` with ``solver="euler"`` (flow matching) or ``"ddim"`` (DDPM family) on
    this grid steps exactly where the stock scheduler steps.
    """
    scheduler.set_timesteps(steps)
    times = form.t_from_model_time(torch.as_tensor(scheduler.timesteps, dtype=torch.float64))
    return _checked(torch.cat([times, torch.tensor([t_end], dtype=torch.float64)]), "scheduler")
