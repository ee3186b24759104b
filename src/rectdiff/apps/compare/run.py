"""Compare diffusion forms under equal hyperparameters: ``rectdiff compare``.

:func:`run_compare` trains one teacher per (form, prediction) cell of a
:class:`~rectdiff.apps.compare.config.CompareConfig` with the one shared block of
hyperparameters, evaluates it, rectifies it in its own form and prediction (Rectified
Diffusion, Wang et al. 2024: retraining on the teacher's deterministic (noise, sample)
couplings, Liu, Gong & Liu 2023, Algorithm 1), evaluates the rectified model alike, and
writes into the output folder::

    report.md        every shared hyperparameter, then the tables
    results.json     one record per form, prediction, stage, solver and steps, with every
                     metric and diagnostic as a number; a summary per cell; the curves
    figures/         quality against NFE, curvature (teacher dashed, rectified solid),
                     x0-prediction drift, implied weighting, samples, x-vs-y trajectories
    models/<form>_<prediction>/teacher, .../rectified   model folders (rectdiff.io.model_dir)
    pairs/<form>_<prediction>/round_<k>                 the couplings each round trained on
    cells/settings.json, cells/<form>_<prediction>.pt   each finished cell's results (resume)

An interrupted compare (Ctrl-C, a killed process, a full disk) resumes when the same
command is rerun: the cells it finished are read back from ``cells/`` and the others run
again (their numbers are the same either way); a rerun with other settings is refused,
naming them.

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

import io
import json
import multiprocessing
import os
import shutil
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ... import __version__, metrics
from ...data import TOYS, load_data
from ...errors import ConfigError
from ...io.files import write_bytes_atomic, write_json_atomic
from ...io.model_dir import build_model, is_model_dir
from ...io.resume import setting_differences
from .cells import CellResult, CellTask, run_cell
from .config import CompareConfig, quick_config
from .figures import draw_figures
from .hyperparameters import implied_weightings, network_config
from .report import write_report
from .summary import summarize

__all__ = ["run_compare"]


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
        if data.n_train > len(rest):
            raise ValueError(
                f"[data] n_train = {data.n_train}, but {data.name!r} has only {len(rest)} "
                f"samples to train on ({len(everything)} less n_holdout = {data.n_holdout}); "
                f"set n_train <= {len(rest)}, or leave it out to train on all of them."
            )
        rest = rest[: data.n_train]
    return rest, reference


#: the files of the figures folder (png, svg and each figure's numbers)
_FIGURE_SUFFIXES = (".png", ".svg", ".csv")
#: the finished cells' results, for resuming (``cells/settings.json`` names their settings)
CELLS, SETTINGS = "cells", "settings.json"


def _settings(config: CompareConfig) -> dict[str, Any]:
    """What a cell's numbers depend on: every setting but the config file's path and the
    worker count (the numbers do not depend on it), and the rectdiff version."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("source", "workers")}
    return json.loads(json.dumps(settings | {"version": __version__}, default=repr))


def _cell_file(out: Path, task: CellTask) -> Path:
    return out / CELLS / f"{task.name}.pt"


def _save_cell(out: Path, task: CellTask, result: CellResult) -> None:
    buffer = io.BytesIO()
    torch.save(result, buffer)
    write_bytes_atomic(_cell_file(out, task), buffer.getvalue())


def _load_cell(out: Path, task: CellTask) -> CellResult | None:
    """The cell's saved result (written by this compare: a full unpickle), or None."""
    path = _cell_file(out, task)
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=False)
    except Exception:  # a damaged file: run the cell again
        return None


