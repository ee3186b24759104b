"""Window couplings of a Gaussian teacher and a phased student trained on them, written by
however many processes run this.

ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 _phased_worker.py OUT
"""

from __future__ import annotations

import sys

import torch

from rectdiff import forms
from rectdiff.models import MLP
from rectdiff.oracles import GaussianOracle
from rectdiff.rectify import phase_edges, process_state, rectify_phased, window_couplings
from rectdiff.training import TrainConfig

MEAN, STD = torch.tensor([0.3, -0.2]), 0.5


def main(out: str) -> None:
    form = forms.VP()
    teacher = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    data = MEAN + STD * torch.randn(700, 2, generator=torch.Generator().manual_seed(0))
    couplings = window_couplings(teacher, data, form=form, prediction="eps",
                                 edges=phase_edges(form, 4), chunk_size=128)  # fmt: skip
    torch.manual_seed(0)
    config = TrainConfig(steps=30, batch_size=64, lr=1e-2, grad_clip=1.0, ema_decay=0.9)
    result = rectify_phased(teacher, data, form=form, prediction="eps", phases=4,
                            student=MLP(2, hidden=32, depth=2), steps=8, config=config,
                            progress=False)  # fmt: skip
    student = {key: value.clone() for key, value in result.model.state_dict().items()}
    state = process_state()
    if state.is_main_process:
        torch.save({**couplings.__dict__, "num_processes": state.num_processes,
                    "student": student}, out)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
