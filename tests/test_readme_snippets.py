"""Every ```python block of the README runs as written. Each test gives a block only the names
the README's text says it is given (a pipeline, data, a network), runs it in a fresh folder
and checks a number it computed. Blocks 6 and 7 (stock diffusers loading a rectified SDXL
folder and its LoRA) run in tests/stable_diffusion/test_sdxl.py, on its tiny SDXL flow."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel
from shared import readme_snippets
from torch import nn

from rectdiff import forms
from rectdiff.data import load_data
from rectdiff.metrics import sliced_wasserstein

SNIPPETS = readme_snippets()
#: the blocks this file runs, and those test_sdxl.py runs (every block is run somewhere)
HERE, IN_SDXL_TESTS = (0, 1, 2, 3, 4), (5, 6)


def run(index: int, namespace: dict) -> dict:
    exec(compile(SNIPPETS[index], f"README.md python block {index + 1}", "exec"), namespace)
    return namespace


def test_every_block_is_run_by_a_test():
    assert sorted(HERE + IN_SDXL_TESTS) == list(range(len(SNIPPETS))), len(SNIPPETS)


def tiny_ddpm_pipeline() -> DDPMPipeline:
    """A diffusers pipeline holding a small ``UNet2DModel`` (untrained) and its scheduler."""
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                       norm_num_groups=4)  # fmt: skip
    return DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))


def test_forms_block(monkeypatch, tmp_path):
    """Given a pipeline, data, noise and a perfect eps-prediction: the block's x0-prediction
    is the data and its v-target is alpha eps - sigma x0 (Salimans & Ho 2022)."""
    monkeypatch.chdir(tmp_path)
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    ns = run(0, {"pipe": tiny_ddpm_pipeline(), "x0": x0, "eps": eps, "out": eps.clone()})
    form, t = ns["form"], ns["t"]
    assert isinstance(form, forms.DiscreteVP)
    assert torch.allclose(ns["x0_pred"], x0, atol=1e-9)
    alpha, sigma = form.alpha(t)[:, None], form.sigma(t)[:, None]
    assert torch.allclose(ns["v"], alpha * eps - sigma * x0, atol=1e-12)
    assert torch.allclose(ns["x_t"], alpha * x0 + sigma * eps, atol=1e-12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Blocks 2 and 3 run in sequence, as the README continues from one to the next."""
    folder = tmp_path_factory.mktemp("readme")
    cwd = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        torch.manual_seed(0)
        ns = run(1, {})
        run(2, ns)
    assert cwd == torch.get_num_threads()
    return ns, folder


def test_training_block_samples_the_data(trained):
    """2000 -> 1000 steps of v-prediction VP: ten DPM-Solver++ steps land near 8 Gaussians."""
    ns, _ = trained
    data = load_data("8gaussians", 2000, seed=123)
    assert sliced_wasserstein(ns["samples"], data) < 0.25


def test_rectification_block_straightens_the_one_step_sample(trained):
    """The rectified student's one DDIM step is closer to the data than the teacher's."""
    from rectdiff import samplers

    ns, folder = trained
    assert len(ns["pairs"]) == 10_000 and (folder / "runs" / "pairs" / "manifest.json").is_file()
    assert torch.isfinite(ns["loss"])
    noise, data = torch.randn(2000, 2), load_data("8gaussians", 2000, seed=123)
    form = ns["form"]

    def one_step(model):
        return samplers.sample(model, noise, form=form, prediction="v", solver="ddim", steps=1)

    teacher = sliced_wasserstein(one_step(ns["teacher"]), data)
    student = sliced_wasserstein(one_step(ns["student"]), data)
    assert student < 0.6 * teacher, (student, teacher)


def test_phased_block_first_order_windows(trained, monkeypatch):
    """Block 4: the phased student's per-window first-order deviation, one per window."""
    ns, folder = trained
    monkeypatch.chdir(folder)
    run(3, ns)
    from rectdiff import diagnostics

    deviation = diagnostics.window_first_order_deviation(ns["traj"], ns["result"].edges)
    assert deviation.shape == (4,) and bool(torch.isfinite(deviation).all())
    from rectdiff import samplers

    # the teacher's own four DDIM steps on the same edges, from the same noise
    form, eps, edges = ns["form"], ns["eps"], ns["result"].edges
    teacher = samplers.sample(ns["teacher"], eps, form=form, prediction="v", solver="ddim",
                              t_grid=edges)  # fmt: skip
    data = load_data("8gaussians", 1000, seed=123)
    phased, own = sliced_wasserstein(ns["x"], data), sliced_wasserstein(teacher, data)
    assert phased < 0.9 * own, (phased, own)  # measured 0.378 vs 0.501


class TutorialNet(nn.Module):
    """The flow-matching tutorials' ``net(x, t) = MLP([x, t])``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return self.body(torch.cat([x, t[:, None]], dim=1))


class KeywordNet(TutorialNet):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # ModelWrapper: x=, t=
        return super().forward(x, t)


def test_adapters_block(monkeypatch, tmp_path):
    """Block 5, given a tutorial net, torchcfm's MLP, a flow_matching field and a DDPM
    pipeline: its dopri5 solve equals torchdiffeq's on the tutorial net, and each adapter
    names the form of its path."""
    from torchcfm.models.models import MLP
    from torchdiffeq import odeint

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    net, noise = TutorialNet(), torch.randn(256, 2)
    ns = {"net": net, "noise": noise, "mlp": MLP(dim=2, time_varying=True), "vf": KeywordNet(),
          "pipe": tiny_ddpm_pipeline()}  # fmt: skip
    with torch.no_grad():
        want = odeint(lambda s, x: net(x, s), noise, torch.tensor([0.0, 1.0]), rtol=1e-5,
                      atol=1e-5, method="dopri5")[-1]  # fmt: skip
    run(4, ns)
    assert len(ns["pairs"]) == 4096
    assert (ns["x"] - want).abs().max() < 1e-3  # both adaptive at 1e-5, from the same noise
    assert isinstance(ns["form"], forms.DiscreteVP) and ns["prediction"] == "eps"
