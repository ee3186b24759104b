"""Sample-quality metrics between two point clouds.

Every metric takes ``x`` (N, ...) and ``y`` (M, ...), flattens each sample to a vector in
R^D and computes in float64 NumPy; a 1-D input is N points on the line. Randomised metrics
take a ``seed`` and draw from their own generator, so a seed fixes the result (and, across
models compared under one seed, the random projections / subsamples are shared).

For sklearn's 8x8 digits, :mod:`rectdiff.metrics.digits` trains a small CNN once and caches
it; its penultimate features give a Frechet distance (FID with a digits network in place of
Inception), and its softmax confidence and class-coverage scores for generated digits.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.spatial.distance import cdist, pdist
from torch import Tensor

from .digits import (
    DigitsClassifier,
    classifier_scores,
    digits_classifier,
    digits_features,
    digits_train_test,
    train_digits_classifier,
)

__all__ = [
    "sliced_wasserstein",
    "wasserstein2",
    "mmd",
    "energy_distance",
    "frechet_distance",
    "frechet_distance_gaussian",
    "DigitsClassifier",
    "digits_train_test",
    "train_digits_classifier",
    "digits_classifier",
    "digits_features",
    "frechet_digits_distance",
    "classifier_scores",
    "METRICS",
    "Metric",
    "compute_metrics",
]

ArrayLike = Tensor | np.ndarray
KERNELS = ("rbf", "laplacian")


def _as_points(x: ArrayLike, name: str) -> np.ndarray:
    """(N, ...) tensor or array -> (N, D) float64 array (a 1-D input is N points in R^1)."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    points = np.asarray(x, dtype=np.float64)
    if points.ndim == 0 or points.shape[0] == 0:
        raise ValueError(f"{name} has shape {points.shape}; expected (N, ...) with N >= 1 samples.")
    points = points.reshape(points.shape[0], -1)
    if not np.isfinite(points).all():
        raise ValueError(f"{name} contains NaN or inf; metrics need finite samples.")
    return points


def _as_pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x has {x.shape[1]} features per sample and y has {y.shape[1]}; "
            "both clouds must live in the same space (same shape after the batch dimension)."
        )
    return x, y


def _subsample(points: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    if len(points) <= max_samples:
        return points
    return points[np.sort(rng.choice(len(points), max_samples, replace=False))]


def sliced_wasserstein(
    x: ArrayLike, y: ArrayLike, n_projections: int = 500, p: float = 2, seed: int = 0
) -> float:
    """Sliced p-Wasserstein distance SW_p (a distance, not its p-th power).

    SW_p(mu, nu) = ( E_{theta ~ U(S^{D-1})} W_p^p(theta#mu, theta#nu) )^{1/p}
    (Bonneel et al. 2015, "Sliced and Radon Wasserstein barycenters of measures"), the
    expectation estimated by Monte Carlo over ``n_projections`` directions drawn from
    ``seed``; each 1-D W_p is exact (quantile matching, uniform weights, N != M allowed).
    Computed by POT's ``ot.sliced_wasserstein_distance``; for N = M, where quantile
    matching pairs the i-th smallest projections, ``W_p^p = mean_i |x_(i) - y_(i)|^p``
    on POT's projections directly (the same number to ~1e-15 relative, about 10x faster).
    """
    import ot  # POT, imported on use: 2 s of every process's start otherwise

    x, y = _as_pair(x, y)
    if n_projections < 1 or p < 1:
        raise ValueError(f"need n_projections >= 1 and p >= 1, got {n_projections=} and {p=}.")
    projections_rng = np.random.RandomState(seed)
    if len(x) != len(y):
        return float(
            ot.sliced_wasserstein_distance(
                x, y, n_projections=n_projections, p=p, seed=projections_rng
            )
        )
    projections = ot.sliced.get_random_projections(x.shape[1], n_projections, projections_rng)
    x_sorted = np.sort(x @ projections, axis=0)
    y_sorted = np.sort(y @ projections, axis=0)
    per_projection = np.mean(np.abs(x_sorted - y_sorted) ** p, axis=0)
    return float(np.mean(per_projection) ** (1.0 / p))


def wasserstein2(x: ArrayLike, y: ArrayLike, max_samples: int = 1000, seed: int = 0) -> float:
    """Exact 2-Wasserstein distance W2 (not squared) between the empirical measures.

    W2(mu, nu)^2 = min_{pi in Pi(a, b)} sum_ij pi_ij ||x_i - y_j||^2 with uniform weights
    a = 1/N, b = 1/M, solved as a linear program by POT's ``ot.emd2`` (network simplex).
    Clouds larger than ``max_samples`` are first subsampled without replacement (seeded);
    cost is about O(n^3), 0.15 s at n = 1000.
    """
    import ot  # POT, imported on use: 2 s of every process's start otherwise

    x, y = _as_pair(x, y)
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}.")
    rng = np.random.default_rng(seed)
    x, y = _subsample(x, max_samples, rng), _subsample(y, max_samples, rng)
    cost = ot.dist(x, y, metric="sqeuclidean")
    a, b = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    return math.sqrt(max(float(ot.emd2(a, b, cost, numItermax=10_000_000)), 0.0))


