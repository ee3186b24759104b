"""Figures of sampling trajectories: curvature, x0-prediction drift, quality against NFE, and
paths in x and in y = x / alpha."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .figures import DPI, FORMATS, T_LABEL, Curves, line_figure, save_figure  # noqa: E402

__all__ = ["plot_curvature", "plot_x0_drift", "plot_quality_vs_nfe", "plot_trajectories_xy"]


def plot_curvature(
    profiles: Curves,
    stem: str | Path,
    rectified_labels: Mapping[str, str] | Collection[str] = (),
    *,
    coords: str = "t",
    ylabel: str | None = None,
    logy: bool = False,
    log_floor: float | None = 1e-8,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Curvature against t for several forms in one figure (teacher dashed, rectified solid).

    Args:
        profiles: ``label -> (t, value)``, e.g. :func:`rectdiff.diagnostics.curvature_profile`.
        stem: output path without suffix (``.png``, ``.svg``, ``.csv`` are written).
        rectified_labels: see :func:`line_styles`.
        coords: the coordinates the profiles were computed in (``"t"`` or ``"y"``), for the title.
        ylabel: y-axis label; the default names the plotted quantity.
        logy: logarithmic y axis.
        log_floor: on a log axis, values below ``log_floor`` times the largest are drawn at
            that floor, so first-order (zero, up to rounding) curves show as a flat line at the
            bottom; None leaves them out.
        formats: the figure files written (default ``FORMATS``, PNG and SVG; or ``"pdf"``).
    """
    if ylabel is None:
        ylabel = r"$E\,\| (Z_1 - Z_0) - dZ/du \|^2$"
    where = "x against t" if coords == "t" else r"y = x/$\alpha$ against s = $\sigma/\alpha$"
    return line_figure(
        profiles,
        stem,
        xlabel=T_LABEL,
        ylabel=ylabel,
        rectified_labels=rectified_labels,
        logy=logy,
        log_floor=log_floor,
        title=f"Trajectory curvature along t, {where}",
        header=["t", "curvature"],
        formats=formats,
    )


