"""Checking a pair store before anything trains on it.

:func:`verified_shards` reads each shard file once and checks, in this order:

* the manifest: format and version (:func:`~.store.load_manifest`), that generation finished,
  and that ``num_pairs``, ``num_shards``, the shard entries (file name, count, seed) and the
  recorded tensor shapes and dtypes agree with the settings;
* where it came from, when the caller says what to expect: the model that made it (the
  ``model_fingerprint``, sha256 of the state_dict, :mod:`.fingerprint`), its form and its
  prediction; ``allow_other_model=True`` (``--allow-other-teacher``) accepts pairs made by
  another model or in another form knowingly;
* every shard: present, its recorded size, its sha256 (``checksums=False``, ``--no-verify``,
  skips the hash), readable as safetensors, ``eps`` and ``x0`` of shape ``(count, *shape)``
  and the recorded dtype, conditioning with one row per pair, and every value finite.

Each failure raises :class:`~.store.PairStoreError` naming the shard and the field, and says
how to repair the store: rerun ``rectdiff pairs`` (``generate_pairs``) into it with the same
settings, which keeps the intact shards and regenerates the others.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from torch import Tensor

from ..forms import Form
from .fingerprint import KEY as FINGERPRINT
from .fingerprint import model_fingerprint
from .store import (
    DTYPES,
    PairSettings,
    PairStoreError,
    load_manifest,
    shard_name,
    shard_noise,
    shard_seed,
)

__all__ = ["verified_shards", "verify_pairs", "REPAIR"]

#: how every failure says to repair a store
REPAIR = (
    "Rerun `rectdiff pairs` (generate_pairs) into this folder with the same settings to repair "
    "it: intact shards are kept, the others regenerated."
)


def _fail(root: Path, problems: list[str]) -> PairStoreError:
    shown = "; ".join(problems[:5]) + (
        f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    )
    return PairStoreError(f"pair store {str(root)!r}: {shown}. {REPAIR}")


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


#: the JSON type of each recorded setting (a hand-edited or damaged manifest is named)
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "form": (dict,), "prediction": (str,), "solver": (str,), "steps": (int,), "seed": (int,),
    "shard_size": (int,), "num_pairs": (int,), "shape": (list,), "dtype": (str,),
    "store_eps": (bool,), "guidance": (int, float, type(None)), "solver_options": (dict,),
    "model_description": (str,), "model_fingerprint": (str, type(None)),
}  # fmt: skip


def _settings(root: Path, manifest: Mapping[str, Any]) -> PairSettings:
    try:
        settings = PairSettings.from_json(manifest["settings"])
    except (KeyError, TypeError) as err:
        raise _fail(root, [f"manifest.json settings unreadable ({err})"]) from None
    problems = [
        f"manifest.json settings {key} = {value!r} has type {type(value).__name__}; expected "
        + " or ".join("null" if t is type(None) else t.__name__ for t in _SETTING_TYPES[key])
        for key, value in vars(settings).items()
        if key in _SETTING_TYPES
        and (
            not isinstance(value, _SETTING_TYPES[key])
            or (isinstance(value, bool) and bool not in _SETTING_TYPES[key])
        )
    ]
    if problems:
        raise _fail(root, problems)
    return settings


def _check_manifest(root: Path, manifest: Mapping[str, Any], settings: PairSettings) -> None:
    """The manifest agrees with its own settings (counts, shard entries, tensor records)."""
    problems = [] if manifest.get("complete") else ["generation has not finished"]
    for key, expected in (("num_pairs", settings.num_pairs), ("num_shards", settings.num_shards)):
        if manifest.get(key) != expected:
            problems.append(
                f"manifest.json {key} = {manifest.get(key)!r}, but its settings give {expected}"
            )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or len(shards) != settings.num_shards:
        count = len(shards) if isinstance(shards, list) else 0
        problems.append(
            f"{count} shard entries in manifest.json, settings give {settings.num_shards}"
        )
        raise _fail(root, problems)
    dtype = settings.dtype
    for k, entry in enumerate(shards):
        name = f"{shard_name(k)}.safetensors"
        if not isinstance(entry, dict):
            problems.append(f"shard {k}: entry is not a record")
            continue
        expected = {
            "file": name,
            "count": settings.shard_count(k),
            "seed": shard_seed(settings.seed, k),
        }
        for key, value in expected.items():
            if entry.get(key) != value:
                problems.append(
                    f"{name}: {key} = {entry.get(key)!r} in manifest.json, expected {value!r}"
                )
        for key, record in (entry.get("tensors") or {}).items():
            if key in ("eps", "x0") and (record.get("shape"), record.get("dtype")) != (
                settings.shape,
                dtype,
            ):
                problems.append(
                    f"{name}: {key} recorded as {record.get('dtype')} {record.get('shape')}, "
                    f"settings say {dtype} {settings.shape}"
                )
    if problems:
        raise _fail(root, problems)


def _check_origin(
    root: Path, settings: PairSettings, form: Form | None, prediction: str | None,
    fingerprint: str | None, check_model: bool,
) -> None:  # fmt: skip
    """The store was made by the expected model, in the expected form and prediction."""
    allowed = "or pass --allow-other-teacher (allow_other_model=True) to train on them knowingly"
    if check_model:
        stored = getattr(settings, FINGERPRINT)
        if stored is None or stored != fingerprint:
            what = "records no model fingerprint" if stored is None else (
                f"was made by another model (model_fingerprint {stored[:16]}... in the store, "
                f"{str(fingerprint)[:16]}... for this model: sha256 of the state_dict)"
            )  # fmt: skip
            raise PairStoreError(
                f"pair store {str(root)!r} {what}. Generate this model's pairs with "
                f"`rectdiff pairs` into another folder, {allowed}."
            )
    if form is not None and settings.form != _json(form.config()):
        raise PairStoreError(
            f"pair store {str(root)!r} was made in form {json.dumps(settings.form)}, the model's "
            f"form is {json.dumps(_json(form.config()))}. Generate its pairs with `rectdiff "
            f"pairs` into another folder, {allowed}."
        )
    if prediction is not None and settings.prediction != prediction:
        raise PairStoreError(
            f"pair store {str(root)!r} was made with prediction {settings.prediction!r}, the "
            f"model predicts {prediction!r}. Generate its pairs with `rectdiff pairs` into "
            f"another folder, {allowed}."
        )


def _shard_problems(
    root: Path, k: int, entry: Mapping[str, Any], settings: PairSettings, checksums: bool
) -> tuple[dict[str, Tensor], list[str]]:
    """Shard ``k``'s tensors (read once) and what is wrong with them."""
    name = entry["file"]
    path = root / name
    if not path.is_file():
        return {}, [f"{name}: missing"]
    data = path.read_bytes()
    if "bytes" in entry and len(data) != entry["bytes"]:
        return {}, [
            f"{name}: {len(data)} bytes, manifest.json records {entry['bytes']} (truncated?)"
        ]
    if checksums and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return {}, [f"{name}: sha256 differs from manifest.json (corrupted or partly written)"]
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own error type for a damaged file
        return {}, [f"{name}: not a readable safetensors file ({' '.join(str(err).split())})"]
    count, shape, dtype = entry["count"], (entry["count"], *settings.shape), DTYPES[settings.dtype]
    if not settings.store_eps:
        tensors["eps"] = shard_noise(settings.seed, k, count, settings.shape, dtype)
    problems = []
    for key in ("eps", "x0"):
        tensor = tensors.get(key)
        if tensor is None:
            problems.append(f"{name}: no {key!r} tensor")
        elif tuple(tensor.shape) != shape or tensor.dtype != dtype:
            problems.append(
                f"{name}: {key} is {str(tensor.dtype).removeprefix('torch.')} "
                f"{list(tensor.shape)}, expected {settings.dtype} {list(shape)}"
            )
    for key, tensor in tensors.items():
        if key not in ("eps", "x0") and (tensor.ndim == 0 or tensor.shape[0] != count):
            problems.append(f"{name}: {key} has shape {list(tensor.shape)}, not one row per pair")
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            row = int((~torch.isfinite(tensor)).reshape(count, -1).any(1).nonzero()[0])
            index = k * settings.shard_size + row
            problems.append(f"{name}: {key} of pair {index} (row {row}) is not finite")
    text = entry.get("text_file")
    if text and not (root / text).is_file():
        problems.append(f"{text}: missing")
    elif text and checksums:
        if hashlib.sha256((root / text).read_bytes()).hexdigest() != entry.get("text_sha256"):
            problems.append(f"{text}: sha256 differs from manifest.json")
    return tensors, problems


