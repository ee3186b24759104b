"""The tables of a ``rectdiff compare`` config: ``[data]``, ``[grid]``, ``[network]``,
``[reference]``, ``[rectify]`` and ``[evaluation]``, each a dataclass that checks its values.

:class:`~rectdiff.apps.compare.config.CompareConfig` holds one of each; the module
docstring of :mod:`rectdiff.apps.compare.config` describes the TOML file they come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ... import diagnostics
from ... import training as timesteps
from ...forms import Form, from_config, load, presets
from ...io.configs import check_choice, reject_unknown
from ...io.model_dir import NET_KINDS
from ...metrics import METRICS
from ...models import SCALINGS
from ...plots.figures import FIGURE_FORMATS, FORMATS
from ...predictions import PREDICTIONS
from ...rectify.student import RectifyConfig
from ...samplers import SOLVERS, TIME_GRIDS

__all__ = [
    "DIAGNOSTICS",
    "ADAPTIVE_SOLVERS",
    "DataConfig",
    "GridConfig",
    "NetworkConfig",
    "ReferenceConfig",
    "RectifyStage",
    "EvaluationConfig",
    "resolve_form",
]

#: trajectory and coupling measures ``run_compare`` can report (see rectdiff.diagnostics)
DIAGNOSTICS = tuple(diagnostics.DIAGNOSTICS)
ADAPTIVE_SOLVERS = tuple(name for name, entry in SOLVERS.items() if entry.adaptive)


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
        reject_unknown(self.predictions, list(PREDICTIONS), "prediction")
        labels = [label for label, _ in self.resolved()]
        if len(set(labels)) != len(labels):
            raise ValueError(f"[grid] forms have repeated names {labels}; give each a name.")

    def resolved(self) -> list[tuple[str, Form]]:
        """``(label, form)`` for every entry of ``forms``, in order."""
        return [resolve_form(entry) for entry in self.forms]


def resolve_form(entry: Any) -> tuple[str, Form]:
    """``(label, form)`` of a ``[grid]`` forms entry: a preset name, a TOML path (labelled by
    its stem) or an inline table (labelled by its ``name``, else its ``family``)."""
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
        scaling: ``"edm"`` (c_in and c_out for data of std sigma_data), ``"fm"``
            (flow-matching units: c_in = 1 / (alpha + sigma), c_out = alpha + sigma for v;
            with ``time_input = "fm"`` every form's network sees and predicts what an
            unscaled flow-matching network does) or ``"velocity"`` (as ``"fm"``, and the
            network predicts flow matching's velocity eps - x0 in every prediction, turned
            into it by a skip connection; needs ``precondition_output``);
            ``nets.Preconditioned``.
        time_input: the network's time: ``"t"`` (each form's own t in [0, 1]) or ``"fm"``
            (the flow-matching t with the same logsnr, the same in every form).
        equalize_units: with ``equal = "logsnr"``, where ``timesteps.equalize`` makes each
            sample's weight constant: ``"network"`` (default: the network's own output,
            after c_out, ``equalize(output_scale=c_out)``), which keeps every sample's
            gradient weight alike also where c_out spans orders of magnitude (VE's v: an
            effective sample size of 0.04 on the network's output otherwise), or ``"loss"``
            (the loss in the form's units, rectdiff 0.2's first scheme). With ``scaling =
            "fm"`` and ``time_input = "fm"`` every form trains the same network as flow
            matching; with ``"velocity"`` every form and prediction does.
    """

    kind: str = "mlp"
    options: dict[str, Any] = field(default_factory=dict)
    sigma_data: float | None = None
    precondition_output: bool = True
    scaling: str = "edm"
    time_input: str = "t"
    equalize_units: str = "network"

    def __post_init__(self) -> None:
        check_choice(self.kind, list(NET_KINDS), "network kind")
        check_choice(self.scaling, list(SCALINGS), "network scaling")
        check_choice(self.time_input, ["t", "fm"], "network time_input")
        check_choice(self.equalize_units, ["loss", "network"], "network equalize_units")


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
        check_choice(self.prediction, list(PREDICTIONS), "prediction")
        check_choice(self.time_sampler, list(timesteps.TIME_SAMPLERS), "time sampler")
        check_choice(self.weighting, list(timesteps.WEIGHTINGS), "weighting")
        self.resolved_form()

    def resolved_form(self) -> Form:
        return resolve_form(self.form)[1]

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
        methods: the few-step methods (:data:`METHODS`), each trained from the same teacher
            with the same student steps and couplings per stage: ``"reflow"`` (``rounds``
            rounds, stages ``rectified``, ``rectified_2``, ...), ``"reflow+distill"`` (stage
            ``distilled``: the last reflow student distilled to one step on its own pairs),
            ``"phased"`` (stage ``phased``: ``rectify.rectify_phased`` with ``phases``
            windows, at one reflow round's teacher evaluations and student steps),
            ``"ot"`` (stage ``ot``: a teacher trained with minibatch optimal-transport
            couplings from the same initial weights), ``"ot+reflow"`` (stages
            ``ot_rectified``, ...: reflow rounds from that OT teacher).
        phases: K, the windows of ``"phased"``.
        phased_space: what the phased loss compares (``rectify.phased_loss``'s ``space``):
            ``"prediction"`` (PeRFlow's, in the cell's prediction; the default) or
            ``"endpoint"`` (the DDIM step's landing point, Rectified Diffusion's).
        phased_loss: the phased student's distance, ``"pseudo_huber"`` (Rectified
            Diffusion's phased training, ``--loss_type huber``; the default) or ``"mse"``;
            the reflow students keep the shared ``[train]`` loss.
        phased_window_time: how the phased student's training times spread over each
            window, ``"t"`` (evenly in t, the default) or ``"logsnr"``
            (``rectify.phased_loss``'s ``window_time``).
    """

    enabled: bool = True
    config: RectifyConfig = field(default_factory=RectifyConfig)
    reference: ReferenceConfig | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)
    phases: int = 0
    methods: list[str] = field(default_factory=lambda: ["reflow"])
    phased_space: str = "prediction"
    phased_loss: str = "pseudo_huber"
    phased_window_time: str = "t"


#: the few-step methods ``[rectify] methods`` can list
METHODS = ("reflow", "reflow+distill", "phased", "ot", "ot+reflow")


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
        figure_formats: the files each figure is written as (``plots.FIGURE_FORMATS``;
            PNG and SVG by default, PNG only with ``--quick``); a CSV of its numbers always.
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
    figure_formats: list[str] = field(default_factory=lambda: list(FORMATS))
    trajectory_forms: list[str] = field(default_factory=list)
    trajectory_prediction: str = ""

    def __post_init__(self) -> None:
        reject_unknown(self.solvers, list(SOLVERS), "solver")
        check_choice(self.diagnostic_solver, list(SOLVERS), "solver")
        if self.reference_solver:
            check_choice(self.reference_solver, ADAPTIVE_SOLVERS, "reference solver")
        reject_unknown(self.metrics, list(METRICS), "metric")
        reject_unknown(self.metric_options, self.metrics, "metric in metric_options")
        reject_unknown(self.diagnostics, DIAGNOSTICS, "diagnostic")
        check_choice(self.t_grid, list(TIME_GRIDS), "t_grid")
        if isinstance(self.figure_formats, str) or not self.figure_formats:
            raise ValueError(
                f"[evaluation] figure_formats = {self.figure_formats!r}: give a list of one or more of {list(FIGURE_FORMATS)} "
                '(e.g. ["png"]), or figures = false for none.'
            )
        reject_unknown(
            self.figure_formats, list(FIGURE_FORMATS), "figure format", "in [evaluation]"
        )
        if not self.steps or any(int(k) < 1 for k in self.steps):
            raise ValueError(f"[evaluation] steps must be integers >= 1, got {self.steps}.")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value >= 0)
            ):
                raise ValueError(
                    f"[evaluation] {name} = {value!r}: expected a finite number >= 0 (e.g. 1e-5)."
                )
        if self.rtol == 0 and self.atol == 0:
            raise ValueError(
                "[evaluation] rtol = atol = 0: an adaptive solve cannot meet a zero tolerance; "
                "give either a positive value (e.g. 1e-5)."
            )
        if self.diagnostic_steps < 2 or self.n_diagnostic < 2:
            raise ValueError("[evaluation] diagnostic_steps and n_diagnostic must be >= 2.")
