"""Teachers trained outside rectdiff: a diffusers ``UNet2DModel`` folder and a user's network.

The two non-rectdiff kinds of :mod:`rectdiff.apps.model_sources`:

* :class:`DiffusersFolder`: a ``DDPMPipeline``-style folder (``model_index.json``, a
  ``UNet2DModel`` under ``unet/``, a DDPM-family scheduler under ``scheduler/``) seen through
  :func:`rectdiff.adapters.diffusers_unet` (``DiscreteVP`` on the scheduler's table, integer
  timesteps). Its student is a ``DDPMPipeline`` folder with the rectified UNet and
  ``DDIMScheduler.from_config(teacher, timestep_spacing="trailing", set_alpha_to_one=True)``
  (clip_sample as the teacher had it): one step from the last training timestep lands on the
  clean endpoint (sigma = 0), so stock ``DDPMPipeline.from_pretrained(out)(num_inference_steps=1)``
  gives the one-step sample with no rectdiff import.
* :class:`FactoryModel`: ``module:function`` building the user's network, its weights and a
  :data:`rectdiff.adapters.CONVENTIONS` name; its student is the network's own state dict
  (``model.safetensors``, loadable with ``net.load_state_dict(load_file(...))``) and a
  ``model.json`` naming the factory and convention, itself a ``--model``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import forms
from ..adapters import CONVENTIONS, Adapted, OutsideModel, adapt, diffusers_unet
from ..forms import Form
from ..forms.io import DDPM_FAMILY
from ..io.configs import check_choice
from ..io.files import write_json_atomic
from ..io.model_dir import INFO, WEIGHTS
from .model_sources import (
    DIFFUSERS_RECORD,
    FACTORY_FORMAT,
    ModelSource,
    class_labels_fn,
    sha256,
    write_factory_record,
)  # fmt: skip

__all__ = ["DiffusersFolder", "FactoryModel", "is_factory_dir", "load_weights", "import_factory"]

#: weight-file suffixes read with safetensors / with ``torch.load(weights_only=True)``
SAFETENSORS, TORCH_FILES = (".safetensors",), (".pt", ".pth", ".bin")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class DiffusersFolder(ModelSource):
    """A diffusers folder holding a ``UNet2DModel`` and a DDPM-family scheduler."""

    kind = "diffusers"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        unet, self.scheduler = self._load(path)
        try:
            adapted = diffusers_unet(unet, self.scheduler)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--model {str(path)!r}: {_first_line(err)}") from None
        model = adapted.model
        num_classes = getattr(model, "num_classes", None)
        files = sorted(p for p in (path / "unet").iterdir() if p.is_file())
        record = path / DIFFUSERS_RECORD
        super().__init__(
            name=str(path), adapted=adapted, shape=model.sample_shape, path=path,
            cond_fn=class_labels_fn({"kwargs": {"num_classes": num_classes}}),
            info=json.loads(record.read_text()).get("info", {}) if record.is_file() else {},
            description=f"{path.resolve()} (unet files sha256 {sha256(*files)})",
        )  # fmt: skip

    @staticmethod
    def _load(path: Path) -> tuple[nn.Module, Any]:
        import diffusers

        try:
            index = json.loads((path / "model_index.json").read_text())
        except ValueError as err:
            raise ValueError(f"{path / 'model_index.json'} is not valid JSON: {err}") from None
        unet_class = (index.get("unet") or [None, None])[1]
        scheduler_class = (index.get("scheduler") or [None, None])[1]
        if unet_class != "UNet2DModel" or not scheduler_class:
            raise ValueError(
                f"--model {str(path)!r} is a diffusers {index.get('_class_name')} folder with unet "
                f"{unet_class!r} and scheduler {scheduler_class!r}; --model takes a UNet2DModel "
                "with a DDPM-family scheduler (a DDPMPipeline save); for Stable Diffusion use "
                "`rectdiff sd`."
            )
        if scheduler_class not in DDPM_FAMILY:
            raise ValueError(
                f"--model {str(path)!r}: scheduler {scheduler_class!r} is not supported; allowed: "
                f"{', '.join(DDPM_FAMILY)}."
            )
        try:
            unet = diffusers.UNet2DModel.from_pretrained(path, subfolder="unet",
                                                         local_files_only=True)  # fmt: skip
            scheduler = getattr(diffusers, scheduler_class).from_pretrained(
                path, subfolder="scheduler", local_files_only=True
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise ValueError(f"cannot load --model {str(path)!r}: {_first_line(err)}") from None
        return unet.eval(), scheduler

    def student_scheduler(self) -> Any:
        """``DDIMScheduler`` on the teacher's table, trailing spacing (the first step at the
        last training timestep), ``set_alpha_to_one=True`` (the last step lands on sigma = 0,
        where the pairs are) and the teacher's clip_sample."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(
            self.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True
        )

    def is_own_output(self, folder: Path) -> bool:
        return (folder / DIFFUSERS_RECORD).is_file() and (folder / "model_index.json").is_file()

    def write_student(self, tmp: Path, model: nn.Module, form: Form, prediction: str,
                      info: dict[str, Any]) -> None:  # fmt: skip
        """``DDPMPipeline(unet, student_scheduler()).save_pretrained(tmp)`` + ``rectdiff.json``."""
        from diffusers import DDPMPipeline

        DDPMPipeline(unet=model.unet, scheduler=self.student_scheduler()).save_pretrained(tmp)
        form_config = {k: v for k, v in form.config().items() if k != "alphas_cumprod"}
        write_json_atomic(tmp / DIFFUSERS_RECORD, {
            "format": "rectdiff-diffusers-student", "teacher": str(self.path.resolve()),
            "teacher_fingerprint": self.description, "form": form_config | {"repr": repr(form)},
            "prediction": prediction, "info": info, "sample_with": {"num_inference_steps": 1},
        })  # fmt: skip


