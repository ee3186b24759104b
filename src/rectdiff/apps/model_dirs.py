"""Workflows on saved model folders: the ``rectdiff pairs`` and ``rectdiff rectify`` commands.

The folder format itself (weights, ``model.json``, :func:`~rectdiff.io.model_dir.build_model`)
is :mod:`rectdiff.io.model_dir`; this module runs the core on such folders: generate a saved
model's (noise, sample) pairs, rectify it on them and save the student as another folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from accelerate import PartialState
from torch import nn

from ..forms import Form, from_config
from ..io.model_dir import WEIGHTS, load_model_dir, read_model_info, save_model_dir
from ..predictions import check_prediction
from ..rectify.pairs import generate_pairs
from ..rectify.student import rectify
from ..reparametrize import Reparametrized

__all__ = ["sample_shape", "class_labels_fn", "generate_pairs_from_dir", "rectify_from_dir"]


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


def generate_pairs_from_dir(
    model_dir: str | os.PathLike[str],
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
) -> Any:
    """``rectify.pairs.generate_pairs`` with a saved model (works under ``accelerate launch``:
    each process generates its own shards).

    The model is solved in its own form and prediction, on a ``t_grid`` grid from its
    ``t_max``; the manifest names the folder and the sha256 of its weights. A
    class-conditional model's pairs carry balanced class labels (:func:`class_labels_fn`).

    Returns:
        The :class:`~rectdiff.rectify.store.PairDataset`.
    """
    model, form, prediction = load_model_dir(model_dir)
    net = read_model_info(model_dir)["net"]
    weights = hashlib.sha256(Path(model_dir, WEIGHTS).read_bytes()).hexdigest()[:16]
    shape = sample_shape(net)
    return generate_pairs(
        model, form=form, prediction=prediction, num_pairs=num_pairs, out=out, solver=solver,
        steps=steps, shard_size=shard_size, seed=seed, batch_size=batch_size, shape=shape,
        solver_options={"t_grid": t_grid}, cond_fn=class_labels_fn(net),
        model_description=f"{Path(model_dir).resolve()} (weights sha256 {weights})",
        progress=progress,
    )  # fmt: skip


def rectify_from_dir(
    model_dir: str | os.PathLike[str],
    pairs: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config: Any = None,
    distill: bool = False,
    form: Form | None = None,
    prediction: str | None = None,
    progress: bool = True,
) -> Path:
    """Rectify a saved model on a pair store and save the student as a model folder.

    The student starts from the teacher's weights. By default it trains in the teacher's
    own form and prediction (Rectified Diffusion); with ``form`` / ``prediction`` it trains
    in those (classic Reflow: ``FlowMatching()``, ``"flow"``) through
    ``reparametrize.Reparametrized``, and the folder records the teacher's form as the
    network's ``source``. Works under ``accelerate launch`` (the main process writes).

    Args:
        model_dir: the teacher's folder.
        pairs: the pair store (``rectdiff pairs``).
        out: the student's folder.
        config: a :class:`~rectdiff.training.TrainConfig` (its defaults when None).
        distill: train only at t = t_max (one-step distillation).
        form, prediction: the student's form and prediction (default: the teacher's).

    Returns:
        The student's folder.
    """
    teacher, teacher_form, teacher_prediction = load_model_dir(model_dir)
    record = read_model_info(model_dir)
    net_config = dict(record["net"])
    form = form or teacher_form
    prediction = check_prediction(prediction or teacher_prediction)
    student: nn.Module = teacher
    if (form, prediction) != (teacher_form, teacher_prediction):
        inner = teacher.model if isinstance(teacher, Reparametrized) else teacher
        source = net_config.get("source") or {
            "form": teacher_form.config(), "prediction": teacher_prediction
        }  # fmt: skip
        src_form = from_config(source["form"], source="teacher source form")
        student = Reparametrized(inner, src_form, source["prediction"], form, prediction)
        net_config["source"] = source
    result = rectify(
        student.train(), pairs, form=form, prediction=prediction, config=config,
        distill=distill, progress=progress,
    )  # fmt: skip
    out = Path(out)
    if PartialState().is_main_process:
        save_model_dir(
            out, result.model, form=form, prediction=prediction, net_config=net_config,
            info={**record.get("info", {}), "stage": "rectified",
                  "rectified_from": str(Path(model_dir).resolve()), "pairs": str(pairs),
                  "final_loss": result.losses[-1] if result.losses else None,
                  "distill": distill},
        )  # fmt: skip
    PartialState().wait_for_everyone()
    return out
