"""The configuration of ``rectdiff compare``: dataclasses parsed from one TOML file.

A comparison trains one teacher per (form, prediction) cell of a grid with ONE shared block of
hyperparameters, rectifies each, and evaluates everything alike. The file (see
``experiments/compare_forms.toml`` for a commented example)::

    seed = 0                 # the only seed: data, initialisation, training, pairs, evaluation
    equal = "logsnr"         # "t" | "logsnr": what "equal hyperparameters" means
    workers = 2              # cells run in parallel processes (results do not depend on it)
    threads = 1              # torch threads per cell (results are reproducible per value)

    [data]        name, n_train, n_eval, params
    [grid]        forms (preset names, TOML paths or inline tables {family = ...}),
                  predictions
    [network]     kind ("mlp" | "unet"), options (the network's arguments), sigma_data
                  (None: the training data's std), precondition_output
    [train]       the shared TrainConfig (steps, batch_size, lr, lr_schedule, warmup_steps,
                  ema_decay, time_sampler, weighting, loss, ...)
    [reference]   equal = "logsnr" only: the set-up whose implied weighting every cell gets
    [rectify]     the rectification stage (RectifyConfig keys, ``enabled``, ``train``
                  overrides of [train], and its own ``reference``)
    [evaluation]  solvers, steps, reference_solver, metrics, diagnostics, ...

``equal = "t"``: every cell trains with the same time sampler and loss weighting in its own
time t over its own safe range, and samples on the same kind of t grid.

``equal = "logsnr"``: every form is restricted to the common logsnr interval [lo, hi] of
the grid's forms (and the reference's): its ``t_min``/``t_max`` become the times where its
logsnr is ``hi``/``lo``. Each cell trains with the time sampler and weighting that
``timesteps.equalize`` builds so that its implied eps-MSE weighting over logsnr (Kingma &
Gao 2023) is the reference's, and every fixed-step solve uses one grid in logsnr (the
reference form's grid of kind ``t_grid`` mapped through logsnr), so a DDIM step is the same update
in y = x / alpha in every form. The default reference is DDPM's recipe: ``vp``,
eps-prediction, uniform t, no weighting (Ho et al. 2020, L_simple).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ... import diagnostics
from ... import training as timesteps
from ...forms import Form, from_config, load, presets
from ...io.model_dir import NET_KINDS
from ...io.resources import data_dir
from ...metrics import METRICS
from ...predictions import PREDICTIONS
from ...rectify.student import RectifyConfig
from ...samplers import SOLVERS, TIME_GRIDS
from ...training.trainer import TrainConfig

__all__ = [
    "EQUAL_MODES",
    "DIAGNOSTICS",
    "ADAPTIVE_SOLVERS",
    "DataConfig",
    "GridConfig",
    "NetworkConfig",
    "ReferenceConfig",
    "RectifyStage",
    "EvaluationConfig",
    "CompareConfig",
    "load_config",
    "quick_config",
    "DEFAULT_CONFIG",
]

EQUAL_MODES = ("t", "logsnr")
#: trajectory and coupling measures ``run_compare`` can report (see rectdiff.diagnostics)
DIAGNOSTICS = tuple(diagnostics.DIAGNOSTICS)
DIAGNOSTICS = (
    "straightness",
    "first_order_deviation",
    "crossing_rate",
    "one_step_gap",
    "transport_cost",
    "relative_transport_cost",
)
ADAPTIVE_SOLVERS = tuple(name for name, entry in SOLVERS.items() if entry.adaptive)
#: the default configuration file, relative to the repository root
DEFAULT_CONFIG = data_dir("experiments") / "compare_forms.toml"


def _reject_unknown(values: dict[str, Any], cls: type, where: str, extra: tuple = ()) -> None:
    allowed = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    allowed += list(extra)
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(allowed)}.")


def _check_names(values: list[str], allowed: Any, what: str) -> None:
    for value in values:
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}.")


@dataclass
class DataConfig:
    """``[data]``: what to train on and compare against.

    Attributes:
        name: a toy (``rectdiff.data.TOYS``), ``"digits"``, or a ``.npy``/``.pt`` file or an
            image folder.
        n_train: training samples (toys: drawn, 10000 when None; finite sets: a random
            subset of the samples not held out, all of them when None).
        n_eval: generated samples per evaluation; for toys also the size of the held-out
            reference set (a fresh draw with another seed). Finite sets hold out
            ``n_holdout`` samples as the reference.
        n_holdout: finite sets only: samples held out of training as the reference.
        params: the toy's own parameters (e.g. ``std`` of 8gaussians).
    """

    name: str = "8gaussians"
    n_train: int | None = None
    n_eval: int = 5000
    n_holdout: int = 360
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("n_eval", "n_holdout"):
            if int(getattr(self, key)) < 2:
                raise ValueError(f"[data] {key} must be >= 2, got {getattr(self, key)}.")
        if self.n_train is not None and self.n_train < 2:
            raise ValueError(
                f"[data] n_train must be >= 2 (or absent for all), got {self.n_train}."
            )


@dataclass
class GridConfig:
    """``[grid]``: the forms and predictions to cross.

    Attributes:
        forms: preset names (``forms.presets()``), TOML paths, or inline tables
            ``{name = "ve100", family = "ve", sigma_max = 100.0}``.
        predictions: ``"eps"``, ``"x0"``, ``"v"``, ``"flow"``.
    """

    forms: list[Any] = field(default_factory=lambda: ["vp", "subvp", "ve", "fm"])
    predictions: list[str] = field(default_factory=lambda: ["eps", "x0", "v"])

    def __post_init__(self) -> None:
        if not self.forms or not self.predictions:
            raise ValueError("[grid] needs at least one form and one prediction.")
        _check_names(self.predictions, PREDICTIONS, "prediction")
        labels = [label for label, _ in self.resolved()]
        if len(set(labels)) != len(labels):
            raise ValueError(f"[grid] forms have repeated names {labels}; give each a name.")

    def resolved(self) -> list[tuple[str, Form]]:
        """``(label, form)`` for every entry of ``forms``, in order."""
        return [_resolve_form(entry) for entry in self.forms]


def _resolve_form(entry: Any) -> tuple[str, Form]:
    if isinstance(entry, dict):
        values = dict(entry)
        name = values.pop("name", None) or values.get("family")
        return str(name), from_config(values, source="[grid] forms")
    if not isinstance(entry, str):
        raise ValueError(f"a [grid] form is a name or an inline table, got {entry!r}.")
    if entry not in presets() and not entry.endswith(".toml"):
        raise ValueError(
            f"unknown form {entry!r}; allowed: {', '.join(presets())}, a path to a .toml "
            "schedule, or an inline table {family = ..., ...}."
        )
    return Path(entry).stem, load(entry)


@dataclass
class NetworkConfig:
    """``[network]``: one network for every cell, wrapped in ``nets.Preconditioned``.

    Attributes:
        kind: ``"mlp"`` (vectors) or ``"unet"`` (images; diffusers' UNet2DModel).
        options: keyword arguments of ``nets.MLP`` / ``nets.UNet`` (``dim`` / ``sample_size``
            and ``in_channels`` are filled in from the data).
        sigma_data: the data std of the input scaling c_in; None = the training data's std.
        precondition_output: also scale the output by c_out (unit-variance targets in every
            form and prediction; see ``nets.Preconditioned``).
    """

    kind: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)
    sigma_data: float | None = None
    precondition_output: bool = True

    def __post_init__(self) -> None:
        _check_names([self.kind], NET_KINDS, "network kind")


@dataclass
class ReferenceConfig:
    """``[reference]``: the training set-up whose implied logsnr weighting every cell gets
    when ``equal = "logsnr"`` (``timesteps.implied_weighting`` of these four).

    The default is DDPM's ``L_simple``: VP, eps-prediction, uniform t, no weighting.
    """

    form: Any = "vp"
    prediction: str = "eps"
    time_sampler: str = "uniform"
    time_sampler_params: dict[str, Any] = field(default_factory=dict)
    weighting: str = "none"
    weighting_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_names([self.prediction], PREDICTIONS, "prediction")
        _check_names([self.time_sampler], timesteps.TIME_SAMPLERS, "time sampler")
        _check_names([self.weighting], timesteps.WEIGHTINGS, "weighting")
        self.resolved_form()

    def resolved_form(self) -> Form:
        return _resolve_form(self.form)[1]

    def weight(self, logsnr: torch.Tensor) -> torch.Tensor:
        """The reference's implied eps-MSE weighting w(logsnr), float64."""
        form = self.resolved_form()
        sampler = timesteps.time_sampler(self.time_sampler, form, **self.time_sampler_params)
        weighting = timesteps.loss_weighting(self.weighting, **self.weighting_params)
        return timesteps.implied_weighting(form, self.prediction, sampler, weighting, logsnr)

    def short(self) -> str:
        """``"vp, eps, uniform t"`` (plus the weighting unless it is none)."""
        form = self.form if isinstance(self.form, str) else self.resolved_form().family
        text = f"{form}, {self.prediction}, {self.time_sampler.replace('_', '-')} t"
        return text if self.weighting == "none" else f"{text}, {self.weighting} weighting"

    def describe(self) -> str:
        form = self.form if isinstance(self.form, str) else self.resolved_form()
        return (
            f"{form} / {self.prediction} / time sampler {self.time_sampler}"
            f"{self.time_sampler_params or ''} / weighting {self.weighting}"
            f"{self.weighting_params or ''}"
        )


@dataclass
class RectifyStage:
    """``[rectify]``: the rectification stage, in each cell's own form and prediction.

    Attributes:
        enabled: run it.
        config: pair generation (``RectifyConfig``: rounds, num_pairs, solver, steps, t_grid,
            shard_size, pair_batch_size, distill); its ``train`` is the shared [train] block
            with the ``[rectify.train]`` overrides applied.
        reference: ``equal = "logsnr"``: the implied weighting of the rectification
            training (None: the teacher's [reference]).
    """

    enabled: bool = True
    config: RectifyConfig = field(default_factory=RectifyConfig)
    reference: ReferenceConfig | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationConfig:
    """``[evaluation]``: how every teacher and rectified model is measured.

    Attributes:
        solvers: fixed-step solvers (``samplers.SOLVERS``), each run at every entry of steps.
        steps: solver steps (= NFE for ddim, euler, dpmpp_2m; heun uses two per step).
        reference_solver: an adaptive solver for the converged reference ("" = none).
        rtol, atol: its tolerances.
        t_grid: the grid kind (``samplers.TIME_GRIDS``): in each form's own t with
            ``equal = "t"``; in the reference form's t, mapped through logsnr, with
            ``equal = "logsnr"``.
        metrics: ``metrics.METRICS`` names, each against the held-out data.
        metric_options: per-metric keyword arguments, e.g. ``{sliced_w2 = {n_projections = 200}}``.
        diagnostics: see :data:`DIAGNOSTICS`.
        diagnostic_solver, diagnostic_steps: the solve whose trajectories the diagnostics read.
        n_diagnostic: trajectories for the diagnostics (and pairs for the crossing rate).
        figures: draw the figures.
        trajectory_forms: forms drawn in the x-vs-y trajectory figure (default: vp and fm
            when in the grid, else the first two).
        trajectory_prediction: their prediction (default: v when in the grid, else the
            first).
    """

    solvers: list[str] = field(default_factory=lambda: ["ddim"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    reference_solver: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    t_grid: str = "uniform"
    metrics: list[str] = field(default_factory=lambda: ["sliced_w2", "energy", "w2"])
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    diagnostics: list[str] = field(
        default_factory=lambda: [
            "straightness",
            "first_order_deviation",
            "crossing_rate",
            "one_step_gap",
            "transport_cost",
        ]
    )
    diagnostic_solver: str = "dpmpp_2m"
    diagnostic_steps: int = 32
    n_diagnostic: int = 1000
    figures: bool = True
    trajectory_forms: list[str] = field(default_factory=list)
    trajectory_prediction: str = ""

    def __post_init__(self) -> None:
        _check_names(self.solvers, SOLVERS, "solver")
        _check_names([self.diagnostic_solver], SOLVERS, "solver")
        if self.reference_solver:
            _check_names([self.reference_solver], ADAPTIVE_SOLVERS, "reference solver")
        _check_names(self.metrics, METRICS, "metric")
        _check_names(list(self.metric_options), self.metrics, "metric in metric_options")
        _check_names(self.diagnostics, DIAGNOSTICS, "diagnostic")
        _check_names([self.t_grid], TIME_GRIDS, "t_grid")
        if not self.steps or any(int(k) < 1 for k in self.steps):
            raise ValueError(f"[evaluation] steps must be integers >= 1, got {self.steps}.")
        if self.diagnostic_steps < 2 or self.n_diagnostic < 2:
            raise ValueError("[evaluation] diagnostic_steps and n_diagnostic must be >= 2.")


@dataclass
class CompareConfig:
    """A whole comparison (see the module docstring for the TOML layout)."""

    seed: int = 0
    equal: str = "logsnr"
    workers: int = 1
    threads: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    rectify: RectifyStage = field(default_factory=RectifyStage)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    source: str = "defaults"

    def __post_init__(self) -> None:
        _check_names([self.equal], EQUAL_MODES, "equal mode")
        for key in ("workers", "threads"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}.")

    # --- derived settings --------------------------------------------------------------
    def logsnr_range(self) -> tuple[float, float]:
        """The common logsnr interval of the grid's forms and the references."""
        forms = [form for _, form in self.grid.resolved()] + [self.reference.resolved_form()]
        if self.rectify.reference is not None:
            forms.append(self.rectify.reference.resolved_form())
        return timesteps.common_logsnr_range(*forms)

    def cells(self) -> list[tuple[str, Form, str]]:
        """``(form label, form, prediction)`` of every cell, forms outer, predictions inner.

        With ``equal = "logsnr"`` each form is restricted to the common logsnr range.
        """
        forms = self.grid.resolved()
        if self.equal == "logsnr":
            lo, hi = self.logsnr_range()
            forms = [(label, restrict_form(form, lo, hi)) for label, form in forms]
        return [(label, form, p) for label, form in forms for p in self.grid.predictions]

    def to_dict(self) -> dict[str, Any]:
        """Every setting as JSON-able values (for results.json and the report)."""
        out = {
            "source": self.source,
            "seed": self.seed,
            "equal": self.equal,
            "workers": self.workers,
            "threads": self.threads,
            "data": dataclasses.asdict(self.data),
            "grid": {
                "forms": [
                    {"label": label, **form.config()} for label, form in self.grid.resolved()
                ],
                "predictions": list(self.grid.predictions),
            },
            "network": dataclasses.asdict(self.network),
            "train": _train_dict(self.train, self.equal),
            "evaluation": dataclasses.asdict(self.evaluation),
        }
        if self.equal == "logsnr":
            out["reference"] = dataclasses.asdict(self.reference)
            out["logsnr_range"] = list(self.logsnr_range())
        rect = self.rectify
        out["rectify"] = {"enabled": rect.enabled}
        if rect.enabled:
            cfg = dataclasses.asdict(rect.config)
            cfg.pop("seed")
            cfg["train"] = rect.train_overrides
            out["rectify"] |= cfg
            if rect.reference is not None:
                out["rectify"]["reference"] = dataclasses.asdict(rect.reference)
        return out


#: TrainConfig fields that do not change what is trained (left out of reports)
_BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "log_every", "out_dir")


def _train_dict(train: TrainConfig, equal: str) -> dict[str, Any]:
    values = {k: v for k, v in train.to_dict().items() if k not in _BOOKKEEPING}
    if equal == "logsnr":
        for key in ("time_sampler", "weighting"):
            values[key] = "equalized to [reference]"
            values.pop(f"{key}_params")
    return values


def restrict_form(form: Form, lo: float, hi: float) -> Form:
    """``form`` with its safe range cut to logsnr in [lo, hi] (t_min at hi, t_max at lo)."""
    config = form.config()
    t_min = float(form.t_from_logsnr(torch.tensor(hi, dtype=torch.float64)))
    t_max = float(form.t_from_logsnr(torch.tensor(lo, dtype=torch.float64)))
    config["t_min"] = max(form.t_min, min(t_min, form.t_max))
    config["t_max"] = min(form.t_max, max(t_max, form.t_min))
    return from_config(config, source=f"{form!r} restricted to logsnr [{lo:.4g}, {hi:.4g}]")


# --- parsing ------------------------------------------------------------------------------
_TOP_KEYS = ("seed", "equal", "workers", "threads", "data", "grid", "network", "train", "reference",
             "rectify", "evaluation")  # fmt: skip
_RECTIFY_EXTRA = ("enabled", "reference", "train")


def _table(values: dict[str, Any], key: str) -> dict[str, Any]:
    table = values.get(key, {})
    if not isinstance(table, dict):
        raise ValueError(f"[{key}] must be a table, got {table!r}.")
    return dict(table)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    _reject_unknown(values, cls, where)
    return cls(**values)


def _train_config(values: dict[str, Any], seed: int, where: str) -> TrainConfig:
    if "seed" in values or "out_dir" in values:
        bad = "seed" if "seed" in values else "out_dir"
        raise ValueError(
            f"{where} may not set {bad!r}: the top-level seed seeds everything and "
            "`rectdiff compare --out` places every file."
        )
    try:
        return TrainConfig.from_dict({**values, "seed": seed})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _rectify_stage(values: dict[str, Any], shared: dict[str, Any], seed: int) -> RectifyStage:
    allowed = [f.name for f in dataclasses.fields(RectifyConfig) if f.name != "train"]
    allowed += list(_RECTIFY_EXTRA)
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in [rectify]; allowed: {', '.join(allowed)}.")
    enabled = bool(values.pop("enabled", True))
    reference = values.pop("reference", None)
    overrides = dict(values.pop("train", {}) or {})
    train = _train_config({**shared, **overrides}, seed, "[rectify.train]")
    if "seed" in values:
        raise ValueError("[rectify] may not set 'seed': the top-level seed seeds the pairs.")
    config = RectifyConfig.from_dict({**values, "train": train, "seed": seed})
    _check_names([config.solver], SOLVERS, "solver")
    _check_names([config.t_grid], TIME_GRIDS, "t_grid")
    ref = (
        None
        if reference is None
        else _build(ReferenceConfig, dict(reference), "[rectify.reference]")
    )
    return RectifyStage(enabled, config, ref, overrides)


def config_from_dict(values: dict[str, Any], source: str = "config") -> CompareConfig:
    """Build and validate a :class:`CompareConfig` from a parsed TOML document.

    Raises:
        ValueError: for an unknown key (naming it and the allowed keys), form, prediction,
            metric, solver, diagnostic or value.
    """
    values = copy.deepcopy(values)
    unknown = [k for k in values if k not in _TOP_KEYS]
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r} at the top level; allowed: {', '.join(_TOP_KEYS)}."
        )
    seed = int(values.get("seed", 0))
    equal = values.get("equal", "logsnr")
    shared = _table(values, "train")
    evaluation = _table(values, "evaluation")
    rectify = _table(values, "rectify")
    if equal == "logsnr":
        for key in ("time_sampler", "weighting", "time_sampler_params", "weighting_params"):
            if key in shared or key in rectify.get("train", {}):
                raise ValueError(
                    f"[train] {key} is set, but with equal = 'logsnr' every cell's time sampler "
                    "and weighting come from [reference] (via timesteps.equalize); set them "
                    "there, or use equal = 't'."
                )
    return CompareConfig(
        seed=seed,
        equal=equal,
        workers=int(values.get("workers", 1)),
        threads=int(values.get("threads", 1)),
        data=_build(DataConfig, _table(values, "data"), "[data]"),
        grid=_build(GridConfig, _table(values, "grid"), "[grid]"),
        network=_build(NetworkConfig, _table(values, "network"), "[network]"),
        train=_train_config(shared, seed, "[train]"),
        reference=_build(ReferenceConfig, _table(values, "reference"), "[reference]"),
        rectify=_rectify_stage(rectify, shared, seed),
        evaluation=_build(EvaluationConfig, evaluation, "[evaluation]"),
        source=source,
    )


