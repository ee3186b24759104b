"""The CSV loss log a training run keeps beside its checkpoints: ``out_dir/loss_log.csv``.

One row per logged step (every ``log_every`` steps and the last)::

    step,loss,lr,grad_norm,ess,seconds

``loss`` is the mean training loss over the steps since the previous row, ``lr`` the learning
rate that step's optimizer update used, ``grad_norm`` the step's total gradient 2-norm before
clipping, ``ess`` the mean effective sample size of the loss weights over those steps (1 for
an unweighted loss; empty for a custom loss function), ``seconds`` the wall time since
training began (added up over resumed runs).

A row is appended in one write once its step is done, so a killed run leaves at most a
partial last line; a resumed run first rewrites the log (atomically) with the complete rows
up to its checkpoint's step, so the log never holds steps twice or steps the weights do not
include. :func:`read_loss_log` reads it back (and skips a partial last line).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from ..io.files import write_text_atomic

__all__ = ["COLUMNS", "LOSS_LOG", "LossLog", "read_loss_log"]

#: the log's file name inside a run's ``out_dir``
LOSS_LOG = "loss_log.csv"
#: its columns, in order
COLUMNS = ("step", "loss", "lr", "grad_norm", "ess", "seconds")


def _rows(path: Path) -> list[dict[str, float]]:
    """The complete rows of ``path`` (a partial or malformed line is skipped)."""
    rows = []
    with open(path, newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(
                f"{path} is not a rectdiff loss log: its header is {header!r}, expected "
                f"{','.join(COLUMNS)}."
            )
        for line in reader:
            if len(line) != len(COLUMNS):
                continue
            try:
                rows.append(
                    {k: float(v) if v else math.nan for k, v in zip(COLUMNS, line, strict=True)}
                )
            except ValueError:
                continue
    return rows


def read_loss_log(path: str | os.PathLike[str]) -> dict[str, list[float]]:
    """The columns of a loss log: ``{"step": [...], "loss": [...], ...}`` (NaN where empty)."""
    rows = _rows(Path(path))
    return {name: [row[name] for row in rows] for name in COLUMNS}


def _format(value: float | None) -> str:
    return (
        "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.9g}"
    )


class LossLog:
    """Appends rows to ``path``; a run resumed at ``start_step`` keeps the rows up to it.

    Args:
        path: the CSV file (created, or rewritten with its kept rows).
        start_step: the step training starts from (0 for a fresh run).
    """

    def __init__(self, path: str | os.PathLike[str], start_step: int = 0) -> None:
        self.path = Path(path)
        kept = []
        if start_step > 0 and self.path.is_file():
            try:
                kept = [r for r in _rows(self.path) if r["step"] <= start_step]
            except ValueError:  # not a loss log: start it over
                kept = []
        self.seconds_before = kept[-1]["seconds"] if kept else 0.0
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in kept:
            writer.writerow([int(row["step"])] + [_format(row[k]) for k in COLUMNS[1:]])
        write_text_atomic(self.path, buffer.getvalue())

    def append(
        self, step: int, losses: list[float], lr: float, grad_norm: float, ess: list[float],
        seconds: float,
    ) -> dict[str, float]:  # fmt: skip
        """Add the row of ``step``: the mean of ``losses`` and of ``ess`` (the steps since the
        previous row; ``ess`` empty or misaligned: none), ``seconds`` of this run (the earlier
        runs' are added). Returns the row's finite numbers but the step, for a tracker."""
        mean_ess = sum(ess) / len(ess) if ess and len(ess) == len(losses) else None
        values = (sum(losses) / len(losses), lr, grad_norm, mean_ess, self.seconds_before + seconds)
        line = ",".join([str(int(step)), *(_format(v) for v in values)]) + "\n"
        with open(self.path, "a") as file:
            file.write(line)
        return {k: float(v) for k, v in zip(COLUMNS[1:], values, strict=True)
                if v is not None and math.isfinite(v)}  # fmt: skip
