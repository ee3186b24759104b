"""A training run's checkpoints: ``out_dir/checkpoints/step_N`` folders written by
``accelerator.save_state`` (through a temporary folder, so a crash or a full disk never
leaves a half-written one), a ``latest`` file naming the newest, and the oldest pruned
beyond ``keep``. A resumed run loads ``latest`` and ends with the weights of an
uninterrupted one (the state holds model, optimizer, scheduler, RNG and
:class:`~rectdiff.training.state.CheckpointState`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator

from ..io.files import publish_folder, write_text_atomic

__all__ = ["checkpoint_root", "save_checkpoint", "prune_checkpoints", "load_latest"]


def checkpoint_root(out_dir: str | Path | None) -> Path | None:
    """``out_dir/checkpoints``, or None without an ``out_dir``."""
    return None if out_dir is None else Path(out_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, root: Path, step: int, keep: int) -> Path:
    """Write ``root/step_<step>`` on every process's behalf, point ``latest`` at it and keep
    the newest ``keep`` (0: all); returns the folder."""
    acc = accelerator
    name = f"step_{step}"
    final, tmp = root / name, root / f".{name}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
    except BaseException:  # a full disk, Ctrl-C: no half-written state is left behind
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()
    if acc.is_main_process:
        publish_folder(tmp, final)
        write_text_atomic(root / "latest", name + "\n")
        prune_checkpoints(root, keep)
    acc.wait_for_everyone()
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` ``step_N`` folders (none for ``keep <= 0``)."""
    if keep <= 0:
        return
    found = sorted(
        (int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name[5:].isdigit()
    )
    for _, path in found[:-keep]:
        shutil.rmtree(path)


def load_latest(accelerator: Accelerator, root: Path | None) -> Path | None:
    """Load the checkpoint ``root/latest`` names into ``accelerator``'s registered objects;
    the folder loaded, or None when there is none.

    Raises:
        ValueError: ``latest`` names a folder that does not exist.
    """
    if root is None or not (root / "latest").is_file():
        return None
    path = root / (root / "latest").read_text().strip()
    if not path.is_dir():
        raise ValueError(f"{root / 'latest'} names {path.name}, which does not exist.")
    accelerator.load_state(str(path))
    return path
