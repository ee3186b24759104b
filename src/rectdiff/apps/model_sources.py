"""Where a ``--model`` comes from: a rectdiff folder, a diffusers folder, or the user's network.

``rectdiff pairs``, ``rectify`` and ``diagnose`` take a teacher of three kinds, each opened by
:func:`open_source` into a :class:`ModelSource` that gives the model in rectdiff's convention
(an :class:`~rectdiff.adapters.Adapted` ``(model, form, prediction)``; the model is called
``model(x_t, form.model_time(t), **cond)`` with t = 0 data, t = 1 noise), one sample's shape,
the class-label ``cond_fn``, a description for the pair store's manifest (with the weights'
sha256) and :meth:`ModelSource.save_student`, which writes the rectified student as the same
kind of folder the teacher came from:

=======================  ============================================  =========================
kind                     teacher                                       student folder
=======================  ============================================  =========================
``rectdiff``             ``model.json`` + ``model.safetensors``         the same
                         (:mod:`rectdiff.io.model_dir`)
``diffusers``            ``model_index.json`` naming a ``UNet2DModel``  a ``DDPMPipeline`` with a
                         (``unet/``) and a DDPM-family ``scheduler/``   DDIM-trailing scheduler
                                                                        + ``rectdiff.json``
``factory``              ``module:function`` building the user's        ``model.safetensors``
                         network, a weights file and a convention name  (the network's own keys)
                         (:data:`rectdiff.adapters.CONVENTIONS`)        + ``model.json``
=======================  ============================================  =========================

A factory student folder is itself a ``--model`` (its ``model.json`` names the factory and
convention), so ``rectdiff diagnose --model student`` and a second round of rectification
work. Every folder is built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__
from ..adapters import Adapted
from ..forms import Form, from_config
from ..io.files import publish_folder, temporary_sibling, write_json_atomic
from ..io.model_dir import (
    INFO,
    WEIGHTS,
    is_model_dir,
    load_model_dir,
    read_model_info,
    save_model_dir,
)  # fmt: skip
from ..reparametrize import Reparametrized

__all__ = [
    "KINDS", "FACTORY_FORMAT", "DIFFUSERS_RECORD", "ModelSource", "open_source", "open_sources",
    "as_source",
    "sample_shape", "class_labels_fn", "parse_shape", "parse_options", "sha256",
]  # fmt: skip

#: the kinds of ``--model``
KINDS = ("rectdiff", "diffusers", "factory")
#: ``model.json`` "format" of a factory student folder
FACTORY_FORMAT = "rectdiff-factory-model"
#: the record a rectified diffusers folder carries (its presence marks rectdiff's output)
DIFFUSERS_RECORD = "rectdiff.json"


def sample_shape(net: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one sample of the network a network config describes."""
    kwargs = net.get("kwargs", {})
    if net["kind"] == "mlp":
        return (int(kwargs.get("dim", 2)),)
    size = int(kwargs.get("sample_size", 8))
    return (int(kwargs.get("in_channels", 1)), size, size)


def class_labels_fn(net: dict[str, Any]) -> Any:
    """For a class-conditional network (``num_classes`` > 0), the ``cond_fn`` that gives pair
    i the label ``i mod num_classes`` (balanced, and independent of batches and processes),
    stored with the pairs and passed to the student by ``rectdiff rectify``; None otherwise."""
    num_classes = int(net.get("kwargs", {}).get("num_classes") or 0)
    if num_classes <= 0:
        return None
    return lambda shard, indices: {"class_labels": indices % num_classes}


def sha256(*paths: str | os.PathLike[str]) -> str:
    """The first 16 hex digits of the sha256 of the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def parse_shape(shape: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """One sample's shape from ``"2"`` or ``"1,8,8"`` (or a sequence of ints); None stays None."""
    if shape is None:
        return None
    parts = shape.replace("x", ",").split(",") if isinstance(shape, str) else list(shape)
    try:
        dims = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        dims = ()
    if not dims or min(dims) < 1:
        raise ValueError(
            f"bad --shape {shape!r}: give one sample's positive sizes separated by commas, "
            "e.g. --shape 2 or --shape 1,8,8."
        )
    return dims


