"""Phased rectification (K = 4) of every tiny pipeline family, measured as issue 13 asks.

For each family: the tiny teacher (``build_tiny_pipeline``, fitted 150 steps), 256 pairs
(25 solver steps at guidance 5 on the 'train' prompts, the family's stock pair solve), a
phased student (``sd rectify --phases 4``: ``--steps``, default 200, lr 2e-3, batch 32, MSE, EMA 0.98,
u-shaped times, the settings of ``tests/stable_diffusion/test_sd_phased.py``), then
``sd eval`` on the held-out prompts: 4-step latent MSE to the teacher's 25-step latents,
the student on its saved scheduler (the window edges) and the teacher on its own stock
scheduler, both run by stock diffusers pipelines. Prints one line per family and writes
``OUT/results.json``. About 5 minutes a family on one CPU core:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/sd/phased_families.py --out out/sd-phased
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rectdiff.stable_diffusion import build_tiny_pipeline, evaluate, tiny_prompts
from rectdiff.stable_diffusion.config import SDRectifyConfig
from rectdiff.stable_diffusion.pairs import generate_sd_pairs
from rectdiff.stable_diffusion.rectify import load_record, rectify_sd

PHASES = 4


def measure(
    family: str, root: Path, steps: int = 200, lr: float = 2e-3, sampler: str = "u_shaped",
    start_mass: float = 0.25, num_pairs: int = 256, starts: str = "trajectory",
) -> dict:  # fmt: skip
    start = time.perf_counter()
    teacher, pairs, student = root / "teacher", root / "pairs", root / "phased"
    if not teacher.exists():
        build_tiny_pipeline(teacher, seed=0, family=family)
    if not pairs.exists():
        generate_sd_pairs(teacher, tiny_prompts("train"), num_pairs, pairs, steps=25, guidance=5.0,
                          batch_size=32, shard_size=64, progress=False)  # fmt: skip
    config = SDRectifyConfig(phases=PHASES, max_steps=steps, lr=lr, batch_size=32, loss="mse",
                             ema=True, ema_decay=0.98, time_sampler=sampler,
                             phase_start_mass=start_mass, phase_starts=starts,
                             resume=False)  # fmt: skip
    rectify_sd(teacher, pairs, student, config, progress=False)
    metrics = evaluate(student, teacher, tiny_prompts("held_out"), root / "eval", steps=(PHASES,),
                       num=32, batch_size=32)  # fmt: skip
    mse = metrics["latent_mse"]
    return {
        "family": family,
        "steps": steps,
        "num_pairs": num_pairs,
        "lr": lr,
        "time_sampler": sampler,
        "start_mass": start_mass,
        "starts": starts,
        "edges": load_record(student)["phase_edges"]["t"],
        "student_4": mse["student"][str(PHASES)],
        "teacher_4": mse["teacher"][str(PHASES)],
        "ratio": metrics["ratio"][str(PHASES)],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/sd-phased")
    parser.add_argument("--families", default="sd15,sd2,sdxl,sd3")
    parser.add_argument("--steps", type=int, default=200, help="phased training steps")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--time-sampler", default="u_shaped")
    parser.add_argument("--start-mass", type=float, default=0.25)
    parser.add_argument("--pairs", type=int, default=256, help="pairs to generate")
    parser.add_argument("--phase-starts", default="trajectory", choices=["trajectory", "line"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    results = []
    for family in args.families.split(","):
        row = measure(family, out / family, args.steps, args.lr, args.time_sampler, args.start_mass,
                      args.pairs, args.phase_starts)  # fmt: skip
        results.append(row)
        print(f"{family}: phased 4-step latent MSE {row['student_4']:.4g}, teacher's own 4 steps "
              f"{row['teacher_4']:.4g}, ratio {row['ratio']:.3f} ({row['seconds']} s); edges "
              f"{[round(t, 4) for t in row['edges']]}", flush=True)  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
