"""Faults mid `rectdiff rectify`, then a rerun of the same command: a SIGKILL (no chance to
clean up), a disk that fills up at a checkpoint or at the final model write, and a second
writer to the same output. Each rerun ends with the weights of an uninterrupted run, bit for
bit (tolerance 0: the checkpoint holds the model, optimizer, scheduler and RNG states, and
the resumed steps draw the same batches and noise)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared import start_rectdiff

from rectdiff import forms
from rectdiff.cli import main
from rectdiff.io.locks import lock_path
from rectdiff.io.model_dir import build_model, save_model_dir

NET = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 8, "depth": 1}}
STEPS = 200
LONG = 2000  # the SIGKILL test's run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A flow-matching teacher, 32 of its pairs and the uninterrupted students (STEPS, and LONG
    with a checkpoint every 100 for the tests that act on a running process)."""
    root = tmp_path_factory.mktemp("faults")
    form = forms.FlowMatching()
    torch.manual_seed(0)
    save_model_dir(root / "teacher", build_model(NET, form), form=form, prediction="flow",
                   net_config=NET)  # fmt: skip
    assert main(["pairs", "--model", str(root / "teacher"), "--out", str(root / "pairs"),
                 "--num", "32", "--steps", "2", "--solver", "ddim", "--no-progress"]) == 0  # fmt: skip
    assert main([*rectify_argv(root, root / "whole"), "--no-progress"]) == 0
    assert main([*rectify_argv(root, root / "whole_long", LONG, 100), "--no-progress"]) == 0
    return root


def rectify_argv(root: Path, out: Path, steps: int = STEPS, every: int = 10) -> list[str]:
    return ["rectify", "--model", str(root / "teacher"), "--pairs", str(root / "pairs"),
            "--out", str(out), "--steps", str(steps), "--batch-size", "8",
            "--checkpoint-every", str(every)]  # fmt: skip


def assert_same_weights(out: Path, whole: Path) -> None:
    got, want = load_file(out / "model.safetensors"), load_file(whole / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def wait_for(path: Path, process: subprocess.Popen, text: str | None = None) -> None:
    """Until ``path`` exists (and, with ``text``, holds it)."""
    begun = time.monotonic()
    while not path.exists() or (text is not None and text not in path.read_text()):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() - begun < 240, f"{path} never appeared"
        time.sleep(0.02)


def test_sigkill_mid_rectify_then_the_same_command_resumes_to_the_same_weights(
    base, tmp_path, capsys
):
    # a run 10x longer than the others with 10x sparser checkpoints, so that the kill after
    # the first one lands mid-run even when this process is descheduled for a while (with 200
    # steps a busy CI machine once let the run finish before the kill arrived)
    argv = [*rectify_argv(base, tmp_path / "student", LONG, 100), "--no-progress"]
    out = tmp_path / "student"
    process = start_rectdiff(argv, tmp_path)
    try:
        wait_for(tmp_path / "student.train" / "checkpoints" / "latest", process, "step_100")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
    assert not out.exists() and lock_path(out).exists()  # killed: no model, a stale lock
    latest = (tmp_path / "student.train" / "checkpoints" / "latest").read_text().strip()
    assert 100 <= int(latest.removeprefix("step_")) < LONG

    assert main(argv) == 0
    assert "took over the stale lock" in capsys.readouterr().err
    assert_same_weights(out, base / "whole_long")
    assert not lock_path(out).exists()


def test_a_second_writer_is_refused_by_name_and_the_first_output_is_intact(base, tmp_path, capsys):
    out = tmp_path / "student"
    first = start_rectdiff([*rectify_argv(base, out, LONG, 100), "--no-progress"], tmp_path)
    try:  # the long run, so that the first writer is still running when the second starts
        wait_for(tmp_path / "student.train" / "checkpoints" / "step_100", first)
        assert main([*rectify_argv(base, out, LONG, 100), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(f"rectdiff rectify: error: {out} is being written by another")
        assert str(lock_path(out)) in err and f"pid {first.pid}" in err
        assert first.wait(timeout=240) == 0, first.stderr.read().decode()[-2000:]
    finally:
        first.kill()
    assert_same_weights(out, base / "whole_long")


@pytest.mark.parametrize("where", ["checkpoint", "model"])
def test_a_full_disk_mid_rectify_is_one_line_and_a_rerun_ends_with_the_same_weights(
    where, base, tmp_path, capsys, monkeypatch
):
    """No space left at the second checkpoint (its files half written) or at the student's
    final write: exit 2 naming the file; nothing half-written is published; the rerun, with
    space again, ends with the uninterrupted weights."""
    import accelerate

    import rectdiff.io.model_dir as model_dir_module

    out = tmp_path / "student"
    calls = []
    save_state, save_model = accelerate.Accelerator.save_state, model_dir_module.save_model

    def full_at_second_checkpoint(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            partial = Path(output_dir) / "model.safetensors"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))
        return save_state(self, output_dir, **kwargs)

    def full_at_model(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    if where == "checkpoint":
        monkeypatch.setattr(accelerate.Accelerator, "save_state", full_at_second_checkpoint)
    else:
        monkeypatch.setattr(model_dir_module, "save_model", full_at_model)
    assert main([*rectify_argv(base, out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("rectdiff rectify: error: No space left on device: '"), err
    assert err.endswith("'; free some space or choose another folder, then rerun."), err
    assert not out.exists() and not lock_path(out).exists()
    checkpoints = tmp_path / "student.train" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_"))
    assert kept == (["step_10"] if where == "checkpoint" else [f"step_{STEPS - 10}",
                                                               f"step_{STEPS}"])  # fmt: skip
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name and p.is_file()]

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    monkeypatch.setattr(model_dir_module, "save_model", save_model)
    assert main([*rectify_argv(base, out), "--no-progress"]) == 0
    assert_same_weights(out, base / "whole")


def test_the_student_records_its_full_training_settings(base):
    from rectdiff.io.model_dir import read_model_info
    from rectdiff.training import TrainConfig

    info = read_model_info(base / "whole")["info"]
    want = TrainConfig(steps=STEPS, batch_size=8, checkpoint_every=10).to_dict()
    assert {k: v for k, v in info["training"].items() if k != "out_dir"} == {
        k: v for k, v in want.items() if k != "out_dir"
    }
    assert (
        info["training"]["out_dir"] == str(base / "whole.train") and info["steps_trained"] == STEPS
    )