def _is_temporary(path: Path) -> bool:
    """A half-written file or folder of an interrupted run (``.{name}.{pid}.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _earlier_output(out: Path) -> tuple[list[Path], list[Path]]:
    """``(ours, foreign)``: what of ``out`` an earlier compare wrote (report, results, figure
    files, model folders, pair stores, half-written temporaries) and everything else."""
    ours: list[Path] = []
    foreign: list[Path] = []
    for entry in sorted(out.iterdir()):
        if entry.name in ("report.md", "results.json") and entry.is_file() or _is_temporary(entry):
            ours.append(entry)
        elif entry.name == CELLS and entry.is_dir():
            for saved in sorted(entry.iterdir()):
                ok = saved.is_file() and (saved.suffix == ".pt" or saved.name == SETTINGS)
                (ours if ok or _is_temporary(saved) else foreign).append(saved)
        elif entry.name == "figures" and entry.is_dir():
            for figure in sorted(entry.iterdir()):
                ok = figure.is_file() and figure.suffix in _FIGURE_SUFFIXES
                (ours if ok or _is_temporary(figure) else foreign).append(figure)
        elif entry.name in ("models", "pairs") and entry.is_dir():
            for cell in sorted(entry.iterdir()):
                if not cell.is_dir():
                    foreign.append(cell)
                    continue
                for stage in sorted(cell.iterdir()):
                    written = (
                        is_model_dir(stage)
                        if entry.name == "models"
                        else (stage / "manifest.json").is_file()
                    )
                    (ours if written or _is_temporary(stage) else foreign).append(stage)
        else:
            foreign.append(entry)
    return ours, foreign


def _resumable(out: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds an interrupted compare of these ``settings`` (True: resume it).

    Raises:
        ConfigError: it is an interrupted compare of other settings, naming them.
    """
    if (out / "report.md").exists():
        return False  # a finished compare: not resumed
    recorded = out / CELLS / SETTINGS
    if not recorded.is_file():
        return False
    try:
        before = json.loads(recorded.read_text())
    except (OSError, ValueError):
        return False
    differences = setting_differences(before, settings, "there")
    if not differences:
        return True
    shown = "; ".join(differences[:4]) + (
        f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
    )
    raise ConfigError(
        f"--out {str(out)!r} holds an interrupted compare with other settings ({shown}); "
        "rerun it with its own settings to resume, choose a new --out, or add --overwrite to "
        "start over there."
    )


def _prepare_out(out: Path, overwrite: bool, settings: dict[str, Any] | None = None) -> None:
    """Refuse an output folder holding anything but an earlier compare's output, and an
    earlier compare's output unless it is an interrupted run of the same ``settings``
    (resumed: its half-written temporaries are removed) or ``overwrite`` (which removes
    only what compare wrote)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder (new or empty).")
    ours, foreign = _earlier_output(out)
    if foreign:
        names = ", ".join(str(p.relative_to(out)) for p in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ConfigError(
            f"--out {str(out)!r} holds files that rectdiff compare did not write ({names}"
            f"{more}); refusing to write into it. Choose a new or empty --out."
        )
    if not ours:
        return
    if not overwrite and settings is not None and _resumable(out, settings):
        for path in [p for p in out.rglob("*") if _is_temporary(p)]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        return
    if not overwrite:
        raise ConfigError(
            f"--out {str(out)!r} holds an earlier compare's output ("
            f"{', '.join(sorted({p.relative_to(out).parts[0] for p in ours}))}); its models "
            "would sit beside this run's report. Choose a new --out, or add --overwrite to "
            "remove that output first (only the files rectdiff compare wrote)."
        )
    for path in ours:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for folder in sorted(out.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _check_network(config: CompareConfig, x_train: Tensor) -> None:
    """Build the first cell's network once, so that a bad ``[network]`` option is refused
    before anything is written (not in a worker, after the output folder is set up)."""
    _, form, prediction = config.cells()[0]
    build_model(network_config(config, x_train, prediction), form)


def _warm_caches(config: CompareConfig) -> None:
    """Train (or load) the digits classifier once before worker processes need it."""
    names = {m for m in config.evaluation.metrics if metrics.METRICS[m].data == "digits"}
    for name in sorted(names):
        options = config.evaluation.metric_options.get(name, {})
        metrics.digits_classifier(options.get("cache_dir"), options.get("classifier_seed", 0))


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (a terminal sends SIGINT to the
    whole process group; the parent stops the workers itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the running cells now (their partial output is
    not used)."""
    pool.shutdown(wait=False, cancel_futures=True)
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=5)
    pool.shutdown(wait=True)  # the pool notices its workers are gone and frees its queues


def _kept(out: Path, results: list[CellResult | None]) -> str:
    """What a compare stopped by Ctrl-C keeps: the finished cells' model folders."""
    done = [r.name for r in results if r is not None]
    if not done:
        return f"no cell had finished; nothing to keep in {out} (no report was written)."
    return (
        f"the {len(done)} finished cell(s) ({', '.join(done)}) are kept in {out}; rerun the "
        "same command to resume (--overwrite starts over)."
    )


def _new_pool(workers: int) -> ProcessPoolExecutor | None:
    """The worker processes (``spawn``; started on first use) that run the cells and then
    draw the figures; None for ``workers <= 1``."""
    if workers <= 1:
        return None
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_ignore_sigint)