def verified_shards(
    out: str | os.PathLike[str],
    *,
    checksums: bool = True,
    form: Form | None = None,
    prediction: str | None = None,
    model: Any = None,
    allow_other_model: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Each shard's tensors (``eps``, ``x0``, conditioning), read once and checked (see the
    module docstring); the manifest and origin are checked before the first shard is read.

    Args:
        out: the store's folder.
        checksums: compare each shard's sha256 with the manifest's (False: ``--no-verify``).
        form, prediction: what the store must have been made in (None: not checked).
        model: the model that must have made it (its fingerprint; None: not checked).
        allow_other_model: accept a store made by another model, form or prediction.

    Raises:
        PairStoreError: naming the shard and field; rerun ``rectdiff pairs`` to repair.
    """
    root = Path(out)
    if not root.is_dir():
        raise PairStoreError(
            f"--pairs {str(root)!r} is not a folder; give a pair store made by `rectdiff pairs`."
        )
    manifest = load_manifest(root)
    settings = _settings(root, manifest)
    _check_manifest(root, manifest, settings)
    if not allow_other_model:
        fingerprint = model_fingerprint(model) if model is not None else None
        _check_origin(root, settings, form, prediction, fingerprint, model is not None)
    problems: list[str] = []
    for k, entry in enumerate(manifest["shards"]):
        tensors, found = _shard_problems(root, k, entry, settings, checksums)
        problems += found
        if not problems:
            yield tensors
    if problems:
        raise _fail(root, problems)


def verify_pairs(out: str | os.PathLike[str], **checks: Any) -> dict[str, Any]:
    """Check a whole store (:func:`verified_shards`'s ``checks``) without keeping its tensors.

    Returns:
        The manifest.
    """
    for _ in verified_shards(out, **checks):
        pass
    return load_manifest(out)
