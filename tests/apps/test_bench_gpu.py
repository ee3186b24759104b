"""experiments/bench/gpu.py measures like against like: its network is DDPM's CIFAR-10 UNet
(35.7 M parameters, Ho et al. 2020), and its hand-written loss is rectdiff's flow-matching
loss on the same draws."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shared import load_script

from rectdiff.rectify.online import Diffusion

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench"


@pytest.fixture(scope="module")
def gpu():
    return load_script(BENCH / "gpu.py")  # gpu.py puts its folder on sys.path for overhead.py


def test_the_network_is_ddpm_cifar10(gpu):
    net = gpu.ddpm_cifar10_unet()
    assert sum(p.numel() for p in net.parameters()) == 35_746_307  # DDPM's "35.7M"
    assert net.sample_shape == (3, 32, 32)


def test_the_hand_written_loss_is_rectdiffs_loss(gpu):
    torch.manual_seed(0)
    net = gpu.ddpm_cifar10_unet(tiny=True)
    x0, eps = torch.randn(2, 8, 3, 8, 8).unbind(0)
    t = torch.tensor([0.001, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.999], dtype=torch.float64)
    with torch.no_grad():
        plain = gpu.plain_loss(net, x0, torch.float32, eps=eps, t=t.float())
        ours = Diffusion(net, form=gpu.FORM, prediction="flow")(x0, eps=eps, t=t)
    assert plain.item() == pytest.approx(ours.item(), rel=1e-6)
