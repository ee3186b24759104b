"""Data sets: shapes, determinism, and statistics that follow from each construction."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from rectdiff import data

TOY_SHAPES = {name: (500, 2) for name in data.TOYS}


@pytest.mark.parametrize("name", data.TOYS)
def test_toys_shape_dtype_determinism(name):
    x = data.load_data(name, 500, seed=3)
    assert x.shape == TOY_SHAPES[name] and x.dtype == torch.float32
    torch.testing.assert_close(x, data.load_data(name, 500, seed=3), rtol=0, atol=0)
    assert not torch.equal(x, data.load_data(name, 500, seed=4))


def test_eight_gaussians_construction():
    n, radius, std = 40_000, 2.0, 0.1
    x, labels = data.load_data("8gaussians", n, seed=0, return_labels=True)
    angles = labels.double() * 2 * math.pi / 8
    centers = radius * torch.stack([angles.cos(), angles.sin()], 1)
    residual = x.double() - centers
    # the residuals are N(0, std^2 I): per-coordinate std and mean
    assert float(residual.std()) == pytest.approx(std, rel=0.02)
    assert float(residual.mean(0).abs().max()) < 4 * std / math.sqrt(n)
    # E||x||^2 = radius^2 + 2 std^2 and E[x] = 0 (8 equal components on a circle)
    assert float((x.double() ** 2).sum(1).mean()) == pytest.approx(radius**2 + 2 * std**2, rel=0.01)
    assert float(x.double().mean(0).abs().max()) < 4 * radius / math.sqrt(2 * n)
    counts = torch.bincount(labels, minlength=8).double() / n
    assert float((counts - 1 / 8).abs().max()) < 0.01


def test_checkerboard_lies_on_black_squares():
    x = data.load_data("checkerboard", 20_000, seed=1).double()
    assert float(x.min()) >= -2 and float(x.max()) <= 2
    parity = (torch.floor(x[:, 0] + 2) + torch.floor(x[:, 1] + 2)) % 2
    assert int(parity.sum()) == 0
    # uniform on 8 unit squares: each coordinate is U(-2, 2), variance 16/12
    assert float(x.var(0).min()) == pytest.approx(16 / 12, rel=0.03)


def test_moons_are_centred():
    x, labels = data.load_data("moons", 20_000, seed=2, return_labels=True)
    # the noise-free moons have mean (0.5, 0.25): centred, the data has mean 0
    assert float(x.double().mean(0).abs().max()) < 0.02
    assert set(labels.tolist()) == {0, 1}


def test_mixture_pair_matches_the_rectified_flow_toy():
    """Liu et al. 2023's 2-D toy: D = 10, variance 0.3, pi_0 and pi_1 mirrored in y."""
    target, labels = data.load_data("mixture_pair", 30_000, seed=0, return_labels=True)
    d = 10.0
    means = torch.tensor(
        [
            [d * math.sqrt(3) / 2, -d / 2],
            [-d * math.sqrt(3) / 2, -d / 2],
            [0.0, d * math.sqrt(3) / 2],
        ]
    )
    for k in range(3):
        part = target[labels == k].double()
        assert torch.allclose(part.mean(0), means[k].double(), atol=0.03)
        assert float(part.var(0).mean()) == pytest.approx(0.3, rel=0.05)
    source = data.mixture_pair_source(30_000, seed=0).double()
    assert float(source.norm(dim=1).mean()) == pytest.approx(
        float(target.double().norm(dim=1).mean()), rel=0.01
    )
    assert float(source[:, 1].mean()) == pytest.approx(
        -float(target[:, 1].double().mean()), abs=0.1
    )


def test_digits_scaled_to_minus_one_one():
    x, labels = data.load_data("digits", return_labels=True)
    assert x.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    pixel = (x + 1) * 8  # back to sklearn's integer 0..16 intensities
    torch.testing.assert_close(pixel, pixel.round(), rtol=0, atol=1e-5)
    subset = data.load_data("digits", 100, seed=7)
    torch.testing.assert_close(subset, data.load_data("digits", 100, seed=7), rtol=0, atol=0)
    with pytest.raises(ValueError, match="1..1797"):
        data.load_data("digits", 5000)


def test_tensor_files(tmp_path):
    array = np.random.default_rng(0).normal(size=(10, 3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    torch.testing.assert_close(data.load_data(tmp_path / "x.npy"), torch.from_numpy(array))
    torch.save({"x": torch.from_numpy(array), "labels": torch.arange(10)}, tmp_path / "x.pt")
    x, labels = data.load_data(str(tmp_path / "x.pt"), n=4, seed=1, return_labels=True)
    assert x.shape == (4, 3, 4)
    torch.testing.assert_close(x, torch.from_numpy(array)[labels])  # subset keeps the pairing
    torch.save(torch.zeros(5), tmp_path / "flat.pt")
    with pytest.raises(ValueError, match=r"\(N, \.\.\.\)"):
        data.load_data(tmp_path / "flat.pt")


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(3, 6, 5), dtype=np.uint8)
    for i, img in enumerate(gray):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    x = data.load_data(tmp_path)
    assert x.shape == (3, 1, 6, 5)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(gray).float() / 127.5 - 1)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "z.png")
    x = data.load_data(tmp_path)
    assert x.shape == (4, 3, 6, 5)  # one colour image: all read as RGB
    torch.testing.assert_close(x[3], torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1)
    Image.fromarray(gray[0][:4]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="image_size"):
        data.load_data(tmp_path)
    assert data.load_data(tmp_path, image_size=8).shape == (5, 3, 8, 8)


def test_unknown_name_lists_the_data_sets():
    with pytest.raises(
        ValueError, match="8gaussians, moons, checkerboard, mixture_pair, spiral, digits"
    ):
        data.load_data("swissroll")
    with pytest.raises(ValueError, match="radius"):
        data.load_data("moons", 10, radius=3.0)
