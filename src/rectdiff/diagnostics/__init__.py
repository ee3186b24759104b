"""diagnostics"""

from __future__ import annotations

from .core import *  # noqa: F403
