"""Config dataclasses from mappings (TOML tables, keyword dicts): one unknown-key check.

Every config in rectdiff is a dataclass built from a mapping; a key that is not a field is an
error that names the key, where it was found and the keys allowed there.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "reject_unknown", "check_choice", "field_names", "parameter_names", "from_mapping",
    "read_toml", "read_toml_table", "read_layered_toml", "merge_tables", "check_types",
    "check_argument_types",
]  # fmt: skip

T = TypeVar("T")


def reject_unknown(
    keys: Iterable[str], allowed: Sequence[str], what: str = "key", where: str = ""
) -> None:
    """Raise ``ValueError("unknown {what} 'k' {where}; allowed: ...")`` for the first key of
    ``keys`` not in ``allowed``; ``where`` reads like ``"in [evaluation]"``."""
    for key in keys:
        if key not in allowed:
            place = f" {where}" if where else ""
            raise ValueError(
                f"unknown {what} {key!r}{place}; allowed: {', '.join(allowed) or '(none)'}."
            )


def check_choice(value: Any, allowed: Sequence[Any], what: str) -> Any:
    """``value`` if it is one of ``allowed``, else ``ValueError`` naming both."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}.")
    return value


def field_names(cls: type) -> list[str]:
    """The init fields of a dataclass, in order."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def parameter_names(fn: Callable[..., Any], skip: Sequence[str] = ("self",)) -> list[str]:
    """The named parameters of ``fn`` (e.g. a class's ``__init__``), minus ``skip``."""
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name not in skip and p.kind is not p.VAR_KEYWORD]


def from_mapping(cls: type[T], values: Mapping[str, Any], what: str = "key", where: str = "") -> T:
    """``cls(**values)`` for a dataclass ``cls``, after rejecting keys that are not fields and
    values whose type is not the field's (:func:`check_types`)."""
    reject_unknown(values, field_names(cls), what, where)
    check_types(cls, values, what, where)
    return cls(**values)


_KINDS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "None": lambda v: v is None,
    "dict": lambda v: isinstance(v, Mapping),
    "list": lambda v: isinstance(v, list | tuple),
}


def _annotation(field: dataclasses.Field[Any]) -> str:
    return _annotation_name(field.type)


def _annotation_name(hint: Any) -> str:
    if isinstance(hint, str):
        return hint
    if hint is inspect.Parameter.empty:
        return "Any"
    return hint.__name__ if isinstance(hint, type) else repr(hint).replace("typing.", "")


def _matches(value: Any, hint: str) -> bool | None:
    """Whether ``value`` fits the annotation ``hint`` (a union of int, float, str, bool, None,
    list[...] and dict[...]); None when ``hint`` names another type (not checked)."""
    for option in (part.strip() for part in hint.split("|")):
        base, _, inner = option.partition("[")
        if base not in _KINDS:
            return None
        if not _KINDS[base](value):
            continue
        item = inner.rstrip("]")
        if base == "list" and item in _KINDS and not all(_KINDS[item](v) for v in value):
            continue
        return True
    return False


def check_types(cls: type, values: Mapping[str, Any], what: str = "key", where: str = "") -> None:
    """Raise ``ValueError`` naming the key, value, its type and the expected type for the first
    value of ``values`` that does not fit its field of dataclass ``cls`` (``steps = 1.5`` for an
    ``int``); fields of other types (``Any``, objects) are not checked."""
    _check_hints({f.name: _annotation(f) for f in dataclasses.fields(cls)}, values, what, where)


def check_argument_types(
    fn: Callable[..., Any], values: Mapping[str, Any], what: str = "key", where: str = ""
) -> None:
    """:func:`check_types` for the annotated parameters of ``fn`` (a class's ``__init__``), and
    a ``ValueError`` naming every required parameter missing from ``values``. Values come from
    a config file, so a ``Callable`` option of a union is not one a value can take."""
    params = inspect.signature(fn).parameters.values()
    named = [
        p for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = [p.name for p in named if p.default is p.empty and p.name not in values]
    if missing:
        place = f" {where}" if where else ""
        raise ValueError(f"missing {what} {', '.join(missing)}{place}; it has no default.")
    hints = {}
    for p in named:
        hint = p.annotation if isinstance(p.annotation, str) else _annotation_name(p.annotation)
        options = [o.strip() for o in hint.split("|") if not o.strip().startswith("Callable")]
        hints[p.name] = " | ".join(options)
    _check_hints(hints, values, what, where)


def _check_hints(
    hints: Mapping[str, str], values: Mapping[str, Any], what: str, where: str
) -> None:
    for key, value in values.items():
        if key in hints and _matches(value, hints[key]) is False:
            place = f" {where}" if where else ""
            raise ValueError(
                f"{what} {key} = {value!r}{place} has type {type(value).__name__}; expected "
                f'{hints[key]} (e.g. steps = 2000, lr = 1e-3, name = "digits").'
            )


def read_toml_table(path: str | Path, table: str | None = None) -> dict[str, Any]:
    """A TOML file as a dict, or its ``[table]`` (an error lists the tables there are)."""
    values = read_toml(path)
    if table is None:
        return values
    if not isinstance(values.get(table), dict):
        raise ValueError(f"{path}: no [{table}] table; tables: {', '.join(values) or 'none'}.")
    return values[table]


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a syntax error names the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err}).") from err
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not valid TOML (not UTF-8 text: byte {err.object[err.start]:#04x} at "
            f"offset {err.start}); save it as UTF-8 text."
        ) from err


def merge_tables(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it: tables merge key by key (recursively), any
    other value of ``override`` replaces ``base``'s. Neither input is changed."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_tables(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_layered_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML file as a dict, laid over the file its top-level ``base = "other.toml"`` names
    (relative to this file; bases may have bases): a variant of an experiment states only
    what it changes (:func:`merge_tables`).

    Raises:
        ValueError: for a base that is not a string, does not exist, or names a file that is
            already in the chain.
    """
    path = Path(path).resolve()
    values = read_toml(path)
    if "base" not in values:
        return values
    base = values.pop("base")
    if not isinstance(base, str):
        raise ValueError(f"{path}: base must be a file name (a string), got {base!r}.")
    base_path = (path.parent / base).resolve()
    if base_path in (*_seen, path):
        chain = " -> ".join(str(p) for p in (*_seen, path, base_path))
        raise ValueError(f"{path}: base {base!r} makes a cycle ({chain}).")
    if not base_path.is_file():
        raise ValueError(
            f"{path}: base {base!r} does not exist (looked for {base_path}); base is relative "
            "to the file that names it."
        )
    return merge_tables(read_layered_toml(base_path, (*_seen, path)), values)
