"""Where the shipped data files live: ``schedules/`` presets and ``experiments/`` configs.

A wheel carries them inside the package (``rectdiff/_data/schedules``,
``rectdiff/_data/experiments``; see ``setup.py``); a source checkout or an editable install
reads them from the repository root, where they are edited.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["data_dir"]

_PACKAGE = Path(__file__).resolve().parents[1]


def data_dir(name: str) -> Path:
    """The folder ``name`` (``"schedules"`` or ``"experiments"``), packaged copy first."""
    packaged = _PACKAGE / "_data" / name
    if packaged.is_dir():
        return packaged
    return _PACKAGE.parents[1] / name
