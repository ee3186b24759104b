"""What ``rectdiff compare`` keeps: results.json's contents.

:func:`summarize` turns the cells' records into the results dictionary (records, a
one-step summary per cell and metric, the diagnostics' changes, curves);
:mod:`.report` renders it as Markdown and :mod:`.figures` draws from it.

The one-step summary (issue 4's criterion): for each cell and distance metric,
``teacher_1step`` and ``rectified_1step`` are the distances to held-out data after one step
of the first configured solver, ``ratio_1step = rectified_1step / teacher_1step`` (halved
when < 0.5), ``teacher_adaptive`` the distance of the teacher's adaptive reference solve,
and ``ratio_vs_adaptive = rectified_1step / teacher_adaptive`` (1 = one step of the
rectified model is as good as the teacher's converged ODE solve).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...metrics import METRICS

__all__ = ["DIAGNOSTIC_COLUMNS", "LOWERED", "distance_metrics", "find_record", "summarize",
           "one_step_summary", "diagnostic_changes"]  # fmt: skip

#: diagnostics in report order, with whether rectification should lower them
DIAGNOSTIC_COLUMNS = ("straightness_y", "straightness_t", "first_order_deviation", "crossing_rate",
                      "train_coupling_crossing_rate", "one_step_gap", "transport_cost",
                      "relative_transport_cost")  # fmt: skip
#: the diagnostics rectification should lower
LOWERED = ("straightness_y", "first_order_deviation", "crossing_rate",
           "train_coupling_crossing_rate", "one_step_gap")  # fmt: skip


def distance_metrics(config: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """The configured metrics that are distances (lower is better) and were recorded."""
    names = [m for m in config["evaluation"]["metrics"] if METRICS[m].kind == "distance"]
    return [m for m in names if records and m in records[0]]


def find_record(records: list[dict], **match: Any) -> dict | None:
    """The first record whose values equal ``match``'s, or None."""
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def one_step_summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell and distance metric: teacher/rectified one-step distances and their ratios."""
    config, records = results["config"], results["records"]
    ev = config["evaluation"]
    one_step = next((s for s in ev["solvers"] if 1 in ev["steps"]), None)
    reference = ev["reference_solver"] or None
    rows = []
    if one_step is None or not config["rectify"]["enabled"]:
        return rows
    for cell in results["cells"]:
        key = {"form": cell["form"], "prediction": cell["prediction"]}
        t1 = find_record(records, **key, stage="teacher", solver=one_step, steps=1)
        r1 = find_record(records, **key, stage="rectified", solver=one_step, steps=1)
        t_ad = find_record(records, **key, stage="teacher", solver=reference) if reference else None
        r_ad = (
            find_record(records, **key, stage="rectified", solver=reference) if reference else None
        )
        if t1 is None or r1 is None:
            continue
        for metric in distance_metrics(config, records):
            row = {**key, "metric": metric, "solver": one_step,
                   "teacher_1step": t1[metric], "rectified_1step": r1[metric],
                   "ratio_1step": r1[metric] / t1[metric] if t1[metric] else float("inf")}  # fmt: skip
            row["halved"] = bool(row["ratio_1step"] < 0.5)
            if t_ad is not None:
                row |= {"teacher_adaptive": t_ad[metric], "teacher_adaptive_nfe": t_ad["nfe"],
                        "rectified_adaptive": r_ad[metric] if r_ad else None,
                        "ratio_vs_adaptive": r1[metric] / t_ad[metric] if t_ad[metric] else float("inf")}  # fmt: skip
            rows.append(row)
    return rows


def diagnostic_changes(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell: each diagnostic before and after rectification, and whether it dropped."""
    rows = []
    for cell in results["cells"]:
        stages = cell["diagnostics"]
        if "teacher" not in stages or "rectified" not in stages:
            continue
        row = {"form": cell["form"], "prediction": cell["prediction"]}
        for name in DIAGNOSTIC_COLUMNS:
            if name in stages["teacher"]:
                before, after = stages["teacher"][name], stages["rectified"][name]
                row[name] = {"teacher": before, "rectified": after, "lowered": after < before}
        rows.append(row)
    return rows


def summarize(config: Any, cells: Sequence[Any], version: str) -> dict[str, Any]:
    """The results dictionary (results.json) of a comparison's cells."""
    results: dict[str, Any] = {
        "rectdiff_version": version,
        "config": config.to_dict(),
        "cells": [],
        "records": [],
        "curves": {"curvature_t": {}, "curvature_y": {}, "x0_drift": {}},
    }
    for cell in cells:
        results["cells"].append(
            {"form": cell.label, "prediction": cell.prediction, "form_config": cell.form.config(),
             "final_loss": cell.losses, "diagnostics": cell.diagnostics,
             "budgets": getattr(cell, "budgets", {}),
             "student_steps": getattr(cell, "student_steps", {}),
             "ess": getattr(cell, "ess", {})}
        )  # fmt: skip
        results["records"] += cell.records
        for stage, curves in cell.curves.items():
            for name, (t, value) in curves.items():
                results["curves"][name][f"{cell.label} {cell.prediction} {stage}"] = [t, value]
    results["summary"] = one_step_summary(results)
    results["diagnostic_changes"] = diagnostic_changes(results)
    return results
