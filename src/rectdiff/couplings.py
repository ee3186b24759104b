"""``rectdiff.couplings``: the name pair generation had before 0.2; see :mod:`rectdiff.rectify`."""

from __future__ import annotations

from .rectify.pairs import *  # noqa: F403
from .rectify.pairs import __all__  # noqa: F401
