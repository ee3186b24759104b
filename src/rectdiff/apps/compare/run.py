"""Compare diffusion forms under equal hyperparameters: ``rectdiff compare``.

:func:`run_compare` trains one teacher per (form, prediction) cell of a
:class:`~rectdiff.compare_config.CompareConfig` with the one shared block of
hyperparameters, evaluates it, rectifies it in its own form and prediction (Rectified
Diffusion, Wang et al. 2024: retraining on the teacher's deterministic (noise, sample)
couplings, Liu, Gong & Liu 2023, Algorithm 1), evaluates the rectified model alike, and
writes into the output folder::

    report.md        every shared hyperparameter, then the tables
    results.json     one record per form, prediction, stage, solver and steps, with every
                     metric and diagnostic as a number; a summary per cell; the curves
    figures/         quality against NFE, curvature (teacher dashed, rectified solid),
                     x0-prediction drift, implied weighting, samples, x-vs-y trajectories
    models/<form>_<prediction>/teacher, .../rectified   model folders (rectdiff.checkpoints)
    pairs/<form>_<prediction>/round_<k>                 the couplings each round trained on

Every random choice is seeded from the config's one seed (data, initialisation, training
noise and times, pairs, evaluation noise, metric projections), so a re-run gives the same
numbers; cells run in ``workers`` processes with ``threads`` torch threads each, and the
numbers do not depend on ``workers``.

The diagnostics (rectdiff.diagnostics) read a ``diagnostic_solver`` trajectory on a grid
uniform in logsnr: relative straightness in t and in y = x / alpha (the headline: in t, VP
and sub-VP first-order paths are arcs, in y every first-order path is a straight line),
the x0-prediction's first-order deviation, the crossing rate and transport cost of the
model's coupling (noise, sample), and the one-step gap to an adaptive solve.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ... import __version__, diagnostics, metrics, samplers
from ... import training as timesteps
from ...data import TOYS, load_data
from ...diagnostics import diagnose_model
from ...forms import Form
from ...io.model_dir import (
    build_model,
    load_model_dir,
    read_model_info,
    sample_shape,
    save_model_dir,
)
from ...rectify.pairs import generate_pairs
from ...rectify.student import load_pairs, rectify
from ...training.trainer import TrainConfig, train
from .config import (
    CompareConfig,
    EvaluationConfig,
    quick_config,
    restrict_form,
)
from .report import draw_figures, draw_result_figures, summarize, write_report

__all__ = [
    "CellResult",
    "run_compare",
    "sampling_grid",
    "cell_train_config",
    "implied_weightings",
    "network_config",
    "evaluate_model",
    "diagnose_dirs",
    "training_coupling",
    "standard_noise",
]

#: how many generated samples / trajectories a cell keeps for the figures
FIGURE_POINTS = 2000


def standard_noise(shape: Sequence[int], n: int, seed: int, stream: str) -> Tensor:
    """``n`` float32 standard-normal samples of ``shape`` from a generator seeded by
    ``sha256(f"rectdiff.compare:{stream}:{seed}")`` (independent streams per purpose)."""
    digest = hashlib.sha256(f"rectdiff.compare:{stream}:{seed}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    return torch.randn((n, *shape), generator=generator)


# --- equal hyperparameters ----------------------------------------------------------------
def sampling_grid(form: Form, steps: int, config: CompareConfig) -> str | Tensor:
    """The time grid of a fixed-step solve with ``steps`` steps in ``form``.

    ``equal = "t"``: the grid kind ``evaluation.t_grid`` in the form's own time.
    ``equal = "logsnr"``: that kind of grid in the (restricted) reference form's time,
    mapped to ``form`` through logsnr, ``t = form.t_from_logsnr(ref.logsnr(t_ref))``, and
    ending at t = 0; so every form takes its steps between the same logsnr values.
    """
    kind = config.evaluation.t_grid
    if config.equal == "t":
        return kind
    lo, hi = config.logsnr_range()
    ref = restrict_form(config.reference.resolved_form(), lo, hi)
    t_ref = samplers.time_grid(ref, steps, kind)
    logsnr = ref.logsnr(t_ref[:-1])
    grid = form.t_from_logsnr(logsnr).clamp(form.t_min, form.t_max)
    grid[0] = form.t_max
    grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    if not bool((torch.diff(grid) < 0).all()):
        raise ValueError(
            f"{steps} steps of a {kind!r} grid collapse at the ends of {form!r}'s logsnr range "
            f"[{lo:.4g}, {hi:.4g}]; use fewer steps or another t_grid."
        )
    return grid


def cell_train_config(
    config: CompareConfig, form: Form, prediction: str, stage: str = "teacher"
) -> TrainConfig:
    """The training hyperparameters of one cell: the shared block, with (``equal =
    "logsnr"``) the time sampler and weighting of ``timesteps.equalize`` that give this form
    and prediction the reference's implied weighting on the common logsnr range.

    Args:
        config: the comparison.
        form: the cell's form (restricted to the common logsnr range in logsnr mode).
        prediction: the cell's prediction.
        stage: ``"teacher"`` or ``"rectify"`` (the rectification stage's block and reference).
    """
    rect = stage != "teacher"
    base = config.rectify.config.train if rect else config.train
    if config.equal == "t":
        return base
    reference = (config.rectify.reference or config.reference) if rect else config.reference
    sampler, weighting = timesteps.equalize(
        form, prediction, reference.weight, logsnr_range=form.logsnr_range()
    )
    return dataclasses.replace(
        base, time_sampler=sampler, weighting=weighting, time_sampler_params={},
        weighting_params={},
    )  # fmt: skip


def implied_weightings(
    config: CompareConfig, points: int = 400
) -> dict[str, tuple[list[float], list[float]]]:
    """The implied eps-MSE weightings over logsnr (``timesteps.implied_weighting``) of a
    comparison, for ``figures/implied_weighting``.

    ``equal = "t"``: every cell's (its time sampler and weighting in its own t).
    ``equal = "logsnr"``: the one weighting every teacher trains with (the reference's;
    every cell's equals it, see ``tests/test_compare.py``), the rectification stage's when
    it has its own reference, and, for contrast, what uniform t without weighting gives each
    form with the grid's first prediction (the cells' weightings under ``equal = "t"``).

    Returns:
        ``label -> (logsnr, weight)`` on ``points`` logsnr values spanning the forms' ranges.
    """
    native = config.grid.resolved()
    ranges = [form.logsnr_range() for _, form in native]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    logsnr = torch.linspace(lo, hi, points, dtype=torch.float64)
    curves: dict[str, Tensor] = {}
    if config.equal == "t":
        for label, form, prediction in config.cells():
            train_config = cell_train_config(config, form, prediction)
            sampler = timesteps.time_sampler(
                train_config.time_sampler, form, **train_config.time_sampler_params
            )
            weighting = timesteps.loss_weighting(
                train_config.weighting, **train_config.weighting_params
            )
            curves[f"{label} {prediction}"] = timesteps.implied_weighting(
                form, prediction, sampler, weighting, logsnr
            )
    else:
        common_lo, common_hi = config.logsnr_range()
        inside = (logsnr >= common_lo) & (logsnr <= common_hi)
        stages = [("all teachers", config.reference)]
        if config.rectify.enabled and config.rectify.reference is not None:
            stages.append(("all rectifications", config.rectify.reference))
        for name, reference in stages:
            weight = torch.where(inside, reference.weight(logsnr), torch.zeros_like(logsnr))
            curves[f"{name}: {reference.short()}"] = weight
        prediction = config.grid.predictions[0]
        ref = config.reference
        for label, form in native:
            same = (form, prediction) == (ref.resolved_form(), ref.prediction)
            if same and ref.time_sampler == "uniform" and ref.weighting == "none":
                continue  # that is the teachers' curve
            curves[f"{label} {prediction}, uniform t"] = timesteps.implied_weighting(
                form, prediction, "uniform", "none", logsnr
            )
    return {name: (logsnr.tolist(), weight.tolist()) for name, weight in curves.items()}


def network_config(config: CompareConfig, x_train: Tensor, prediction: str) -> dict[str, Any]:
    """The model-folder network config of a cell (see ``checkpoints.build_model``)."""
    net = config.network
    kwargs = dict(net.options)
    if net.kind == "mlp":
        kwargs.setdefault("dim", int(x_train[0].numel()))
    else:
        kwargs.setdefault("sample_size", int(x_train.shape[-1]))
        kwargs.setdefault("in_channels", int(x_train.shape[1]))
    sigma_data = net.sigma_data if net.sigma_data is not None else float(x_train.std())
    return {
        "kind": net.kind,
        "kwargs": kwargs,
        "preconditioning": {
            "sigma_data": round(sigma_data, 6),
            "scale_input": True,
            "output_prediction": prediction if net.precondition_output else None,
        },
    }


# --- evaluation -----------------------------------------------------------------------------
def evaluate_model(
    model: nn.Module,
    *,
    form: Form,
    prediction: str,
    noise: Tensor,
    reference_data: Tensor,
    evaluation: EvaluationConfig,
    grid: Any,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Sample from ``noise`` with every configured solver and number of steps, and score.

    Args:
        model, form, prediction: the model.
        noise: standard-normal starting noise (shared by every model compared).
        reference_data: held-out data the metrics compare against.
        evaluation: solvers, steps, reference solver, metrics.
        grid: ``grid(form, steps) -> t_grid`` (see :func:`sampling_grid`).
        seed: the metrics' seed.

    Returns:
        ``(records, samples)``: one record ``{solver, steps, nfe, <metric>: value}`` per
        solve (the adaptive reference with ``steps = None``), and the first samples of the
        one-step and reference solves for the figures (``"ddim@1"``, ``"dopri5"``, ...).
    """
    runs: list[tuple[str, int | None]] = [
        (s, k) for s in evaluation.solvers for k in evaluation.steps
    ]
    if evaluation.reference_solver:
        runs.append((evaluation.reference_solver, None))
    records, kept = [], {}
    for solver, steps in runs:
        t_grid = grid(form, steps if steps is not None else 1)
        traj = samplers.sample(
            model, noise, form=form, prediction=prediction, solver=solver,
            steps=steps or 1, t_grid=t_grid, rtol=evaluation.rtol, atol=evaluation.atol,
            return_trajectory=True,
        )  # fmt: skip
        sample = traj.sample
        scores = metrics.compute_metrics(
            evaluation.metrics, sample, reference_data, seed=seed, **evaluation.metric_options
        )
        records.append({"solver": solver, "steps": steps, "nfe": int(traj.nfe), **scores})
        if steps in (None, 1):
            kept[solver if steps is None else f"{solver}@1"] = sample[:FIGURE_POINTS].clone()
    return records, kept


# --- one cell -------------------------------------------------------------------------------
@dataclass
class CellTask:
    """Everything one cell needs (picklable, for worker processes)."""

    index: int
    label: str
    form: Form
    prediction: str
    config: CompareConfig
    x_train: Tensor
    reference_data: Tensor
    out: Path


@dataclass
class CellResult:
    """One cell's numbers and figure material.

    Attributes:
        label, prediction, form: the cell.
        records: evaluation records, each with ``stage`` and the stage's diagnostics.
        diagnostics: stage -> diagnostic numbers.
        curves: stage -> curve name -> ``(t, value)``.
        samples: stage -> solve name -> samples (for the figures).
        trajectories: stage -> a few diagnostic trajectories.
        losses: stage -> final training loss.
        seconds: wall time of the cell.
    """

    label: str
    prediction: str
    form: Form
    records: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    trajectories: dict[str, samplers.Trajectory] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.label}_{self.prediction}"


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _measure(
    result: CellResult,
    stage: str,
    model: nn.Module,
    task: CellTask,
    grid: Any,
    coupling: tuple[Tensor, Tensor],
) -> None:
    config, ev = task.config, task.config.evaluation
    shape = tuple(task.x_train.shape[1:])
    noise = standard_noise(shape, config.data.n_eval, config.seed, "evaluation")
    records, kept = evaluate_model(
        model, form=task.form, prediction=task.prediction, noise=noise,
        reference_data=task.reference_data, evaluation=ev, grid=grid, seed=config.seed,
    )  # fmt: skip
    diag_noise = standard_noise(shape, ev.n_diagnostic, config.seed, "diagnostics")
    diagnosis = diagnose_model(
        model, form=task.form, prediction=task.prediction, noise=diag_noise,
        which=ev.diagnostics, solver=ev.diagnostic_solver, steps=ev.diagnostic_steps,
        reference_solver=ev.reference_solver or "dopri5", rtol=ev.rtol, atol=ev.atol,
        seed=config.seed,
    )  # fmt: skip
    if "crossing_rate" in ev.diagnostics:
        eps, x0 = (c[: ev.n_diagnostic] for c in coupling)
        diagnosis.numbers["train_coupling_crossing_rate"] = float(
            diagnostics.crossing_rate(eps, x0, seed=config.seed)
        )
    for record in records:
        result.records.append(
            {"form": task.label, "prediction": task.prediction, "stage": stage, **record,
             **diagnosis.numbers}
        )  # fmt: skip
    result.diagnostics[stage] = diagnosis.numbers
    result.curves[stage] = diagnosis.curves
    result.samples[stage] = kept
    result.trajectories[stage] = diagnosis.trajectory