def _value(text: str) -> Any:
    """``KEY=VALUE``'s value: int, then float, then true/false/none, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_options(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["sigma_min=0.0", "call=t_x"]`` -> ``{"sigma_min": 0.0, "call": "t_x"}`` (values as
    int, float, bool, None or str); a mapping is returned as a dict."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"bad --convention-arg {item!r}: write KEY=VALUE, e.g. sigma_min=0.0 or call=t_x."
            )
        options[key.strip()] = _value(text.strip())
    return options


class ModelSource:
    """A teacher in rectdiff's convention and how to save its student (see the module doc).

    Attributes:
        kind: one of :data:`KINDS`.
        name: what the manifest and diagnostics call it (the folder, or the factory).
        adapted: ``(model, form, prediction)`` in rectdiff's convention.
        shape: one sample's shape.
        cond_fn: ``cond_fn(shard, indices) -> {"class_labels": ...}`` for class-conditional
            models (balanced labels), else None.
        description: the model and the sha256 of its weights, for the pair store manifest.
        info: facts the folder records (stage, pairs, ...); empty for a fresh factory model.
        path: the folder it was read from (None for ``--model-factory``).
    """

    kind = ""

    def __init__(self, *, name: str, adapted: Adapted, shape: Sequence[int], cond_fn: Any,
                 description: str, info: Mapping[str, Any] | None = None,
                 path: Path | None = None) -> None:  # fmt: skip
        self.name, self.adapted, self.shape = name, adapted, tuple(int(s) for s in shape)
        self.cond_fn, self.description = cond_fn, description
        self.info, self.path = dict(info or {}), path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.adapted.form!r}, {self.prediction!r})"

    @property
    def model(self) -> nn.Module:
        return self.adapted.model

    @property
    def form(self) -> Form:
        return self.adapted.form

    @property
    def prediction(self) -> str:
        return self.adapted.prediction

    def student(
        self, form: Form | None = None, prediction: str | None = None
    ) -> tuple[nn.Module, Form, str]:
        """The module to rectify (the teacher's own, trained in place: no second copy of a
        large network), with the form and prediction it trains in (the teacher's own unless
        given). Only a rectdiff folder can be reparametrized into another form or prediction
        (classic Reflow)."""
        form = self.form if form is None else form
        prediction = prediction or self.prediction
        if (form, prediction) != (self.form, self.prediction):
            raise ValueError(
                f"--form/--prediction reparametrize rectdiff model folders only; the "
                f"{self.kind} model {self.name!r} trains in its own form and prediction "
                f"({self.form!r}, {self.prediction!r}); leave both out."
            )
        return self.model, form, prediction

    def check_out(self, out: str | os.PathLike[str]) -> Path:
        """``out`` as a Path, after refusing the teacher's own folder and a folder of
        another kind (nothing is overwritten then)."""
        out = Path(out)
        if self.path is not None and out.resolve() == self.path.resolve():
            raise ValueError(f"out {str(out)!r} is the teacher's folder; choose another folder.")
        if out.exists() and not self.is_own_output(out):
            raise ValueError(
                f"out {str(out)!r} exists and is not a {self.kind} student folder that "
                "rectdiff wrote; refusing to overwrite it. Choose another path or remove it."
            )
        return out

    def is_own_output(self, folder: Path) -> bool:
        """Whether ``folder`` is a student folder of this kind (safe to replace)."""
        raise NotImplementedError

    def write_student(self, tmp: Path, model: nn.Module, form: Form, prediction: str,
                      info: dict[str, Any]) -> None:  # fmt: skip
        """Write the student's files into the fresh folder ``tmp``."""
        raise NotImplementedError

    def save_student(self, out: str | os.PathLike[str], model: nn.Module, form: Form,
                     prediction: str, info: Mapping[str, Any]) -> Path:  # fmt: skip
        """Write the trained ``model`` (from :meth:`student`) at ``out`` as this kind's folder:
        built in a temporary sibling, then renamed into place."""
        out = self.check_out(out)
        info = {**self.info, **info}
        json.dumps(info)  # fail before writing anything if something is not JSON-able
        tmp = temporary_sibling(out)
        try:
            self.write_student(tmp, model, form, prediction, info)
            publish_folder(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


class RectdiffFolder(ModelSource):
    """A rectdiff model folder (:mod:`rectdiff.io.model_dir`)."""

    kind = "rectdiff"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        model, form, prediction = load_model_dir(path)
        self.record = read_model_info(path)
        net = self.record["net"]
        super().__init__(
            name=str(path), adapted=Adapted(model, form, prediction), shape=sample_shape(net),
            cond_fn=class_labels_fn(net), info=self.record.get("info", {}), path=path,
            description=f"{path.resolve()} (weights sha256 {sha256(path / WEIGHTS)})",
        )  # fmt: skip

    def _source(self) -> dict[str, Any]:
        return self.record["net"].get("source") or {
            "form": self.form.config(), "prediction": self.prediction,
        }  # fmt: skip

    def student(
        self, form: Form | None = None, prediction: str | None = None
    ) -> tuple[nn.Module, Form, str]:
        """The teacher itself (trained in place), or, in another form or prediction, its
        network seen there through :class:`~rectdiff.reparametrize.Reparametrized`."""
        form = self.form if form is None else form
        prediction = prediction or self.prediction
        if (form, prediction) == (self.form, self.prediction):
            return self.model, form, prediction
        inner = self.model.model if isinstance(self.model, Reparametrized) else self.model
        source = self._source()
        src_form = from_config(source["form"], source="teacher source form")
        return (
            Reparametrized(inner, src_form, source["prediction"], form, prediction),
            form,
            prediction,
        )

    def is_own_output(self, folder: Path) -> bool:
        """A model folder that ``rectdiff rectify`` wrote (its info's stage is "rectified"),
        not another model (a teacher, a compare cell's model) that a typo would destroy."""
        if not is_model_dir(folder):
            return False
        try:
            info = read_model_info(folder).get("info") or {}
        except (OSError, ValueError):
            return False
        return isinstance(info, dict) and info.get("stage") == "rectified"

    def save_student(self, out: str | os.PathLike[str], model: nn.Module, form: Form,
                     prediction: str, info: Mapping[str, Any]) -> Path:  # fmt: skip
        """``io.model_dir.save_model_dir``, recording the teacher's form as the network's
        ``source`` when the student trained in another form or prediction."""
        out = self.check_out(out)
        net_config = dict(self.record["net"])
        if (form, prediction) != (self.form, self.prediction):
            net_config["source"] = self._source()
        return save_model_dir(out, model, form=form, prediction=prediction,
                              net_config=net_config, info={**self.info, **info})  # fmt: skip


def as_source(model: Any = None, **options: Any) -> ModelSource:
    """``model`` itself when it is a :class:`ModelSource`, else ``open_source(model, **options)``."""
    return model if isinstance(model, ModelSource) else open_source(model, **options)


def open_source(
    model: str | os.PathLike[str] | None = None,
    *,
    factory: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    convention: str | None = None,
    convention_args: Sequence[str] | Mapping[str, Any] | None = None,
    shape: str | Sequence[int] | None = None,
) -> ModelSource:
    """Open a ``--model``: a rectdiff model folder, a diffusers ``UNet2DModel`` folder or a
    factory student folder; or, with ``factory``, the user's network.

    Args:
        model: the folder (None with ``factory``).
        factory: ``"module:function"``: ``function()`` builds the user's network (the module
            is imported with the current folder on ``sys.path``, as ``python -m`` does).
        weights: the network's state dict (``.safetensors``, or ``.pt``/``.pth`` read with
            ``weights_only=True``); keys and shapes must match exactly.
        convention: how the network is called and what it predicts, a
            :data:`rectdiff.adapters.CONVENTIONS` name.
        convention_args: the adapter's options (``{"sigma_min": 0.0}`` or ``["sigma_min=0"]``).
        shape: one sample's shape (``"2"``, ``"1,8,8"``); default the network's ``sample_shape``.

    Raises:
        ValueError: one line naming the bad value, what is allowed and how to fix it.
    """
    from .outside_sources import DiffusersFolder, FactoryModel, is_factory_dir

    options = parse_options(convention_args)
    dims = parse_shape(shape)
    if factory is not None:
        if model is not None:
            raise ValueError(
                f"give either --model ({str(model)!r}) or --model-factory ({factory!r}), not both."
            )
        return FactoryModel(factory, weights, convention, options, dims)
    if model is None:
        raise ValueError(
            "no model given: pass --model FOLDER, or --model-factory MODULE:FUNCTION with "
            "--weights FILE and --convention NAME."
        )
    given = [flag for flag, value in (("--weights", weights), ("--convention", convention),
                                      ("--convention-arg", options)) if value]  # fmt: skip
    if given:
        raise ValueError(
            f"{', '.join(given)} go with --model-factory, not with --model {str(model)!r} "
            "(a folder records its own); drop them."
        )
    path = Path(model)
    if not path.is_dir():
        raise ValueError(
            f"--model {str(path)!r} is not a folder; give a rectdiff model folder, a diffusers "
            "UNet2DModel folder or a factory student folder (or use --model-factory)."
        )
    if is_factory_dir(path):
        return FactoryModel.from_folder(path, dims)
    if dims is not None:
        raise ValueError(f"--shape goes with --model-factory; {str(path)!r} records its own.")
    if (path / INFO).is_file():
        return RectdiffFolder(path)
    if (path / "model_index.json").is_file():
        return DiffusersFolder(path)
    raise ValueError(
        f"--model {str(path)!r} is neither a rectdiff model folder ({INFO} + {WEIGHTS}) nor a "
        "diffusers folder (model_index.json with unet/ and scheduler/); for your own network "
        "use --model-factory MODULE:FUNCTION --weights FILE --convention NAME."
    )


def open_sources(
    models: Sequence[str | os.PathLike[str]] | None = None,
    *,
    factory: str | None = None,
    shape: str | Sequence[int] | None = None,
    **options: Any,
) -> list[ModelSource]:
    """Each folder of ``models`` opened (:func:`open_source`), then the ``factory`` model
    (with ``weights``, ``convention``, ``convention_args`` in ``options`` and ``shape``)."""
    sources = [open_source(m) for m in models or ()]
    if factory is not None:
        sources.append(open_source(factory=factory, shape=shape, **options))
    elif shape is not None or any(options.values()):
        raise ValueError(
            "--weights, --convention, --convention-arg and --shape go with --model-factory "
            "MODULE:FUNCTION; give it or drop them."
        )
    if not sources:
        raise ValueError("no model given: pass --model FOLDER..., or --model-factory "
                         "MODULE:FUNCTION with --weights FILE and --convention NAME.")  # fmt: skip
    return sources


def write_factory_record(folder: Path, record: Mapping[str, Any]) -> None:
    """``folder/model.json`` of a factory student, with the format and rectdiff's version."""
    write_json_atomic(folder / INFO, {"format": FACTORY_FORMAT, "format_version": 1,
                                      "rectdiff_version": __version__, **record})  # fmt: skip
