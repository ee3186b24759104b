"""The data floor: the metrics of disjoint data sets against the held-out set."""

import numpy as np
import pytest
import torch

from rectdiff.metrics import compute_metrics, data_floor


def test_the_floor_scores_each_disjoint_set_like_a_model():
    rng = np.random.default_rng(0)
    data, reference = rng.standard_normal((1100, 2)), rng.standard_normal((250, 2))
    floor = data_floor(["sliced_w2", "energy"], data, reference, 250, seed=7,
                       sliced_w2={"n_projections": 16})  # fmt: skip
    assert (floor["n"], floor["sets"]) == (250, 4)  # 1100 // 250 sets, the last 100 rows unused
    for key in ("sliced_w2", "energy"):
        direct = [
            compute_metrics([key], data[j * 250 : (j + 1) * 250], reference, seed=7,
                            sliced_w2={"n_projections": 16})[key]
            for j in range(4)
        ]  # fmt: skip
        entry = floor["metrics"][key]
        assert entry["values"] == direct
        assert entry["mean"] == pytest.approx(np.mean(direct), rel=1e-15)
        assert entry["std"] == pytest.approx(np.std(direct, ddof=1), rel=1e-12)
    assert data_floor(["energy"], data, reference, 250, max_sets=2)["sets"] == 2


def test_copies_of_the_held_out_set_are_at_zero():
    """Three copies of the reference itself: every set is the held-out set, at distance 0."""
    reference = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    floor = data_floor(["sliced_w2", "energy"], torch.cat([reference] * 3), reference, 300)
    assert floor["sets"] == 3
    for entry in floor["metrics"].values():
        assert entry["values"] == pytest.approx([0.0] * 3, abs=1e-12)
        assert entry["std"] == pytest.approx(0.0, abs=1e-12)


def test_one_set_has_no_spread():
    data = np.random.default_rng(2).standard_normal((150, 2))
    floor = data_floor("energy", data, data[:50], 100)
    assert floor["sets"] == 1 and floor["metrics"]["energy"]["std"] is None


@pytest.mark.parametrize(
    "n, max_sets, pattern",
    [
        (1, 4, r"2 <= n <= len\(data\) = 10 .*got n=1"),
        (11, 4, r"2 <= n <= len\(data\) = 10 .*got n=11\. Pass more data or a smaller n"),
        (5, 0, r"max_sets must be >= 1, got 0"),
    ],
)
def test_bad_sizes_are_named(n, max_sets, pattern):
    data = np.zeros((10, 2))
    with pytest.raises(ValueError, match=pattern):
        data_floor("energy", data, data, n, max_sets=max_sets)
