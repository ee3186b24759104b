"""Model folders: a trained toy or image model, its form and its prediction type on disk.

A model folder holds two files::

    model.safetensors   the weights (safetensors' ``save_model``: shared tensors handled)
    model.json          {"format": "rectdiff-model", "format_version": 1,
                         "rectdiff_version": "...", "net": {"kind": "mlp", "kwargs": {...},
                         "preconditioning": {"sigma_data": ..., "scale_input": ...,
                         "output_prediction": ...}}, "form": form.config(),
                         "prediction": "eps", "info": {...}}

``net`` is a *network config*: the network kind (``"mlp"`` for :class:`rectdiff.models.MLP`,
``"unet"`` for :class:`rectdiff.models.UNet`), its keyword arguments, the options of the
:class:`rectdiff.models.Preconditioned` wrapper around it (``None`` for a bare network) and,
for a network trained in one form and used in another (classic Reflow from a VP teacher),
``"source": {"form": ..., "prediction": ...}``: the network computes in the source form and
prediction and is wrapped in :class:`rectdiff.reparametrize.Reparametrized`.
:func:`build_model` turns it into a module, so the network a run trains and the one
:func:`load_model_dir` rebuilds are made by the same code. Folders are written to a
temporary folder next to the target and renamed into place, so a folder is never
half-written; ``rectdiff diagnose``, ``pairs``, ``rectify`` and ``plot`` read them (the
workflows on folders live in :mod:`rectdiff.apps.model_dirs`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .. import __version__
from ..errors import StoreError
from ..forms import Form, from_config
from ..models import MLP, Preconditioned, UNet
from ..predictions import check_prediction
from ..reparametrize import Reparametrized
from .configs import check_choice, reject_unknown
from .files import publish_folder, temporary_sibling

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS",
    "INFO",
    "NET_KINDS",
    "build_model",
    "save_model_dir",
    "load_model_dir",
    "read_model_info",
    "is_model_dir",
]

FORMAT = "rectdiff-model"
FORMAT_VERSION = 1
#: the two files of a model folder
WEIGHTS, INFO = "model.safetensors", "model.json"
#: network kind -> class, for :func:`build_model`
NET_KINDS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet}
_PRECONDITIONING_KEYS = ("sigma_data", "scale_input", "output_prediction", "time_input",
                         "scaling")  # fmt: skip


def _check_net_config(net_config: dict[str, Any]) -> tuple[str, dict[str, Any], dict | None]:
    allowed = ("kind", "kwargs", "preconditioning", "source")
    unknown = [k for k in net_config if k not in allowed]
    if unknown or "kind" not in net_config:
        raise ValueError(
            f"a network config needs 'kind' and may have 'kwargs', 'preconditioning' and "
            f"'source'; got keys {sorted(net_config)}."
        )
    kind = check_choice(net_config["kind"], list(NET_KINDS), "network kind")
    precond = net_config.get("preconditioning")
    if precond is not None:
        reject_unknown(precond, _PRECONDITIONING_KEYS, "preconditioning option")
    return kind, dict(net_config.get("kwargs") or {}), precond


def build_model(net_config: dict[str, Any], form: Form, prediction: str | None = None) -> nn.Module:
    """The module a network config describes (untrained; seed torch first for a fixed init).

    Args:
        net_config: ``{"kind", "kwargs", "preconditioning"[, "source"]}`` (module docstring).
        form: the form the model works in (the preconditioning's c_in depends on it).
        prediction: what the model answers; needed only with a ``"source"``.

    Raises:
        ValueError: for an unknown kind, option or network argument.
    """
    kind, kwargs, precond = _check_net_config(net_config)
    source = net_config.get("source")
    if source is not None:
        if prediction is None:
            raise ValueError("a network config with a 'source' needs prediction= to build.")
        src_form = from_config(source["form"], source="network source form")
        inner = build_model({k: v for k, v in net_config.items() if k != "source"}, src_form)
        return Reparametrized(inner, src_form, source["prediction"], form, prediction)
    try:
        net = NET_KINDS[kind](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments {kwargs} for network kind {kind!r}: {err}") from None
    if precond is None:
        return net
    return Preconditioned(net, form, **precond)


def _write_folder(tmp: Path, model: nn.Module, info: dict[str, Any]) -> None:
    save_model(model, str(tmp / WEIGHTS))
    (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def save_model_dir(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    form: Form,
    prediction: str,
    net_config: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a model folder at ``path`` (replacing one that is there).

    Args:
        path: the folder to write.
        model: the module :func:`build_model` made from ``net_config`` (then trained).
        form: its diffusion form (stored as ``form.config()``).
        prediction: what it predicts.
        net_config: the network config it was built from.
        info: free JSON-able facts to keep with it (stage, data, training settings, ...).

    Returns:
        The folder's path.

    Raises:
        ValueError: for a bad prediction or network config, or when ``path`` is a file or a
            folder that is not a model folder (it is never overwritten then).
    """
    path = Path(path)
    check_prediction(prediction)
    _check_net_config(net_config)
    if path.exists() and not is_model_dir(path):
        raise ValueError(
            f"{path} exists and is not a rectdiff model folder; refusing to overwrite it. "
            "Choose another path or remove it."
        )
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rectdiff_version": __version__,
        "net": net_config,
        "form": form.config(),
        "prediction": prediction,
        "info": info or {},
    }
    json.dumps(record)  # fail before writing anything if something is not JSON-able
    tmp = temporary_sibling(path)
    try:
        _write_folder(tmp, model, record)
        publish_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding ``model.json`` of this format and weights."""
    path = Path(path)
    try:
        record = json.loads((path / INFO).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict) and record.get("format") == FORMAT and (path / WEIGHTS).is_file()
    )


def read_model_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``model.json`` of a model folder.

    Raises:
        ValueError: when ``path`` is not a model folder (says what is missing).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"{path} is not a folder; expected a rectdiff model folder ({INFO} + {WEIGHTS})."
        )
    if not (path / INFO).is_file():
        raise ValueError(
            f"{path} has no {INFO}, so it is not a rectdiff model folder; make one with "
            "rectdiff.io.model_dir.save_model_dir or `rectdiff compare`."
        )
    try:
        record = json.loads((path / INFO).read_text())
    except ValueError as err:
        raise ValueError(f"{path / INFO} is not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{path / INFO} holds a {type(record).__name__}, not a rectdiff model record (a "
            "JSON object with format = 'rectdiff-model'); save or copy the model again."
        )
    if record.get("format") != FORMAT:
        raise ValueError(
            f"{path / INFO} is not a rectdiff model record: format = {record.get('format')!r}, "
            f"expected {FORMAT!r}; give a folder written by rectdiff (save_model_dir, "
            "`rectdiff compare` or `rectdiff rectify`)."
        )
    version = record.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(
            f"{path / INFO}: format_version = {version!r}; expected an integer <= "
            f"{FORMAT_VERSION}. The record was edited or damaged: save or copy the model again."
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written with model format {record['format_version']}, newer than this "
            f"rectdiff ({FORMAT_VERSION}); upgrade rectdiff."
        )
    missing = [k for k in ("net", "form", "prediction") if k not in record]
    if missing:
        raise ValueError(f"{path / INFO} lacks {', '.join(missing)}.")
    if not (path / WEIGHTS).is_file():
        raise ValueError(f"{path} has {INFO} but no {WEIGHTS}; the folder is incomplete.")
    return record


def load_model_dir(path: str | os.PathLike[str]) -> tuple[nn.Module, Form, str]:
    """Rebuild a saved model: ``(model in eval mode, form, prediction)``.

    Raises:
        ValueError: when ``path`` is not a model folder or its weights do not fit its config.
    """
    record = read_model_info(path)
    form = from_config(record["form"], source=str(Path(path) / INFO))
    prediction = check_prediction(record["prediction"])
    model = build_model(record["net"], form, prediction)
    weights = Path(path) / WEIGHTS
    try:
        load_model(model, str(weights))
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the network in {INFO}: {err}") from None
    except OSError:
        raise
    except Exception as err:  # safetensors' own error type: a truncated or damaged file
        raise StoreError(
            f"{weights} is not a readable safetensors file ({' '.join(str(err).split())}); "
            "the folder is damaged: save or copy the model again."
        ) from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StoreError(
                f"{weights}: tensor {name!r} holds non-finite values (nan or inf); the weights "
                "are damaged or come from a diverged training run: save or copy a sound model."
            )
    return model.eval(), form, prediction
