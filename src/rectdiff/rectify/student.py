"""Rectification: retraining on a model's own deterministic (noise, sample) couplings.

Given a teacher that maps standard-normal ``eps`` to ``x0_hat`` through its probability-flow
ODE, rectification trains a student with the ordinary diffusion loss on
``x_t = form.add_noise(x0_hat, eps, t)`` — the *same* eps the teacher started from
(Liu, Gong & Liu 2023, "Flow Straight and Fast", Algorithm 1, "Reflow"). Rectified Diffusion
(Wang et al. 2024, sec. 3) shows that what this buys is a first-order ODE — the x0-prediction
is constant along each trajectory, so one DDIM step is exact — in *any* form and prediction,
so by default the student keeps the teacher's own form and prediction. Training it instead as
flow matching with flow prediction is classic Reflow (start it from the teacher's weights
with :func:`rectdiff.reparametrize.reparametrize`).

* :func:`rectify` — one retraining on a pair store (or in-memory pairs).
* :func:`rectify_rounds` — generate pairs, retrain, repeat: the k-rectified model, each
  round's pairs, checkpoint and numbers kept under ``out/round_k``.
* ``distill=True`` — train on the pairs only at ``t = t_max``, so the student maps noise to
  sample in one step (the "+Distill" rows of Liu et al. 2023, Table 1).
* :class:`~rectdiff.rectify.online.Reflow` — the online variant for the one-object API.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from ..forms import Form
from ..io.configs import from_mapping, read_toml_table
from ..io.files import atomic_path, write_json_atomic
from ..predictions import check_prediction
from ..reparametrize import reparametrize
from ..training.time_samplers import AtTime
from ..training.trainer import TrainConfig, TrainResult, train
from ..training.weightings import X0Weighting
from .coupling import Couplings, start_noise
from .pairs import PairDataset, generate_pairs

__all__ = [
    "RectifyConfig",
    "RoundResult",
    "AtTime",
    "rectify",
    "rectify_rounds",
]

INITS = ("previous", "teacher", "scratch")


@dataclass
class RectifyConfig:
    """How to make pairs and retrain on them; loaded from a TOML table ``[rectify]``.

    Attributes:
        rounds: how many times to generate pairs and retrain (k-rectified).
        num_pairs: couplings generated per round.
        solver, steps, t_grid: the pair solver (any of ``samplers.SOLVERS``).
        shard_size, pair_batch_size: pair store shard length and generation batch.
        seed: pair noise seed (round k uses ``seed + k``).
        distill: train only at ``t = t_max`` (one-step distillation).
        init: where round k's student starts: ``"previous"`` (round k-1's model, the teacher
            for k = 1: Liu et al. 2023's k-rectified flow), ``"teacher"`` (the teacher's
            weights every round) or ``"scratch"`` (``fresh``).
        train: the trainer's hyperparameters for each round.
    """

    rounds: int = 1
    num_pairs: int = 10_000
    solver: str = "dpmpp_2m"
    steps: int = 25
    t_grid: str = "uniform"
    shard_size: int = 4096
    pair_batch_size: int = 2048
    seed: int = 0
    distill: bool = False
    init: str = "previous"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name in ("rounds", "num_pairs", "steps", "shard_size", "pair_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RectifyConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.init not in INITS:
            raise ValueError(f"RectifyConfig.init = {self.init!r}; allowed: {', '.join(INITS)}.")
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RectifyConfig:
        """Build from a dict; an unknown key is an error naming it and the allowed keys."""
        return from_mapping(cls, values, what="rectify setting")

    @classmethod
    def from_toml(cls, path: str | Path, table: str = "rectify") -> RectifyConfig:
        """Read the ``[rectify]`` table (with ``[rectify.train]``) of a TOML file."""
        return cls.from_dict(read_toml_table(path, table))


@dataclass
class RoundResult:
    """One round of :func:`rectify_rounds`: its pairs, its trained model and numbers."""

    round: int
    pairs: Path
    model: nn.Module
    checkpoint: Path | None
    losses: list[float]


def _training_config(config: TrainConfig, form: Form, distill: bool) -> TrainConfig:
    if not distill:
        return config
    return dataclasses.replace(
        config, time_sampler=AtTime(form), time_sampler_params={}, weighting=X0Weighting(),
        weighting_params={},
    )  # fmt: skip


def _cond_fn(keys: list[str]) -> Any:
    """Map the trainer's extra batch items back to the model's keyword arguments."""
    if len(keys) == 1:
        return lambda extra: {keys[0]: extra}
    return lambda extra: dict(zip(keys, extra, strict=True))


def rectify(
    student: nn.Module,
    pairs: Couplings | PairDataset | str | os.PathLike[str] | tuple,
    *,
    form: Form,
    prediction: str,
    config: TrainConfig | None = None,
    distill: bool = False,
    progress: bool = True,
    accelerator: Any = None,
) -> TrainResult:
    """Retrain ``student`` on couplings ``(eps, x0_hat)`` in ``form`` with ``prediction``.

    The loss is the ordinary diffusion loss on the first-order line through the student's own
    sampling start, ``x_t = alpha_t x0_hat + sigma_t eps~`` with
    ``eps~ = eps - (alpha/sigma)(t_max) x0_hat`` (:func:`~.coupling.start_noise`; Liu et al.
    2023, Algorithm 1, where alpha(t_max) = 0 and eps~ = eps). Pass the teacher's form and
    prediction for Rectified Diffusion, or ``FlowMatching`` / ``"flow"`` for classic Reflow.
    Every conditioning tensor the pairs carry (e.g. ``class_labels``) is passed to the student
    with its pair.

    Args:
        student: the network to train (usually a copy of the teacher); trained in place.
        pairs: a pair store folder, a :class:`PairDataset`, :class:`Couplings`, or a tuple
            ``(eps, x0)`` / ``(eps, x0, cond)``.
        form, prediction: the form and prediction the student is trained in.
        config: trainer hyperparameters (any time sampler, weighting and loss).
        distill: train only at ``t = form.t_max`` on the x0-MSE (one-step distillation).

    Returns:
        The trainer's :class:`~rectdiff.training.TrainResult`.
    """
    check_prediction(prediction)
    couplings = Couplings.of(pairs)
    eps = start_noise(couplings.eps, couplings.x0, form)
    keys = sorted(couplings.cond)
    config = _training_config(config or TrainConfig(), form, distill)
    return train(
        student, (eps, couplings.x0, *(couplings.cond[k] for k in keys)), form=form,
        prediction=prediction, config=config, pairs=True,
        cond_fn=_cond_fn(keys) if keys else None, progress=progress, accelerator=accelerator,
    )  # fmt: skip


def _initial_student(
    start: nn.Module, init: str, start_form: Form, start_prediction: str,
    form: Form, prediction: str, fresh: nn.Module | None,
) -> nn.Module:  # fmt: skip
    """A copy of ``start`` (the teacher or the previous round) seen in the student's form."""
    if init == "scratch":
        if fresh is None:
            raise ValueError(
                "init='scratch' needs fresh=, an untrained network of the student's shape."
            )
        return fresh
    student = copy.deepcopy(start)
    if (start_form, start_prediction) != (form, prediction):
        return reparametrize(student, start_form, start_prediction, form, prediction)
    return student


