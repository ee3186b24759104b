"""Ctrl-C: `rectdiff pairs` and `rectdiff rectify` stop within seconds, keep what is complete,
say how to resume and exit 130 (a real SIGINT to a real process)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    command = [sys.executable, "-c", "import sys; from rectdiff.cli import main; sys.exit(main())"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([*command, *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
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


def test_rectify_stops_writes_nothing_and_says_so(teacher, tmp_path):
    pairs = tmp_path / "pairs"
    assert main(["pairs", "--model", str(teacher), "--out", str(pairs), "--num", "32",
                 "--steps", "2", "--solver", "ddim", "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "student"
    argv = ["rectify", "--model", str(teacher), "--pairs", str(pairs), "--out", str(out),
            "--steps", "1000000", "--batch-size", "8"]  # fmt: skip
    code, err, seconds = interrupt(argv, lambda text: "train:" in text, tmp_path)
    assert code == 130 and seconds < STOP_WITHIN, (code, seconds, err)
    assert "Traceback" not in err, err
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            f"rectdiff rectify: interrupted; nothing was written to {out} (rectify keeps no "
            "checkpoints); rerun the same command to start again."
        )
    )
    assert not out.exists() and not list(tmp_path.glob(".student*"))