def _run_tasks(
    tasks: list[CellTask], pool: ProcessPoolExecutor | None, progress: bool
) -> list[CellResult]:
    """Run the cells, in ``pool``'s processes when there is one and more than one cell to
    run. Ctrl-C raises ``KeyboardInterrupt`` whose message says what was kept (the caller
    stops the workers)."""
    bar = tqdm(total=len(tasks), desc="compare", unit="cell", disable=not progress)
    results: list[CellResult | None] = [_load_cell(task.out, task) for task in tasks]
    bar.update(sum(r is not None for r in results))  # resumed: finished in an earlier run
    todo = [task for task in tasks if results[task.index] is None]
    try:
        if pool is None or len(todo) <= 1:
            for task in todo:
                bar.set_postfix_str(f"{task.label}/{task.prediction}")
                results[task.index] = run_cell(task)
                _save_cell(task.out, task, results[task.index])
                bar.update(1)
        else:
            futures = {pool.submit(run_cell, task): task for task in todo}
            for future in as_completed(futures):
                task = futures[future]
                results[task.index] = future.result()
                _save_cell(task.out, task, results[task.index])
                bar.set_postfix_str(f"done {task.label}/{task.prediction}")
                bar.update(1)
    except KeyboardInterrupt as interrupt:
        raise KeyboardInterrupt(_kept(tasks[0].out, results)) from interrupt
    finally:
        bar.close()
    return [r for r in results if r is not None]


def _data_floor(config: CompareConfig, x_train: Tensor, reference: Tensor) -> dict[str, Any] | None:
    """The evaluation's metrics between up to four disjoint sets of ``n_eval`` training points
    and the held-out set (:func:`rectdiff.metrics.data_floor`): what a model that sampled the
    data itself would score, and how far that moves from one draw to the next. None without
    metrics or with fewer than ``n_eval`` training points."""
    ev, n = config.evaluation, config.data.n_eval
    if not ev.metrics or len(x_train) < n:
        return None
    return metrics.data_floor(
        ev.metrics, x_train, reference, n, seed=config.seed, **ev.metric_options
    )


def run_compare(
    config: CompareConfig,
    out: str | os.PathLike[str],
    quick: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run a comparison and write report.md, results.json, figures and model folders.

    Args:
        config: the comparison (``config.load_config``).
        out: the output folder: new, empty, an interrupted compare of the same settings
            (resumed: its finished cells are read back), or (with ``overwrite``) an earlier
            compare's.
        quick: shrink it to a smoke test (``config.quick_config``).
        progress: a tqdm bar over the grid, and a line on stderr as each cell starts a
            stage (training, pairs, evaluation) with its seconds so far.
        overwrite: remove an earlier compare's output in ``out`` first (only the files
            compare wrote: report, results, figures, model folders, pair stores).

    Raises:
        ConfigError: ``out`` holds files compare did not write, a finished compare's output
            or an interrupted one of other settings, and not ``overwrite`` (checked before
            anything is written).

    Returns:
        The contents of results.json.
    """
    if quick:
        config = quick_config(config)
    out = Path(out)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        x_train, reference = _load_datasets(config)  # validates [data] before anything is written
        _check_network(config, x_train)
        settings = _settings(config)
        _prepare_out(out, overwrite, settings)
        write_json_atomic(out / CELLS / SETTINGS, settings)
        _warm_caches(config)
    finally:
        torch.set_num_threads(threads)
    tasks = [
        CellTask(i, label, form, prediction, config, x_train, reference, out, progress)
        for i, (label, form, prediction) in enumerate(config.cells())
    ]
    pool = _new_pool(config.workers if len(tasks) > 1 else 1)  # one cell: no processes to start
    try:
        # the data floor runs in the first free worker, which imports POT for its cells anyway
        floor = None if pool is None else pool.submit(_data_floor, config, x_train, reference)
        cells = _run_tasks(tasks, pool, progress)
        torch.set_num_threads(threads)  # a cell run in this process set its own
        results = summarize(config, cells, __version__)
        results["data_floor"] = (
            _data_floor(config, x_train, reference) if floor is None else floor.result()
        )
        results["curves"]["implied_weighting"] = implied_weightings(config)
        if config.evaluation.figures:
            drawn = draw_figures(results, out / "figures", cells, reference,
                                 map_fn=map if pool is None else pool.map)  # fmt: skip
            results["figures"] = [str(p.relative_to(out)) for p in drawn]
    except BaseException:
        torch.set_num_threads(threads)
        if pool is not None:
            _stop_workers(pool)
        del pool  # not kept alive by the traceback: its queues are freed before exit
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    results["timing"] = {
        "seconds": round(time.perf_counter() - start, 1),
        "cells": {cell.name: round(cell.seconds, 1) for cell in cells},
    }
    write_json_atomic(out / "results.json", results, indent=1)
    write_report(results, out / "report.md")
    return results