def _model_info(task: CellTask, stage: str, losses: list[float], extra: dict) -> dict[str, Any]:
    config = task.config
    return {
        "stage": stage,
        "cell": {"form": task.label, "prediction": task.prediction},
        "data": config.data.name,
        "data_params": config.data.params,
        "n_train": config.data.n_train,
        "equal": config.equal,
        "seed": config.seed,
        "final_loss": losses[-1] if losses else None,
        "compare_config": config.source,
        **extra,
    }


def run_cell(task: CellTask) -> CellResult:
    """Train, evaluate, rectify and evaluate one (form, prediction) cell."""
    torch.set_num_threads(task.config.threads)
    start = time.perf_counter()
    config, form, prediction = task.config, task.form, task.prediction
    result = CellResult(task.label, prediction, form)
    models_dir = task.out / "models" / result.name

    def grid(f: Form, steps: int) -> Any:
        return sampling_grid(f, steps, config)

    net_config = network_config(config, task.x_train, prediction)
    torch.manual_seed(config.seed)
    teacher = build_model(net_config, form)
    trained = train(
        teacher, task.x_train, form=form, prediction=prediction,
        config=cell_train_config(config, form, prediction), resume=False, progress=False,
    )  # fmt: skip
    teacher = trained.model.eval()
    result.losses["teacher"] = trained.losses[-1]
    save_model_dir(
        models_dir / "teacher", teacher, form=form, prediction=prediction,
        net_config=net_config, info=_model_info(task, "teacher", trained.losses, {}),
    )  # fmt: skip
    shape, n = tuple(task.x_train.shape[1:]), config.evaluation.n_diagnostic
    # the coupling a diffusion loss samples: noise and data drawn independently
    independent = (standard_noise(shape, n, config.seed, "diagnostics"), task.x_train)
    _measure(result, "teacher", teacher, task, grid, independent)

    stage_cfg = config.rectify
    current, current_name = teacher, "teacher"
    if stage_cfg.enabled:
        rc = stage_cfg.config
        for k in range(1, rc.rounds + 1):
            stage = "rectified" if k == 1 else f"rectified_{k}"
            pairs_dir = task.out / "pairs" / result.name / f"round_{k}"
            shutil.rmtree(pairs_dir, ignore_errors=True)
            pairs = generate_pairs(
                current, form=form, prediction=prediction, num_pairs=rc.num_pairs,
                out=pairs_dir, solver=rc.solver, steps=rc.steps, shard_size=rc.shard_size,
                seed=config.seed + k - 1, batch_size=rc.pair_batch_size,
                shape=tuple(task.x_train.shape[1:]),
                solver_options={"t_grid": _json_grid(grid(form, rc.steps))},
                model_description=f"{result.name} {current_name} {_weights_digest(current)}",
                progress=False,
            )  # fmt: skip
            if rc.init == "scratch":
                torch.manual_seed(config.seed)
                student = build_model(net_config, form)
            else:
                student = copy.deepcopy(teacher)
            fitted = rectify(
                student.train(), pairs, form=form, prediction=prediction,
                config=cell_train_config(config, form, prediction, "rectify"),
                distill=rc.distill, progress=False,
            )  # fmt: skip
            student = fitted.model.eval()
            result.losses[stage] = fitted.losses[-1]
            save_model_dir(
                models_dir / stage, student, form=form, prediction=prediction,
                net_config=net_config,
                info=_model_info(
                    task, stage, fitted.losses, {"pairs": str(pairs_dir.relative_to(task.out))}
                ),
            )  # fmt: skip
            _measure(result, stage, student, task, grid, load_pairs(pairs))
            current, current_name = student, stage
    result.seconds = time.perf_counter() - start
    return result


