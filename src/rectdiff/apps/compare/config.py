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
                  overrides of [train], its own ``reference``, ``methods``: the few-step
                  methods "reflow" (``rounds``), "reflow+distill", "phased" (``phases`` = K
                  windows; ``phased_space``, ``phased_loss``, ``phased_window_time``), each
                  from the same teacher at the same budget per stage)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ... import training as timesteps
from ...forms import Form, from_config
from ...io.configs import check_choice, from_mapping, read_layered_toml, reject_unknown
from ...io.resources import data_dir
from ...models import check_scaling
from ...rectify.phased import SPACES, WINDOW_TIMES
from ...rectify.student import RectifyConfig
from ...samplers import SOLVERS, TIME_GRIDS, check_start
from ...training.losses import LOSSES
from ...training.trainer import TrainConfig
from .tables import (
    METHODS,
    DataConfig,
    EvaluationConfig,
    GridConfig,
    NetworkConfig,
    RectifyStage,
    ReferenceConfig,
)

__all__ = [
    "EQUAL_MODES",
    "CompareConfig",
    "restrict_form",
    "config_from_dict",
    "load_config",
    "quick_config",
    "DEFAULT_CONFIG",
]

EQUAL_MODES = ("t", "logsnr")
#: the default configuration file, relative to the repository root
DEFAULT_CONFIG = data_dir("experiments") / "compare_forms.toml"


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
        check_choice(self.equal, EQUAL_MODES, "equal mode")
        for key in ("workers", "threads"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}.")
        for label, form, prediction in self.cells():
            output = prediction if self.network.precondition_output else None
            try:
                check_scaling(self.network.scaling, form, output)
            except ValueError as err:
                raise ValueError(f"[network] in form {label!r}: {err}") from None
            try:
                check_start(form, prediction)
            except ValueError as err:
                raise ValueError(
                    f"[grid] form {label!r}, prediction {prediction!r}: {err}"
                ) from None

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
            used = rect.config.train.to_dict()  # the values that ran (--quick shrinks steps)
            cfg["train"] = {
                key: used.get(key, value) for key, value in rect.train_overrides.items()
            }
            out["rectify"] |= cfg | {"methods": list(rect.methods), "phases": rect.phases}
            if "phased" in rect.methods:
                out["rectify"]["phased_space"] = rect.phased_space
                out["rectify"]["phased_loss"] = rect.phased_loss
                out["rectify"]["phased_window_time"] = rect.phased_window_time
            if rect.reference is not None:
                out["rectify"]["reference"] = dataclasses.asdict(rect.reference)
        return out


#: TrainConfig fields that do not change what is trained (left out of reports)
_BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "log_every", "out_dir", "log_with",
                "sample_every", "sample_steps")  # fmt: skip


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
_RECTIFY_EXTRA = ("enabled", "reference", "train", "phases", "methods", "phased_space",
                  "phased_loss", "phased_window_time")  # fmt: skip


def _table(values: dict[str, Any], key: str) -> dict[str, Any]:
    table = values.get(key, {})
    if not isinstance(table, dict):
        raise ValueError(f"[{key}] must be a table, got {table!r}.")
    return dict(table)


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
    reject_unknown(values, allowed + list(_RECTIFY_EXTRA), where="in [rectify]")
    enabled = bool(values.pop("enabled", True))
    methods, phases = _methods(values.pop("methods", None), values.pop("phases", None))
    space = check_choice(values.pop("phased_space", "prediction"), SPACES, "[rectify] phased_space")
    loss = check_choice(values.pop("phased_loss", "pseudo_huber"), LOSSES, "[rectify] phased_loss")
    window_time = check_choice(values.pop("phased_window_time", "t"), WINDOW_TIMES,
                               "[rectify] phased_window_time")  # fmt: skip
    reference = values.pop("reference", None)
    overrides = dict(values.pop("train", {}) or {})
    if overrides.get("coupling", "independent") != "independent":
        raise ValueError(
            f"[rectify.train] coupling = {overrides['coupling']!r}: rectification trains on "
            'the teacher\'s pairs, which are the coupling; use [rectify] methods = ["ot"] or '
            '["ot+reflow"] for minibatch OT, or [train] coupling for the teachers.'
        )
    train = _train_config({**shared, **overrides, "coupling": "independent"}, seed,
                          "[rectify.train]")  # fmt: skip
    if "seed" in values:
        raise ValueError("[rectify] may not set 'seed': the top-level seed seeds the pairs.")
    config = RectifyConfig.from_dict({**values, "train": train, "seed": seed})
    check_choice(config.solver, list(SOLVERS), "solver")
    check_choice(config.t_grid, list(TIME_GRIDS), "t_grid")
    ref = (
        None
        if reference is None
        else from_mapping(ReferenceConfig, dict(reference), where="in [rectify.reference]")
    )
    return RectifyStage(enabled, config, ref, overrides, phases, methods, space, loss, window_time)


