"""Resume that cannot lie: the settings that change the weights, recorded beside a training
run's checkpoints, and a refusal to resume under other ones.

A training command writes ``work_dir/rectify_settings.json`` before its first step and, on a
rerun, resumes ``work_dir/checkpoints/latest`` only when the settings it is given now equal
the recorded ones; otherwise it names each differing setting with both values. Used by
``rectdiff rectify`` and ``rectdiff sd rectify``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import write_json_atomic

__all__ = ["SETTINGS", "check_resume", "record_settings", "latest_checkpoint",
           "setting_differences"]  # fmt: skip

#: the training settings of the checkpoints in ``work_dir`` (beside ``checkpoints/``)
SETTINGS = "rectify_settings.json"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def setting_differences(stored: Any, current: Any, there: str, prefix: str = "") -> list[str]:
    """``key.sub: <stored> <there>, <current> now`` for each (nested) setting that differs
    between two JSON documents; a key one of them lacks shows as ``"<absent>"``."""
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in list(stored) + [k for k in current if k not in stored]:
            name = f"{prefix}.{key}" if prefix else key
            out += setting_differences(stored.get(key, "<absent>"),
                                       current.get(key, "<absent>"), there, name)  # fmt: skip
        return out
    if stored == current:
        return []
    return [f"{prefix}: {_short(stored)} {there}, {_short(current)} now"]


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint ``work_dir/checkpoints/latest`` names, or None when there is none."""
    latest = Path(work_dir) / "checkpoints" / "latest"
    return latest.parent / latest.read_text().strip() if latest.is_file() else None


def check_resume(work_dir: Path, settings: dict[str, Any], max_steps: int | None, fix: str) -> None:
    """Refuse to resume the checkpoints in ``work_dir`` when they were trained with other
    ``settings`` (naming each differing one with both values), have no recorded settings,
    or are past ``max_steps``; nothing to check without a checkpoint. ``fix`` says how to
    start over instead (the flag)."""
    latest = work_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return
    recorded = work_dir / SETTINGS
    if not recorded.is_file():
        raise ValueError(
            f"{work_dir / 'checkpoints'} has no {SETTINGS}, so nothing says what its "
            f"checkpoints were trained with and resuming could mislabel the weights. {fix}"
        )
    stored = json.loads(recorded.read_text())
    current = json.loads(json.dumps(settings))
    differences = [
        f"{key}: {stored.get(key, '<absent>')!r} in the checkpoints, "
        f"{current.get(key, '<absent>')!r} now"
        for key in sorted(set(stored) | set(current))
        if stored.get(key, recorded) != current.get(key, recorded)
    ]
    if differences:
        raise ValueError(
            f"the checkpoints in {work_dir / 'checkpoints'} were trained with other settings: "
            + "; ".join(differences)
            + f". Rerun with the recorded settings to resume, or choose another out. {fix}"
        )
    step = int(latest.read_text().strip().removeprefix("step_"))
    if max_steps is not None and step > max_steps:
        raise ValueError(
            f"the newest checkpoint in {work_dir / 'checkpoints'} is at step {step}, past "
            f"max_steps = {max_steps}; set max_steps >= {step} to resume. {fix}"
        )


def record_settings(work_dir: Path, settings: dict[str, Any], resume: bool) -> None:
    """Write ``settings`` beside the checkpoints; without ``resume`` first unlink
    ``checkpoints/latest``, so that older checkpoints are never resumed under them."""
    if not resume:
        (work_dir / "checkpoints" / "latest").unlink(missing_ok=True)
    write_json_atomic(work_dir / SETTINGS, settings, indent=1)
