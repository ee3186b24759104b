"""The data floor of a sample-quality distance: what it gives two samples of the data itself.

A distance between n generated samples and n held-out points is not zero for a perfect model:
two independent samples of the same distribution are apart too, by an amount that shrinks
slowly with n (for a mixture, mostly from how many points each mode happens to get). The
floor is that amount, measured: each of k disjoint sets of n data points (drawn independently
of the held-out set, e.g. the training data) scored against the held-out set like a model's
samples,

    floor = mean_j d(data_j, reference),   spread = std_j d(data_j, reference),

the sample standard deviation over the k sets. A model at the floor is indistinguishable from
the data by that metric at that n; two models less than about one spread apart are not
resolved by it (the spread is that of fresh data sets, the resampling that Efron &
Tibshirani's bootstrap imitates when no fresh data is at hand: "An Introduction to the
Bootstrap", 1993, ch. 6).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from .distances import ArrayLike, compute_metrics

__all__ = ["data_floor"]


def data_floor(
    names: str | Sequence[str],
    data: ArrayLike,
    reference: ArrayLike,
    n: int,
    *,
    max_sets: int = 4,
    seed: int = 0,
    **opts: Mapping[str, Any],
) -> dict[str, Any]:
    """The named metrics between disjoint sets of ``n`` consecutive rows of ``data`` and
    ``reference`` (:func:`~rectdiff.metrics.compute_metrics`, with ``seed`` and ``opts``).

    Args:
        names: metric names (see ``METRICS``).
        data: points drawn independently of ``reference`` from the same distribution, at
            least ``n`` of them; its first ``min(max_sets, len(data) // n)`` blocks of ``n``
            rows are the sets.
        reference: the held-out points the models are scored against.
        n: points per set: the number of generated samples each model is scored with.
        max_sets: at most this many sets.
        seed, opts: as :func:`~rectdiff.metrics.compute_metrics`.

    Returns:
        ``{"n": n, "sets": k, "metrics": {key: {"mean", "std", "values"}}}`` with one key per
        number ``compute_metrics`` returns; ``std`` is None for a single set.

    Raises:
        ValueError: ``n`` below 2 or above ``len(data)``, or ``max_sets`` below 1.
    """
    size = len(data)
    if not 2 <= n <= size:
        raise ValueError(
            f"data_floor needs 2 <= n <= len(data) = {size} (n is the number of generated "
            f"samples a model is scored with); got n={n}. Pass more data or a smaller n."
        )
    if max_sets < 1:
        raise ValueError(f"max_sets must be >= 1, got {max_sets}.")
    sets = min(max_sets, size // n)
    scores = [
        compute_metrics(names, _rows(data, j * n, n), reference, seed=seed, **opts)
        for j in range(sets)
    ]
    table = {}
    for key in scores[0]:
        values = [score[key] for score in scores]
        table[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if sets > 1 else None,
            "values": values,
        }
    return {"n": n, "sets": sets, "metrics": table}


def _rows(data: ArrayLike, start: int, n: int) -> ArrayLike:
    rows = data[start : start + n]
    return rows.detach() if isinstance(rows, Tensor) else rows
