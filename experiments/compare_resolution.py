"""How much of a finished comparison is the evaluation's own noise?

`rectdiff compare` scores every model once: one stream of evaluation noise, one held-out set.
This script takes the saved models of a finished toy comparison and scores the teacher's
adaptive (dopri5) solve and each few-step student's K-step DDIM samples again, over
``--streams`` evaluation noise streams (stream 0 is the report's own) and ``--references``
held-out sets (set 0 is the report's, seed ``seed + 1``; the others are fresh draws of the toy,
seeds ``seed + 2``, ``seed + 3``, ...: held out from training like the first). It prints, per cell,
each student's ratio to the teacher's dopri5 (the report's, then min-max and mean over every
evaluation), and per evaluation how many cells meet ``ratio <= --limit`` and in how many the
first student beats the second:

    python experiments/compare_resolution.py --out out/demo --streams 3 --references 5

Each stream re-solves every teacher with dopri5 (a few seconds a cell at n_eval = 5000), so
the whole demo takes 5-10 min on one core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rectdiff import metrics, samplers
from rectdiff.apps.compare.config import load_config
from rectdiff.apps.compare.evaluate import standard_noise
from rectdiff.apps.compare.hyperparameters import sampling_grid
from rectdiff.data import TOYS, load_data
from rectdiff.io.model_dir import load_model_dir


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a finished `rectdiff compare` folder")
    parser.add_argument("--config", default="experiments/compare_forms.toml",
                        help="the TOML it ran (default: the demo's)")  # fmt: skip
    parser.add_argument("--stages", nargs=2, default=["phased", "rectified"],
                        help="two student stages: the first is checked against --limit and "
                        "against the second")  # fmt: skip
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps of the students")
    parser.add_argument("--metric", default="sliced_w2", help="one metric of the config")
    parser.add_argument("--streams", type=int, default=3, help="evaluation noise streams")
    parser.add_argument("--references", type=int, default=5, help="held-out sets")
    parser.add_argument("--limit", type=float, default=1.2,
                        help="the ratio to the teacher's dopri5 counted as met")  # fmt: skip
    args = parser.parse_args(argv)
    if args.streams < 1 or args.references < 1 or args.steps < 1:
        parser.error(
            f"--streams, --references and --steps must be >= 1; got {args.streams}, "
            f"{args.references} and {args.steps}."
        )
    torch.set_num_threads(1)
    config = load_config(args.config)
    if config.data.name not in TOYS:
        parser.error(
            f"{config.data.name!r} is not a toy: it has one held-out set to score against."
        )
    scores = score(config, Path(args.out), args.stages, args.steps, args.metric, args.streams,
                   args.references)  # fmt: skip
    report(scores, [f"{label}_{p}" for label, _, p in config.cells()], args)
    return scores


def score(
    config: Any, out: Path, stages: list[str], steps: int, metric: str, streams: int,
    references: int,
) -> dict[tuple[str, int, int], tuple[float, float, float]]:  # fmt: skip
    """``(cell, stream, set) -> (teacher dopri5, stage 1, stage 2)``: the metric of the teacher's
    adaptive solve and of each student's ``steps`` DDIM steps from noise stream ``stream``
    against held-out set ``set`` (stream 0 and set 0 are the report's own)."""
    ev, n = config.evaluation, config.data.n_eval
    options = {metric: ev.metric_options.get(metric, {})}
    held_out = [load_data(config.data.name, n, config.seed + 1 + j, **config.data.params)
                for j in range(references)]  # fmt: skip
    shape = tuple(held_out[0].shape[1:])
    scores = {}
    start = time.perf_counter()
    for label, form, prediction in config.cells():
        cell = f"{label}_{prediction}"
        folder = out / "models" / cell
        teacher = load_model_dir(folder / "teacher")[0].eval()
        students = [load_model_dir(folder / stage)[0].eval() for stage in stages]
        grid = sampling_grid(form, steps, config)
        span = sampling_grid(form, 1, config)  # the adaptive solve's ends, as compare passes them
        for i in range(streams):
            noise = standard_noise(shape, n, config.seed + i, "evaluation")
            with torch.no_grad():
                samples = [samplers.sample(teacher, noise, form=form, prediction=prediction,
                                           solver="dopri5", t_grid=span, rtol=ev.rtol,
                                           atol=ev.atol)]  # fmt: skip
                samples += [samplers.sample(s, noise, form=form, prediction=prediction,
                                            solver="ddim", steps=steps, t_grid=grid)
                            for s in students]  # fmt: skip
            for j, reference in enumerate(held_out):
                scores[cell, i, j] = tuple(_metric(metric, s, reference, config.seed, options)
                                           for s in samples)  # fmt: skip
        print(f"# {cell} scored ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return scores


def _metric(name: str, sample: Any, reference: Any, seed: int, options: dict) -> float:
    return metrics.compute_metrics([name], sample, reference, seed=seed, **options)[name]


def report(scores: dict, cells: list[str], args: argparse.Namespace) -> None:
    first, second = args.stages
    evaluations = [(i, j) for i in range(args.streams) for j in range(args.references)]
    print(f"\n{args.metric} of {args.steps}-step DDIM samples over the teacher's dopri5, "
          f"{len(evaluations)} evaluations ({args.streams} noise streams x {args.references} "
          "held-out sets; the report's is stream 0, set 0)\n")  # fmt: skip
    print(f"| cell | {first}: report | min-max | mean | {second}: report | min-max | mean | "
          f"{first} < {second} |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cell in cells:
        row = [cell.replace("_", " ")]
        for k in (1, 2):
            ratios = [scores[cell, i, j][k] / scores[cell, i, j][0] for i, j in evaluations]
            row += [f"{ratios[0]:.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}",
                    f"{statistics.fmean(ratios):.2f}"]  # fmt: skip
        wins = sum(scores[cell, i, j][1] < scores[cell, i, j][2] for i, j in evaluations)
        print("| " + " | ".join(row) + f" | {wins}/{len(evaluations)} |")
    print(f"\n| stream | held-out set | {first} <= {args.limit}x teacher dopri5 | "
          f"{first} < {second} |\n|---|---|---:|---:|")  # fmt: skip
    for i, j in evaluations:
        within = sum(scores[c, i, j][1] <= args.limit * scores[c, i, j][0] for c in cells)
        wins = sum(scores[c, i, j][1] < scores[c, i, j][2] for c in cells)
        print(f"| {i} | {j} | {within}/{len(cells)} | {wins}/{len(cells)} |")
    means = {c: [statistics.fmean(scores[c, i, j][k] for i, j in evaluations) for k in range(3)]
             for c in cells}  # fmt: skip
    within = sum(m[1] <= args.limit * m[0] for m in means.values())
    wins = sum(m[1] < m[2] for m in means.values())
    print(f"\nOn the mean over all {len(evaluations)} evaluations: {first} <= {args.limit}x the "
          f"teacher's dopri5 in {within}/{len(cells)} cells, {first} < {second} in "
          f"{wins}/{len(cells)}.")  # fmt: skip


if __name__ == "__main__":
    main()
