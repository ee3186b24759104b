"""The figures of ``rectdiff compare``: from results.json alone (quality against NFE,
curvature in t and y, x0-prediction drift, implied weighting) and from the cells' samples
and trajectories (sample scatter plots or image grids, x-vs-y trajectories).

Each figure is a job ``(plot function, args, kwargs)``; :func:`draw_figures` runs them
through a ``map`` (``rectdiff compare`` passes its worker pool's, so its figures are drawn
in parallel; matplotlib takes about a second per figure on a slow CPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ... import plots
from .report import method_name, method_stages
from .summary import distance_metrics

__all__ = ["draw_result_figures", "draw_figures", "draw_job"]

#: one figure: ``(plot function, args, kwargs)``, run by :func:`draw_job`
Job = tuple[Callable[..., list[Path]], tuple[Any, ...], dict[str, Any]]
Mapper = Callable[[Callable[[Job], list[Path]], Iterable[Job]], Iterator[list[Path]]]


def draw_job(job: Job) -> list[Path]:
    """Draw one figure job (module-level, so that worker processes can run it)."""
    function, args, kwargs = job
    return function(*args, **kwargs)


def _formats(results: dict[str, Any]) -> list[str]:
    """The figure files to write (``[evaluation] figure_formats``; PNG and SVG in results
    written before that option)."""
    return results["config"]["evaluation"].get("figure_formats", list(plots.FORMATS))


def _run_jobs(jobs: list[Job], map_fn: Mapper) -> list[Path]:
    return [path for paths in map_fn(draw_job, jobs) for path in paths]


def _rectified_map(labels: Sequence[str]) -> dict[str, str]:
    return {
        label: label.rsplit(" ", 1)[0] + " teacher"
        for label in labels
        if not label.endswith(" teacher") and label.rsplit(" ", 1)[0] + " teacher" in labels
    }


def draw_result_figures(
    results: dict[str, Any], out: str | os.PathLike[str], map_fn: Mapper = map
) -> list[Path]:
    """The figures drawn from results alone: quality against NFE, curvature in t and y,
    x0-prediction drift (one figure per prediction type, colour per form, teacher dashed,
    rectified solid) and the implied weighting (drawn through ``map_fn``)."""
    return _run_jobs(_result_jobs(results, Path(out)), map_fn)


def _result_jobs(results: dict[str, Any], out: Path) -> list[Job]:
    jobs: list[Job] = []
    formats = _formats(results)
    config, records = results["config"], results["records"]
    ev = config["evaluation"]
    metric = next(iter(distance_metrics(config, records)), None)
    predictions = list(dict.fromkeys(c["prediction"] for c in results["cells"]))
    for prediction in predictions:
        cells = [c for c in results["cells"] if c["prediction"] == prediction]
        if metric is not None and ev["solvers"]:
            solver = ev["solvers"][0]
            curves = {}
            for cell in cells:
                for stage in cell["diagnostics"]:
                    points = [r for r in records if r["form"] == cell["form"]
                              and r["prediction"] == prediction and r["stage"] == stage
                              and r["solver"] == solver]  # fmt: skip
                    curves[f"{cell['form']} {stage}"] = (
                        [r["nfe"] for r in points],
                        [r[metric] for r in points],
                    )
            jobs.append((plots.plot_quality_vs_nfe, (
                curves, out / f"quality_vs_nfe_{prediction}", f"{metric} to held-out data "
                f"({solver}, {prediction}-prediction)", _rectified_map(list(curves))),
                {"logy": True, "floor": _floor(results, metric), "formats": formats}))  # fmt: skip
        for name in ("curvature_y", "curvature_t", "x0_drift"):
            source = results["curves"].get(name, {})
            curves = {
                label.replace(f" {prediction} ", " "): tuple(value)
                for label, value in source.items()
                if label.split(" ")[1] == prediction
            }
            if not curves:
                continue
            rect = _rectified_map(list(curves))
            stem = out / f"{name}_{prediction}"
            if name == "x0_drift":
                jobs.append((plots.plot_x0_drift, (curves, stem, rect),
                             {"logy": True, "formats": formats}))  # fmt: skip
            else:
                jobs.append((plots.plot_curvature, (curves, stem, rect), {
                    "coords": name[-1], "logy": True, "formats": formats,
                    "ylabel": r"$E\,\|(Z_1 - Z_0) - dZ/du\|^2 \,/\, E\,\|Z_1 - Z_0\|^2$"
                    + f"   ({prediction}-prediction)",
                }))  # fmt: skip
    if metric is not None and ev["solvers"]:
        jobs += _method_jobs(results, out, metric, ev["solvers"][0], predictions)
    implied = results["curves"].get("implied_weighting")
    if implied:
        weights = {label: tuple(value) for label, value in implied.items()}
        jobs.append((plots.plot_implied_weighting, (weights, out / "implied_weighting"),
                     {"formats": formats}))  # fmt: skip
    return jobs


def _method_jobs(
    results: dict[str, Any], out: Path, metric: str, solver: str, predictions: Sequence[str]
) -> list[Job]:
    """One quality-against-NFE figure per few-step method and prediction: each form's
    student solid, its teacher dashed in the same colour."""
    records, jobs, formats = results["records"], [], _formats(results)
    for stage in method_stages(results):
        name = method_name(stage)
        for prediction in predictions:
            curves = {}
            for cell in results["cells"]:
                if cell["prediction"] != prediction:
                    continue
                for which, label in ((stage, name), ("teacher", "teacher")):
                    points = [r for r in records if r["form"] == cell["form"]
                              and r["prediction"] == prediction and r["stage"] == which
                              and r["solver"] == solver]  # fmt: skip
                    if points:
                        curves[f"{cell['form']} {label}"] = (
                            [r["nfe"] for r in points],
                            [r[metric] for r in points],
                        )
            slug = name.replace("+", "_").replace(" ", "_")
            jobs.append((plots.plot_quality_vs_nfe, (
                curves, out / f"quality_vs_nfe_{slug}_{prediction}",
                f"{metric} to held-out data ({name}, {solver}, {prediction}-prediction)",
                _rectified_map(list(curves))),
                {"logy": True, "floor": _floor(results, metric), "formats": formats}))  # fmt: skip
    return jobs


def _floor(results: dict[str, Any], metric: str) -> tuple[float, float | None] | None:
    """``(mean, std)`` of the metric's data floor in results.json, if it has one."""
    entry = (results.get("data_floor") or {}).get("metrics", {}).get(metric)
    return None if entry is None else (entry["mean"], entry["std"])


