"""Workflows on saved models: the ``rectdiff pairs`` and ``rectdiff rectify`` commands.

The folder format itself (weights, ``model.json``, :func:`~rectdiff.io.model_dir.build_model`)
is :mod:`rectdiff.io.model_dir`; where a teacher comes from (a rectdiff folder, a diffusers
``UNet2DModel`` folder, or the user's own network through ``--model-factory``) is
:mod:`rectdiff.apps.model_sources`. This module runs the core on such teachers: generate a
teacher's (noise, sample) pairs, rectify it on them and save the student as the same kind of
folder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..forms import Form
from ..io.resume import check_resume, record_settings
from ..predictions import check_prediction
from ..rectify.coupling import load_pairs
from ..rectify.fingerprint import model_fingerprint
from ..rectify.pairs import generate_pairs
from ..rectify.store import load_manifest
from ..rectify.student import rectify
from ..samplers import check_start
from ..training.config import TrainConfig
from .model_sources import ModelSource, as_source, class_labels_fn, sample_shape

__all__ = ["sample_shape", "class_labels_fn", "generate_pairs_from_dir", "rectify_from_dir"]

#: ``Model`` below: a folder, a :class:`~.model_sources.ModelSource`, or None with ``factory=``
Model = str | os.PathLike[str] | ModelSource | None


def generate_pairs_from_dir(
    model_dir: Model,
    out: str | os.PathLike[str],
    *,
    num_pairs: int,
    solver: str = "dpmpp_2m",
    steps: int = 32,
    t_grid: str = "uniform",
    seed: int = 0,
    shard_size: int = 4096,
    batch_size: int = 2048,
    progress: bool = True,
    **source: Any,
) -> Any:
    """``rectify.pairs.generate_pairs`` with a saved model (works under ``accelerate launch``:
    each process generates its own shards).

    The model is solved in its own form and prediction, on a ``t_grid`` grid from its
    ``t_max``; the manifest names the model and the sha256 of its weights. A
    class-conditional model's pairs carry balanced class labels (:func:`class_labels_fn`).

    Args:
        model_dir: a rectdiff model folder, a diffusers ``UNet2DModel`` folder, a factory
            student folder, a :class:`~.model_sources.ModelSource`, or None with ``factory``.
        source: ``factory``, ``weights``, ``convention``, ``convention_args``, ``shape`` of
            :func:`~.model_sources.open_source` (the user's own network).

    Returns:
        The :class:`~rectdiff.rectify.store.PairDataset`.
    """
    teacher = as_source(model_dir, **source)
    return generate_pairs(
        teacher.model, form=teacher.form, prediction=teacher.prediction, num_pairs=num_pairs,
        out=out, solver=solver, steps=steps, shard_size=shard_size, seed=seed,
        batch_size=batch_size, shape=teacher.shape, solver_options={"t_grid": t_grid},
        cond_fn=teacher.cond_fn, model_description=teacher.description, progress=progress,
    )  # fmt: skip


def _weight_settings(
    teacher: ModelSource, pairs: Any, form: Form, prediction: str, distill: bool,
    config: TrainConfig,
) -> dict[str, Any]:  # fmt: skip
    """What decides the student's weights: the teacher's weights, the pairs' shards, the form,
    prediction and training settings (not where or how often checkpoints are written)."""
    train = config.to_dict()
    for key in ("out_dir", "checkpoint_every", "keep_checkpoints", "log_every", "log_with",
                "sample_every", "sample_steps"):  # fmt: skip
        train.pop(key)
    shards = [entry["sha256"] for entry in load_manifest(pairs)["shards"]]
    return {"teacher_fingerprint": model_fingerprint(teacher.model), "pairs_sha256": shards,
            "form": form.config(), "prediction": prediction, "distill": distill, **train}  # fmt: skip


def rectify_from_dir(
    model_dir: Model,
    pairs: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config: Any = None,
    distill: bool = False,
    form: Form | None = None,
    prediction: str | None = None,
    progress: bool = True,
    verify: bool = True,
    allow_other_teacher: bool = False,
    fresh: bool = False,
    **source: Any,
) -> Path:
    """Rectify a saved model on a pair store and save the student as the same kind of folder.

    The student starts from the teacher's weights. By default it trains in the teacher's
    own form and prediction (Rectified Diffusion; for a diffusers or factory teacher, the
    adapted ones, :mod:`rectdiff.adapters`); with ``form`` / ``prediction`` a rectdiff folder
    trains in those (classic Reflow: ``FlowMatching()``, ``"flow"``) through
    ``reparametrize.Reparametrized``, and the folder records the teacher's form as the
    network's ``source``. A diffusers teacher's student is a ``DDPMPipeline`` folder that
    stock diffusers samples in one step; a factory teacher's is the network's own state dict
    (:mod:`rectdiff.apps.model_sources`). Works under ``accelerate launch`` (the main process
    writes).

    Args:
        model_dir: the teacher (as in :func:`generate_pairs_from_dir`).
        pairs: the pair store (``rectdiff pairs``).
        out: the student's folder.
        config: a :class:`~rectdiff.training.TrainConfig` (its defaults when None).
        distill: train only at t = t_max (one-step distillation).
        form, prediction: the student's form and prediction (default: the teacher's).
        verify: check every shard's sha256 (False: ``--no-verify``; sizes, shapes, dtypes and
            finiteness are checked either way, :mod:`rectdiff.rectify.verify`).
        allow_other_teacher: train on pairs that another model made, or made in another form
            or prediction than the teacher's (refused by default, naming the difference).
        fresh: with ``config.checkpoint_every``, start over instead of resuming the
            checkpoints in ``config.out_dir`` (default ``OUT.train``); a resume is refused when
            the teacher, pairs, form, prediction or training settings differ from the
            recorded ones (:mod:`rectdiff.io.resume`), naming each.
        source: the user's own network (:func:`~.model_sources.open_source`'s options).

    Returns:
        The student's folder.

    Raises:
        PairStoreError: the pair store is missing, damaged, or not this teacher's (naming the
            shard and field); nothing is written then.
    """
    teacher = as_source(model_dir, **source)
    if prediction is not None:
        check_prediction(prediction)
    out = teacher.check_out(out)
    if out.resolve() == Path(pairs).resolve():
        raise ValueError(f"out {str(out)!r} is the pair store; choose another folder.")
    couplings = load_pairs(
        pairs, verify=verify, model=teacher.model, form=teacher.form,
        prediction=teacher.prediction, allow_other_model=allow_other_teacher,
    )  # fmt: skip
    student, form, prediction = teacher.student(form, prediction)
    check_start(form, prediction)  # a student that could not start sampling is refused now
    config = config or TrainConfig()
    if config.checkpoint_every > 0:  # resumable: checked, then recorded, before training
        work_dir = Path(config.out_dir or f"{out}.train")
        config = dataclasses.replace(config, out_dir=str(work_dir))
        settings = _weight_settings(teacher, pairs, form, prediction, distill, config)
        if not fresh:
            check_resume(work_dir, settings, None, "Pass --fresh (fresh=True) to start over.")
        if PartialState().is_main_process:
            record_settings(work_dir, settings, resume=not fresh)
        PartialState().wait_for_everyone()
    result = rectify(
        student.train(), couplings, form=form, prediction=prediction, config=config,
        distill=distill, progress=progress,
    )  # fmt: skip
    if PartialState().is_main_process:
        rectified_from = str(teacher.path.resolve()) if teacher.path else teacher.description
        teacher.save_student(
            out, result.model, form, prediction,
            {"stage": "rectified", "rectified_from": rectified_from, "pairs": str(pairs),
             "final_loss": result.losses[-1] if result.losses else None, "distill": distill,
             "training": config.to_dict(), "steps_trained": result.step},
        )  # fmt: skip
    PartialState().wait_for_everyone()
    return out
