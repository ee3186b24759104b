"""Files written whole or not at all: a temporary name, then ``os.replace``."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "publish_folder",
    "temporary_sibling",
    "check_writable",
]


def _os_code(err: BaseException) -> int | None:
    """The OS error number behind ``err``: its errno, or the one a writer in another language
    (safetensors' Rust) quotes in its message (``os error 28``, ``code: 28``)."""
    if isinstance(err, OSError):
        return err.errno
    match = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(err))
    return int(match.group(1) or match.group(2)) if match else None


def named_os_error(err: BaseException, path: str | os.PathLike[str]) -> BaseException:
    """``err`` as an ``OSError`` that names ``path`` when it is an OS error without a file name
    (a write that fails with ENOSPC says neither which file nor where); else ``err``."""
    code = _os_code(err)
    if code is None or (isinstance(err, OSError) and err.filename is not None):
        return err
    named = OSError(code, os.strerror(code), str(path))
    named.__cause__ = err
    return named


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to; renamed onto ``path`` when the block ends
    normally, removed when it raises. For writers that take a file name (safetensors,
    matplotlib): ``with atomic_path(p) as tmp: save_file(tensors, tmp)``.

    The temporary name keeps the suffix (``.<stem>.<pid>.tmp<suffix>``), since some writers
    choose the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        named = named_os_error(err, path)
        if named is err:
            raise
        raise named from err
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through ``.<name>.<pid>.tmp`` and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` (UTF-8), written atomically."""
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(
    path: str | os.PathLike[str], obj: Any, indent: int = 2, **dumps: Any
) -> Path:
    """``obj`` as indented JSON, written atomically (``dumps`` go to ``json.dumps``)."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=indent, **dumps) + "\n").encode())


def temporary_sibling(final: str | os.PathLike[str]) -> Path:
    """A fresh, empty folder next to ``final`` to build it in (removed first if left over)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Move the finished folder ``tmp`` to ``final``, replacing an older ``final``.

    The old folder is first renamed aside, so ``final`` is at every moment either the old
    complete folder or the new one (never a mix); the old one is then deleted.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def check_writable(
    path: str | os.PathLike[str], flag: str, *, folder: bool, what: str | None = None
) -> Path:
    """Refuse an output path that cannot be written, before any work is done for it: a file
    where a folder is wanted (or the reverse), a file among its parents, a read-only or
    forbidden folder, a full disk. Nothing is created.

    Raises:
        ValueError: (a ``ConfigError``) naming ``flag`` and the path, for the wrong kind.
        OSError: EROFS, EACCES or ENOSPC naming the nearest existing folder.
    """
    from ..errors import ConfigError

    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        want, got = ("folder", "file") if folder else ("file", "folder")
        raise ConfigError(f"{flag} {str(path)!r} is a {got}; give the {what or want} to write.")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder; choose another path."
        )
    if not os.access(parent, os.W_OK):
        readonly = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        code = errno.EROFS if readonly else errno.EACCES
        raise OSError(code, os.strerror(code), str(parent))
    if os.statvfs(parent).f_bavail == 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(parent))
    return path
