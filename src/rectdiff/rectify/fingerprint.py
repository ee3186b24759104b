"""Which model made a pair store: a sha256 of the model's state_dict, and the resume check.

``generate_pairs`` records :func:`model_fingerprint` in the manifest's settings; resuming into
a store made by another model (other weights, or a store from before fingerprints) is refused,
since its finished shards are that model's pairs, unless the caller says
``allow_other_model=True``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["model_fingerprint", "check_fingerprint"]

KEY = "model_fingerprint"


def model_fingerprint(model: Any) -> str | None:
    """sha256 over the state_dict's names, dtypes, shapes and bytes (sorted by name) of an
    ``nn.Module``-like ``model``; None for a callable without a ``state_dict``.

    Names are taken relative to the prefix all of them share, so a wrapper that adds one
    (DDP's ``module.``, torch.compile's ``_orig_mod.``) leaves the fingerprint unchanged.
    Settings kept outside tensors (a Python float attribute) are not part of it.
    """
    state_dict = getattr(model, "state_dict", None)
    if not callable(state_dict):
        return None
    tensors = {k: v for k, v in state_dict().items() if isinstance(v, torch.Tensor)}
    prefix = os.path.commonprefix(list(tensors)) if tensors else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        name = name[len(prefix) :]
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{str(data.dtype)}:{tuple(tensor.shape)}:".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _short(value: Any) -> str:
    return "none (a model without a state_dict)" if value is None else f"{str(value)[:16]}..."


def check_fingerprint(
    root: Path, stored: Mapping[str, Any], current: str | None, allow_other_model: bool
) -> None:
    """Raise ``ValueError`` when the store at ``root`` (manifest settings ``stored``) was not
    made by the model with fingerprint ``current``, or predates fingerprints; nothing when
    ``allow_other_model``."""
    if allow_other_model:
        return
    manifest = root / "manifest.json"
    if KEY not in stored:
        raise ValueError(
            f"{manifest} predates model fingerprints, so nothing records which model made its "
            "shards, and resuming would keep them as this model's pairs. Generate into another "
            "folder, or pass allow_other_model=True to resume it knowingly."
        )
    if stored[KEY] != current:
        raise ValueError(
            f"{manifest} was made by another model: model_fingerprint {_short(stored[KEY])} in "
            f"the store, {_short(current)} now (sha256 of the state_dict). Its shards are that "
            "model's pairs: generate into another folder, or resume with the model that made "
            "them (allow_other_model=True keeps them knowingly)."
        )
