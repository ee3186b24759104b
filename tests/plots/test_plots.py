"""Figures: each writes PNG + SVG + the CSV of exactly the numbers it draws, atomically."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from shared import F64

from rectdiff import forms, plots, samplers
from rectdiff.oracles import CouplingOracle


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open() as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _check_written(paths: list[Path], stem: Path) -> None:
    assert paths == [stem.with_suffix(".png"), stem.with_suffix(".svg"), stem.with_suffix(".csv")]
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stem.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    assert not [p for p in stem.parent.iterdir() if ".tmp" in p.name]  # written atomically


def test_line_styles_pair_teacher_and_rectified() -> None:
    labels = ["vp", "fm", "vp rectified", "fm rectified", "ve"]
    styles = plots.line_styles(labels, ["vp rectified", "fm rectified"])
    assert styles["vp"][0] == styles["vp rectified"][0]
    assert styles["fm"][0] == styles["fm rectified"][0]
    assert len({styles[k][0] for k in ("vp", "fm", "ve")}) == 3
    assert [styles[k][1] for k in labels] == ["--", "--", "-", "-", "--"]
    explicit = plots.line_styles(["VP teacher", "VP student"], {"VP student": "VP teacher"})
    assert explicit["VP teacher"] == (explicit["VP student"][0], "--")
    assert explicit["VP student"][1] == "-"
    assert {style for _, style in plots.line_styles(["a", "b"]).values()} == {"-"}
    # a teacher's second and third students: dotted, then dash-dot, in the teacher's colour
    labels = ["vp", "vp rectified", "vp phased", "vp distilled"]
    styles = plots.line_styles(labels, {k: "vp" for k in labels[1:]})
    assert [styles[k][1] for k in labels] == ["--", "-", ":", "-."]
    assert len({styles[k][0] for k in labels}) == 1


def test_curvature_and_drift_csv_hold_the_drawn_numbers(tmp_path: Path) -> None:
    t = torch.linspace(0.99, 0.01, 50, dtype=F64)
    profiles = {"vp": (t, torch.exp(-3 * t)), "vp rectified": (t, torch.zeros_like(t))}
    stem = tmp_path / "curvature"
    _check_written(plots.plot_curvature(profiles, stem, ["vp rectified"], logy=True), stem)
    header, rows = _read_csv(stem.with_suffix(".csv"))
    assert header == ["label", "rectified", "t", "curvature"]
    assert [r[0] for r in rows] == ["vp"] * 50 + ["vp rectified"] * 50
    assert [r[1] for r in rows] == ["False"] * 50 + ["True"] * 50
    values = np.array([[float(r[2]), float(r[3])] for r in rows])
    np.testing.assert_allclose(values[:50, 1], np.exp(-3 * t.numpy()), rtol=1e-9)
    np.testing.assert_array_equal(values[50:, 1], 0.0)  # the CSV keeps zeros, not the log floor
    drift_stem = tmp_path / "drift"
    _check_written(plots.plot_x0_drift({"fm": (t, t**2)}, drift_stem), drift_stem)
    _, rows = _read_csv(drift_stem.with_suffix(".csv"))
    np.testing.assert_allclose([float(r[3]) for r in rows], (t**2).numpy(), rtol=1e-9)
    with pytest.raises(ValueError, match="equal length"):
        plots.plot_curvature({"bad": (t, t[:-1])}, tmp_path / "bad")


def test_quality_vs_nfe_and_implied_weighting(tmp_path: Path) -> None:
    stem = tmp_path / "nfe"
    results = {
        "vp": ([1, 2, 4, 8], [0.9, 0.5, 0.2, 0.1]),
        "vp rectified": ([1, 2, 4, 8], [0.1] * 4),
    }
    _check_written(plots.plot_quality_vs_nfe(results, stem, "sliced W2", ["vp rectified"]), stem)
    header, rows = _read_csv(stem.with_suffix(".csv"))
    assert header == ["label", "rectified", "nfe", "sliced W2"]
    assert [(float(r[2]), float(r[3])) for r in rows[:4]] == [
        (1, 0.9),
        (2, 0.5),
        (4, 0.2),
        (8, 0.1),
    ]
    # the weighting figure normalises each curve to its peak but its CSV keeps the raw weights
    lam = torch.linspace(-5, 5, 11, dtype=F64)
    weight = torch.where(lam.abs() < 4, 3.0 * torch.exp(-(lam**2)), torch.zeros_like(lam))
    stem = tmp_path / "weighting"
    _check_written(plots.plot_implied_weighting({"vp eps": (lam, weight)}, stem), stem)
    _, rows = _read_csv(stem.with_suffix(".csv"))
    np.testing.assert_allclose([float(r[3]) for r in rows], weight.numpy(), rtol=1e-9)


@pytest.mark.parametrize("logy", [False, True])
def test_a_data_floor_is_a_line_with_its_band(logy: bool) -> None:
    import matplotlib.pyplot as plt

    from rectdiff.plots.figures import _draw_band

    fig, ax = plt.subplots()
    ax.set_yscale("log" if logy else "linear")
    _draw_band(ax, "data floor", 0.3, 0.05)
    _draw_band(ax, "floor without spread", 0.2, None)
    _draw_band(ax, "wide", 0.1, 0.4)  # 0.1 - 0.4 < 0: the band starts at 1e-4 instead
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert lines == {"data floor (± 1 std)": [0.3, 0.3], "floor without spread": [0.2, 0.2],
                     "wide (± 1 std)": [0.1, 0.1]}  # fmt: skip
    spans = sorted(
        (round(float(y0), 12), round(float(y1), 12))
        for y0, y1 in (ax.transData.inverted().transform(p.get_window_extent())[:, 1]
                       for p in ax.patches)
    )  # fmt: skip
    assert spans == pytest.approx([(1e-4, 0.5), (0.25, 0.35)], rel=1e-6)
    plt.close(fig)


def test_trajectories_xy_csv_has_x_and_y_over_alpha(tmp_path: Path) -> None:
    form = forms.VP()
    oracle = CouplingOracle(
        form, "eps", scale=torch.tensor([0.5, 2.0]), shift=torch.tensor([1.0, -1.0])
    )
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    traj = samplers.sample(
        oracle, eps, form=form, prediction="eps", steps=12, return_trajectory=True
    )
    stem = tmp_path / "xy"
    _check_written(plots.plot_trajectories_xy({"vp": traj}, stem, max_paths=3), stem)
    header, rows = _read_csv(stem.with_suffix(".csv"))
    assert header == ["label", "path", "step", "t", "x_1", "x_2", "y_1", "y_2"]
    assert len(rows) == 3 * 13  # max_paths paths, K+1 states each
    table = np.array([[float(v) for v in r[1:]] for r in rows])
    path, step = table[:, 0].astype(int), table[:, 1].astype(int)
    x = traj.x.numpy()[step, path]
    alpha = form.alpha(traj.t).numpy()[step]
    np.testing.assert_allclose(table[:, 3:5], x, rtol=1e-7)
    np.testing.assert_allclose(table[:, 5:7], x / alpha[:, None], rtol=1e-7)
    with pytest.raises(ValueError, match="2-D"):
        three_d = samplers.Trajectory(
            traj.t, torch.zeros(13, 5, 3), traj.x0_pred, traj.eps_pred, 12, form, "eps", "ddim"
        )
        plots.plot_trajectories_xy({"3d": three_d}, tmp_path / "bad")


def test_samples_points_and_images(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    points = {"model": torch.randn(30, 2, generator=generator, dtype=F64)}
    reference = torch.randn(40, 2, generator=generator, dtype=F64)
    stem = tmp_path / "points"
    _check_written(plots.plot_samples(points, stem, reference=reference, max_points=25), stem)
    _, rows = _read_csv(stem.with_suffix(".csv"))
    assert [r[0] for r in rows] == ["data (reference)"] * 25 + ["model"] * 25
    np.testing.assert_allclose(
        [[float(r[2]), float(r[3])] for r in rows[25:]], points["model"][:25]
    )

    images = {"digits": torch.rand(5, 1, 4, 3, generator=generator, dtype=F64)}
    stem = tmp_path / "images"
    _check_written(plots.plot_samples(images, stem), stem)
    _, rows = _read_csv(stem.with_suffix(".csv"))
    np.testing.assert_allclose(
        [[float(v) for v in r[2:]] for r in rows], images["digits"].reshape(5, -1), rtol=1e-5
    )
    with pytest.raises(ValueError, match="images"):
        plots.plot_samples({"bad": torch.zeros(4, 5)}, tmp_path / "bad")


def test_figure_formats_are_the_files_written(tmp_path: Path) -> None:
    curves = {"vp": ([1, 2, 4], [0.5, 0.25, 0.2])}
    stem = tmp_path / "png_only"
    written = plots.plot_quality_vs_nfe(curves, stem, "w2", formats=["png"])
    assert [p.name for p in written] == ["png_only.png", "png_only.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["png_only.csv", "png_only.png"]
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = plots.plot_samples({"x": torch.randn(5, 2)}, tmp_path / "s", formats=("pdf",))
    assert written[0].read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match=r"figure formats \['jpg'\].*'png', 'svg', 'pdf'"):
        plots.plot_x0_drift(curves, tmp_path / "bad", formats=["jpg"])
    assert not list(tmp_path.glob("bad*"))


def test_image_grid_layout() -> None:
    # 5 images of 2x3 pixels in 3 columns: 2 rows, 1-pixel white gaps, values mapped to [0, 1]
    images = np.arange(5 * 6, dtype=np.float64).reshape(5, 1, 2, 3)
    grid = plots.image_grid(images, 3, lo=0.0, hi=29.0)
    assert grid.shape == (2 * 3 - 1, 3 * 4 - 1, 1)
    np.testing.assert_allclose(grid[3:5, 4:7, 0], images[4, 0] / 29.0)  # image 4: row 1, column 1
    np.testing.assert_array_equal(grid[2, :, 0], 1.0)  # the gap between rows
    np.testing.assert_array_equal(grid[3:5, 8:11, 0], 1.0)  # the empty sixth cell
