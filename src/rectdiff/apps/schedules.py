"""``rectdiff schedules``: alpha, sigma and logsnr of every form preset, tabulated and drawn."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .. import forms, plots
from ..io.files import write_text_atomic

__all__ = ["schedule_table", "write_schedules"]


def schedule_table(ts: tuple[float, ...] | None = None) -> str:
    """``forms.preset_table`` as a Markdown table (at its default times when ``ts`` is None)."""
    rows = forms.preset_table() if ts is None else forms.preset_table(tuple(ts))
    lines = ["| preset | t | alpha | sigma | logsnr |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['preset']} | {r['t']:.4g} | {r['alpha']:.6g} | {r['sigma']:.6g} | {r['logsnr']:.4f} |"
        for r in rows
    ]
    return "\n".join(lines)


def write_schedules(
    out: str | os.PathLike[str], ts: tuple[float, ...] | None = None
) -> tuple[str, list[Path]]:
    """Write ``schedules.md`` (:func:`schedule_table`) and the schedule plots into ``out``.

    Returns:
        ``(table, written files)``, ``schedules.md`` first.
    """
    out = Path(out)
    table = schedule_table(ts)
    created = not out.exists()
    try:
        written = [write_text_atomic(out / "schedules.md", table + "\n")]
        presets = {n: forms.load(n) for n in forms.presets()}
        written += plots.plot_schedules(presets, out / "schedules")
    except BaseException:
        if created:  # a failed write (a full disk) leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return table, written
