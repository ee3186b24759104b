"""Ctrl-C: `rectdiff pairs` and `rectdiff rectify` stop within seconds, keep what is complete,
say how to resume and exit 130 (a real SIGINT to a real process); a rerun resumes exactly."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared import start_rectdiff

from rectdiff import forms
from rectdiff.cli import main
from rectdiff.io.model_dir import build_model, save_model_dir

NET = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 8, "depth": 1}}
#: seconds from SIGINT to exit allowed (measured 2.9-3.1 s on a loaded 2-core machine, most
#: of it the interpreter's shutdown)
STOP_WITHIN = 15.0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    form = forms.FlowMatching()
    torch.manual_seed(0)
    save_model_dir(root / "teacher", build_model(NET, form), form=form, prediction="flow",
                   net_config=NET)  # fmt: skip
    return root / "teacher"


def interrupt(argv: list[str], ready, cwd: Path) -> tuple[int, str, float]:
    """Start ``rectdiff argv``, send SIGINT once ``ready(stderr so far)`` holds; return the exit
    code, its stderr and the seconds from the signal to the exit."""
    process = start_rectdiff(argv, cwd)
    os.set_blocking(process.stderr.fileno(), False)
    err, start = b"", time.monotonic()
    try:
        while not ready(err.decode(errors="replace")):
            assert process.poll() is None, f"ended before the signal: {err.decode()[-2000:]}"
            assert time.monotonic() - start < 240, "never got ready"
            err += process.stderr.read() or b""
            time.sleep(0.05)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        os.set_blocking(process.stderr.fileno(), True)
        err += process.stderr.read()
        code = process.wait(timeout=60)
        return code, err.decode(errors="replace"), time.monotonic() - sent
    finally:
        process.kill()


def test_pairs_stops_and_keeps_its_complete_shards(teacher, tmp_path):
    out = tmp_path / "pairs"
    argv = ["pairs", "--model", str(teacher), "--out", str(out), "--num", "3000", "--shard-size",
            "100", "--steps", "1000", "--solver", "ddim", "--no-progress"]  # fmt: skip
    code, err, seconds = interrupt(
        argv, lambda _: (out / "shard_00001.done.json").exists(), tmp_path
    )
    assert code == 130 and seconds < STOP_WITHIN, (code, seconds, err)
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"rectdiff pairs: interrupted; complete shards are kept in {out}; rerun the same "
        "command to resume."
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
    done = sorted(out.glob("*.done.json"))
    assert 2 <= len(done) < 30
    assert not list(out.glob(".*tmp*")), "a half-written file was left"
    # every kept shard is complete: the file has the sha256 its record names
    for record in done:
        entry = json.loads(record.read_text())
        assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    shards = sorted(out.glob("shard_*.safetensors"))
    assert len(shards) == len(done)


def test_rectify_stops_keeps_a_checkpoint_and_resumes_to_the_same_weights(teacher, tmp_path):
    """Interrupted after a checkpoint, rerun with the same command: the student is bit for bit
    the uninterrupted run's (tolerance 0); the same rerun with another --lr is refused."""
    pairs = tmp_path / "pairs"
    assert main(["pairs", "--model", str(teacher), "--out", str(pairs), "--num", "32",
                 "--steps", "2", "--solver", "ddim", "--no-progress"]) == 0  # fmt: skip

    def argv(out: Path, *extra: str) -> list[str]:
        return ["rectify", "--model", str(teacher), "--pairs", str(pairs), "--out", str(out),
                "--steps", "2000", "--batch-size", "8", "--checkpoint-every", "100", *extra]  # fmt: skip

    # 2000 steps (~3 s) with a checkpoint every 100: the signal after the first one lands
    # mid-run even when this process is descheduled for a while (a 200-step run once finished
    # first on a busy CI machine)
    # ready once `latest` names a checkpoint: the folder step_100 appears (renamed into place)
    # a moment before `latest` is written, and a signal between the two once left none named
    out = tmp_path / "student"
    checkpoints = tmp_path / "student.train" / "checkpoints"
    code, err, seconds = interrupt(argv(out), lambda _: (checkpoints / "latest").exists(), tmp_path)
    assert code == 130 and seconds < STOP_WITHIN, (code, seconds, err)
    assert "Traceback" not in err, err
    kept = (checkpoints / "latest").read_text().strip()
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            f"rectdiff rectify: interrupted; the latest checkpoint, {checkpoints / kept}, is "
            "kept; rerun the same command to resume."
        )
    )
    assert int(kept.removeprefix("step_")) < 2000 and not out.exists()

    assert main([*argv(out, "--lr", "2e-3"), "--no-progress"]) == 2  # other settings: refused
    assert main([*argv(out), "--no-progress"]) == 0  # resumed
    assert main([*argv(tmp_path / "whole"), "--no-progress"]) == 0  # never interrupted
    resumed = load_file(out / "model.safetensors")
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key


#: a compare of four tiny cells in two worker processes
COMPARE = """
seed = 3
workers = 2
[data]
name = "8gaussians"
n_train = 256
n_eval = 64
[grid]
forms = ["vp", "fm"]
predictions = ["eps", "v"]
[network]
options = { hidden = 8, depth = 1 }
[train]
steps = 300
batch_size = 64
[rectify]
num_pairs = 64
steps = 2
shard_size = 64
pair_batch_size = 64
[evaluation]
steps = [1]
metrics = ["energy"]
n_diagnostic = 16
figures = false
"""


def _workers(parent: int) -> list[int]:
    """Pids of ``parent``'s multiprocessing workers (spawned, so ``spawn_main`` in the command)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_compare_with_workers_stops_them_and_exits(tmp_path):
    """SIGINT to the parent of a two-worker compare while its workers run: exit 130 within
    seconds (was: ran on to the end, writing no report), both workers ended, no report."""
    config, out = tmp_path / "tiny.toml", tmp_path / "out"
    config.write_text(COMPARE)
    argv = ["compare", "--config", str(config), "--out", str(out), "--no-progress"]
    process = start_rectdiff(argv, tmp_path)
    try:
        start = time.monotonic()
        while len(workers := _workers(process.pid)) < 2:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() - start < 240, "the workers never started"
            time.sleep(0.05)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        err = process.stderr.read().decode(errors="replace")
        code = process.wait(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        process.kill()
    assert code == 130 and seconds < STOP_WITHIN, (code, seconds, err)
    assert "Traceback" not in err and "leaked" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"rectdiff compare: interrupted; no cell had finished; nothing to keep in {out} (no "
        "report was written)."
    )
    assert [pid for pid in workers if _alive(pid)] == []
    assert not (out / "report.md").exists() and not (out / "results.json").exists()


def test_compare_interrupt_names_the_finished_cells(tmp_path):
    from rectdiff.apps.compare.cells import CellResult
    from rectdiff.apps.compare.run import _kept

    done = [CellResult("vp", "eps", forms.VP()), None, CellResult("fm", "v", forms.FlowMatching())]
    assert _kept(tmp_path, done) == (
        f"the 2 finished cell(s) (vp_eps, fm_v) are kept in {tmp_path}; rerun the same "
        "command to resume (--overwrite starts over)."
    )