def _median_distance(points: np.ndarray, seed: int, max_points: int = 4096) -> float:
    points = _subsample(points, max_points, np.random.default_rng(seed))
    median = float(np.median(pdist(points))) if len(points) > 1 else 0.0
    if median <= 0.0:
        raise ValueError(
            "the median heuristic gave bandwidth 0 (most samples coincide); pass bandwidth=<float>."
        )
    return median


def _kernel(sq_dist: np.ndarray, kernel: str, bandwidths: Sequence[float]) -> np.ndarray:
    if kernel == "rbf":
        return sum(np.exp(-sq_dist / (2.0 * h**2)) for h in bandwidths)
    return sum(np.exp(-np.sqrt(sq_dist) / h) for h in bandwidths)


def mmd(
    x: ArrayLike,
    y: ArrayLike,
    kernel: str = "rbf",
    bandwidth: float | Sequence[float] | None = None,
    unbiased: bool = False,
    seed: int = 0,
) -> float:
    """Squared maximum mean discrepancy MMD^2 (Gretton et al. 2012, JMLR, eqs. 3 and 5).

    Biased V-statistic (default; >= 0 and exactly 0 for identical sets):
        MMD_b^2 = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j).
    ``unbiased=True`` gives the U-statistic MMD_u^2, which drops the i = j terms of the
    first two means (and can be negative). Kernels: ``"rbf"`` k = exp(-||a-b||^2 / (2 h^2)),
    ``"laplacian"`` k = exp(-||a-b|| / h). ``bandwidth=None`` is the median heuristic,
    h = median of ||z_i - z_j|| (i < j) over the pooled samples z = x U y (at most 4096 of
    them, seeded); a list of bandwidths sums the kernels (a multi-scale kernel). Memory is
    O((N + M)^2).
    """
    x, y = _as_pair(x, y)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}.")
    if bandwidth is None:
        bandwidths = [_median_distance(np.concatenate([x, y]), seed)]
    else:
        bandwidths = (
            [float(bandwidth)] if np.ndim(bandwidth) == 0 else [float(h) for h in bandwidth]
        )
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"bandwidth must be a positive float or a list of them, got {bandwidth}.")
    k_xx = _kernel(cdist(x, x, "sqeuclidean"), kernel, bandwidths)
    k_yy = _kernel(cdist(y, y, "sqeuclidean"), kernel, bandwidths)
    k_xy = _kernel(cdist(x, y, "sqeuclidean"), kernel, bandwidths)
    n, m = len(x), len(y)
    if not unbiased:
        return float(k_xx.mean() + k_yy.mean() - 2.0 * k_xy.mean())
    if n < 2 or m < 2:
        raise ValueError(f"unbiased MMD needs >= 2 samples per set, got N={n}, M={m}.")
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


#: rows of a distance block (see :func:`energy_distance`)
BLOCK_ROWS = 256


def energy_distance(x: ArrayLike, y: ArrayLike) -> float:
    """Energy distance D^2 (Szekely & Rizzo 2013, "Energy statistics: a class of statistics
    based on distances", J. Stat. Plan. Inference 143), as the V-statistic

        D^2 = 2 mean_ij ||x_i - y_j|| - mean_ij ||x_i - x_j|| - mean_ij ||y_i - y_j||

    (all pairs, i = j included), which is >= 0 and exactly 0 for identical sets. This is
    the square of what ``scipy.stats.energy_distance`` returns for 1-D samples.

    The distances are summed a block of :data:`BLOCK_ROWS` rows at a time, so memory stays
    at ``BLOCK_ROWS x M`` distances (5000 points against 5000: 10 MB, not 200 MB for the whole
    matrix; 20 000 points would need 3.2 GB).
    """
    x, y = _as_pair(x, y)
    cross = sum(float(cdist(block, y).sum()) for block, _ in _blocks(x)) / (len(x) * len(y))
    return float(2.0 * cross - _mean_self_distance(x) - _cached_self_distance(y))


