"""rectdiff's expected errors, and the command line's error boundary.

An *expected* error is one a user can fix: a bad value, a damaged or foreign file, a full
disk. Its message names the value, what was allowed and how to fix it, and the command line
prints it as one line on stderr with exit code 2. Anything else is a bug and keeps its
traceback. The hierarchy::

    RectdiffError
    ├── ConfigError (also a ValueError)    a setting: flag, config key, argument
    ├── DataError   (also a ValueError)    the user's data: non-finite values, unreadable files
    ├── StoreError  (also a RuntimeError)  a pair store or saved model: missing, damaged, foreign
    │   └── rectdiff.rectify.store.PairStoreError
    ├── SolveError  (also a FloatingPointError)  a sampler's result went non-finite, or an
    │                                            adaptive solver gave up
    ├── rectdiff.training.NonFiniteLossError (also a RuntimeError)  a NaN or infinite loss
    └── rectdiff.io.locks.OutputLocked (also a RuntimeError)  another writer holds the output

The library also raises plain ``ValueError`` for bad arguments (documented per function);
the boundary treats those as expected too. Expected OS errors are the ones a user causes or
fixes: a missing path, no permission, a read-only file system, no space left.

This module imports nothing heavy: the command line uses it before torch is loaded.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "RectdiffError", "ConfigError", "DataError", "StoreError", "SolveError", "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "is_expected", "one_line", "run_command",
]  # fmt: skip

#: exit code of an expected error (as argparse's own usage errors)
EXIT_ERROR = 2
#: exit code after Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_INTERRUPTED = 130


class RectdiffError(Exception):
    """An error the user can fix; the message says what was wrong, what was allowed and how."""


class ConfigError(RectdiffError, ValueError):
    """A setting (command-line flag, config key, function argument) out of its allowed values."""


class DataError(RectdiffError, ValueError):
    """The user's data: non-finite values, an empty set, an unreadable file."""


class StoreError(RectdiffError, RuntimeError):
    """A pair store or saved model that is missing, damaged, or made by another model."""


class SolveError(RectdiffError, FloatingPointError):
    """A sampler's result went non-finite, or an adaptive solver's step size underflowed: a
    model, form, prediction or tolerance that does not fit (the message says which)."""


#: OS errors a user causes and fixes, with what to do about each
_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path (a part of it is a file)",
    errno.EISDIR: "give a file, not a folder",
    errno.EEXIST: "choose another path or remove it",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOSPC: "free some space or choose another folder, then rerun",
    errno.EDQUOT: "free some space or choose another folder, then rerun",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def is_expected(err: BaseException) -> bool:
    """Whether ``err`` is a user's error (one line, exit 2) rather than a bug (traceback)."""
    if isinstance(err, (RectdiffError, ValueError)):
        return True
    return isinstance(err, OSError) and err.errno in _OS_HINTS


def one_line(err: BaseException) -> str:
    """``err``'s message on one line; an OS error as what failed, on which path, and what to do."""
    if isinstance(err, OSError) and err.errno in _OS_HINTS:
        paths = " -> ".join(repr(str(p)) for p in (err.filename, err.filename2) if p is not None)
        where = f" {paths}" if paths else ""
        return f"{err.strerror or errno.errorcode[err.errno]}:{where}; {_OS_HINTS[err.errno]}."
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _clear_progress_bars() -> None:
    """Close the progress bars an error or Ctrl-C cut short, erasing them (``leave=False``),
    so that what the terminal is left with is the one line that says what happened."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        try:
            bar.leave = False
            bar.close()
        except Exception:  # a bar half torn down already: nothing to erase
            pass


@contextmanager
def _sigint_watch() -> Iterator[list[int]]:
    """Note each Ctrl-C while raising ``KeyboardInterrupt`` as Python's own handler does.

    Python raises ``KeyboardInterrupt`` at the next bytecode, which can be inside a C
    extension's callback: torch, asked for a tensor from a sequence whose item lookup was
    interrupted, turns it into ``ValueError: could not determine the shape of object type
    ...``. The list this yields says that a Ctrl-C came, whatever the exception says. Only
    Python's default handler in the main thread is replaced (and restored after)."""
    received: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):  # fmt: skip
        yield received
        return

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_command(
    command: Callable[[], int | None],
    prog: str,
    *,
    debug: bool = False,
    interrupted: str | Callable[[], str] = "",
) -> int:
    """Run ``command`` inside the error boundary and return the exit code.

    An expected error prints ``{prog}: error: {message}`` on one line and returns 2; Ctrl-C
    prints ``{prog}: interrupted; {interrupted}`` (what was kept, how to resume; a callable is
    asked then, so it can look at what is on disk; a ``KeyboardInterrupt`` raised with a
    message, as a library function re-raises it once it knows what it kept, says it instead)
    and returns 130, also when a library turned the ``KeyboardInterrupt`` into another
    exception on its way out; anything else propagates with its traceback. ``debug`` prints
    the traceback of expected errors and interrupts too (before the line).
    """
    with _sigint_watch() as sigints:
        try:
            return int(command() or 0)
        except KeyboardInterrupt as stop:
            return _report_interrupt(prog, str(stop), interrupted, debug)
        except Exception as err:
            if sigints:
                return _report_interrupt(prog, "", interrupted, debug)
            if not is_expected(err):
                raise
            _clear_progress_bars()
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
            return EXIT_ERROR


def _report_interrupt(
    prog: str, said: str, interrupted: str | Callable[[], str], debug: bool
) -> int:
    """Print the interrupt's one line (``said``, else the caller's hint) and give 130."""
    _clear_progress_bars()
    if debug:
        traceback.print_exc()
    hint = said or (interrupted() if callable(interrupted) else interrupted)
    print(f"{prog}: interrupted; {hint or 'nothing to resume.'}", file=sys.stderr)
    return EXIT_INTERRUPTED