def _json_grid(grid: str | Tensor) -> str | list[float]:
    return grid if isinstance(grid, str) else [float(t) for t in grid]


# --- the whole grid -------------------------------------------------------------------------
def _load_datasets(config: CompareConfig) -> tuple[Tensor, Tensor]:
    """``(x_train, reference)``: toys draw both (seeds ``seed`` and ``seed + 1``); finite
    sets hold out ``n_holdout`` samples by a seeded permutation."""
    data = config.data
    if data.name in TOYS:
        x_train = load_data(data.name, data.n_train, config.seed, **data.params)
        reference = load_data(data.name, data.n_eval, config.seed + 1, **data.params)
        return x_train, reference
    everything = load_data(data.name, None, config.seed, **data.params)
    if len(everything) <= data.n_holdout + 1:
        raise ValueError(
            f"data {data.name!r} has {len(everything)} samples, too few to hold out "
            f"n_holdout = {data.n_holdout}; lower [data] n_holdout."
        )
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(config.seed))
    reference = everything[order[: data.n_holdout]]
    rest = everything[order[data.n_holdout :]]
    if data.n_train is not None:
        rest = rest[: data.n_train]
    return rest, reference


def _warm_caches(config: CompareConfig) -> None:
    """Train (or load) the digits classifier once before worker processes need it."""
    names = {"frechet_digits", "classifier"} & set(config.evaluation.metrics)
    for name in sorted(names):
        options = config.evaluation.metric_options.get(name, {})
        metrics.digits_classifier(options.get("cache_dir"), options.get("classifier_seed", 0))


