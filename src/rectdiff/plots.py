"""Matplotlib figures. Every figure is saved as PNG and SVG next to a CSV of the numbers it draws.

Figures that compare a teacher with its rectified student share one convention: the same
colour per form, the teacher dashed and the rectified model solid (``rectified_labels``).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ._files import write_text_atomic  # noqa: E402
from .forms import Form  # noqa: E402

__all__ = [
    "save_figure",
    "write_csv",
    "plot_schedules",
    "line_styles",
    "plot_curvature",
    "plot_x0_drift",
    "plot_quality_vs_nfe",
    "plot_implied_weighting",
    "plot_trajectories_xy",
    "plot_samples",
]

T_LABEL = "t   (0 = data, 1 = noise)"
Curves = Mapping[str, tuple[Any, Any]]


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write rows to ``path`` atomically (temporary name, then rename)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def save_figure(
    fig: plt.Figure,
    stem: str | Path,
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Save ``fig`` as ``stem.png``/``stem.svg`` and its numbers as ``stem.csv``; close it.

    Returns:
        The paths written, figure formats first, CSV last.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        tmp = path.with_name(f".{path.stem}.tmp.{fmt}")
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=fmt)
        os.replace(tmp, path)
        written.append(path)
    plt.close(fig)
    written.append(write_csv(stem.with_suffix(".csv"), header, rows))
    return written


def plot_schedules(forms: Mapping[str, Form], stem: str | Path, points: int = 201) -> list[Path]:
    """alpha_t, sigma_t and logsnr(t) of several forms, side by side.

    Each curve is drawn over the form's safe range ``[t_min, t_max]`` (logsnr is infinite at
    the ends of some forms).
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = []
    for label, form in forms.items():
        t = torch.linspace(form.t_min, form.t_max, points, dtype=torch.float64)
        alpha, sigma, logsnr = form.alpha(t), form.sigma(t), form.logsnr(t)
        axes[0].plot(t, alpha, label=label)
        axes[1].plot(t, sigma, label=label)
        axes[2].plot(t, logsnr, label=label)
        rows += [
            [label, f"{a:.6g}", f"{b:.10g}", f"{c:.10g}", f"{d:.10g}"]
            for a, b, c, d in zip(
                t.tolist(), alpha.tolist(), sigma.tolist(), logsnr.tolist(), strict=True
            )
        ]
    axes[1].set_yscale("log")
    titles = (
        r"$\alpha_t$ (signal)",
        r"$\sigma_t$ (noise, log scale)",
        r"logSNR $= \log \alpha_t^2/\sigma_t^2$",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("t   (0 = data, 1 = noise)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, ncol=2)
    fig.suptitle("Diffusion forms: x_t = alpha_t x0 + sigma_t eps")
    fig.tight_layout()
    return save_figure(fig, stem, ["form", "t", "alpha", "sigma", "logsnr"], rows)


# --- line figures: curvature, x0 drift, quality vs NFE, implied weighting ----------------------


def _numbers(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def line_styles(
    labels: Sequence[str], rectified_labels: Mapping[str, str] | Collection[str] = ()
) -> dict[str, tuple[Any, str]]:
    """``label -> (colour, linestyle)``: one colour per form, teacher dashed, rectified solid.

    Args:
        labels: the curves, in drawing order.
        rectified_labels: the labels of rectified models. A mapping ``rectified -> teacher``
            gives each rectified curve its teacher's colour; with a plain collection the
            teacher is the longest other label that the rectified label starts with (``"vp"``
            for ``"vp rectified"``). Without rectified labels every curve is solid.
    """
    rectified = set(rectified_labels)
    teachers = [label for label in labels if label not in rectified]

    def group(label: str) -> str:
        if label not in rectified:
            return label
        if isinstance(rectified_labels, Mapping):
            return rectified_labels[label]
        prefixes = [t for t in teachers if label.startswith(t)]
        return max(prefixes, key=len) if prefixes else label

    groups = list(dict.fromkeys(group(label) for label in labels))
    palette = plt.get_cmap("tab10").colors
    colour = {g: palette[i % len(palette)] for i, g in enumerate(groups)}
    dashed = "--" if rectified else "-"
    return {
        label: (colour[group(label)], "-" if label in rectified else dashed) for label in labels
    }


def _line_figure(
    curves: Curves,
    stem: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    header: Sequence[str],
    rectified_labels: Mapping[str, str] | Collection[str] = (),
    logx: bool = False,
    logy: bool = False,
    log_floor: float | None = None,
    markers: bool = False,
) -> list[Path]:
    """One panel of labelled curves. On a log axis, values <= 0 are not drawn, or, with
    ``log_floor``, values below ``log_floor * max`` are drawn at that floor (so exact zeros,
    up to rounding, show as a flat line at the bottom)."""
    data = {label: (_numbers(xs), _numbers(ys)) for label, (xs, ys) in curves.items()}
    for label, (xs, ys) in data.items():
        if xs.shape != ys.shape:
            raise ValueError(
                f"curve {label!r}: x has {xs.size} values but y has {ys.size}; pass arrays of "
                "equal length."
            )
    positive = [float(ys[ys > 0].max()) for _, ys in data.values() if (ys > 0).any()]
    floor = log_floor * max(positive) if logy and log_floor is not None and positive else None
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    styles = line_styles(list(curves), rectified_labels)
    rows = []
    for label, (xs, ys) in data.items():
        colour, linestyle = styles[label]
        if floor is not None:
            shown = np.maximum(ys, floor)
        else:
            shown = np.where(ys > 0, ys, np.nan) if logy else ys  # log axes cannot show zeros
        ax.plot(
            xs,
            shown,
            color=colour,
            linestyle=linestyle,
            linewidth=1.8,
            label=label,
            marker="o" if markers else None,
            markersize=4,
        )
        rows += [
            [label, label in set(rectified_labels), f"{x:.10g}", f"{y:.10g}"]
            for x, y in zip(xs, ys, strict=True)
        ]
    if logx:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if logy:
        ax.set_yscale("log")
    if floor is not None:
        ax.set_ylim(bottom=floor / 3)
        ax.text(
            0.01,
            0.01,
            f"values below {floor:.1e} (= {log_floor:g} x max) drawn at that floor",
            transform=ax.transAxes,
            fontsize=7,
            color="0.35",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="major")
    if logy:
        ax.grid(alpha=0.08, which="minor")
    # long handles so that dashed (teacher) and solid (rectified) lines differ in the legend
    ax.legend(fontsize=8, ncol=2 if len(curves) > 5 else 1, handlelength=4)
    fig.tight_layout()
    return save_figure(fig, stem, ["label", "rectified", *header], rows)


def plot_curvature(
    profiles: Curves,
    stem: str | Path,
    rectified_labels: Mapping[str, str] | Collection[str] = (),
    *,
    coords: str = "t",
    ylabel: str | None = None,
    logy: bool = False,
    log_floor: float | None = 1e-8,
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
    """
    if ylabel is None:
        ylabel = r"$E\,\| (Z_1 - Z_0) - dZ/du \|^2$"
    where = "x against t" if coords == "t" else r"y = x/$\alpha$ against s = $\sigma/\alpha$"
    return _line_figure(
        profiles,
        stem,
        xlabel=T_LABEL,
        ylabel=ylabel,
        rectified_labels=rectified_labels,
        logy=logy,
        log_floor=log_floor,
        title=f"Trajectory curvature along t, {where}",
        header=["t", "curvature"],
    )


def plot_x0_drift(
    curves: Curves,
    stem: str | Path,
    rectified_labels: Mapping[str, str] | Collection[str] = (),
    *,
    which: str = "x0",
    logy: bool = False,
    log_floor: float | None = 1e-8,
) -> list[Path]:
    """How far the x0-prediction (or eps-prediction) is from its final value, along t.

    Args:
        curves: ``label -> (t, drift)``, e.g. ``first_order_deviation(traj, per_step=True)``.
        stem: output path without suffix.
        rectified_labels: see :func:`line_styles`.
        which: ``"x0"`` or ``"eps"``, for the labels.
        logy: logarithmic y axis.
        log_floor: as in :func:`plot_curvature`.
    """
    ref = r"t_{end}" if which == "x0" else r"t_{start}"
    hat = r"\hat{x}_0" if which == "x0" else r"\hat{\epsilon}"
    ylabel = rf"$\sqrt{{E\|{hat}(t) - {hat}({ref})\|^2 \,/\, E\|{hat}({ref})\|^2}}$"
    return _line_figure(
        curves,
        stem,
        xlabel=T_LABEL,
        ylabel=ylabel,
        rectified_labels=rectified_labels,
        logy=logy,
        log_floor=log_floor,
        title=f"{which}-prediction drift along the trajectory (0 = first-order)",
        header=["t", "drift"],
    )


def plot_quality_vs_nfe(
    results: Curves,
    stem: str | Path,
    metric_name: str,
    rectified_labels: Mapping[str, str] | Collection[str] = (),
    *,
    logy: bool = False,
) -> list[Path]:
    """Sample quality against the number of function evaluations (log2 NFE axis).

    Args:
        results: ``label -> (nfe list, metric list)``.
        stem: output path without suffix.
        metric_name: the metric's name, for the y axis (e.g. "sliced W2 (lower is better)").
        rectified_labels: see :func:`line_styles`.
        logy: logarithmic y axis.
    """
    return _line_figure(
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
    )


def plot_implied_weighting(
    curves: Curves, stem: str | Path, *, normalize: bool = True, logy: bool = True
) -> list[Path]:
    """The eps-MSE weight over logsnr that each training set-up implies (Kingma & Gao 2023).

    Args:
        curves: ``label -> (logsnr, weight)``, e.g. from ``timesteps.implied_weighting``.
        stem: output path without suffix.
        normalize: divide each curve by its maximum, so shapes compare (the CSV keeps raw values).
        logy: logarithmic y axis (zeros, outside a form's logsnr range, are not drawn).
    """
    if normalize:
        shown = {}
        for label, (lam, w) in curves.items():
            w = _numbers(w)
            peak = float(np.max(w)) if w.size else 0.0
            shown[label] = (lam, w / peak if peak > 0 else w)
    else:
        shown = dict(curves)
    paths = _line_figure(
        shown,
        stem,
        xlabel=r"logSNR $\lambda = \log \alpha_t^2 / \sigma_t^2$",
        ylabel=r"$w(\lambda)$" + (" / max" if normalize else ""),
        title="Implied weighting of the eps-MSE over logSNR",
        header=["logsnr", "weight"],
        logy=logy,
    )
    if normalize:  # the CSV holds the raw weights
        rows = [
            [label, False, f"{x:.10g}", f"{y:.10g}"]
            for label, (lam, w) in curves.items()
            for x, y in zip(_numbers(lam), _numbers(w), strict=True)
        ]
        write_csv(Path(stem).with_suffix(".csv"), ["label", "rectified", "logsnr", "weight"], rows)
    return paths


# --- 2-D trajectories in x and in y = x / alpha -----------------------------------------------


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
    """
    from .diagnostics import straightness

    fig, axes = plt.subplots(len(trajs), 2, figsize=(9.5, 4.3 * len(trajs)), squeeze=False)
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
    return save_figure(fig, stem, ["label", "path", "step", "t", "x_1", "x_2", "y_1", "y_2"], rows)


# --- samples ---------------------------------------------------------------------------------


def _image_grid(images: np.ndarray, columns: int, lo: float, hi: float) -> np.ndarray:
    """(N, C, H, W) -> one mosaic (rows*(H+1)-1, columns*(W+1)-1, C) with 1-pixel white gaps,
    pixel values mapped from [lo, hi] to [0, 1] and clipped."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    images = np.clip((images - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(images)
    grid = np.ones((rows * (h + 1) - 1, columns * (w + 1) - 1, c))
    for i in range(n):
        r, q = divmod(i, columns)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = images[i].transpose(
            1, 2, 0
        )
    return grid


def plot_samples(
    samples: Mapping[str, Tensor],
    stem: str | Path,
    reference: Tensor | None = None,
    *,
    max_points: int = 2000,
    max_images: int = 36,
) -> list[Path]:
    """Samples side by side: scatter plots for 2-D points, image mosaics for (N, C, H, W).

    Args:
        samples: ``label -> (N, 2)`` points or ``(N, C, H, W)`` images (C = 1 or 3).
        stem: output path without suffix.
        reference: data drawn in grey behind each scatter (2-D), or as a first mosaic (images).
        max_points: points per scatter; max_images: images per mosaic.
    """
    panels = ({"data (reference)": reference} if reference is not None else {}) | dict(samples)
    arrays = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in panels.items()}
    shapes = {a.shape[1:] for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(
            f"all samples must share one shape per item, got {sorted(map(tuple, shapes))}."
        )
    shape = shapes.pop()
    is_points = shape == (2,)
    if not is_points and not (len(shape) == 3 and shape[0] in (1, 3)):
        raise ValueError(
            f"plot_samples draws (N, 2) points or (N, C, H, W) images with C in (1, 3); got "
            f"items of shape {shape}."
        )
    fig, axes = plt.subplots(1, len(arrays), figsize=(4.2 * len(arrays), 4.4), squeeze=False)
    rows: list[list[Any]] = []
    if is_points:
        everything = np.concatenate([a[:max_points] for a in arrays.values()])
        lo, hi = np.percentile(everything, 0.5, axis=0), np.percentile(everything, 99.5, axis=0)
        pad = 0.08 * (hi - lo)
    else:  # one grey scale for every mosaic: the reference's range, else the common range
        scale = (
            arrays["data (reference)"]
            if reference is not None
            else np.concatenate(list(arrays.values()))
        )
        pixel_range = (float(scale.min()), float(scale.max()))
    for ax, (label, values) in zip(axes[0], arrays.items(), strict=True):
        if is_points:
            pts = values[:max_points]
            if reference is not None and label != "data (reference)":
                ref = arrays["data (reference)"][:max_points]
                ax.scatter(ref[:, 0], ref[:, 1], s=3, color="0.8", label="data (reference)")
            ax.scatter(
                pts[:, 0],
                pts[:, 1],
                s=3,
                color="C0" if label != "data (reference)" else "0.3",
                label=label,
            )
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_aspect("equal", adjustable="box")
            ax.set_xlabel("dimension 1")
            ax.set_ylabel("dimension 2")
            ax.grid(alpha=0.3)
            if reference is not None and label != "data (reference)":
                ax.legend(fontsize=7, loc="upper right", markerscale=3)
            rows += [[label, i, f"{p[0]:.8g}", f"{p[1]:.8g}"] for i, p in enumerate(pts)]
        else:
            imgs = values[:max_images]
            grid = _image_grid(imgs, math.ceil(math.sqrt(len(imgs))), *pixel_range)
            ax.imshow(
                grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            rows += [
                [label, i, *(f"{v:.6g}" for v in img.reshape(-1))] for i, img in enumerate(imgs)
            ]
        ax.set_title(label, fontsize=10)
    header = (
        ["label", "index", "x_1", "x_2"]
        if is_points
        else ["label", "index", "pixels (C, H, W) flattened"]
    )
    fig.tight_layout()
    return save_figure(fig, stem, header, rows)
