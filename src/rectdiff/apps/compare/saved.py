"""A comparison's saved outputs, read back: ``rectdiff diagnose`` and ``rectdiff plot``.

:func:`diagnose_dirs` and :func:`plot_model_dirs` measure and draw saved model folders from
the diagnostics noise stream of ``rectdiff compare`` (so the same seed gives the numbers a
comparison reported); :func:`plot_results` redraws a comparison's line figures from its
results.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from ... import diagnostics, plots, samplers
from ...data import TOYS, load_data
from ...diagnostics import diagnose_model
from ...io.files import write_json_atomic
from ...io.model_dir import load_model_dir, read_model_info
from ...rectify.coupling import load_pairs
from ..model_sources import ModelSource, as_source, sample_shape
from .evaluate import standard_noise
from .figures import draw_result_figures

__all__ = ["diagnose_dirs", "training_coupling", "plot_results", "plot_model_dirs"]


def diagnose_dirs(
    model_dirs: Sequence[str | os.PathLike[str] | ModelSource],
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
    progress: bool = False,
) -> list[dict[str, Any]]:
    """:func:`diagnose_model` on saved models, each from the same noise.

    With the defaults and ``seed`` equal to a comparison's seed, the numbers are the ones
    ``rectdiff compare`` reported for those models (same noise stream, solver and grid).

    Args:
        model_dirs: rectdiff model folders (``io.model_dir.save_model_dir``), diffusers
            ``UNet2DModel`` folders, factory student folders or opened
            :class:`~rectdiff.apps.model_sources.ModelSource` s (``--model-factory``).
        solver, steps, num, seed: the diagnostic solve and its noise.
        which: the diagnostics to compute.
        reference_solver, rtol, atol: the one-step gap's reference.
        out: also write the records as JSON there.
        progress: a tqdm bar over the models, naming the model and the step it is on.

    Returns:
        One record per folder: ``{"model", "form", "prediction", <diagnostic>: value}``.
    """
    records = []
    bar = tqdm(model_dirs, desc="diagnose", unit="model", disable=not progress)
    with _erased_on_error(bar):
        records = _diagnose_each(bar, solver, steps, num, seed, which, reference_solver, rtol, atol)
    if out is not None:
        write_json_atomic(out, records, indent=1)
    return records


@contextmanager
def _erased_on_error(bar: tqdm) -> Iterator[None]:
    """Close ``bar``; erase it when an error unwinds (the error is then the last line)."""
    try:
        yield
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def _diagnose_each(
    bar: tqdm, solver: str, steps: int, num: int, seed: int, which: Sequence[str],
    reference_solver: str, rtol: float, atol: float,
) -> list[dict[str, Any]]:  # fmt: skip
    records = []
    for path in bar:
        source = as_source(path)
        bar.set_postfix_str(
            f"{source.name}: {num} trajectories, {solver}@{steps} + {reference_solver}"
        )
        model, form, prediction = source.adapted
        noise = standard_noise(source.shape, num, seed, "diagnostics")
        diagnosis = diagnose_model(
            model, form=form, prediction=prediction, noise=noise, which=which, solver=solver,
            steps=steps, reference_solver=reference_solver, rtol=rtol, atol=atol, seed=seed,
        )  # fmt: skip
        if "crossing_rate" in which:
            coupling = _source_coupling(source, num, seed)
            if coupling is not None:
                diagnosis.numbers["train_coupling_crossing_rate"] = float(
                    diagnostics.crossing_rate(*coupling, seed=seed)
                )
        records.append(
            {"model": source.name, "form": form.config(), "prediction": prediction,
             **diagnosis.numbers}
        )  # fmt: skip
    return records


def _source_coupling(source: ModelSource, num: int, seed: int) -> tuple[Tensor, Tensor] | None:
    """:func:`training_coupling` of a rectdiff folder; the recorded pair store of another
    kind's rectified student; None otherwise."""
    if source.kind == "rectdiff":
        return training_coupling(source.path, num, seed)
    pairs = Path(source.info.get("pairs") or "")
    if source.info.get("pairs") and pairs.is_dir():
        eps, x0 = load_pairs(pairs)
        return eps[:num], x0[:num]
    return None


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
    progress: bool = False,
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
        progress: a tqdm bar over the models (then the figures).
    """
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
    bar = tqdm(total=len(labels) + 1, desc="plot", unit="step", disable=not progress)
    with _erased_on_error(bar):
        for label, path in zip(labels, model_dirs, strict=True):
            bar.set_postfix_str(f"{label}: {num} trajectories, {solver}@{steps}")
            model, form, prediction = load_model_dir(path)
            noise = standard_noise(
                sample_shape(read_model_info(path)["net"]), num, seed, "diagnostics"
            )
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
            bar.update(1)
        bar.set_postfix_str("figures")
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
        bar.update(1)
    return written