def _methods(methods: Any, phases: Any) -> tuple[list[str], int]:
    """``[rectify] methods`` and ``phases``: a list of :data:`METHODS` (default ``["reflow"]``,
    plus ``"phased"`` when only ``phases`` = K > 0 is given) and K (default 4 with
    ``"phased"``, else 0)."""
    if phases is not None and (
        isinstance(phases, bool) or not isinstance(phases, int) or phases < 0
    ):
        raise ValueError(f"[rectify] phases must be an integer >= 0 (0: off), got {phases!r}.")
    if methods is None:
        methods = ["reflow", "phased"] if phases else ["reflow"]
    if isinstance(methods, str) or not isinstance(methods, list) or not methods:
        raise ValueError(
            f"[rectify] methods must be a non-empty list of {', '.join(map(repr, METHODS))}, "
            f'got {methods!r}; e.g. methods = ["reflow", "phased"].'
        )
    for method in methods:
        check_choice(method, METHODS, "[rectify] method")
    if len(set(methods)) != len(methods):
        raise ValueError(f"[rectify] methods lists a method twice: {methods!r}.")
    if "phased" not in methods:
        return list(methods), int(phases or 0)
    if phases == 0:
        raise ValueError(
            "[rectify] methods has 'phased' but phases = 0; set phases = K >= 1 (e.g. 4, the "
            "K-step evaluation grid's windows) or drop 'phased'."
        )
    return list(methods), 4 if phases is None else phases


def _top_int(values: dict[str, Any], key: str, default: int) -> int:
    """A top-level integer setting, type-checked (TOML gives ints; 1.7 or "3" is refused)."""
    value = values.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{key} = {value!r} has type {type(value).__name__}; expected int (e.g. {key} = "
            f"{default})."
        )
    return value


def config_from_dict(values: dict[str, Any], source: str = "config") -> CompareConfig:
    """Build and validate a :class:`CompareConfig` from a parsed TOML document.

    Raises:
        ValueError: for an unknown key (naming it and the allowed keys), form, prediction,
            metric, solver, diagnostic or value.
    """
    values = copy.deepcopy(values)
    reject_unknown(values, _TOP_KEYS, where="at the top level")
    seed = _top_int(values, "seed", 0)
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
        workers=_top_int(values, "workers", 1),
        threads=_top_int(values, "threads", 1),
        data=from_mapping(DataConfig, _table(values, "data"), where="in [data]"),
        grid=from_mapping(GridConfig, _table(values, "grid"), where="in [grid]"),
        network=from_mapping(NetworkConfig, _table(values, "network"), where="in [network]"),
        train=_train_config(shared, seed, "[train]"),
        reference=from_mapping(
            ReferenceConfig, _table(values, "reference"), where="in [reference]"
        ),
        rectify=_rectify_stage(rectify, shared, seed),
        evaluation=from_mapping(EvaluationConfig, evaluation, where="in [evaluation]"),
        source=source,
    )


def load_config(path: str | Path | None = None) -> CompareConfig:
    """Read a comparison config (``experiments/compare_forms.toml`` when None); a top-level
    ``base = "other.toml"`` reads that file first and lays this one over it
    (``io.configs.read_layered_toml``).

    Raises:
        ValueError: for a missing file, invalid TOML or any invalid setting.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist.")
    values = read_layered_toml(path)
    try:
        return config_from_dict(values, source=str(path))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def quick_config(config: CompareConfig) -> CompareConfig:
    """A smoke-test version of ``config`` (``--quick``): a twentieth of the training steps,
    at most 500 evaluation samples, 1000 pairs, 128 diagnostic trajectories, steps <= 4,
    a looser adaptive reference (rtol = atol = 1e-4) and PNG figures only."""
    quick = copy.deepcopy(config)

    def shrink(train: TrainConfig) -> TrainConfig:
        steps = max(1, math.ceil(train.steps / 20))
        return dataclasses.replace(
            train, steps=steps, warmup_steps=min(train.warmup_steps, steps // 10)
        )

    quick.train = shrink(quick.train)
    rect = quick.rectify.config
    rect.train = shrink(rect.train)
    rect.num_pairs = min(rect.num_pairs, 1000)
    quick.data.n_eval = min(quick.data.n_eval, 500)
    ev = quick.evaluation
    ev.steps = [k for k in ev.steps if k <= 4] or ev.steps[:1]
    ev.n_diagnostic = min(ev.n_diagnostic, 128)
    ev.rtol, ev.atol = max(ev.rtol, 1e-4), max(ev.atol, 1e-4)
    ev.figure_formats = ["png"]
    quick.source = f"{config.source} (--quick)"
    return quick
