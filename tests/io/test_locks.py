"""One writer per output: a second writer is refused naming the lock file, a killed writer's
stale lock is taken over with a note, the lock is gone once the writer ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from rectdiff.cli import main
from rectdiff.io.locks import OutputLocked, lock_path, output_lock

HOLD = "import sys, time; from rectdiff.io.locks import output_lock\n" \
       "with output_lock(sys.argv[1], 'rectdiff pairs --out first'):\n" \
       "    print('held', flush=True); time.sleep(120)"  # fmt: skip


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of ``tmp_path / 'out'``."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"held\n"
        yield out, process
    finally:
        process.kill()
        process.wait()


def test_the_lock_records_the_writer_and_is_removed_after(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with output_lock(out, "rectdiff rectify --out out") as path:
            assert path == tmp_path / ".out.rectdiff.lock"
            record = json.loads(path.read_text())
            assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
            assert record["command"] == "rectdiff rectify --out out"
            raise RuntimeError("boom")
    assert not path.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary left either


def test_a_second_writer_is_refused_naming_the_lock(holder, capsys):
    out, process = holder
    lock = lock_path(out)
    before = lock.read_bytes()
    with pytest.raises(OutputLocked) as refused:
        with output_lock(out, "rectdiff pairs --out second"):
            pytest.fail("two writers proceeded")
    message = str(refused.value)
    assert str(lock) in message and f"pid {process.pid} on {socket.gethostname()}" in message
    assert "rectdiff pairs --out first" in message
    # the command line: exit 2, one line naming the lock, nothing written, the lock untouched
    code = main(["pairs", "--model", str(out.parent / "teacher"), "--out", str(out), "--num", "8"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"rectdiff pairs: error: {out} is being written by another rectdiff")
    assert str(lock) in err and "Traceback" not in err
    assert lock.read_bytes() == before and not out.exists()


def test_a_killed_writers_lock_is_taken_over_with_a_note(holder, capsys):
    out, process = holder
    stale = json.loads(lock_path(out).read_text())
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert lock_path(out).exists()  # a killed writer cannot remove its lock
    with output_lock(out, "rectdiff pairs --out again") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"took over the stale lock {path}" in err and f"pid {stale['pid']}" in err
    assert not path.exists()


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    record = {"pid": 1, "host": "elsewhere", "command": "rectdiff compare", "started": 0}
    lock_path(out).write_text(json.dumps(record))
    with pytest.raises(OutputLocked, match="pid 1 on elsewhere"):
        with output_lock(out, "rectdiff compare"):
            pass
    assert json.loads(lock_path(out).read_text()) == record
