"""Figures of forms: alpha, sigma and logsnr against t, and implied weightings over logsnr."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..forms import Form  # noqa: E402
from .figures import DPI, FORMATS, Curves, line_figure, numbers, save_figure, write_csv  # noqa: E402

__all__ = ["plot_schedules", "plot_implied_weighting"]


def plot_schedules(
    forms: Mapping[str, Form], stem: str | Path, points: int = 201,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:  # fmt: skip
    """alpha_t, sigma_t and logsnr(t) of several forms, side by side.

    Each curve is drawn over the form's safe range ``[t_min, t_max]`` (logsnr is infinite at
    the ends of some forms).
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=DPI)
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
    return save_figure(fig, stem, ["form", "t", "alpha", "sigma", "logsnr"], rows, formats)


# --- line figures: curvature, x0 drift, quality vs NFE, implied weighting ----------------------


def plot_implied_weighting(
    curves: Curves, stem: str | Path, *, normalize: bool = True, logy: bool = True,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:  # fmt: skip
    """The eps-MSE weight over logsnr that each training set-up implies (Kingma & Gao 2023).

    Args:
        curves: ``label -> (logsnr, weight)``, e.g. from ``timesteps.implied_weighting``.
        stem: output path without suffix.
        normalize: divide each curve by its maximum, so shapes compare (the CSV keeps raw values).
        logy: logarithmic y axis (zeros, outside a form's logsnr range, are not drawn).
        formats: the figure files written (default ``FORMATS``, PNG and SVG; or ``"pdf"``).
    """
    if normalize:
        shown = {}
        for label, (lam, w) in curves.items():
            w = numbers(w)
            peak = float(np.max(w)) if w.size else 0.0
            shown[label] = (lam, w / peak if peak > 0 else w)
    else:
        shown = dict(curves)
    paths = line_figure(
        shown,
        stem,
        xlabel=r"logSNR $\lambda = \log \alpha_t^2 / \sigma_t^2$",
        ylabel=r"$w(\lambda)$" + (" / max" if normalize else ""),
        title="Implied weighting of the eps-MSE over logSNR",
        header=["logsnr", "weight"],
        logy=logy,
        formats=formats,
    )
    if normalize:  # the CSV holds the raw weights
        rows = [
            [label, False, f"{x:.10g}", f"{y:.10g}"]
            for label, (lam, w) in curves.items()
            for x, y in zip(numbers(lam), numbers(w), strict=True)
        ]
        write_csv(Path(stem).with_suffix(".csv"), ["label", "rectified", "logsnr", "weight"], rows)
    return paths


# --- 2-D trajectories in x and in y = x / alpha -----------------------------------------------