def plot_x0_drift(
    curves: Curves,
    stem: str | Path,
    rectified_labels: Mapping[str, str] | Collection[str] = (),
    *,
    which: str = "x0",
    logy: bool = False,
    log_floor: float | None = 1e-8,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """How far the x0-prediction (or eps-prediction) is from its final value, along t.

    Args:
        curves: ``label -> (t, drift)``, e.g. ``first_order_deviation(traj, per_step=True)``.
        stem: output path without suffix.
        rectified_labels: see :func:`line_styles`.
        which: ``"x0"`` or ``"eps"``, for the labels.
        logy: logarithmic y axis.
        log_floor: as in :func:`plot_curvature`.
        formats: the figure files written (default ``FORMATS``, PNG and SVG; or ``"pdf"``).
    """
    ref = r"t_{end}" if which == "x0" else r"t_{start}"
    hat = r"\hat{x}_0" if which == "x0" else r"\hat{\epsilon}"
    ylabel = rf"$\sqrt{{E\|{hat}(t) - {hat}({ref})\|^2 \,/\, E\|{hat}({ref})\|^2}}$"
    return line_figure(
        curves,
        stem,
        xlabel=T_LABEL,
        ylabel=ylabel,
        rectified_labels=rectified_labels,
        logy=logy,
        log_floor=log_floor,
        title=f"{which}-prediction drift along the trajectory (0 = first-order)",
        header=["t", "drift"],
        formats=formats,
    )


def plot_quality_vs_nfe(
    results: Curves,
    stem: str | Path,
    metric_name: str,
    rectified_labels: Mapping[str, str] | Collection[str] = (),
    *,
    logy: bool = False,
    floor: tuple[float, float | None] | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Sample quality against the number of function evaluations (log2 NFE axis).

    Args:
        results: ``label -> (nfe list, metric list)``.
        stem: output path without suffix.
        metric_name: the metric's name, for the y axis (e.g. "sliced W2 (lower is better)").
        rectified_labels: see :func:`line_styles`.
        logy: logarithmic y axis.
        floor: ``(mean, std)`` of the metric's data floor (``metrics.data_floor``: the data
            itself scored like a model), drawn as a grey line with a ± std band.
        formats: the figure files written (default ``FORMATS``, PNG and SVG; or ``"pdf"``).
    """
    return line_figure(
        results,
        stem,
        xlabel="NFE (model evaluations)",
        ylabel=metric_name,
        rectified_labels=rectified_labels,
        title=f"{metric_name} against NFE",
        header=["nfe", metric_name],
        logx=True,
        logy=logy,
        markers=True,
        band=None if floor is None else ("data floor", *floor),
        formats=formats,
    )


def _y_window(
    y: np.ndarray, s: np.ndarray, s_view: float
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Square axis limits around the y points with s <= s_view (the far noise end of a path
    in y lies at s_max * eps, hundreds of units out; straight lines leave the frame)."""
    near = y[s <= s_view] if bool((s <= s_view).any()) else y
    points = near.reshape(-1, 2)
    lo, hi = points.min(0), points.max(0)
    centre, half = 0.5 * (lo + hi), 0.55 * float((hi - lo).max()) + 1e-9
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def _straightness_text(value: float) -> str:
    """A relative straightness below 1e-12 is float64 rounding of an exactly straight path."""
    return "0 (to rounding)" if abs(value) < 1e-12 else f"{value:.3g}"


def plot_trajectories_xy(
    trajs: Mapping[str, Any],
    stem: str | Path,
    *,
    max_paths: int = 48,
    s_view: float = 2.0,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """2-D sampling trajectories in x (left) and in y = x / alpha (right), one row per label.

    In y against s = sigma / alpha every first-order trajectory is the straight line
    ``y = x0 + s eps`` (Rectified Diffusion, Wang et al. 2024), whatever the form; in x it is
    straight only for flow matching. Each panel title gives the relative straightness
    (:func:`rectdiff.diagnostics.straightness` with ``relative=True``) in those coordinates.

    Args:
        trajs: ``label -> Trajectory`` with 2-D states ``x`` of shape (K+1, B, 2).
        stem: output path without suffix.
        max_paths: draw at most this many trajectories per row (all enter the straightness).
        s_view: the y panel shows the part of the paths with s <= s_view (straight lines
            continue out of the frame towards the noise end).
        formats: the figure files written (default ``FORMATS``, PNG and SVG; or ``"pdf"``).
    """
    from ..diagnostics import straightness

    fig, axes = plt.subplots(len(trajs), 2, figsize=(9.5, 4.3 * len(trajs)), squeeze=False, dpi=DPI)
    palette = plt.get_cmap("tab10").colors
    rows = []
    for r, (label, traj) in enumerate(trajs.items()):
        if traj.x.ndim != 3 or traj.x.shape[-1] != 2:
            raise ValueError(
                f"plot_trajectories_xy draws 2-D data; trajectory {label!r} has states of shape "
                f"{tuple(traj.x.shape)}, expected (K+1, B, 2)."
            )
        t = torch.as_tensor(traj.t).to("cpu", torch.float64)
        alpha, sigma = traj.form.alpha(t).numpy(), traj.form.sigma(t).numpy()
        x = traj.x[:, :max_paths].detach().to("cpu", torch.float64).numpy()
        y, s = x / alpha[:, None, None], sigma / alpha
        bent = {c: float(straightness(traj, coords=c, relative=True)) for c in ("t", "y")}
        colour = palette[r % len(palette)]
        for col, (points, name) in enumerate(((x, "x_t"), (y, r"y = x_t / \alpha_t"))):
            ax = axes[r, col]
            ax.plot(points[:, :, 0], points[:, :, 1], color=colour, linewidth=0.8, alpha=0.55)
            ax.scatter(
                points[-1, :, 0], points[-1, :, 1], s=10, color=colour, zorder=3, label="sample"
            )
            if col == 0:
                ax.scatter(
                    points[0, :, 0],
                    points[0, :, 1],
                    s=6,
                    color="0.55",
                    zorder=2,
                    label="noise start",
                )
            else:
                (xlim, ylim) = _y_window(
                    points, np.broadcast_to(s[:, None], points.shape[:2]), s_view
                )
                ax.set_xlim(*xlim)
                ax.set_ylim(*ylim)
            ax.set_aspect("equal", adjustable="datalim" if col == 0 else "box")
            coord = "t" if col == 0 else "y"
            ax.set_title(
                f"{label}: ${name}$   (relative straightness {_straightness_text(bent[coord])})",
                fontsize=10,
            )
            ax.set_xlabel("dimension 1")
            ax.set_ylabel("dimension 2")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        if math.isfinite(s_view):
            axes[r, 1].text(
                0.02,
                0.02,
                rf"view: $s = \sigma/\alpha \leq {s_view:g}$",
                transform=axes[r, 1].transAxes,
                fontsize=8,
                color="0.3",
            )
        rows += [
            [label, b, k, f"{float(t[k]):.8g}", *(f"{v:.8g}" for v in (*x[k, b], *y[k, b]))]
            for b in range(x.shape[1])
            for k in range(x.shape[0])
        ]
    fig.tight_layout()
    header = ["label", "path", "step", "t", "x_1", "x_2", "y_1", "y_2"]
    return save_figure(fig, stem, header, rows, formats)


# --- samples ---------------------------------------------------------------------------------