def _blocks(points: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(block, later)``: :data:`BLOCK_ROWS` consecutive points and every point after them."""
    for start in range(0, len(points), BLOCK_ROWS):
        yield points[start : start + BLOCK_ROWS], points[start + BLOCK_ROWS :]


def _mean_self_distance(points: np.ndarray) -> float:
    """``mean_ij ||p_i - p_j||`` over all n^2 ordered pairs (i = j included), from the
    n (n - 1) / 2 distinct pairs, block by block (the pairs inside a block from ``pdist``,
    those with every later point from ``cdist``): twice their sum over n^2."""
    n = len(points)
    if n < 2:
        return 0.0
    total = 0.0
    for block, later in _blocks(points):
        total += float(pdist(block).sum())
        total += float(cdist(block, later).sum())
    return 2.0 * total / n**2


def _cached_self_distance(points: np.ndarray) -> float:
    """:func:`_mean_self_distance` of a set seen before (the held-out data every model of a
    comparison is scored against) from a small cache keyed by the set's bytes."""
    return _self_distance_by_bytes(points.tobytes(), points.shape)


@functools.lru_cache(maxsize=4)
def _self_distance_by_bytes(data: bytes, shape: tuple[int, ...]) -> float:
    return _mean_self_distance(np.frombuffer(data, dtype=np.float64).reshape(shape))


def frechet_distance_gaussian(
    mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray
) -> float:
    """Squared Frechet (W2) distance between N(mean1, cov1) and N(mean2, cov2).

    d^2 = ||mean1 - mean2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^{1/2})
    (Dowson & Landau 1982; the FID of Heusel et al. 2017). The trace term uses
    Tr((cov1 cov2)^{1/2}) = sum_i sqrt(lambda_i(cov1^{1/2} cov2 cov1^{1/2})), the square
    roots of a symmetric PSD matrix via ``eigh``: no complex parts, stable for singular covs.
    """
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    eigval1, eigvec1 = np.linalg.eigh(cov1)
    sqrt_cov1 = (eigvec1 * np.sqrt(np.clip(eigval1, 0.0, None))) @ eigvec1.T
    middle = sqrt_cov1 @ cov2 @ sqrt_cov1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    diff = mean1 - mean2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def frechet_distance(x_feats: ArrayLike, y_feats: ArrayLike) -> float:
    """Frechet distance d^2 between Gaussians fitted to two feature sets (the FID formula).

    Means and unbiased (ddof = 1) covariances, as pytorch-fid, then
    :func:`frechet_distance_gaussian`. Needs >= 2 samples per set.
    """
    x, y = _as_pair(x_feats, y_feats)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"need >= 2 feature vectors per set, got {len(x)} and {len(y)}.")
    return frechet_distance_gaussian(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    )


def frechet_digits_distance(
    samples: ArrayLike, reference: ArrayLike, classifier: DigitsClassifier | None = None
) -> float:
    """Frechet distance (FID formula) between digits-classifier features of two image sets."""
    return frechet_distance(
        digits_features(samples, classifier), digits_features(reference, classifier)
    )


# --- registry -----------------------------------------------------------------------------


def _frechet_digits_metric(
    samples: ArrayLike,
    reference: ArrayLike,
    cache_dir: str | Path | None = None,
    classifier_seed: int = 0,
) -> float:
    classifier = digits_classifier(cache_dir, classifier_seed)
    return frechet_digits_distance(samples, reference, classifier)


def _classifier_metric(
    samples: ArrayLike,
    reference: ArrayLike,
    cache_dir: str | Path | None = None,
    classifier_seed: int = 0,
) -> dict[str, float]:
    return classifier_scores(samples, digits_classifier(cache_dir, classifier_seed))


@dataclass(frozen=True)
class Metric:
    """A registry entry: the metric function and what kind of numbers it gives.

    Attributes:
        fn: ``fn(samples, reference, **options)``.
        kind: ``"distance"`` (one number, lower is better) or ``"scores"`` (a dict of numbers,
            e.g. classifier accuracy; reported beside the distances, not ranked with them).
        data: ``"any"`` or ``"digits"`` (needs 8x8 digit images and the digits classifier).
    """

    fn: Callable[..., float | dict[str, float]]
    kind: str = "distance"
    data: str = "any"

    def __call__(self, *args: Any, **kwargs: Any) -> float | dict[str, float]:
        return self.fn(*args, **kwargs)


#: metric name -> :class:`Metric`; a new metric is one function and one line here
METRICS: dict[str, Metric] = {
    "sliced_w2": Metric(sliced_wasserstein),
    "w2": Metric(wasserstein2),
    "mmd": Metric(mmd),
    "energy": Metric(energy_distance),
    "frechet_digits": Metric(_frechet_digits_metric, data="digits"),
    "classifier": Metric(_classifier_metric, kind="scores", data="digits"),
}


def compute_metrics(
    names: str | Sequence[str],
    samples: ArrayLike,
    reference: ArrayLike,
    seed: int = 0,
    **opts: Mapping[str, Any],
) -> dict[str, float]:
    """Compute the named metrics of ``samples`` against ``reference``.

    ``opts`` maps a metric name to that metric's keyword arguments, e.g.
    ``compute_metrics(["mmd", "w2"], s, r, mmd={"bandwidth": 0.5})``; ``seed`` goes to every
    metric that takes one unless its options say otherwise. A metric returning several
    numbers (``"classifier"``) contributes ``"<name>_<key>"`` entries.
    """
    names = [names] if isinstance(names, str) else list(names)
    for name in [*names, *opts]:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(METRICS)}.")
    results: dict[str, float] = {}
    for name in names:
        metric = METRICS[name]
        kwargs = dict(opts.get(name, {}))
        if "seed" in inspect.signature(metric.fn).parameters:
            kwargs.setdefault("seed", seed)
        value = metric(samples, reference, **kwargs)
        if isinstance(value, dict):
            results.update({f"{name}_{key}": float(v) for key, v in value.items()})
        else:
            results[name] = float(value)
    return results
