"""Matplotlib figures. Every figure is saved as PNG and SVG next to a CSV of the numbers it draws."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .forms import Form  # noqa: E402

__all__ = ["save_figure", "write_csv", "plot_schedules"]


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Write rows to ``path`` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


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
            for a, b, c, d in zip(t.tolist(), alpha.tolist(), sigma.tolist(), logsnr.tolist())
        ]
    axes[1].set_yscale("log")
    titles = (r"$\alpha_t$ (signal)", r"$\sigma_t$ (noise, log scale)", r"logSNR $= \log \alpha_t^2/\sigma_t^2$")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("t   (0 = data, 1 = noise)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, ncol=2)
    fig.suptitle("Diffusion forms: x_t = alpha_t x0 + sigma_t eps")
    fig.tight_layout()
    return save_figure(fig, stem, ["form", "t", "alpha", "sigma", "logsnr"], rows)
