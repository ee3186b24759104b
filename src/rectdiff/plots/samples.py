"""Sample figures: 2-D scatter plots, or image grids for image data."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from .figures import DPI, FORMATS, save_figure  # noqa: E402

__all__ = ["image_grid", "plot_samples"]


def image_grid(images: np.ndarray, columns: int, lo: float, hi: float) -> np.ndarray:
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


def _dots(ax: Any, points: np.ndarray, color: str, label: str) -> None:
    """Thousands of same-size dots: one marker line (several times faster to draw than a
    scatter's path collection), rasterized inside an SVG (its axes and text stay vectors)."""
    ax.plot(points[:, 0], points[:, 1], linestyle="none", marker="o", markersize=1.7,
            markeredgewidth=0, color=color, label=label, rasterized=True)  # fmt: skip


def plot_samples(
    samples: Mapping[str, Tensor],
    stem: str | Path,
    reference: Tensor | None = None,
    *,
    max_points: int = 2000,
    max_images: int = 36,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Samples side by side: scatter plots for 2-D points, image mosaics for (N, C, H, W).

    Args:
        samples: ``label -> (N, 2)`` points or ``(N, C, H, W)`` images (C = 1 or 3).
        stem: output path without suffix.
        reference: data drawn in grey behind each scatter (2-D), or as a first mosaic (images).
        max_points: points per scatter; max_images: images per mosaic.
        formats: the figure files written (default ``FORMATS``, PNG and SVG; or ``"pdf"``).
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
    fig, axes = plt.subplots(
        1, len(arrays), figsize=(4.2 * len(arrays), 4.4), squeeze=False, dpi=DPI
    )
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
                _dots(ax, ref, "0.8", "data (reference)")
            _dots(ax, pts, "C0" if label != "data (reference)" else "0.3", label)
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
            grid = image_grid(imgs, math.ceil(math.sqrt(len(imgs))), *pixel_range)
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
    return save_figure(fig, stem, header, rows, formats)
