"""Metrics against exact optimal-transport answers, closed forms, hand computations and SciPy."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from rectdiff import metrics
from rectdiff.metrics import (
    DigitsClassifier,
    classifier_scores,
    compute_metrics,
    digits_classifier,
    digits_features,
    digits_train_test,
    energy_distance,
    frechet_digits_distance,
    frechet_distance,
    frechet_distance_gaussian,
    mmd,
    sliced_wasserstein,
    wasserstein2,
)


def _cloud(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


# --- exact W2 -----------------------------------------------------------------------------


def test_w2_of_a_shifted_copy_is_the_shift_length():
    # W2^2 = ||E x - E y||^2 + W2^2 of the centred clouds, which coincide: W2 = ||c|| exactly.
    x, shift = _cloud(60, 3), np.array([0.3, -1.2, 2.0])
    y = (x + shift)[np.random.default_rng(1).permutation(60)]
    assert wasserstein2(x, y) == pytest.approx(np.linalg.norm(shift), rel=1e-10)


def test_w2_of_a_linear_map_is_the_map_cost():
    # y_i = A x_i + c with A symmetric positive definite is the gradient of a convex function,
    # so the coupling (x_i, y_i) is cyclically monotone, hence optimal (Brenier; Knott-Smith):
    # W2^2 = mean ||A x_i + c - x_i||^2, although y is handed over shuffled.
    x = _cloud(80, 2)
    a = np.array([[1.5, 0.4], [0.4, 0.7]])
    mapped = x @ a + np.array([1.0, -2.0])
    y = torch.as_tensor(mapped[np.random.default_rng(2).permutation(80)])
    expected = math.sqrt(np.mean(np.sum((mapped - x) ** 2, axis=1)))
    assert wasserstein2(torch.as_tensor(x), y) == pytest.approx(expected, rel=1e-10)


def test_w2_in_one_dimension_matches_sorted_matching():
    # In 1-D the monotone (sorted) matching is optimal for equal-size clouds.
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(200), rng.exponential(size=200)
    expected = math.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2))
    assert wasserstein2(x, y) == pytest.approx(expected, rel=1e-10)


def test_w2_between_gaussian_samples_matches_the_closed_form():
    # N(m1, diag s1^2) vs N(m2, diag s2^2): W2^2 = ||m1 - m2||^2 + sum (s1 - s2)^2 = 2.5.
    # Over 40 seeds at n = 1000 the estimate had mean 1.587 (bias +0.006) and std 0.039:
    # the tolerance is 4 standard deviations.
    m1, m2 = np.array([0.0, 0.0]), np.array([1.0, -0.5])
    s1, s2 = np.array([1.0, 0.5]), np.array([0.5, 1.5])
    rng = np.random.default_rng(0)
    x = m1 + s1 * rng.standard_normal((1000, 2))
    y = m2 + s2 * rng.standard_normal((1000, 2))
    assert wasserstein2(x, y) == pytest.approx(math.sqrt(2.5), abs=4 * 0.039)


def test_w2_subsample_is_seeded():
    x, y = _cloud(300, 2, 0), _cloud(300, 2, 1) + 1.0
    assert wasserstein2(x, y, max_samples=100, seed=5) == wasserstein2(x, y, 100, seed=5)
    assert wasserstein2(x, y, max_samples=100, seed=5) != wasserstein2(x, y, 100, seed=6)


# --- sliced W2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_sliced_wasserstein_in_one_dimension_is_exact(p):
    # In 1-D every projection is +-1, so SW_p = W_p = |c| for a shift by c.
    x = _cloud(50, 1)
    y = (x + 0.7)[np.random.default_rng(1).permutation(50)]
    assert sliced_wasserstein(x, y, n_projections=7, p=p) == pytest.approx(0.7, rel=1e-12)


@pytest.mark.parametrize("dim", [2, 5])
def test_sliced_w2_of_a_shift_matches_the_sphere_average(dim):
    # Projected on theta, a shift by c is a 1-D shift by theta.c, so
    # SW2^2 = E_theta (theta.c)^2 = ||c||^2 E[u_1^2] = ||c||^2 / d.
    # Monte Carlo: Var(u_1^2) = 3 / (d (d + 2)) - 1 / d^2; tolerance 5 standard errors.
    n_projections, shift = 20000, np.linspace(1.0, -1.0, dim)
    x = _cloud(20, dim)
    sw2_sq = sliced_wasserstein(x, x + shift, n_projections=n_projections) ** 2
    norm_sq = float(shift @ shift)
    std_error = math.sqrt((3 / (dim * (dim + 2)) - 1 / dim**2) / n_projections) * norm_sq
    assert sw2_sq == pytest.approx(norm_sq / dim, abs=5 * std_error)


@pytest.mark.parametrize("n, dim, p", [(2000, 2, 2), (300, 5, 1), (500, 64, 2), (7, 3, 3)])
def test_sliced_wasserstein_of_equal_sizes_is_pots(n, dim, p):
    """For N = M the sorted projections are matched directly; POT's general quantile
    matching on the same projections gives the same number to 1e-12 relative."""
    import ot

    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, dim)), 1.3 * rng.normal(size=(n, dim)) + 0.2
    ours = sliced_wasserstein(x, y, n_projections=64, p=p, seed=5)
    pots = ot.sliced_wasserstein_distance(x, y, n_projections=64, p=p,
                                          seed=np.random.RandomState(5))  # fmt: skip
    assert ours == pytest.approx(float(pots), rel=1e-12)


def test_sliced_wasserstein_is_seeded():
    x, y = _cloud(100, 3, 0), _cloud(120, 3, 1)
    assert sliced_wasserstein(x, y, seed=3) == sliced_wasserstein(x, y, seed=3)
    assert sliced_wasserstein(x, y, seed=3) != sliced_wasserstein(x, y, seed=4)


# --- MMD ----------------------------------------------------------------------------------


def test_biased_mmd_of_a_set_with_itself_is_zero():
    x = _cloud(200, 4)
    assert abs(mmd(x, x)) < 1e-12
    assert abs(mmd(x, x, kernel="laplacian", bandwidth=[0.5, 2.0])) < 1e-12


def test_mmd_by_hand_on_tiny_sets():
    # x = {0, 1}, y = {3, 5}; RBF k = exp(-r^2 / (2 h^2)), h = 1; squared distances
    # xx: 0, 1; yy: 0, 4; xy: 9, 25, 4, 16.
    x, y = np.array([0.0, 1.0]), np.array([3.0, 5.0])
    e = math.exp
    k_xy = (e(-4.5) + e(-12.5) + e(-2.0) + e(-8.0)) / 4
    biased = (2 + 2 * e(-0.5)) / 4 + (2 + 2 * e(-2.0)) / 4 - 2 * k_xy
    unbiased = e(-0.5) + e(-2.0) - 2 * k_xy
    assert mmd(x, y, bandwidth=1.0) == pytest.approx(biased, rel=1e-12)
    assert mmd(x, y, bandwidth=1.0, unbiased=True) == pytest.approx(unbiased, rel=1e-12)
    # Laplacian k = exp(-r / h), h = 2; distances xx: 0, 1; yy: 0, 2; xy: 3, 5, 2, 4.
    k_xy = (e(-1.5) + e(-2.5) + e(-1.0) + e(-2.0)) / 4
    laplacian = (2 + 2 * e(-0.5)) / 4 + (2 + 2 * e(-1.0)) / 4 - 2 * k_xy
    assert mmd(x, y, kernel="laplacian", bandwidth=2.0) == pytest.approx(laplacian, rel=1e-12)


def test_mmd_median_heuristic_and_bandwidth_sum():
    # Pooled {0, 1, 3, 5}: pairwise distances 1, 3, 5, 2, 4, 2 -> median h = 2.5.
    x, y = np.array([0.0, 1.0]), np.array([3.0, 5.0])
    assert mmd(x, y) == pytest.approx(mmd(x, y, bandwidth=2.5), rel=1e-14)
    multi = mmd(x, y, bandwidth=[1.0, 2.5])
    assert multi == pytest.approx(mmd(x, y, bandwidth=1.0) + mmd(x, y, bandwidth=2.5), rel=1e-12)


def test_unbiased_mmd_matches_the_gaussian_closed_form():
    # X ~ N(0, 1), Y ~ N(mu, 1), RBF bandwidth h: E k(X, X') = h / sqrt(h^2 + 2) and
    # E k(X, Y) = h / sqrt(h^2 + 2) exp(-mu^2 / (2 (h^2 + 2))), so
    # MMD^2 = 2 h / sqrt(h^2 + 2) (1 - exp(-mu^2 / (2 (h^2 + 2)))) = 0.5619 for mu = 2, h = 1.
    # Over 30 seeds at n = 2000 the U-statistic had std 0.015: tolerance 4 std.
    mu, h = 2.0, 1.0
    expected = 2 * h / math.sqrt(h**2 + 2) * (1 - math.exp(-(mu**2) / (2 * (h**2 + 2))))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2000, 1)), mu + rng.standard_normal((2000, 1))
    assert mmd(x, y, bandwidth=h, unbiased=True) == pytest.approx(expected, abs=4 * 0.015)


# --- energy distance ----------------------------------------------------------------------


def test_energy_distance_by_hand_and_zero_for_identical_sets():
    # x = {(0,0), (3,0)}, y = {(0,4)}: E|X-Y| = (4 + 5)/2, E|X-X'| = (0+3+3+0)/4, E|Y-Y'| = 0.
    x, y = np.array([[0.0, 0.0], [3.0, 0.0]]), np.array([[0.0, 4.0]])
    assert energy_distance(x, y) == pytest.approx(2 * 4.5 - 1.5, rel=1e-14)
    cloud = _cloud(100, 3)
    assert abs(energy_distance(cloud, cloud)) < 1e-12


def test_energy_distance_is_scipys_squared_in_one_dimension():
    rng = np.random.default_rng(4)
    u, v = rng.standard_normal(70), 0.5 + 2.0 * rng.standard_normal(90)
    assert energy_distance(u, v) == pytest.approx(scipy.stats.energy_distance(u, v) ** 2, rel=1e-10)


def test_energy_distance_equals_the_all_pairs_formula_and_reuses_the_reference_term():
    # the distances are summed in blocks of BLOCK_ROWS = 256 rows, the self terms from the
    # distinct pairs (and the reference's from a cache); every pair distance written out with
    # numpy broadcasting must give the same number, for sizes across the block boundaries
    rng = np.random.default_rng(5)
    reference = rng.standard_normal((300, 2))

    def by_hand(x, y):
        def mean_dist(a, b):
            return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).mean()

        return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)

    # one reference set (two blocks), three samples: two calls hit the cache
    for shift, n in ((0.0, 257), (0.3, 512), (2.0, 700)):
        x = shift + rng.standard_normal((n, 2))
        assert energy_distance(x, reference) == pytest.approx(by_hand(x, reference), rel=1e-12)
    moved = reference.copy()
    moved[0, 0] += 1.0  # same shape, other bytes: not the cached set's term
    x = rng.standard_normal((40, 2))
    assert energy_distance(x, moved) == pytest.approx(by_hand(x, moved), rel=1e-12)
    assert energy_distance(x, reference[:1]) == pytest.approx(by_hand(x, reference[:1]), rel=1e-12)


# --- Frechet ------------------------------------------------------------------------------


def test_frechet_gaussian_closed_form_for_diagonal_covariances():
    mean1, mean2 = np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 1.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 1 + 4 + 1 + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance_gaussian(mean1, np.diag(var1), mean2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_gaussian_matches_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
    mean1, mean2 = rng.standard_normal(6), rng.standard_normal(6)
    trace_sqrt = np.trace(scipy.linalg.sqrtm(cov1 @ cov2)).real
    expected = np.sum((mean1 - mean2) ** 2) + np.trace(cov1 + cov2) - 2 * trace_sqrt
    assert frechet_distance_gaussian(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_shifted_features_is_the_squared_shift():
    feats = _cloud(500, 8)
    shift = np.arange(8) / 4.0
    assert abs(frechet_distance(feats, feats)) < 1e-9
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


# --- digits classifier --------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("rectdiff_cache")
    digits_classifier(cache_dir)  # trains (a few seconds) and writes the cache file
    return cache_dir


def test_digits_classifier_is_accurate_and_its_cache_reloads_identically(classifier_dir):
    classifier = digits_classifier(classifier_dir)
    _, _, x_test, labels_test = digits_train_test()
    with torch.no_grad():
        accuracy = float((classifier(x_test).argmax(1) == labels_test).float().mean())
    assert accuracy > 0.9
    assert accuracy == pytest.approx(classifier.heldout_accuracy, abs=1e-6)
    (path,) = classifier_dir.glob("digits_classifier_*.safetensors")
    reloaded = DigitsClassifier.load(path)
    assert reloaded.heldout_accuracy == classifier.heldout_accuracy
    assert torch.equal(digits_features(x_test, reloaded), digits_features(x_test, classifier))


def test_frechet_digits_separates_real_digits_from_noise(classifier_dir):
    classifier = digits_classifier(classifier_dir)
    x_train, _, x_test, _ = digits_train_test()
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = frechet_digits_distance(x_test, x_train, classifier)
    fake = frechet_digits_distance(noise, x_train, classifier)
    assert real < 0.1 * fake
    # Flattened (N, 64) input is read as the same images.
    assert frechet_digits_distance(x_test.flatten(1), x_train, classifier) == real


def test_classifier_scores_on_real_digits_and_on_one_repeated_digit(classifier_dir):
    classifier = digits_classifier(classifier_dir)
    _, _, x_test, labels_test = digits_train_test()
    scores = classifier_scores(x_test, classifier)
    label_freq = torch.bincount(labels_test, minlength=10).double() / len(labels_test)
    label_entropy = float(-(label_freq * label_freq.log()).sum())
    assert scores["confidence"] > 0.9
    assert scores["class_coverage"] == 1.0
    # >= 98% accuracy moves at most 2% of the mass between classes.
    assert scores["class_entropy"] == pytest.approx(label_entropy, abs=0.05)
    one_digit = classifier_scores(x_test[:1].repeat(20, 1, 1, 1), classifier)
    with torch.no_grad():
        max_prob = float(classifier(x_test[:1]).softmax(1).max())
    assert one_digit == pytest.approx(
        {"confidence": max_prob, "class_entropy": 0.0, "class_coverage": 0.1}, abs=1e-6
    )


# --- registry -----------------------------------------------------------------------------


def test_compute_metrics_matches_the_functions(classifier_dir):
    x, y = _cloud(150, 2, 0), _cloud(150, 2, 1) + 0.5
    results = compute_metrics(
        ["sliced_w2", "w2", "mmd", "energy"], x, y, seed=2, mmd={"bandwidth": 0.7}
    )
    assert results == {
        "sliced_w2": sliced_wasserstein(x, y, seed=2),
        "w2": wasserstein2(x, y, seed=2),
        "mmd": mmd(x, y, bandwidth=0.7),
        "energy": energy_distance(x, y),
    }
    x_train, _, x_test, _ = digits_train_test()
    digits = compute_metrics(
        ["frechet_digits", "classifier"],
        x_test,
        x_train,
        frechet_digits={"cache_dir": classifier_dir},
        classifier={"cache_dir": classifier_dir},
    )
    classifier = digits_classifier(classifier_dir)
    assert digits["frechet_digits"] == frechet_digits_distance(x_test, x_train, classifier)
    assert digits["classifier_confidence"] == classifier_scores(x_test, classifier)["confidence"]


def test_unknown_metric_and_bad_input_are_clear_errors():
    x = _cloud(10, 2)
    with pytest.raises(ValueError, match=r"'fid'.*sliced_w2, w2, mmd, energy, frechet_digits"):
        compute_metrics(["w2", "fid"], x, x)
    with pytest.raises(ValueError, match="'swd'"):
        compute_metrics(["w2"], x, x, swd={"n_projections": 10})
    with pytest.raises(ValueError, match="same space"):
        wasserstein2(x, _cloud(10, 3))
    with pytest.raises(ValueError, match="'gaussian'.*rbf, laplacian"):
        mmd(x, x, kernel="gaussian")
    assert set(metrics.METRICS) >= {"sliced_w2", "w2", "mmd", "energy", "frechet_digits"}
