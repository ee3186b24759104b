"""One cell of a comparison: train a (form, prediction) teacher, rectify it, measure both.

:func:`run_cell` runs in a worker process (``spawn``), so :class:`CellTask` carries
everything it needs and :class:`CellResult` everything the report and figures read. Every
model is saved as a model folder (``models/<form>_<prediction>/<stage>``) and every round's
pairs as a pair store (``pairs/<form>_<prediction>/round_<k>``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ... import diagnostics, samplers
from ...diagnostics import diagnose_model
from ...forms import Form
from ...io.model_dir import build_model, save_model_dir
from ...rectify.coupling import load_pairs
from ...rectify.pairs import generate_pairs
from ...rectify.phased import rectify_phased, window_grid
from ...rectify.store import PairDataset
from ...rectify.student import rectify
from ...training.trainer import train
from .config import CompareConfig
from .evaluate import evaluate_model, standard_noise
from .figures import draw_cell_samples
from .hyperparameters import cell_train_config, network_config, sampling_grid

__all__ = ["CellTask", "CellResult", "run_cell"]


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
    progress: bool = False

    @property
    def name(self) -> str:
        return f"{self.label}_{self.prediction}"


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
        budgets: stage -> model evaluations spent on its training couplings (cumulative
            over the stages it builds on).
        student_steps: stage -> training steps of its students (cumulative likewise).
        ess: stage -> mean effective sample size of its training batches' loss weights
            (``TrainResult.ess``; 1 for an unweighted loss).
        seconds: wall time of the cell.
        figures: file names (in the figures folder) of what the cell's worker drew.
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
    budgets: dict[str, int] = field(default_factory=dict)
    student_steps: dict[str, int] = field(default_factory=dict)
    ess: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    figures: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.label}_{self.prediction}"


#: when each cell of this process started (for the progress notes)
_STARTED: dict[str, float] = {}


def _note(task: CellTask, text: str) -> None:
    """With ``task.progress``, one line on stderr: the cell, its seconds so far and what it
    starts now (from worker processes too; above the compare bar in one process)."""
    if task.progress:
        seconds = time.perf_counter() - _STARTED.get(task.name, time.perf_counter())
        tqdm.write(f"compare {task.name} {seconds:6.1f} s  {text}", file=sys.stderr)


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
    target: Tensor | None = None,
) -> Tensor | None:
    """Evaluate ``model`` as ``stage`` (``evaluate_model``: ``target`` is its teacher's
    adaptive solve, None for a teacher) and diagnose it; returns its own adaptive solve."""
    config, ev = task.config, task.config.evaluation
    _note(task, f"{stage}: evaluating ({len(ev.steps)} step counts, diagnostics)")
    shape = tuple(task.x_train.shape[1:])
    noise = standard_noise(shape, config.data.n_eval, config.seed, "evaluation")
    records, kept, reference = evaluate_model(
        model, form=task.form, prediction=task.prediction, noise=noise,
        reference_data=task.reference_data, evaluation=ev, grid=grid, seed=config.seed,
        target=target,
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
    return reference


def _record_ess(result: CellResult, stage: str, ess: list[float]) -> None:
    if ess:  # empty for a custom loss (the phased loss is unweighted)
        result.ess[stage] = sum(ess) / len(ess)


def _model_info(
    task: CellTask, stage: str, losses: list[float], training: Any, extra: dict
) -> dict[str, Any]:
    """What a cell's model folder records: the cell, data, seed, final loss and the full
    training settings (``training``, a :class:`~rectdiff.training.TrainConfig`)."""
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
        "training": training.to_dict(),
        "compare_config": config.source,
        **extra,
    }


def run_cell(task: CellTask) -> CellResult:
    """Train, evaluate, rectify and evaluate one (form, prediction) cell."""
    torch.set_num_threads(task.config.threads)
    start = _STARTED[task.name] = time.perf_counter()
    config, form, prediction = task.config, task.form, task.prediction
    result = CellResult(task.label, prediction, form)
    models_dir = task.out / "models" / result.name

    def grid(f: Form, steps: int) -> Any:
        return sampling_grid(f, steps, config)

    net_config = network_config(config, task.x_train, prediction)
    teacher, target = _teacher_stage(result, task, net_config, models_dir, grid, "teacher")

    stage_cfg = config.rectify
    if stage_cfg.enabled:
        methods = stage_cfg.methods
        if "reflow" in methods or "reflow+distill" in methods:
            last, last_name = _reflow_stages(result, task, teacher, net_config, models_dir, grid,
                                             target)  # fmt: skip
            if "reflow+distill" in methods:
                _distill_stage(result, task, last, last_name, net_config, models_dir, grid,
                               target)  # fmt: skip
        if "phased" in methods:
            _phased_stage(result, task, teacher, net_config, models_dir, grid, target)
        if "ot" in methods or "ot+reflow" in methods:
            ot_teacher, ot_target = _ot_stage(result, task, net_config, models_dir, grid)
            if "ot+reflow" in methods:
                _reflow_stages(result, task, ot_teacher, net_config, models_dir, grid,
                               ot_target, prefix="ot_rectified", base="ot")  # fmt: skip
    if config.evaluation.figures:  # in this worker, alongside the other cells
        drawn = draw_cell_samples(result, task.out / "figures", task.reference_data,
                                  config.evaluation.figure_formats)  # fmt: skip
        result.figures = [path.name for path in drawn]
    result.seconds = time.perf_counter() - start
    _note(task, "done")
    return result


def _pairs(
    task: CellTask, model: nn.Module, name: str, cell: str, folder: str, seed: int, grid: Any
) -> tuple[PairDataset, str]:
    """Couplings of ``model`` (a pair store under ``pairs/<cell>/<folder>``), with the
    rectification stage's solver, steps and number of pairs, and the store's relative path."""
    rc = task.config.rectify.config
    pairs_dir = task.out / "pairs" / cell / folder
    _note(task, f"{folder}: {rc.num_pairs} pairs of {name} ({rc.solver}@{rc.steps})")
    shutil.rmtree(pairs_dir, ignore_errors=True)
    dataset = generate_pairs(
        model, form=task.form, prediction=task.prediction, num_pairs=rc.num_pairs,
        out=pairs_dir, solver=rc.solver, steps=rc.steps, shard_size=rc.shard_size, seed=seed,
        batch_size=rc.pair_batch_size, shape=tuple(task.x_train.shape[1:]),
        solver_options={"t_grid": _json_grid(grid(task.form, rc.steps))},
        model_description=f"{cell} {name} {_weights_digest(model)}", progress=False,
    )  # fmt: skip
    return dataset, str(pairs_dir.relative_to(task.out))


def _reflow_stages(
    result: CellResult, task: CellTask, teacher: nn.Module, net_config: dict[str, Any],
    models_dir: Path, grid: Any, target: Tensor | None, prefix: str = "rectified",
    base: str = "teacher",
) -> tuple[nn.Module, str]:  # fmt: skip
    """``rounds`` reflow rounds (stages ``rectified``, ``rectified_2``, ...; with another
    ``prefix``, from the model of stage ``base``), each retrained on the previous model's
    pairs (Liu, Gong & Liu 2023, Algorithm 1; Rectified Diffusion in the cell's own form).
    Budgets are cumulative over rounds (and over ``base``)."""
    config, form, prediction = task.config, task.form, task.prediction
    rc = config.rectify.config
    current, current_name = teacher, base
    folder = "round" if prefix == "rectified" else f"{prefix}_round"
    for k in range(1, rc.rounds + 1):
        stage = prefix if k == 1 else f"{prefix}_{k}"
        pairs, where = _pairs(task, current, current_name, result.name, f"{folder}_{k}",
                       config.seed + k - 1, grid)  # fmt: skip
        if rc.init == "scratch":
            torch.manual_seed(config.seed)
            student = build_model(net_config, form)
        else:
            student = copy.deepcopy(teacher)
        _note(task, f"{stage}: training {rc.train.steps} steps")
        train_config = cell_train_config(config, form, prediction, "rectify", net_config)
        fitted = rectify(
            student.train(), pairs, form=form, prediction=prediction, config=train_config,
            distill=rc.distill, progress=False,
        )  # fmt: skip
        student = fitted.model.eval()
        result.losses[stage] = fitted.losses[-1]
        _record_ess(result, stage, fitted.ess)
        save_model_dir(
            models_dir / stage, student, form=form, prediction=prediction,
            net_config=net_config,
            info=_model_info(task, stage, fitted.losses, train_config,
                             {"pairs": where, "distill": rc.distill}),
        )  # fmt: skip
        _measure(result, stage, student, task, grid, load_pairs(pairs), target)
        result.budgets[stage] = result.budgets.get(base, 0) + k * rc.num_pairs * rc.steps
        result.student_steps[stage] = result.student_steps.get(base, 0) + k * rc.train.steps
        current, current_name = student, stage
    return current, current_name


def _teacher_stage(
    result: CellResult, task: CellTask, net_config: dict[str, Any], models_dir: Path,
    grid: Any, stage: str, coupling: str | None = None,
) -> tuple[nn.Module, Tensor | None]:  # fmt: skip
    """A teacher trained from the cell's seeded initial weights with the shared
    hyperparameters (``coupling`` overriding the training's), saved and measured as
    ``stage``; returns it and its adaptive solve of the evaluation noise (its students'
    target). Its diagnostics' training coupling is noise and data drawn independently."""
    config, form, prediction = task.config, task.form, task.prediction
    torch.manual_seed(config.seed)
    model = build_model(net_config, form)
    train_config = cell_train_config(config, form, prediction, net_config=net_config)
    if coupling is not None:
        train_config = dataclasses.replace(train_config, coupling=coupling)
    _note(task, f"{stage}: training {train_config.steps} steps")
    trained = train(model, task.x_train, form=form, prediction=prediction, config=train_config,
                    resume=False, progress=False)  # fmt: skip
    model = trained.model.eval()
    result.losses[stage] = trained.losses[-1]
    _record_ess(result, stage, trained.ess)
    save_model_dir(models_dir / stage, model, form=form, prediction=prediction,
                   net_config=net_config, info=_model_info(task, stage, trained.losses, train_config, {}))  # fmt: skip
    shape, n = tuple(task.x_train.shape[1:]), config.evaluation.n_diagnostic
    independent = (standard_noise(shape, n, config.seed, "diagnostics"), task.x_train)
    reference = _measure(result, stage, model, task, grid, independent)
    return model, reference


def _ot_stage(
    result: CellResult, task: CellTask, net_config: dict[str, Any], models_dir: Path,
    grid: Any,
) -> tuple[nn.Module, Tensor | None]:  # fmt: skip
    """``ot`` (stage ``ot``): a second teacher from the same initial weights, data and
    hyperparameters, trained with minibatch optimal-transport couplings
    (``TrainConfig.coupling = "ot"``: each batch's noise re-paired with its data by the exact
    assignment; Tong et al. 2023, Pooladian et al. 2023), in the cell's own form and
    prediction. It spends no couplings; its student steps are the teacher's."""
    model, reference = _teacher_stage(result, task, net_config, models_dir, grid, "ot", "ot")
    result.budgets["ot"] = 0
    result.student_steps["ot"] = task.config.train.steps
    return model, reference


def _distill_stage(
    result: CellResult, task: CellTask, reflowed: nn.Module, reflowed_name: str,
    net_config: dict[str, Any], models_dir: Path, grid: Any, target: Tensor | None,
) -> None:  # fmt: skip
    """``reflow+distill`` (stage ``distilled``): the last reflow student, fine-tuned only at
    ``t = t_max`` on its own pairs so that one step maps noise to its sample (Liu, Gong & Liu
    2023, sec. 2.3; InstaFlow's 2-rectified flow + distillation). It costs one more round:
    as many couplings (of the reflowed model) and student steps again."""
    config, form, prediction = task.config, task.form, task.prediction
    rc = config.rectify.config
    pairs, where = _pairs(task, reflowed, reflowed_name, result.name, "distill",
                   config.seed + rc.rounds, grid)  # fmt: skip
    _note(task, f"distilled: training {rc.train.steps} steps")
    train_config = cell_train_config(config, form, prediction, "rectify", net_config)
    fitted = rectify(
        copy.deepcopy(reflowed).train(), pairs, form=form, prediction=prediction,
        config=train_config, distill=True, progress=False,
    )  # fmt: skip
    student = fitted.model.eval()
    result.losses["distilled"] = fitted.losses[-1]
    _record_ess(result, "distilled", fitted.ess)
    save_model_dir(
        models_dir / "distilled", student, form=form, prediction=prediction,
        net_config=net_config,
        info=_model_info(task, "distilled", fitted.losses, train_config,
                         {"pairs": where, "from": reflowed_name, "distill": True}),
    )  # fmt: skip
    _measure(result, "distilled", student, task, grid, load_pairs(pairs), target)
    result.budgets["distilled"] = result.budgets[reflowed_name] + rc.num_pairs * rc.steps
    result.student_steps["distilled"] = result.student_steps[reflowed_name] + rc.train.steps


def _phased_stage(
    result: CellResult, task: CellTask, teacher: nn.Module, net_config: dict[str, Any],
    models_dir: Path, grid: Any, target: Tensor | None,
) -> None:  # fmt: skip
    """The phased student (``rectify.rectify_phased``, stage ``"phased"``) at one reflow
    round's budget: its K windows are the K-step evaluation grid (so the K-step solve steps on
    the window edges), each window solved with ``steps / K`` teacher steps, ``K num_pairs``
    windows from the training data, trained for as many steps as the rectified student, with
    t uniform inside each window (in t, or in logsnr: ``[rectify] phased_window_time``) and no
    weighting, on ``phased_space`` and ``phased_loss`` (by default the prediction's own target
    on the window's line, in pseudo-Huber distance).
    Its diagnostics add the mean per-window first-order deviation of the student and of the
    teacher (``diagnostics.window_first_order_deviation`` on 8 DDIM steps per window)."""
    config, form, prediction = task.config, task.form, task.prediction
    rc, phases = config.rectify.config, config.rectify.phases
    edges = grid(form, phases)
    if isinstance(edges, str):
        edges = samplers.time_grid(form, phases, edges)
    per_window = max(1, rc.steps // phases)
    num = rc.num_pairs * rc.steps // per_window
    # the rectification block with t uniform in each window and no weighting (what
    # cell_train_config would give before its equalized sampler and weighting are replaced)
    train_config = dataclasses.replace(
        rc.train, time_sampler="uniform", weighting="none", time_sampler_params={},
        weighting_params={}, loss=config.rectify.phased_loss,
    )  # fmt: skip
    _note(
        task,
        f"phased: {num} window solves ({rc.solver}@{per_window}), then training "
        f"{train_config.steps} steps",
    )
    fitted = rectify_phased(
        teacher, task.x_train, form=form, prediction=prediction, edges=edges,
        student=copy.deepcopy(teacher), num=num, solver=rc.solver, steps=per_window,
        config=train_config, seed=config.seed, space=config.rectify.phased_space,
        window_time=config.rectify.phased_window_time, progress=False,
    )  # fmt: skip
    student = fitted.model.eval()
    result.losses["phased"] = fitted.train.losses[-1]
    result.budgets["phased"] = num * per_window
    result.student_steps["phased"] = train_config.steps
    save_model_dir(
        models_dir / "phased", student, form=form, prediction=prediction, net_config=net_config,
        info=_model_info(task, "phased", fitted.train.losses, train_config,
                         {"phases": phases, "edges": [float(t) for t in edges]}),
    )  # fmt: skip
    couplings = fitted.couplings
    _measure(result, "phased", student, task, grid, (couplings.eps, couplings.x0), target)
    noise = standard_noise(tuple(task.x_train.shape[1:]), config.evaluation.n_diagnostic,
                           config.seed, "diagnostics")  # fmt: skip
    fine = window_grid(form, edges, 8)
    for name, model in (("window_first_order_deviation", student),
                        ("teacher_window_first_order_deviation", teacher)):  # fmt: skip
        traj = samplers.sample(model, noise, form=form, prediction=prediction, solver="ddim",
                               t_grid=fine, return_trajectory=True)  # fmt: skip
        deviation = diagnostics.window_first_order_deviation(traj, edges)
        result.diagnostics["phased"][name] = float(deviation.mean())
        result.diagnostics["phased"][f"{name}_per_window"] = deviation.tolist()


def _json_grid(grid: str | Tensor) -> str | list[float]:
    return grid if isinstance(grid, str) else [float(t) for t in grid]