def load_config(path: str | Path | None = None) -> CompareConfig:
    """Read a comparison config (``experiments/compare_forms.toml`` when None).

    Raises:
        ValueError: for a missing file, invalid TOML or any invalid setting.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist.")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    try:
        return config_from_dict(values, source=str(path))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def quick_config(config: CompareConfig) -> CompareConfig:
    """A smoke-test version of ``config`` (``--quick``): a fifth of the training steps,
    at most 1000 evaluation samples, 2000 pairs, 256 diagnostic trajectories, steps <= 4,
    and a looser adaptive reference (rtol = atol = 1e-4)."""
    quick = copy.deepcopy(config)

    def shrink(train: TrainConfig) -> TrainConfig:
        steps = max(1, math.ceil(train.steps / 5))
        return dataclasses.replace(
            train, steps=steps, warmup_steps=min(train.warmup_steps, steps // 10)
        )

    quick.train = shrink(quick.train)
    rect = quick.rectify.config
    rect.train = shrink(rect.train)
    rect.num_pairs = min(rect.num_pairs, 2000)
    quick.data.n_eval = min(quick.data.n_eval, 1000)
    ev = quick.evaluation
    ev.steps = [k for k in ev.steps if k <= 4] or ev.steps[:1]
    ev.n_diagnostic = min(ev.n_diagnostic, 256)
    ev.rtol, ev.atol = max(ev.rtol, 1e-4), max(ev.atol, 1e-4)
    quick.source = f"{config.source} (--quick)"
    return quick
