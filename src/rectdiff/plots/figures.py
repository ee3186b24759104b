"""Shared figure machinery: every figure is saved as PNG and SVG next to a CSV of its numbers.

Figures that compare a teacher with its rectified student share one convention: the same
colour per form, the teacher dashed and the rectified model solid (``rectified_labels``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from ..io.files import atomic_path, write_text_atomic  # noqa: E402

__all__ = ["T_LABEL", "Curves", "FORMATS", "FIGURE_FORMATS", "write_csv", "save_figure", "numbers",
           "line_styles", "line_figure"]  # fmt: skip

T_LABEL = "t   (0 = data, 1 = noise)"
Curves = Mapping[str, tuple[Any, Any]]
#: the figure files every plot writes by default, and the formats it can write
FORMATS = ("png", "svg")
FIGURE_FORMATS = ("png", "svg", "pdf")
#: the resolution figures are laid out and saved at: one dpi for both, so that matplotlib
#: lays out each mathtext label (log-axis ticks, formulas) once, not once per dpi
DPI = 150


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
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Save ``fig`` as ``stem.png``/``stem.svg`` (``formats``) and its numbers as ``stem.csv``;
    close it.

    Returns:
        The paths written, figure formats first, CSV last.
    """
    unknown = [fmt for fmt in formats if fmt not in FIGURE_FORMATS]
    if unknown or not formats:
        plt.close(fig)
        raise ValueError(
            f"figure formats {list(formats)!r}: expected one or more of {list(FIGURE_FORMATS)}."
        )
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=fmt)
        written.append(path)
    plt.close(fig)
    written.append(write_csv(stem.with_suffix(".csv"), header, rows))
    return written


def numbers(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def line_styles(
    labels: Sequence[str], rectified_labels: Mapping[str, str] | Collection[str] = ()
) -> dict[str, tuple[Any, str]]:
    """``label -> (colour, linestyle)``: one colour per form, teacher dashed, rectified solid;
    a group's further students (e.g. "vp phased" after "vp rectified") dotted, then dash-dot.

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
    students = ("-", ":", "-.")
    seen: dict[str, int] = {}
    styles = {}
    for label in labels:
        if label in rectified:
            k = seen[group(label)] = seen.get(group(label), -1) + 1
            styles[label] = (colour[group(label)], students[k % len(students)])
        else:
            styles[label] = (colour[group(label)], dashed)
    return styles


def line_figure(
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
    band: tuple[str, float, float | None] | None = None,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """One panel of labelled curves. On a log axis, values <= 0 are not drawn, or, with
    ``log_floor``, values below ``log_floor * max`` are drawn at that floor (so exact zeros,
    up to rounding, show as a flat line at the bottom). ``band = (label, centre, half_width)``
    draws a grey horizontal line at ``centre`` and, with a half width, the band around it
    (e.g. a metric's data floor, mean ± one standard deviation)."""
    data = {label: (numbers(xs), numbers(ys)) for label, (xs, ys) in curves.items()}
    for label, (xs, ys) in data.items():
        if xs.shape != ys.shape:
            raise ValueError(
                f"curve {label!r}: x has {xs.size} values but y has {ys.size}; pass arrays of "
                "equal length."
            )
    positive = [float(ys[ys > 0].max()) for _, ys in data.values() if (ys > 0).any()]
    floor = log_floor * max(positive) if logy and log_floor is not None and positive else None
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=DPI)
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
    if band is not None:
        _draw_band(ax, *band)
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
    return save_figure(fig, stem, ["label", "rectified", *header], rows, formats)


def _draw_band(ax: Any, label: str, centre: float, half_width: float | None) -> None:
    if half_width:
        lower = centre - half_width
        lower = lower if lower > 0 else 1e-3 * centre  # a log axis shows no values <= 0
        ax.axhspan(lower, centre + half_width, color="0.5", alpha=0.15, linewidth=0)
        label = f"{label} (± 1 std)"
    ax.axhline(centre, color="0.35", linestyle=":", linewidth=1.4, label=label)
