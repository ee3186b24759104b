"""What ``rectdiff compare`` reports: report.md, rendered from results.json's contents
(:mod:`.summary`): every shared hyperparameter first, then the tables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...io.files import write_text_atomic
from .summary import DIAGNOSTIC_COLUMNS, LOWERED, distance_metrics, find_record

__all__ = ["DIAGNOSE_COLUMNS", "WINDOW_KEYS", "write_report", "summary_markdown",
           "diagnose_markdown", "method_name", "method_stages"]  # fmt: skip

#: the phased stage's per-window first-order deviations (student, teacher) in its diagnostics
WINDOW_KEYS = ("window_first_order_deviation_per_window",
               "teacher_window_first_order_deviation_per_window")  # fmt: skip


# --- report.md ------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    aligns = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in aligns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, item, out)
    else:
        out.append((prefix, value))


def _hyperparameters(config: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, Any]] = []
    for section in ("seed", "equal", "workers", "threads", "data", "network", "train",
                    "reference", "logsnr_range", "rectify", "evaluation"):  # fmt: skip
        if section in config:
            _flatten(section, config[section], rows)
    return _table(["setting", "value"], [(k, f"`{v}`") for k, v in rows])


def _solves(results: dict[str, Any]) -> list[tuple[str, int | None]]:
    ev = results["config"]["evaluation"]
    solves = [(s, k) for s in ev["solvers"] for k in ev["steps"]]
    return solves + ([(ev["reference_solver"], None)] if ev["reference_solver"] else [])


def _quality_tables(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    records = results["records"]
    metric_names = [k for k in results["config"]["evaluation"]["metrics"]]
    keys = [
        k for k in (records[0] if records else {}) if any(k.startswith(m) for m in metric_names)
    ]
    if records and "mse_to_teacher" in records[0]:
        keys.append("mse_to_teacher")
    solves = _solves(results)
    for key in keys:
        header = ["form", "prediction", "stage"]
        for solver, steps in solves:
            if steps is None:
                nfe = [r["nfe"] for r in records if r["solver"] == solver]
                span = f"{min(nfe)}–{max(nfe)}" if nfe else "?"
                header.append(f"{solver} (NFE {span})")
            else:
                header.append(f"{solver} {steps}")
        rows = []
        stages = sorted({r["stage"] for r in records}, key=lambda s: (s != "teacher", s))
        for cell in results["cells"]:
            for stage in stages:
                row: list[Any] = [cell["form"], cell["prediction"], stage]
                for solver, steps in solves:
                    rec = find_record(records, form=cell["form"], prediction=cell["prediction"],
                                stage=stage, solver=solver, steps=steps)  # fmt: skip
                    row.append(None if rec is None else rec[key])
                rows.append(row)
        if key == "mse_to_teacher":
            lines += [
                "### mse_to_teacher: mean squared difference to the teacher's adaptive solve "
                "from the same noise (per coordinate, lower is better; a teacher's to its own)",
                "",
            ]
        else:
            better = "lower" if not key.startswith("classifier") else "classifier scores: higher"
            floor = _floor_note(results, key)
            lines += [f"### {key} to held-out data ({better} is better{floor})", ""]
        lines += _table(header, rows, "lll" + "r" * len(solves)) + [""]
    return lines + _floor_paragraph(results)


def _floor_note(results: dict[str, Any], key: str) -> str:
    """``"; data floor 0.102 ± 0.018"`` for a metric with a data floor, else ``""``."""
    entry = (results.get("data_floor") or {}).get("metrics", {}).get(key)
    if entry is None:
        return ""
    spread = "" if entry["std"] is None else f" ± {_fmt(entry['std'])}"
    return f"; data floor {_fmt(entry['mean'])}{spread}"


def _floor_paragraph(results: dict[str, Any]) -> list[str]:
    floor = results.get("data_floor")
    if not floor:
        return []
    sets = (
        f"{floor['sets']} disjoint sets of {floor['n']} training points and the held-out set "
        "(mean ± standard deviation over the sets)"
        if floor["sets"] > 1
        else f"{floor['n']} training points and the held-out set (one set: no spread)"
    )
    return [
        f"The data floor is each metric between {sets}: "
        "what a model that sampled the data distribution itself would score. A model at the "
        "floor is indistinguishable from the data by that metric at this number of samples, "
        "and two numbers less than about one spread apart are not resolved by it.",
        "",
    ]


#: the few-step methods' stages in the order they run (each may carry a round, ``_k``)
_STAGE_ORDER = ("rectified", "distilled", "phased", "ot", "ot_rectified")


def method_stages(results: dict[str, Any]) -> list[str]:
    """The stages of the few-step methods in ``results``, in the order they ran (reflow
    rounds, distilled, phased, ot, ot+reflow rounds)."""

    def order(stage: str) -> tuple[int, str, int]:
        base, _, k = stage.rpartition("_") if stage[-1].isdigit() else (stage, "", "1")
        rank = _STAGE_ORDER.index(base) if base in _STAGE_ORDER else len(_STAGE_ORDER)
        return rank, base, int(k)

    return sorted({r["stage"] for r in results["records"]} - {"teacher"}, key=order)


def _methods_table(results: dict[str, Any]) -> list[str]:
    """Few-step methods side by side: method x form x prediction x NFE of the first solver,
    in the first distance metric, with the model evaluations each method's couplings cost,
    its student steps (both cumulative over the stages it builds on) and the teacher's
    adaptive solve as the target."""
    records, config = results["records"], results["config"]
    ev = config["evaluation"]
    metric = next(iter(distance_metrics(config, records)), None)
    methods = method_stages(results)
    if metric is None or not ev["solvers"] or not methods:
        return []
    solver, reference = ev["solvers"][0], ev.get("reference_solver")
    header = ["method", "form", "prediction", *(f"NFE {k}" for k in ev["steps"]),
              f"teacher {reference}", "couplings NFE", "student steps"]  # fmt: skip
    rows = []
    for method in methods:
        for cell in results["cells"]:
            key = {"form": cell["form"], "prediction": cell["prediction"]}
            row: list[Any] = [method_name(method), cell["form"], cell["prediction"]]
            for k in ev["steps"]:
                rec = find_record(records, **key, stage=method, solver=solver, steps=k)
                row.append(None if rec is None else rec[metric])
            ref = (
                find_record(records, **key, stage="teacher", solver=reference)
                if reference
                else None
            )
            row += [None if ref is None else ref[metric], cell.get("budgets", {}).get(method),
                    cell.get("student_steps", {}).get(method)]  # fmt: skip
            rows.append(row)
    return [
        f"### Few-step methods: {metric} to held-out data, {solver} (lower is better)", "",
        "Every method starts from the same teacher. *couplings NFE*: model evaluations spent "
        "on its training couplings; *student steps*: its training steps (both cumulative: "
        "a second reflow round or a distillation costs one round more).", "",
        *_table(header, rows, "lll" + "r" * (len(header) - 3)), "",
    ]  # fmt: skip


def method_name(stage: str) -> str:
    """The method a stage belongs to, as the report names it: ``rectified`` -> ``reflow``,
    ``rectified_2`` -> ``reflow-2``, ``distilled`` -> ``reflow+distill``."""
    for prefix, name in (("rectified", "reflow"), ("ot_rectified", "ot+reflow")):
        if stage == prefix:
            return name
        if stage.startswith(prefix + "_"):
            return f"{name}-{stage.rsplit('_', 1)[1]}"
    return {"distilled": "reflow+distill"}.get(stage, stage)


def _summary_table(results: dict[str, Any]) -> list[str]:
    rows = results["summary"]
    if not rows:
        return ["(no rectification stage or no one-step solve configured)", ""]
    header = ["form", "prediction", "metric", "teacher 1-step", "rectified 1-step",
              "rectified / teacher", "halved", "teacher adaptive (NFE)",
              "rectified 1-step / teacher adaptive"]  # fmt: skip
    body = [
        [r["form"], r["prediction"], r["metric"], r["teacher_1step"], r["rectified_1step"],
         r["ratio_1step"], r["halved"],
         None if r.get("teacher_adaptive") is None else f"{r['teacher_adaptive']:.4g} ({r['teacher_adaptive_nfe']})",
         r.get("ratio_vs_adaptive")]
        for r in rows
    ]  # fmt: skip
    halved = sum(r["halved"] for r in rows)
    within = sum(1 for r in rows if r.get("ratio_vs_adaptive", float("inf")) <= 2.0)
    lines = _table(header, body, "lllrrrlrr")
    lines += ["", f"One-step distance halved by rectification in {halved} of {len(rows)} "
              f"(cell, metric) pairs; rectified one-step within 2x of the teacher's adaptive "
              f"solve in {within} of {len(rows)}.", ""]  # fmt: skip
    return lines


def _ess_table(results: dict[str, Any]) -> list[str]:
    """Mean effective sample size of each stage's training batches, ``(sum w)^2 / (n sum
    w^2)`` of the loss weights: how much of a batch an equalized weighting keeps (1 = all)."""
    stages = list(dict.fromkeys(s for cell in results["cells"] for s in cell.get("ess", {})))
    if not stages:
        return []
    rows = [[c["form"], c["prediction"], *(c.get("ess", {}).get(s) for s in stages)]
            for c in results["cells"]]  # fmt: skip
    return [
        "Effective sample size of the training batches' loss weights (mean over steps; 1: "
        "every sample counts fully):", "",
        *_table(["form", "prediction", *stages], rows, "ll" + "r" * len(stages)), "",
    ]  # fmt: skip


def _window_table(results: dict[str, Any]) -> list[str]:
    """Each phased student's first-order deviation per window next to its teacher's."""
    cells = [c for c in results["cells"] if WINDOW_KEYS[0] in c["diagnostics"].get("phased", {})]
    if not cells:
        return []
    rows = []
    for cell in cells:
        student, teacher = (cell["diagnostics"]["phased"][key] for key in WINDOW_KEYS)
        pairs = [f"{a:.3g} / {b:.3g} ({b / a:.2g}x)" for a, b in zip(student, teacher, strict=True)]
        rows.append([cell["form"], cell["prediction"], *pairs, sum(teacher) / sum(student)])
    header = [*(f"window {k + 1}" for k in range(len(student))), "teacher / student (mean)"]
    return [
        "Phased windows, first-order deviation of the student / its teacher (teacher / "
        "student) in each window (`diagnostics.window_first_order_deviation`, 8 DDIM steps per "
        "window; window 1 starts at the noise end; 0 = exactly first-order):", "",
        *_table(["form", "prediction", *header], rows, "ll" + "r" * len(header)), "",
    ]  # fmt: skip


def _diagnostic_table(results: dict[str, Any]) -> list[str]:
    records = results["cells"]
    present = [
        c
        for c in DIAGNOSTIC_COLUMNS
        if any(c in d for cell in records for d in cell["diagnostics"].values())
    ]
    rows = []
    for cell in records:
        for stage, numbers in cell["diagnostics"].items():
            rows.append(
                [cell["form"], cell["prediction"], stage, *(numbers.get(c) for c in present)]
            )
    lines = _table(["form", "prediction", "stage", *present], rows, "lll" + "r" * len(present))
    changes = results["diagnostic_changes"]
    checked = [c for c in LOWERED if c in present]
    if changes and checked:
        lines += ["", "Lowered by rectification:", ""]
        body = [
            [ch["form"], ch["prediction"], *(ch[c]["lowered"] for c in checked)] for ch in changes
        ]
        lines += _table(["form", "prediction", *checked], body)
        total = sum(ch[c]["lowered"] for ch in changes for c in checked)
        lines += ["", f"{total} of {len(changes) * len(checked)} lowered.", ""]
    return lines


def write_report(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Render ``results`` as Markdown at ``path`` (written atomically)."""
    config = results["config"]
    data = config["data"]
    seconds = results.get("timing", {}).get("seconds")
    lines = [
        f"# rectdiff compare: {data['name']}",
        "",
        f"Config `{config['source']}`, rectdiff {results['rectdiff_version']}"
        + (f", wall time {seconds:.0f} s" if seconds is not None else "")
        + ".",
        "",
        _equal_sentence(config),
        "",
        "## Shared hyperparameters",
        "",
        *_hyperparameters(config),
        "",
        *_ess_table(results),
        "## Rectification: one-step sample distance",
        "",
        *_summary_table(results),
        "## Sample quality against NFE",
        "",
        *_methods_table(results),
        *_quality_tables(results),
        "## Trajectory diagnostics",
        "",
        "Relative straightness (Liu et al. 2023, eq. 4, divided by E||Z1 - Z0||^2) in t and in "
        "y = x / alpha against s = sigma / alpha (where every first-order path is straight), "
        "first-order deviation of the x0-prediction, crossing rate and transport cost of the "
        "model's own (noise, sample) coupling, crossing rate of the coupling it was trained on "
        "(teacher: noise and data drawn independently; rectified: its pairs), one-step gap to "
        "an adaptive solve.",
        "",
        *_diagnostic_table(results),
        *_window_table(results),
    ]
    if results.get("figures"):
        lines += ["## Figures", ""]
        lines += [f"- [{Path(p).stem}]({p})" for p in results["figures"] if p.endswith(".png")]
        lines.append("")
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _equal_sentence(config: dict[str, Any]) -> str:
    if config["equal"] == "t":
        train = config["train"]
        return (
            f"**Equal in t**: every form trains with time sampler `{train['time_sampler']}` "
            f"and weighting `{train['weighting']}` in its own t, and samples on a "
            f"`{config['evaluation']['t_grid']}` grid in its own t."
        )
    ref = config["reference"]
    lo, hi = config["logsnr_range"]
    rect = config["rectify"].get("reference")
    rect_text = (
        f" The rectification stage trains every cell with the implied weighting of "
        f"`{rect['form']}` / `{rect['prediction']}` / `{rect['time_sampler']}` / "
        f"`{rect['weighting']}` instead."
        if rect
        else ""
    )
    return (
        f"**Equal in logsnr**: every form is restricted to logsnr in [{lo:.3f}, {hi:.3f}] and "
        f"trains with the implied logsnr weighting of the reference `{ref['form']}` / "
        f"`{ref['prediction']}` / `{ref['time_sampler']}` / `{ref['weighting']}` "
        "(timesteps.equalize); fixed-step solvers use one grid in logsnr "
        f"(`{config['evaluation']['t_grid']}` in the reference's t).{rect_text}"
    )


def summary_markdown(results: dict[str, Any]) -> str:
    """The one-step summary table of a comparison, as Markdown (what the CLI prints)."""
    return "\n".join(_summary_table(results))


#: the columns ``rectdiff diagnose`` prints
DIAGNOSE_COLUMNS = (
    "straightness_t",
    "straightness_y",
    "first_order_deviation",
    "crossing_rate",
    "train_coupling_crossing_rate",
    "one_step_gap",
)


def diagnose_markdown(records: Sequence[dict[str, Any]]) -> str:
    """``rectdiff diagnose`` records as a Markdown table, one row per model folder."""
    columns = [c for c in DIAGNOSE_COLUMNS if any(c in r for r in records)]
    rows = [
        [r["model"], r["form"].get("family", "?"), r["prediction"], *(r.get(c) for c in columns)]
        for r in records
    ]
    return "\n".join(
        _table(["model", "form", "prediction", *columns], rows, "lll" + "r" * len(columns))
    )
