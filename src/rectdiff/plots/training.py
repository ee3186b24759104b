"""Training curves from loss logs (``out_dir/loss_log.csv``, :mod:`rectdiff.training.loss_log`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from ..training.loss_log import COLUMNS, read_loss_log
from .figures import DPI, plt, save_figure

__all__ = ["plot_loss_logs"]

#: the panels drawn: column, axis label, log scale
_PANELS = (("loss", "loss (mean since the previous row)", True), ("lr", "learning rate", False),
           ("grad_norm", "gradient norm (before clipping)", True),
           ("ess", "ESS of the loss weights", False))  # fmt: skip


def _label(path: Path, others: Sequence[Path]) -> str:
    """The run's folder name (a rectify run's ``OUT.train``), or the file name if shared."""
    names = [p.parent.name for p in others]
    return path.parent.name if names.count(path.parent.name) == 1 else str(path)


def plot_loss_logs(
    paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]
) -> list[Path]:
    """Draw loss, learning rate, gradient norm and ESS against the step for each loss log.

    Args:
        paths: loss logs (``loss_log.csv`` files, or the run folders holding them).
        out: the figure folder; writes ``loss_log.png``/``.svg`` and ``loss_log.csv`` (every
            log's rows, with a ``run`` column).

    Raises:
        DataError: a file that is missing, not a loss log, or holds no complete row.
    """
    files = [Path(p) / "loss_log.csv" if Path(p).is_dir() else Path(p) for p in paths]
    logs = {}
    for path in files:
        try:
            log = read_loss_log(path)
        except OSError as err:
            raise DataError(f"cannot read loss log {str(path)!r}: {err.strerror}.") from None
        except ValueError as err:
            raise DataError(str(err)) from None
        if not log["step"]:
            raise DataError(f"loss log {str(path)!r} holds no complete row yet.")
        logs[_label(path, files)] = log
    panels = [p for p in _PANELS if any(not all(map(math.isnan, g[p[0]])) for g in logs.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False, dpi=DPI)
    for ax, (column, title, log_scale) in zip(axes[0], panels, strict=True):
        for label, log in logs.items():
            ax.plot(log["step"], log[column], label=label)
        if log_scale and all(v > 0 for g in logs.values() for v in g[column] if not math.isnan(v)):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
    if len(logs) > 1:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    rows = [[label, *(log[c][i] for c in COLUMNS)] for label, log in logs.items()
            for i in range(len(log["step"]))]  # fmt: skip
    return save_figure(fig, Path(out) / "loss_log", ["run", *COLUMNS], rows)
