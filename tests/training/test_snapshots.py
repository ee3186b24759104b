"""Watching a run from tensorboard: a short `rectdiff rectify --log-with tensorboard
--sample-every N`, its event file read back: the loss and learning-rate series equal the
loss_log.csv rows, and the sample snapshots are there, the last one being exactly the final
student's one-step DDIM samples (read from its CSV)."""

from __future__ import annotations

import csv

import pytest
import torch

from rectdiff import forms, samplers
from rectdiff.cli import main
from rectdiff.io.model_dir import build_model, load_model_dir, save_model_dir
from rectdiff.training import TrainConfig, train
from rectdiff.training.loss_log import read_loss_log
from rectdiff.training.snapshots import snapshot_noise

NET = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 16, "depth": 1}}


def snapshot_points(path) -> torch.Tensor:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return torch.tensor([[float(r["x_1"]), float(r["x_2"])] for r in rows], dtype=torch.float64)


def test_rectify_log_with_tensorboard_holds_loss_lr_and_sample_snapshots(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    form = forms.FlowMatching()
    torch.manual_seed(0)
    save_model_dir(tmp_path / "teacher", build_model(NET, form), form=form, prediction="flow",
                   net_config=NET)  # fmt: skip
    assert main(["pairs", "--model", str(tmp_path / "teacher"), "--out", str(tmp_path / "pairs"),
                 "--num", "64", "--steps", "2", "--solver", "ddim", "--no-progress"]) == 0  # fmt: skip
    out, steps = tmp_path / "student", 40
    argv = ["rectify", "--model", str(tmp_path / "teacher"), "--pairs", str(tmp_path / "pairs"),
            "--out", str(out), "--steps", str(steps), "--batch-size", "16", "--log-with",
            "tensorboard", "--sample-every", "20", "--seed", "5", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    run = tmp_path / "student.train"
    events = EventAccumulator(str(run / "rectdiff"), size_guidance={"images": 0})
    events.Reload()
    log = read_loss_log(run / "loss_log.csv")
    for name in ("loss", "lr"):
        series = events.Scalars(name)
        assert [e.step for e in series] == [int(s) for s in log["step"]]
        assert [e.value for e in series] == pytest.approx(log[name], rel=1e-6)
    images = events.Images("samples")
    assert [e.step for e in images] == [20, 40]
    assert all(e.width > 100 and e.height > 100 for e in images)
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [
        "step_0000020.png",
        "step_0000040.png",
    ]
    # the last snapshot: the saved student's one DDIM step from the snapshot noise
    student, form, prediction = load_model_dir(out)
    noise = snapshot_noise((2,), 5, "cpu")
    want = samplers.sample(student, noise, form=form, prediction=prediction, solver="ddim",
                           steps=1).double()  # fmt: skip
    got = snapshot_points(run / "samples" / "step_0000040.csv")
    assert got.shape == (1000, 2)
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-7)  # the CSV keeps 8 digits


def test_snapshots_use_the_ema_weights_and_skip_undrawable_data(tmp_path):
    """With an EMA the snapshot is the EMA model's (what train returns); 3-D points cannot be
    drawn: a warning says so and no snapshot is written."""
    form = forms.FlowMatching()
    torch.manual_seed(1)
    model = build_model(NET, form)
    config = TrainConfig(steps=10, batch_size=8, out_dir=str(tmp_path / "a"), sample_every=10,
                         ema_decay=0.5, sample_steps=2)  # fmt: skip
    result = train(model, torch.randn(32, 2), form=form, prediction="flow", config=config,
                   progress=False)  # fmt: skip
    noise = snapshot_noise((2,), 0, "cpu")
    want = samplers.sample(result.model, noise, form=form, prediction="flow", solver="ddim",
                           steps=2).double()  # fmt: skip
    got = snapshot_points(tmp_path / "a" / "samples" / "step_0000010.csv")
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-7)

    net3 = build_model({"kind": "mlp", "kwargs": {"dim": 3, "hidden": 8, "depth": 1}}, form)
    config = TrainConfig(steps=4, batch_size=8, out_dir=str(tmp_path / "b"), sample_every=2)
    with pytest.warns(UserWarning, match=r"sample_every=2: snapshots draw unconditional 2-D "
                      r"points or \(C, H, W\) images, not items of shape \(3,\)"):  # fmt: skip
        train(net3, torch.randn(32, 3), form=form, prediction="flow", config=config,
              progress=False)  # fmt: skip
    assert not (tmp_path / "b" / "samples").exists()