def import_factory(factory: str) -> Any:
    """The function ``module:function`` names, imported with the current folder first on
    ``sys.path`` (as ``python -m`` does)."""
    module_name, sep, function = factory.partition(":")
    if not sep or not module_name or not function.isidentifier():
        raise ValueError(
            f"bad --model-factory {factory!r}: write MODULE:FUNCTION, e.g. mynet:build "
            "(function() returns the network)."
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any failure while importing user code
        raise ValueError(
            f"--model-factory {factory!r}: cannot import module {module_name!r} "
            f"({_first_line(err)}); run from the folder holding it or put it on PYTHONPATH."
        ) from None
    fn = getattr(module, function, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(
            f"--model-factory {factory!r}: module {module_name!r} has no function {function!r}; "
            f"it defines: {', '.join(names) or '(nothing callable)'}."
        )
    return fn


def load_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or from a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--weights {str(path)!r} is not a file; give the network's state dict.")
    if path.suffix not in SAFETENSORS + TORCH_FILES:
        raise ValueError(
            f"--weights {str(path)!r}: unknown suffix {path.suffix!r}; allowed: "
            f"{', '.join(SAFETENSORS + TORCH_FILES)}."
        )
    try:
        if path.suffix in SAFETENSORS:
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file
        raise ValueError(f"cannot read --weights {str(path)!r}: {_first_line(err)}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"--weights {str(path)!r} is not a state dict (name -> tensor); save "
            "net.state_dict() with safetensors.torch.save_file."
        )
    return dict(state)


def fit_weights(net: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """Load ``state`` into ``net`` with strict key matching, or a one-line error naming the
    missing and unexpected keys and the shape mismatches."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
    problems = [(what, items) for what, items in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shape mismatches (file vs network)", shapes)) if items]  # fmt: skip
    if problems:
        listed = "; ".join(
            f"{what}: {', '.join(items[:4])}{f' (+{len(items) - 4} more)' if len(items) > 4 else ''}"
            for what, items in problems
        )
        raise ValueError(
            f"{where} do not fit the factory's network: {listed}. Save this network's "
            "state_dict(), or use the factory that built those weights."
        )
    net.load_state_dict(state, strict=True)


def is_factory_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a factory student's ``model.json`` and weights."""
    try:
        record = json.loads((Path(path) / INFO).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == FACTORY_FORMAT


class FactoryModel(ModelSource):
    """The user's network: ``function()`` from ``module:function``, its weights, a convention."""

    kind = "factory"

    def __init__(self, factory: str, weights: Any, convention: str | None,
                 options: Mapping[str, Any], shape: Sequence[int] | None = None, *,
                 path: Path | None = None, info: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        conventions = list(CONVENTIONS)
        if convention is None:
            raise ValueError(
                f"--model-factory {factory!r} needs --convention NAME; allowed: "
                f"{', '.join(conventions)}."
            )
        check_choice(convention, conventions, "--convention")
        if weights is None:
            raise ValueError(f"--model-factory {factory!r} needs --weights FILE (its state dict).")
        self.factory, self.convention, self.options = factory, convention, dict(options)
        net = self._build(factory)
        fit_weights(net, load_weights(weights), f"--weights {str(weights)!r}")
        net.eval()
        adapted = adapt(net, convention, **self._adapter_options())
        super().__init__(
            name=str(path) if path is not None else factory, adapted=adapted, path=path,
            shape=self._shape(net, adapted, shape), cond_fn=None, info=info,
            description=f"{factory} in convention {convention} {self.options} from "
            f"{Path(weights).resolve()} (weights sha256 {sha256(weights)})",
        )  # fmt: skip
        self._check_call()

    @classmethod
    def from_folder(cls, path: Path, shape: Sequence[int] | None = None) -> FactoryModel:
        """A factory student folder (its ``model.json`` names factory, convention, shape)."""
        record = json.loads((path / INFO).read_text())
        missing = [k for k in ("factory", "convention") if k not in record]
        if missing or not (path / WEIGHTS).is_file():
            raise ValueError(f"{path} is an incomplete factory model folder (lacks "
                             f"{', '.join(missing) or WEIGHTS}).")  # fmt: skip
        return cls(record["factory"], path / WEIGHTS, record["convention"],
                   record.get("convention_args", {}), shape or record.get("shape"), path=path,
                   info=record.get("info", {}))  # fmt: skip

    @staticmethod
    def _build(factory: str) -> nn.Module:
        fn = import_factory(factory)
        try:
            net = fn()
        except Exception as err:  # noqa: BLE001 - the user's code
            raise ValueError(
                f"--model-factory {factory!r}: calling it failed ({_first_line(err)}); it must "
                "build the network with no arguments."
            ) from None
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"--model-factory {factory!r} returned a {type(net).__name__}, not a torch "
                "nn.Module."
            )
        return net

    def _adapter_options(self) -> dict[str, Any]:
        options = dict(self.options)
        if self.convention == "rectdiff" and isinstance(options.get("form"), str):
            options["form"] = forms.load(options["form"])  # a preset name or TOML path
        return options

    def _shape(self, net: nn.Module, adapted: Adapted, shape: Sequence[int] | None) -> tuple:
        if shape is not None:
            return tuple(shape)
        for owner in (adapted.model, net):
            if hasattr(owner, "sample_shape"):
                return tuple(int(s) for s in owner.sample_shape)
        raise ValueError(
            f"the network {self.factory!r} builds has no sample_shape attribute; give one "
            "sample's shape with --shape, e.g. --shape 2 or --shape 1,8,8."
        )

    def _check_call(self) -> None:
        """One forward at t_max on zeros, so a wrong shape or call fails before any writing."""
        x = torch.zeros(2, *self.shape)
        try:
            with torch.no_grad():
                out = self.model(x, self.form.model_time(torch.full((2,), self.form.t_max)))
        except Exception as err:  # noqa: BLE001 - the user's network
            raise ValueError(
                f"the network {self.factory!r} in convention {self.convention!r} fails on "
                f"samples of shape {list(self.shape)} ({_first_line(err)}); check --shape and "
                "--convention-arg call=..."
            ) from None
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(
                f"the network {self.factory!r} maps samples of shape {list(self.shape)} to "
                f"{list(out.shape[1:])}; its output must have the input's shape (check --shape)."
            )

    def is_own_output(self, folder: Path) -> bool:
        return is_factory_dir(folder)

    def write_student(self, tmp: Path, model: nn.Module, form: Form, prediction: str,
                      info: dict[str, Any]) -> None:  # fmt: skip
        """The network's own state dict (its keys exactly) and ``model.json``."""
        net = model.net if isinstance(model, OutsideModel) else model
        state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        write_factory_record(tmp, {
            "factory": self.factory, "convention": self.convention,
            "convention_args": self.options, "shape": list(self.shape), "form": form.config(),
            "prediction": prediction, "info": info,
        })  # fmt: skip
