"""experiments/bench/overhead.py: the paired ratio's interval is the exact sign-test interval
for a median (checked against scipy's binomial distribution), and the median of per-round
ratios is what it says."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from scipy.stats import binom
from shared import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    return load_script(SCRIPT)


@pytest.mark.parametrize("n", [6, 10, 20, 30, 60, 100, 201])
def test_interval_rank_is_the_largest_with_95_percent_coverage(overhead, n):
    k = overhead.median_interval_rank(n)
    coverage = 1 - 2 * binom.cdf(k, n, 0.5)  # [x_(k+1), x_(n-k)] in 1-based order statistics
    assert coverage >= 0.95
    assert 1 - 2 * binom.cdf(k + 1, n, 0.5) < 0.95  # one rank further in misses the level


def test_interval_ranks_at_known_sizes(overhead):
    # n = 20: P(B <= 5) = 21700 / 2^20 = 0.0207 <= 0.025 < P(B <= 6) = 60460 / 2^20
    assert overhead.median_interval_rank(20) == 5
    assert overhead.median_interval_rank(5) == 0  # too few rounds for 95 %: the whole sample


def test_paired_ratio_is_the_median_of_per_round_ratios(overhead):
    rng = random.Random(0)
    plain = [rng.uniform(1.0, 2.0) for _ in range(20)]  # a machine drifting by up to 2x
    ratios = [1 + 0.001 * i for i in range(20)]
    rng.shuffle(ratios)
    times = [p * r for p, r in zip(plain, ratios, strict=True)]
    median, lo, hi = overhead.paired_ratio(times, plain)
    assert median == pytest.approx(1.0095, abs=1e-12)  # the drift cancels round by round
    assert lo == pytest.approx(1.005, abs=1e-12) and hi == pytest.approx(1.014, abs=1e-12)


def test_paired_ratio_needs_ratios(overhead):
    with pytest.raises(ValueError, match="n=0"):
        overhead.paired_ratio([], [])


def test_round_robin_rotates_the_order_and_the_instances(overhead):
    """Every round times one block of each name; the order rotates by one a round, and a name
    with several instances uses instance ``r % len`` in round r."""
    calls: list[tuple[str, int]] = []

    def fn(name, i):
        return lambda: calls.append((name, i))

    fns = {
        "a": fn("a", 0),
        "b": [fn("b", 0), fn("b", 1), fn("b", 2)],
        "c": [fn("c", 0), fn("c", 1)],
    }
    times = overhead.round_robin_times(fns, rounds=4, block=2)
    assert {n: len(t["cpu"]) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    blocks = calls[::2]
    assert calls[1::2] == blocks  # each block calls one function twice
    assert blocks == [
        ("a", 0), ("b", 0), ("c", 0),  # round 0
        ("b", 1), ("c", 1), ("a", 0),  # round 1: rotated, the next instances
        ("c", 0), ("a", 0), ("b", 2),  # round 2
        ("a", 0), ("b", 0), ("c", 1),  # round 3
    ]  # fmt: skip
