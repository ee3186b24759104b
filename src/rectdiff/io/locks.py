"""One writer per output: a lock file beside each output folder.

``with output_lock(out, command):`` holds ``<parent>/.<name>.rectdiff.lock`` (a JSON record
of the pid, host, command and start time) while a command writes ``out``. The lock sits
beside the output rather than inside it, so it works for outputs published by a rename at the
end (a model folder) and never shows up in the output itself. It is created atomically
(written complete under a temporary name, then hard-linked into place, which fails if the
name exists), so a second writer always finds a complete record and is refused with an
:class:`OutputLocked` naming the lock file and its holder. A lock whose pid is no longer
alive on this host is stale (its writer was killed) and is taken over with a note on stderr;
a lock held on another host is never presumed stale.

This module imports nothing heavy: the command line takes locks before torch is loaded.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import RectdiffError
from .files import named_os_error

__all__ = ["OutputLocked", "lock_path", "output_lock"]


class OutputLocked(RectdiffError, RuntimeError):
    """Another process is writing the same output (its lock file names it)."""


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of output ``out``: ``<parent>/.<name>.rectdiff.lock``."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}.rectdiff.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The lock's record; ``None`` when it has gone; ``{}`` when it is not a lock we can read."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _stale(record: dict[str, Any]) -> bool:
    pid = record.get("pid")
    return (
        record.get("host") == socket.gethostname()
        and isinstance(pid, int)
        and pid != os.getpid()
        and not _alive(pid)
    )


def _describe(record: dict[str, Any]) -> str:
    if not record:
        return "an unreadable lock"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return (
        f"pid {record.get('pid')} on {record.get('host')}, since {since}: "
        f"{record.get('command', '?')}"
    )


def _take_over(path: Path, record: dict[str, Any]) -> None:
    """Remove the stale lock ``record`` at ``path`` (unless another process replaced it)."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != record:  # a live writer took it over meanwhile: give it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


@contextmanager
def output_lock(out: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """Hold the lock of output ``out`` while the block runs; yield the lock file's path.

    Args:
        out: the output folder (or file); its parent is created if missing.
        command: what writes it, recorded in the lock (shown to a second writer).

    Raises:
        OutputLocked: another live process holds the lock (the message names the lock file,
            the holder's pid, host and command, and what to do).
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.time()}  # fmt: skip
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record))
    except OSError as err:  # a full disk fails the write without naming the file
        tmp.unlink(missing_ok=True)
        raise named_os_error(err, tmp) from None
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                held = _read(path)
                if held is None:  # released meanwhile
                    continue
                if not _stale(held):
                    raise OutputLocked(
                        f"{out} is being written by another rectdiff ({_describe(held)}); its "
                        f"lock file is {path}. Wait for it to finish or choose another output; "
                        f"if that process is gone, remove {path}."
                    ) from None
                print(
                    f"rectdiff: note: took over the stale lock {path} of a writer that is no "
                    f"longer running ({_describe(held)}); {out} may hold its partial output.",
                    file=sys.stderr,
                )
                _take_over(path, held)
        else:
            raise OutputLocked(f"could not take the lock {path} of {out}; try again.")
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield path
    finally:
        if _read(path) == record:
            path.unlink(missing_ok=True)