def draw_cell_samples(
    cell: Any,
    out: str | os.PathLike[str],
    reference: Tensor | None,
    formats: Sequence[str] = plots.FORMATS,
) -> list[Path]:
    """One cell's sample scatter plots or image grids (every stage's one-step and reference
    solves side by side), ``samples_<cell>.*``; drawn by the cell's own worker process."""
    job = _samples_job(cell, Path(out), reference, formats)
    return [] if job is None else draw_job(job)


def _samples_job(
    cell: Any, out: Path, reference: Tensor | None, formats: Sequence[str]
) -> Job | None:
    panels = {f"{stage} {solve}": sample for stage, kept in cell.samples.items()
              for solve, sample in kept.items()}  # fmt: skip
    if not panels:
        return None
    ref = None if reference is None else reference[: len(next(iter(panels.values())))]
    kwargs = {"reference": ref, "formats": formats}
    return plots.plot_samples, (panels, out / f"samples_{cell.name}"), kwargs


def draw_figures(
    results: dict[str, Any],
    out: str | os.PathLike[str],
    cells: Sequence[Any] = (),
    reference: Tensor | None = None,
    map_fn: Mapper = map,
) -> list[Path]:
    """All figures: :func:`draw_result_figures`, plus, from the cells, sample scatter plots
    or image grids per cell and the x-vs-y trajectories of a few 2-D cells; every figure not
    drawn yet is drawn through ``map_fn`` (e.g. a process pool's ``map``)."""
    out = Path(out)
    jobs, drawn = _result_jobs(results, out), []
    ev = results["config"]["evaluation"]
    for cell in cells:  # drawn by the cell's worker already, unless resumed from before that
        paths = [out / name for name in getattr(cell, "figures", [])]
        if paths and all(path.is_file() for path in paths):
            drawn += paths
        elif (job := _samples_job(cell, out, reference, _formats(results))) is not None:
            jobs.append(job)
    two_d = [c for c in cells if c.trajectories and next(iter(c.trajectories.values())).x.shape[-1] == 2
             and next(iter(c.trajectories.values())).x.ndim == 3]  # fmt: skip
    if two_d:
        chosen = ev.get("trajectory_forms") or [
            f for f in ("vp", "fm") if any(c.label == f for c in two_d)
        ]
        chosen = chosen or list(dict.fromkeys(c.label for c in two_d))[:2]
        predictions = [c.prediction for c in two_d]
        prediction = ev.get("trajectory_prediction") or (
            "v" if "v" in predictions else predictions[0]
        )
        trajs = {}
        for cell in two_d:
            if cell.label in chosen and cell.prediction == prediction:
                for stage, traj in cell.trajectories.items():
                    trajs[f"{cell.label} {cell.prediction} {stage}"] = traj
        if trajs:
            jobs.append((plots.plot_trajectories_xy, (trajs, out / "trajectories_xy"),
                         {"max_paths": 32, "formats": _formats(results)}))  # fmt: skip
    return _run_jobs(jobs, map_fn) + drawn
