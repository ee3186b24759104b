"""Window couplings of a Gaussian teacher, written by however many processes run this.

ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 _phased_worker.py OUT
"""

from __future__ import annotations

import sys

import torch

from rectdiff import forms
from rectdiff.oracles import GaussianOracle
from rectdiff.rectify import phase_edges, process_state, window_couplings

MEAN, STD = torch.tensor([0.3, -0.2]), 0.5


def main(out: str) -> None:
    form = forms.VP()
    teacher = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    data = MEAN + STD * torch.randn(700, 2, generator=torch.Generator().manual_seed(0))
    couplings = window_couplings(teacher, data, form=form, prediction="eps",
                                 edges=phase_edges(form, 4), chunk_size=128)  # fmt: skip
    state = process_state()
    if state.is_main_process:
        torch.save({**couplings.__dict__, "num_processes": state.num_processes}, out)


if __name__ == "__main__":
    main(sys.argv[1])