def _run_tasks(tasks: list[CellTask], workers: int, progress: bool) -> list[CellResult]:
    bar = tqdm(total=len(tasks), desc="compare", unit="cell", disable=not progress)
    results: list[CellResult | None] = [None] * len(tasks)
    try:
        if workers <= 1 or len(tasks) == 1:
            for task in tasks:
                bar.set_postfix_str(f"{task.label}/{task.prediction}")
                results[task.index] = run_cell(task)
                bar.update(1)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {pool.submit(run_cell, task): task for task in tasks}
                for future in as_completed(futures):
                    task = futures[future]
                    results[task.index] = future.result()
                    bar.set_postfix_str(f"done {task.label}/{task.prediction}")
                    bar.update(1)
    finally:
        bar.close()
    return [r for r in results if r is not None]


def run_compare(
    config: CompareConfig,
    out: str | os.PathLike[str],
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a comparison and write report.md, results.json, figures and model folders.

    Args:
        config: the comparison (``compare_config.load_config``).
        out: the output folder (created; files of an earlier run are replaced).
        quick: shrink it to a smoke test (``compare_config.quick_config``).
        progress: a tqdm bar over the grid.

    Returns:
        The contents of results.json.
    """
    if quick:
        config = quick_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        x_train, reference = _load_datasets(config)
        _warm_caches(config)
        tasks = [
            CellTask(i, label, form, prediction, config, x_train, reference, out)
            for i, (label, form, prediction) in enumerate(config.cells())
        ]
        cells = _run_tasks(tasks, config.workers, progress)
    finally:
        torch.set_num_threads(threads)
    results = summarize(config, cells, __version__)
    results["curves"]["implied_weighting"] = implied_weightings(config)
    if config.evaluation.figures:
        results["figures"] = [
            str(p.relative_to(out))
            for p in draw_figures(results, out / "figures", cells, reference)
        ]
    results["timing"] = {
        "seconds": round(time.perf_counter() - start, 1),
        "cells": {cell.name: round(cell.seconds, 1) for cell in cells},
    }
    _write_json(out / "results.json", results)
    write_report(results, out / "report.md")
    return results


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# --- saved models ---------------------------------------------------------------------------
def diagnose_dirs(
    model_dirs: Sequence[str | os.PathLike[str]],
    *,
    solver: str = "dpmpp_2m",
    steps: int = 32,
    num: int = 1000,
    seed: int = 0,
    which: Sequence[str] = (
        "straightness",
        "first_order_deviation",
        "crossing_rate",
        "one_step_gap",
    ),
    reference_solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    out: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """:func:`diagnose_model` on saved model folders, each from the same noise.

    With the defaults and ``seed`` equal to a comparison's seed, the numbers are the ones
    ``rectdiff compare`` reported for those models (same noise stream, solver and grid).

    Args:
        model_dirs: model folders (``checkpoints.save_model_dir``).
        solver, steps, num, seed: the diagnostic solve and its noise.
        which: the diagnostics to compute.
        reference_solver, rtol, atol: the one-step gap's reference.
        out: also write the records as JSON there.

    Returns:
        One record per folder: ``{"model", "form", "prediction", <diagnostic>: value}``.
    """
    records = []
    for path in model_dirs:
        model, form, prediction = load_model_dir(path)
        shape = sample_shape(read_model_info(path)["net"])
        noise = standard_noise(shape, num, seed, "diagnostics")
        diagnosis = diagnose_model(
            model, form=form, prediction=prediction, noise=noise, which=which, solver=solver,
            steps=steps, reference_solver=reference_solver, rtol=rtol, atol=atol, seed=seed,
        )  # fmt: skip
        if "crossing_rate" in which:
            coupling = training_coupling(path, num, seed)
            if coupling is not None:
                diagnosis.numbers["train_coupling_crossing_rate"] = float(
                    diagnostics.crossing_rate(*coupling, seed=seed)
                )
        records.append(
            {"model": str(path), "form": form.config(), "prediction": prediction,
             **diagnosis.numbers}
        )  # fmt: skip
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        _write_json(Path(out), records)
    return records


def training_coupling(
    model_dir: str | os.PathLike[str], num: int, seed: int
) -> tuple[Tensor, Tensor] | None:
    """The first ``num`` pairs of the coupling a ``rectdiff compare`` model was trained on,
    as that run measured them: a rectified model's pairs, or, for a teacher of a 2-D toy,
    the diagnostics noise beside the training data (drawn independently). None when the
    folder does not say (another origin, or a finite data set)."""
    info = read_model_info(model_dir).get("info", {})
    pairs = Path(info.get("pairs") or "")
    if info.get("pairs") and not pairs.is_absolute():  # relative to the run's output folder
        pairs = Path(model_dir).resolve().parents[2] / pairs
    if info.get("pairs") and pairs.is_dir():
        eps, x0 = load_pairs(pairs)
        return eps[:num], x0[:num]
    if info.get("stage") == "teacher" and info.get("data") in TOYS and "n_train" in info:
        data_seed, params = info.get("seed", 0), info.get("data_params", {})
        x_train = load_data(info["data"], info["n_train"], data_seed, **params)
        return standard_noise(tuple(x_train.shape[1:]), num, seed, "diagnostics"), x_train[:num]
    return None


def plot_results(results_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Path]:
    """Redraw the line figures of a comparison from its results.json (quality against
    NFE, curvature in t and y, x0-prediction drift, implied weighting)."""
    path = Path(results_path)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read results file {str(path)!r}: {err}") from None
    if not isinstance(results, dict) or "records" not in results or "config" not in results:
        raise ValueError(f"{path} is not a `rectdiff compare` results.json (no records/config).")
    return draw_result_figures(results, out)


def _model_label(path: str | os.PathLike[str]) -> str:
    info = read_model_info(path).get("info", {})
    cell = info.get("cell")
    if cell and info.get("stage"):
        return f"{cell['form']} {cell['prediction']} {info['stage']}"
    return Path(path).name


def plot_model_dirs(
    model_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    num: int = 1000,
    seed: int = 0,
    steps: int = 32,
    solver: str = "dpmpp_2m",
) -> list[Path]:
    """Figures of saved models: one-step and dopri5 samples, x-vs-y trajectories (2-D
    data), curvature in t and y and x0-prediction drift (teacher dashed, rectified solid,
    when the folders say which is which).

    Args:
        model_dirs: model folders.
        out: the figure folder.
        num, seed: trajectories per model and the seed of their noise (the diagnostics'
            noise stream of ``rectdiff compare``).
        steps, solver: the diagnostic solve.
    """
    from ... import plots

    out = Path(out)
    labels = [_model_label(p) for p in model_dirs]
    if len(set(labels)) != len(labels):
        labels = [
            f"{label} ({Path(p).parent.name}/{Path(p).name})"
            for label, p in zip(labels, model_dirs, strict=True)
        ]
    curves: dict[str, dict[str, Any]] = {"curvature_t": {}, "curvature_y": {}, "x0_drift": {}}
    panels: dict[str, Tensor] = {}
    trajs = {}
    for label, path in zip(labels, model_dirs, strict=True):
        model, form, prediction = load_model_dir(path)
        noise = standard_noise(sample_shape(read_model_info(path)["net"]), num, seed, "diagnostics")
        diagnosis = diagnose_model(
            model, form=form, prediction=prediction, noise=noise, solver=solver, steps=steps,
            which=("straightness", "first_order_deviation"),
        )  # fmt: skip
        for name, value in diagnosis.curves.items():
            curves[name][label] = value
        panels[f"{label} ddim@1"] = samplers.sample(
            model, noise, form=form, prediction=prediction, steps=1
        )
        panels[f"{label} {solver}@{steps}"] = diagnosis.sample
        if diagnosis.trajectory.x.ndim == 3 and diagnosis.trajectory.x.shape[-1] == 2:
            trajs[label] = diagnosis.trajectory
    rect = {
        label: label.rsplit(" ", 1)[0] + " teacher"
        for label in labels
        if not label.endswith("teacher") and label.rsplit(" ", 1)[0] + " teacher" in labels
    }
    written: list[Path] = []
    for coords in ("t", "y"):
        written += plots.plot_curvature(
            curves[f"curvature_{coords}"], out / f"curvature_{coords}", rect, coords=coords, logy=True,
            ylabel=r"$E\,\|(Z_1 - Z_0) - dZ/du\|^2 \,/\, E\,\|Z_1 - Z_0\|^2$",
        )  # fmt: skip
    written += plots.plot_x0_drift(curves["x0_drift"], out / "x0_drift", rect, logy=True)
    written += plots.plot_samples(panels, out / "samples")
    if trajs:
        written += plots.plot_trajectories_xy(trajs, out / "trajectories_xy", max_paths=32)
    return written
