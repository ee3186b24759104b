"""The CSV loss log beside a run's checkpoints: the rows hold the right numbers (loss means,
the learning rate each update used, the gradient norm before clipping), a resumed run keeps
each step once, and `rectdiff plot --loss-log` draws it."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from rectdiff import forms
from rectdiff.cli import main
from rectdiff.errors import RectdiffError
from rectdiff.models import MLP
from rectdiff.training import NonFiniteLossError, TrainConfig, train
from rectdiff.training.loss_log import COLUMNS, read_loss_log


def half_square(model, x0, **_):
    """0.5 ||theta||^2: its gradient is theta itself, so the gradient norm is ||theta||."""
    value = 0.5 * sum((p**2).sum() for p in model.parameters())
    return value, value.detach()[None]


def norm(model) -> float:
    return math.sqrt(sum(float((p.detach() ** 2).sum()) for p in model.parameters()))


def net() -> MLP:
    torch.manual_seed(0)
    return MLP(dim=2, hidden=8, depth=1)


def test_the_rows_hold_the_gradient_norm_before_clipping_and_the_lr_used(tmp_path):
    model = net()
    theta0 = norm(model)
    config = TrainConfig(steps=1, batch_size=4, lr=1e-3, log_every=1, grad_clip=0.1 * theta0,
                         out_dir=str(tmp_path))  # fmt: skip
    result = train(model, torch.randn(16, 2), form=forms.FlowMatching(), prediction="flow",
                   config=config, loss_fn=half_square, progress=False)  # fmt: skip
    log = read_loss_log(tmp_path / "loss_log.csv")
    assert log["step"] == [1.0]
    assert log["grad_norm"][0] == pytest.approx(theta0, rel=1e-6)  # not the clipped 0.1 theta0
    assert log["loss"][0] == pytest.approx(0.5 * theta0**2, rel=1e-6) == result.losses[0]
    assert log["lr"] == [pytest.approx(1e-3)] and math.isnan(log["ess"][0])  # a custom loss
    assert log["seconds"][0] > 0


def test_a_resumed_run_keeps_each_step_once_and_the_same_numbers(tmp_path):
    data = torch.randn(64, 2)

    def run(out, steps=20):
        config = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=10,
                             lr_schedule="linear", log_every=5, checkpoint_every=10,
                             out_dir=str(out))  # fmt: skip
        return train(net(), data, form=forms.VP(), prediction="eps", config=config,
                     progress=False)  # fmt: skip

    whole = run(tmp_path / "whole")
    first = read_loss_log(tmp_path / "whole" / "loss_log.csv")
    assert first["step"] == [5, 10, 15, 20]
    # loss: the mean over the steps since the previous row
    for i, step in enumerate((5, 10, 15, 20)):
        assert first["loss"][i] == pytest.approx(sum(whole.losses[step - 5 : step]) / 5, rel=1e-7)
    # diffusers' linear warm-up then decay: update k uses lr * (k-1)/10, then (20-(k-1))/10
    assert first["lr"] == pytest.approx([1e-2 * 0.4, 1e-2 * 0.9, 1e-2 * 0.6, 1e-2 * 0.1])
    assert first["ess"] == [1.0] * 4 and all(g > 0 for g in first["grad_norm"])

    # an interruption after step 10's checkpoint (rows 15 and a partial 20 were written)
    out = tmp_path / "resumed"
    run(out, steps=20)
    (out / "checkpoints" / "latest").write_text("step_10\n")
    with open(out / "loss_log.csv", "a") as file:
        file.write("20,0.12")
    before = read_loss_log(out / "loss_log.csv")
    run(out, steps=20)
    resumed = read_loss_log(out / "loss_log.csv")
    assert resumed["step"] == [5, 10, 15, 20]
    assert resumed["seconds"][:2] == before["seconds"][:2]  # the kept rows are untouched
    assert resumed["seconds"][2] > resumed["seconds"][1]  # time adds up over the runs
    for column in ("loss", "lr", "grad_norm", "ess"):
        assert resumed[column] == first[column], column  # resumed exactly


def test_plot_draws_the_log_and_refuses_what_is_not_one(tmp_path, capsys):
    config = TrainConfig(steps=6, batch_size=8, log_every=2, out_dir=str(tmp_path / "run"))
    train(net(), torch.randn(32, 2), form=forms.FlowMatching(), prediction="flow",
          config=config, progress=False)  # fmt: skip
    assert main(["plot", "--loss-log", str(tmp_path / "run"), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "loss_log.png").stat().st_size > 1000
    with open(tmp_path / "fig" / "loss_log.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["run", *COLUMNS]
    log = read_loss_log(tmp_path / "run" / "loss_log.csv")
    assert [float(r[1]) for r in rows[1:]] == log["step"] == [2, 4, 6]
    assert [float(r[2]) for r in rows[1:]] == log["loss"]
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    capsys.readouterr()
    assert main(["plot", "--loss-log", str(tmp_path / "notes.csv"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "notes.csv is not a rectdiff loss log" in err and len(err.strip().splitlines()) == 1


def test_a_non_finite_loss_is_a_rectdiff_error():
    assert issubclass(NonFiniteLossError, RectdiffError)
    assert issubclass(NonFiniteLossError, RuntimeError)


def test_log_with_csv_keeps_only_the_loss_log(tmp_path):
    config = TrainConfig(steps=4, batch_size=8, log_every=2, out_dir=str(tmp_path), log_with="csv")
    train(net(), torch.randn(32, 2), form=forms.FlowMatching(), prediction="flow",
          config=config, progress=False)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_log.csv", "train_config.json"]
    assert read_loss_log(tmp_path / "loss_log.csv")["step"] == [2, 4]


def test_a_tracker_whose_package_is_missing_is_named_with_its_pip_command(
    tmp_path, monkeypatch, capsys
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))  # fmt: skip
    with pytest.raises(RectdiffError, match=r"log_with = 'tensorboard' needs the tensorboard "
                       r"package, which is not installed; run `pip install tensorboard`"):  # fmt: skip
        TrainConfig(log_with="tensorboard")
    out = tmp_path / "student"
    argv = ["rectify", "--model", str(tmp_path / "teacher"), "--pairs", str(tmp_path / "pairs"),
            "--out", str(out), "--log-with", "tensorboard"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install tensorboard" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, the lock released


def test_log_with_tensorboard_writes_the_loss_and_lr_series(tmp_path):
    """Where the optional tensorboard package is installed (skipped otherwise)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(steps=10, batch_size=8, log_every=5, out_dir=str(tmp_path),
                         log_with="tensorboard")  # fmt: skip
    train(net(), torch.randn(32, 2), form=forms.FlowMatching(), prediction="flow",
          config=config, progress=False)  # fmt: skip
    events = EventAccumulator(str(tmp_path / "rectdiff"))
    events.Reload()
    log = read_loss_log(tmp_path / "loss_log.csv")
    for name in ("loss", "lr"):
        series = events.Scalars(name)
        assert [e.step for e in series] == [5, 10]
        assert [e.value for e in series] == pytest.approx(log[name], rel=1e-6)
