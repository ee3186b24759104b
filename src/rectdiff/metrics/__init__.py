"""Sample-quality distances (one METRICS registry) and the digits classifier behind two of them.

distances   sliced / exact W2, MMD, energy distance, Frechet distances, METRICS, compute_metrics
digits      a small classifier on sklearn's 8x8 digits: features, accuracy, class entropy
floor       data_floor: each metric between disjoint data sets and the held-out set
"""

from __future__ import annotations

from .digits import *  # noqa: F403
from .distances import *  # noqa: F403
from .floor import *  # noqa: F403
