"""Training hyperparameters: :class:`TrainConfig`, loaded from a TOML table or a dict."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.configs import from_mapping, read_toml_table
from .losses import LOSSES
from .minibatch_ot import COUPLINGS
from .time_samplers import TIME_SAMPLERS, TimeSampler
from .weightings import WEIGHTINGS, Weighting

__all__ = ["TrainConfig", "MIXED_PRECISION", "LR_SCHEDULES", "LOG_WITH", "check_log_with"]

MIXED_PRECISION = ("no", "fp16", "bf16")
#: ``log_with`` choices: accelerate's trackers, or only the CSV loss log
LOG_WITH = ("csv", "tensorboard", "wandb")
#: the package each tracker needs
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: diffusers' ``get_scheduler`` names (``diffusers.optimization.SchedulerType``'s values; a
#: test keeps the two equal). Written out so that importing the config does not import
#: diffusers (3 s of every compare worker's start on a slow CPU)
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                "constant_with_warmup", "piecewise_constant")  # fmt: skip


def check_log_with(value: str | None, owner: str = "TrainConfig") -> None:
    """Refuse a ``log_with`` outside :data:`LOG_WITH` or whose tracker package is missing.

    Raises:
        ValueError: an unknown tracker.
        ConfigError: its package is not installed (naming the pip command).
    """
    if value is None:
        return
    if value not in LOG_WITH:
        raise ValueError(
            f"{owner}.log_with = {value!r} is not allowed; allowed: {', '.join(LOG_WITH)} "
            "(or None: loss_log.csv only)."
        )
    package = _TRACKER_PACKAGES.get(value)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"{owner}.log_with = {value!r} needs the {package} package, which is not "
            f"installed; run `pip install {package}`, or log with 'csv' (loss_log.csv, which "
            "needs nothing)."
        )


@dataclass
class TrainConfig:
    """Hyperparameters of :func:`train`; ``from_toml``/``from_dict`` reject unknown keys.

    Attributes:
        steps: optimizer steps.
        batch_size: samples per micro-batch, all processes together: each of P processes
            computes batch_size / P of them (a multiple of P), and the result does not
            depend on P.
        lr, weight_decay: AdamW.
        warmup_steps: linear warm-up length of ``lr_schedule``.
        lr_schedule: a diffusers ``get_scheduler`` name (``LR_SCHEDULES``).
        grad_clip: max gradient norm; 0 turns clipping off.
        ema_decay: diffusers ``EMAModel`` decay (its warm-up ``(1+n)/(10+n)`` caps it early);
            0 turns EMA off.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``.
        grad_accum: micro-batches per optimizer step.
        seed: seeds model-independent randomness (t, eps, batches; accelerate ``set_seed``).
        time_sampler, time_sampler_params: see :mod:`rectdiff.training` (a sampler object is
            accepted when set in Python, e.g. from ``timesteps.equalize``).
        weighting, weighting_params: likewise.
        loss, huber_c: ``"mse"`` or ``"pseudo_huber"`` and its constant.
        coupling: ``"independent"`` (noise as drawn) or ``"ot"``: each batch's noise re-paired
            with its data by the exact minibatch optimal-transport assignment before ``x_t``
            is formed (Tong et al. 2023; Pooladian et al. 2023; see
            :mod:`rectdiff.training.minibatch_ot`); conditioning stays with its data. Only
            for data (not ``pairs=True``, whose noise is the coupling) and the default loss.
        checkpoint_every: save every this many steps and at the end; 0 = never.
        keep_checkpoints: how many checkpoints to keep; 0 = all.
        log_every: loss check, tqdm postfix and history flush interval.
        out_dir: where ``checkpoints/``, ``train_config.json`` and ``loss_log.csv`` go;
            None = nowhere.
        log_with: also log loss, learning rate, gradient norm and ESS every ``log_every``
            steps through an accelerate tracker into ``out_dir``: ``"tensorboard"`` or
            ``"wandb"`` (optional packages; wandb offline unless ``WANDB_MODE`` or
            ``WANDB_API_KEY`` is set); ``"csv"`` or None: only ``loss_log.csv``.
        sample_every: with an ``out_dir``, draw samples every this many steps and at the end
            (:mod:`rectdiff.training.snapshots`: ``out_dir/samples/step_N.png``, and to the
            tracker); 0 = never. Unconditional 2-D or image models only.
        sample_steps: DDIM steps of those samples (1: the one-step sample rectification
            straightens).
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant_with_warmup"
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    mixed_precision: str = "no"
    grad_accum: int = 1
    seed: int = 0
    time_sampler: str | TimeSampler = "uniform"
    time_sampler_params: dict[str, Any] = field(default_factory=dict)
    weighting: str | Weighting = "none"
    weighting_params: dict[str, Any] = field(default_factory=dict)
    loss: str = "mse"
    huber_c: float | None = None
    coupling: str = "independent"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 50
    out_dir: str | None = None
    log_with: str | None = None
    sample_every: int = 0
    sample_steps: int = 1

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "log_every", "sample_steps")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("lr", "weight_decay", "grad_clip", "warmup_steps", "checkpoint_every",
                     "keep_checkpoints", "sample_every"):  # fmt: skip
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                allowed = "a finite number > 0" if name == "lr" else "a finite number >= 0"
                raise ValueError(f"TrainConfig.{name} must be {allowed}, got {value}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}.")
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("coupling", self.coupling, COUPLINGS)
        check_log_with(self.log_with)
        if isinstance(self.time_sampler, str):
            _check_choice("time_sampler", self.time_sampler, tuple(TIME_SAMPLERS))
        if isinstance(self.weighting, str):
            _check_choice("weighting", self.weighting, tuple(WEIGHTINGS))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. a TOML table).

        Raises:
            ValueError: for an unknown key (naming it and listing the allowed ones) or value.
        """
        return from_mapping(cls, values, what="training option")

    @classmethod
    def from_toml(cls, path: str | Path, table: str | None = None) -> TrainConfig:
        """Build from a TOML file, or from its ``[table]`` when given."""
        return cls.from_dict(read_toml_table(path, table))

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready values (sampler and weighting objects by their repr)."""
        out = dataclasses.asdict(self)
        for key in ("time_sampler", "weighting"):
            if not isinstance(out[key], str):
                out[key] = repr(getattr(self, key))
        return out


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"TrainConfig.{name} = {value!r} is not allowed; allowed: {', '.join(allowed)}."
        )
