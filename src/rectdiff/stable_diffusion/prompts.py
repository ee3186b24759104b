"""Reading prompts: a .txt file (one per line) or a .jsonl / .csv file with a caption column."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

__all__ = ["CAPTION_COLUMNS", "PROMPT_SUFFIXES", "read_prompts"]

#: columns tried, in order, when no caption column is named
CAPTION_COLUMNS = ("caption", "text", "prompt")
#: the file types :func:`read_prompts` reads
PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")


def _column(path: Path, keys: list[str], caption_column: str | None, where: str) -> str:
    if caption_column is not None:
        if caption_column not in keys:
            raise ValueError(
                f"{path}: {where} has no column {caption_column!r}; its columns are "
                f"{', '.join(map(repr, keys)) or 'none'}. Pass --caption-column with one of them."
            )
        return caption_column
    for name in CAPTION_COLUMNS:
        if name in keys:
            return name
    raise ValueError(
        f"{path}: {where} has none of the columns {', '.join(CAPTION_COLUMNS)} (its columns "
        f"are {', '.join(map(repr, keys)) or 'none'}); name the caption column with "
        "--caption-column."
    )


def _from_jsonl(path: Path, caption_column: str | None) -> list[str]:
    prompts, column = [], caption_column
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object.")
        column = _column(path, list(row), column, f"line {number}")
        prompts.append(str(row[column]))
    return prompts


def _from_csv(path: Path, caption_column: str | None) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return []
        column = _column(path, list(reader.fieldnames), caption_column, "the header")
        return [row[column] or "" for row in reader]


def read_prompts(path: str | os.PathLike[str], caption_column: str | None = None) -> list[str]:
    """The prompts of a file, in file order.

    ``.txt``: one prompt per line (blank lines skipped). ``.jsonl``: one JSON object per
    line, ``.csv``: a header row; the prompt is ``caption_column``, or else the first of
    ``caption``, ``text``, ``prompt`` present. Prompts are stripped of surrounding whitespace;
    an empty caption in a .jsonl/.csv row stays (the empty prompt).

    Raises:
        ValueError: missing file, unknown suffix, no caption column, or no prompts at all.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            prompts = [p for p in prompts if p]
        elif suffix == ".jsonl":
            prompts = [p.strip() for p in _from_jsonl(path, caption_column)]
        elif suffix == ".csv":
            prompts = [p.strip() for p in _from_csv(path, caption_column)]
    except UnicodeDecodeError as err:
        raise ValueError(
            f"prompt file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
            f"offset {err.start}); save it as UTF-8."
        ) from None
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise ValueError(
            f"prompt file {str(path)!r} has suffix {suffix!r}; allowed: "
            f"{', '.join(PROMPT_SUFFIXES)} (one prompt per line, or a caption column)."
        )
    if not prompts:
        raise ValueError(
            f"prompt file {str(path)!r} holds no prompts; write one prompt per line (.txt) or "
            "one row per prompt (.jsonl/.csv)."
        )
    return prompts
