"""Pair generation for tests/test_couplings.py, run in separate processes.

    python tests/_pairs_worker.py OUT [--delay SECONDS]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/_pairs_worker.py OUT

The model is the exact Gaussian denoiser (elementwise arithmetic only, so its output for a
pair does not depend on the batch it is in); ``--delay`` makes every model call sleep, so a
test can kill the process while a shard is being generated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from rectdiff import forms
from rectdiff.rectify import pairs as couplings
from rectdiff.oracles import GaussianOracle

#: the settings every run of this worker uses (the tests compare stores byte for byte)
SETTINGS = dict(
    prediction="eps",
    solver="ddim",
    steps=2,
    num_pairs=56,
    shard_size=16,
    batch_size=4,
    shape=(3,),
    seed=7,
    model_description="GaussianOracle(VP, eps, mean=0.5, std=0.3)",
    progress=False,
)


class SlowModel(nn.Module):
    """Wraps a model and sleeps ``delay`` seconds per call (numerics unchanged)."""

    def __init__(self, model: nn.Module, delay: float) -> None:
        super().__init__()
        self.model = model
        self.delay = delay

    def forward(self, x_t: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        time.sleep(self.delay)
        return self.model(x_t, model_time, **cond)


def run(out: str, delay: float = 0.0, **overrides: Any) -> tuple[couplings.PairDataset, int]:
    """Generate the worker's store into ``out``; returns it and the number of model calls."""
    form = overrides.pop("form", forms.VP())
    oracle = GaussianOracle(form, "eps", mean=0.5, std=0.3)
    model = SlowModel(oracle, delay) if delay > 0 else oracle
    pairs = couplings.generate_pairs(model, form=form, out=out, **(SETTINGS | overrides))
    return pairs, oracle.nfe


if __name__ == "__main__":
    from accelerate import PartialState

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--report", help="folder for one JSON per process: rank, world, nfe")
    args = parser.parse_args()
    _, nfe = run(args.out, args.delay)
    if args.report:
        state = PartialState()  # the state generate_pairs used (a process-wide singleton)
        rank, world = state.process_index, state.num_processes
        report = {"rank": rank, "num_processes": world, "nfe": nfe}
        Path(args.report, f"rank{rank}.json").write_text(json.dumps(report))
