"""Shared fixtures of the Stable Diffusion tests: one tiny pipeline, its pairs and a rectified
student, built once per test session (shared by pytest-xdist workers through a file lock).

Tiny models are dominated by per-operation overhead: torch runs them on one thread here,
which on a shared 2-core machine is several times faster than two contending threads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from rectdiff.stable_diffusion import (
    SDRectifyConfig,
    build_tiny_pipeline,
    generate_sd_pairs,
    rectify_sd,
    tiny_prompts,
)

#: settings of the shared flow (the tests quote them)
NUM_PAIRS = 256
PAIR_STEPS = 25
PAIR_GUIDANCE = 5.0
RECTIFY_STEPS = 600
RECTIFY_LR = 1e-3
#: the rest of the student's training: MSE on the x0-prediction, an EMA of the weights
RECTIFY_OPTIONS = dict(batch_size=32, loss="mse", ema=True, ema_decay=0.98)


@dataclass(frozen=True)
class Flow:
    teacher: Path
    other: Path
    pairs: Path
    student: Path
    root: Path
    pair_steps: int = PAIR_STEPS
    pair_guidance: float = PAIR_GUIDANCE
    rectify_steps: int = RECTIFY_STEPS


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shared_root(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def flow(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Flow:
    """Tiny teacher (fitted 150 steps), 256 pairs (25-step DPM-Solver++ at guidance 5 on the
    'train' prompts), a student rectified for 600 steps (MSE, EMA), and a second, other tiny
    pipeline."""
    root = _shared_root(tmp_path_factory, worker_id) / "sd_flow"
    paths = Flow(root / "teacher", root / "other", root / "pairs", root / "student", root)
    with FileLock(str(root) + ".lock"):
        if not (root / "done.json").is_file():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                build_tiny_pipeline(paths.teacher, seed=0)
                build_tiny_pipeline(paths.other, seed=1, fit_steps=0)
                generate_sd_pairs(
                    paths.teacher, tiny_prompts("train"), NUM_PAIRS, paths.pairs,
                    steps=PAIR_STEPS, guidance=PAIR_GUIDANCE, batch_size=32, shard_size=64,
                    progress=False,
                )  # fmt: skip
                config = SDRectifyConfig(max_steps=RECTIFY_STEPS, lr=RECTIFY_LR, **RECTIFY_OPTIONS)
                rectify_sd(paths.teacher, paths.pairs, paths.student, config, progress=False)
            finally:
                torch.set_num_threads(threads)
            (root / "done.json").write_text(json.dumps({"done": True}))
    return paths