def _save_round(model: nn.Module, path: Path, info: dict[str, Any]) -> Path:
    with atomic_path(path / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    write_json_atomic(path / "round.json", info, default=repr)
    return path / "model.safetensors"


def rectify_rounds(
    teacher: nn.Module,
    *,
    form: Form,
    prediction: str,
    config: RectifyConfig,
    out: str | os.PathLike[str],
    student_form: Form | None = None,
    student_prediction: str | None = None,
    fresh: nn.Module | None = None,
    shape: tuple[int, ...] | None = None,
    cond_fn: Any = None,
    progress: bool = True,
    allow_other_model: bool = False,
) -> list[RoundResult]:
    """k rounds of rectification: pairs from the current model, then retraining on them.

    Round k (1-based) writes ``out/round_k/pairs`` (a resumable pair store made with
    ``config.solver`` / ``config.steps`` from the model of round k-1, the teacher for k = 1)
    and ``out/round_k/model.safetensors`` with ``round.json`` (settings and loss history).
    Running again resumes: complete pair shards are kept, and the trainer resumes from its
    checkpoints when ``config.train.checkpoint_every`` is set.

    Args:
        teacher: the pretrained model (not modified).
        form, prediction: the teacher's form and prediction.
        config: pair generation and training settings.
        out: the run folder.
        student_form, student_prediction: train the students in another form (classic Reflow:
            ``FlowMatching()``, ``"flow"``); default the teacher's own (Rectified Diffusion).
        fresh: an untrained network, for ``config.init = "scratch"``.
        shape: one sample's shape (inferred from the model when it has ``sample_shape``).
        cond_fn: per-pair conditioning for a conditional model, as in
            :func:`~.pairs.generate_pairs` (e.g. class labels); stored with every round's pairs
            and passed to the student in training.
        allow_other_model: resume round stores made by another model (see
            :func:`~.pairs.generate_pairs`); by default a rerun whose teacher or earlier
            round's student changed is refused instead of training on stale pairs.

    Returns:
        One :class:`RoundResult` per round.
    """
    out = Path(out)
    s_form = student_form or form
    s_pred = student_prediction or prediction
    current, current_form, current_pred = teacher, form, prediction
    results = []
    for k in range(1, config.rounds + 1):
        round_dir = out / f"round_{k}"
        pairs = generate_pairs(
            current, form=current_form, prediction=current_pred, num_pairs=config.num_pairs,
            out=round_dir / "pairs", solver=config.solver, steps=config.steps,
            shard_size=config.shard_size, seed=config.seed + k - 1,
            batch_size=config.pair_batch_size, solver_options={"t_grid": config.t_grid}, shape=shape,
            model_description=f"round {k - 1} model ({current_form!r}, {current_pred})",
            cond_fn=cond_fn, progress=progress, allow_other_model=allow_other_model,
        )  # fmt: skip
        if config.init == "previous":
            start, start_form, start_pred = current, current_form, current_pred
        else:
            start, start_form, start_pred = teacher, form, prediction
        student = _initial_student(
            start, config.init, start_form, start_pred, s_form, s_pred, fresh
        )
        train_config = dataclasses.replace(config.train, out_dir=str(round_dir / "train"))
        result = rectify(
            student, pairs, form=s_form, prediction=s_pred, config=train_config,
            distill=config.distill, progress=progress,
        )  # fmt: skip
        info = {
            "round": k, "form": s_form.config(), "prediction": s_pred,
            "pairs": str(round_dir / "pairs"), "losses": result.losses,
            "final_loss": result.losses[-1] if result.losses else None,
        }  # fmt: skip
        checkpoint = _save_round(result.model, round_dir, info)
        results.append(RoundResult(k, round_dir / "pairs", result.model, checkpoint, result.losses))
        current, current_form, current_pred = result.model, s_form, s_pred
    return results
