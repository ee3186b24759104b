"""How the bad-input audit runs one command: in a forked child of a process that imported the
heavy modules once (fast), or as a fresh ``rectdiff`` process (faithful, ~20 s of imports
each); either way in its own process group, with a timeout, stdout and stderr captured.

Used by ``bad_inputs.py``; nothing here knows the cases.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: what a fork-mode parent imports before forking (the heavy part of every command)
PRELOAD = (
    "rectdiff.cli", "rectdiff.apps.model_dirs", "rectdiff.apps.model_sources",
    "rectdiff.apps.compare.saved", "rectdiff.apps.compare.run", "rectdiff.apps.compare.config",
    "rectdiff.apps.compare.report", "rectdiff.apps.schedules", "rectdiff.plots.training",
    "rectdiff.stable_diffusion", "rectdiff.stable_diffusion.cli", "matplotlib.pyplot",
)  # fmt: skip
VENV_RECTDIFF = Path(sys.executable).parent / "rectdiff"


@dataclass
class Result:
    """What one command did."""

    rc: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.rc is None


def preload() -> None:
    """Import the heavy modules (fork mode), touching no thread pool."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _child(target: Sequence[str] | Callable[[], int | None], cwd: Path, out: Path) -> int:
    """In the forked child: redirect, run ``rectdiff.cli.main(target)`` (or call ``target``),
    return the exit code a ``rectdiff`` process would have."""
    os.setpgid(0, 0)
    os.chdir(cwd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if callable(target):
            return int(target() or 0)
        from rectdiff.cli import main

        sys.argv = ["rectdiff", *target]
        return int(main(list(target)) or 0)
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def start_fork(target, cwd: Path, out: Path) -> int:
    """Fork a child running ``target`` (argv or a function); its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = _child(target, cwd, out)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code if 0 <= code < 256 else 1)
    return pid


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def wait_fork(pid: int, out: Path, timeout: float, started: float) -> Result:
    """Wait for a forked child (killing its process group at ``timeout``)."""
    rc: int | None = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            if rc < 0:  # killed by a signal, as a shell reports it
                rc = 128 - rc
            break
        if time.monotonic() - started > timeout:
            _kill_group(pid)
            os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    _kill_group(pid)  # workers it left behind
    return Result(rc, _read(out / "stdout"), _read(out / "stderr"), time.monotonic() - started)


def run_spawn(argv: Sequence[str], cwd: Path, timeout: float) -> Result:
    """A fresh ``rectdiff`` process (every import paid again)."""
    started = time.monotonic()
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.Popen(
        [str(VENV_RECTDIFF), *argv],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip (bytes: carriage returns are kept, not turned into newlines)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        rc = None
    _kill_group(proc.pid)
    text = [b.decode(errors="replace") for b in (stdout, stderr)]
    return Result(rc, *text, time.monotonic() - started)


def run(target, cwd: Path, timeout: float, *, spawn: bool = False) -> Result:
    """Run ``target`` (argv, or in fork mode a function) to the end or the timeout."""
    if spawn and not callable(target):
        return run_spawn(target, cwd, timeout)
    out = cwd / ".." / f".{cwd.name}.io"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    return wait_fork(start_fork(target, cwd, out), out, timeout, started)


def _read(path: Path) -> str:
    try:  # bytes: carriage returns (progress bars redrawn in place) are kept as they are
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""
