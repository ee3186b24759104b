"""Pair generation for tests/test_couplings.py, run in separate processes.

    python tests/_pairs_worker.py OUT [--delay SECONDS]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/_pairs_worker.py OUT

The model is the exact Gaussian denoiser (elementwise arithmetic only, so its output for a
pair does not depend on the batch it is in); ``--delay`` makes every model call sleep, so a
test can kill the process while a shard is being generated, and ``--calls FILE`` logs each
call so the test knows when.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from rectdiff import forms
from rectdiff.oracles import GaussianOracle
from rectdiff.rectify import pairs as couplings

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
    """Wraps a model, sleeps ``delay`` seconds per call (numerics unchanged) and appends one
    line per call to ``calls`` (so a test can see how far generation has got)."""

    def __init__(self, model: nn.Module, delay: float, calls: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.delay = delay
        self.calls = calls

    def forward(self, x_t: Tensor, model_time: Tensor, **cond: Any) -> Tensor:
        time.sleep(self.delay)
        if self.calls is not None:
            with open(self.calls, "a") as log:
                log.write(".\n")
        return self.model(x_t, model_time, **cond)


def run(
    out: str, delay: float = 0.0, calls: str | None = None, **overrides: Any
) -> tuple[couplings.PairDataset, int]:
    """Generate the worker's store into ``out``; returns it and the number of model calls."""
    form = overrides.pop("form", forms.VP())
    oracle = GaussianOracle(form, "eps", mean=0.5, std=0.3)
    model = SlowModel(oracle, delay, calls) if delay > 0 or calls else oracle
    pairs = couplings.generate_pairs(model, form=form, out=out, **(SETTINGS | overrides))
    return pairs, oracle.nfe


if __name__ == "__main__":
    from accelerate import PartialState

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--calls", help="append one line per model call to this file")
    parser.add_argument("--report", help="folder for one JSON per process: rank, world, nfe")
    args = parser.parse_args()
    _, nfe = run(args.out, args.delay, args.calls)
    if args.report:
        state = PartialState()  # the state generate_pairs used (a process-wide singleton)
        rank, world = state.process_index, state.num_processes
        report = {"rank": rank, "num_processes": world, "nfe": nfe}
        Path(args.report, f"rank{rank}.json").write_text(json.dumps(report))
