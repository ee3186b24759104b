"""The trainer: it learns a 2-D toy in every form x prediction, trains on fixed (eps, x0) pairs,
resumes exactly, stops on a NaN loss, averages with diffusers' EMA rule, validates its config."""

import math
import shutil

import pytest
import torch
from shared import FOUR, pick
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rectdiff import forms, samplers
from rectdiff.data import load_data
from rectdiff.models import MLP, Preconditioned
from rectdiff.training import NonFiniteLossError, TrainConfig, train

FORMS = pick(*FOUR)
RADIUS, STD = 2.0, 0.25


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mode_statistics(x):
    """Mean distance to the nearest of the 8 centres, and the largest deviation of a mode's
    share of the samples from 1/8."""
    angles = torch.arange(8) * 2 * math.pi / 8
    centers = RADIUS * torch.stack([angles.cos(), angles.sin()], 1)
    distance, mode = torch.cdist(x.float(), centers).min(1)
    share = torch.bincount(mode, minlength=8).float() / len(x)
    return float(distance.mean()), float((share - 1 / 8).abs().max())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("form_name", FORMS)
def test_learns_eight_gaussians_in_every_form(form_name, prediction):
    """800 steps of a width-64 MLP with min-SNR-5 weighting, sampled with 32 DDIM steps.

    For the data the mean nearest-centre distance is 0.31; for a Gaussian with the data's
    mean and covariance it is 0.93; a trained model must reach < 0.6 with every mode
    holding 12.5% +- 6% of the samples (a perfect sampler deviates by about 2%: the share's
    standard deviation over 2000 samples is 0.74%).
    """
    form = FORMS[form_name]
    x0 = load_data("8gaussians", 4096, seed=0, std=STD)
    torch.manual_seed(0)
    net = Preconditioned(
        MLP(2, hidden=64, depth=3), form, sigma_data=float(x0.std()), output_prediction=prediction
    )
    config = TrainConfig(
        steps=800, batch_size=256, lr=1e-2, lr_schedule="cosine", warmup_steps=20,
        weighting="min_snr", log_every=200,
    )  # fmt: skip
    result = train(net, x0, form=form, prediction=prediction, config=config, progress=False)
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    samples = samplers.sample(
        result.model,
        eps,
        form=form,
        prediction=prediction,
        solver="ddim",
        steps=32,
        t_grid="logsnr",
    )
    distance, share_error = mode_statistics(samples)
    # against a Gaussian with the data's mean and std (what a model that learnt nothing
    # of the modes would give): the samples sit far closer to the modes
    gaussian = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2)) * x0.std(0)
    blurred = mode_statistics(gaussian + x0.mean(0))[0]
    assert distance < 0.7 * blurred and share_error < 0.06, (distance, blurred, share_error)


@pytest.mark.parametrize("source", ["tensors", "loader"])
def test_pairs_train_on_the_given_noise(source):
    """Pairs (eps, x0 = shift + scale * eps) with a negative scale: trained on the pairs, one
    DDIM step from eps lands on the paired x0 (the coupling is first-order); trained with fresh
    noise it would learn the monotone map shift + |scale| eps instead."""
    form = forms.FlowMatching()
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(4096, 2, generator=gen)
    shift, scale = torch.tensor([1.0, -0.5]), torch.tensor([-2.0, 0.5])
    x0 = shift + scale * eps
    data = (
        (eps, x0)
        if source == "tensors"
        else DataLoader(TensorDataset(eps, x0), batch_size=256, shuffle=True)
    )
    torch.manual_seed(0)
    net = MLP(2, hidden=64, depth=3)
    config = TrainConfig(  # U-shaped t: Lee, Lin & Fanti's choice for training on pairs
        steps=300, batch_size=256, lr=1e-2, lr_schedule="cosine", time_sampler="u_shaped"
    )
    result = train(
        net, data, form=form, prediction="flow", config=config, pairs=True, progress=False
    )
    test_eps = torch.randn(1000, 2, generator=gen)
    one_step = samplers.sample(
        result.model, test_eps, form=form, prediction="flow", solver="ddim", steps=1
    )
    error = float((one_step - (shift + scale * test_eps)).norm(dim=1).mean())
    monotone = float(
        ((shift + scale.abs() * test_eps) - (shift + scale * test_eps)).norm(dim=1).mean()
    )
    # the paired map, not the monotone one fresh noise would give (they differ by ~3.2)
    assert error < 0.12 * monotone, (error, monotone)


class Interrupt(Exception):
    pass


def test_resume_gives_the_uninterrupted_result(tmp_path):
    """Interrupted at step 14 (after the step-10 checkpoint) and re-run from a fresh model:
    final weights, EMA weights and loss history equal those of one uninterrupted run."""
    form = forms.VP()
    x0 = load_data("moons", 1024, seed=0)
    labels = torch.zeros(len(x0), dtype=torch.long)  # a cond item, to count the steps

    def config(out):
        return TrainConfig(
            steps=20, batch_size=64, lr=1e-2, lr_schedule="cosine", warmup_steps=5, ema_decay=0.9,
            checkpoint_every=10, keep_checkpoints=0, log_every=5, out_dir=str(tmp_path / out),
        )  # fmt: skip

    def fresh(seed):
        torch.manual_seed(seed)
        return MLP(2, hidden=32, depth=2)

    full = train(fresh(0), (x0, labels), form=form, prediction="v", config=config("a"),
                 cond_fn=lambda _: {}, progress=False)  # fmt: skip
    calls = []

    def interrupting(_):
        calls.append(1)
        if len(calls) == 14:
            raise Interrupt
        return {}

    with pytest.raises(Interrupt):
        train(fresh(0), (x0, labels), form=form, prediction="v", config=config("b"),
              cond_fn=interrupting, progress=False)  # fmt: skip
    assert (tmp_path / "b/checkpoints/latest").read_text().strip() == "step_10"
    resumed = train(fresh(123), (x0, labels), form=form, prediction="v", config=config("b"),
                    cond_fn=lambda _: {}, progress=False)  # fmt: skip
    assert resumed.step == 20 and resumed.losses == full.losses
    for p_full, p_resumed in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p_resumed, p_full, rtol=0, atol=1e-7)
    assert sorted(p.name for p in (tmp_path / "b/checkpoints").glob("step_*")) == [
        "step_10",
        "step_20",
    ]


def test_resume_with_a_dataloader_replays_its_batches(tmp_path):
    """A DataLoader (shuffled, 5 batches an epoch): resumed from the mid-epoch step-7
    checkpoint of a run, a second run ends with that run's weights and losses."""
    x0 = load_data("moons", 300, seed=0)

    def run(out, seed):
        torch.manual_seed(seed)
        loader = DataLoader(TensorDataset(x0), batch_size=64, shuffle=True)
        config = TrainConfig(steps=20, batch_size=64, checkpoint_every=7, keep_checkpoints=0,
                             lr_schedule="cosine", out_dir=str(tmp_path / out))  # fmt: skip
        return train(
            MLP(2, 32, 2), loader, form=forms.VP(), prediction="eps", config=config, progress=False
        )

    full = run("a", 0)
    (tmp_path / "b/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step_7", tmp_path / "b/checkpoints/step_7")
    (tmp_path / "b/checkpoints/latest").write_text("step_7\n")
    resumed = run("b", 1)
    assert resumed.losses == full.losses
    for p_full, p_resumed in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p_resumed, p_full, rtol=0, atol=1e-7)


def test_non_finite_loss_names_step_and_checkpoint(tmp_path):
    class NaNFromCall(nn.Module):
        def __init__(self, net, call):
            super().__init__()
            self.net, self.call, self.calls = net, call, 0

        def forward(self, x, model_time):
            self.calls += 1
            out = self.net(x, model_time)
            return out * float("nan") if self.calls >= self.call else out

    x0 = load_data("8gaussians", 512, seed=0)
    config = TrainConfig(
        steps=20, batch_size=32, checkpoint_every=2, log_every=4, out_dir=str(tmp_path)
    )
    with pytest.raises(NonFiniteLossError, match=r"step 5\b.*step_4") as info:
        train(NaNFromCall(MLP(2, 16, 2), call=5), x0, form=forms.VE(), prediction="eps",
              config=config, progress=False)  # fmt: skip
    assert info.value.step == 5 and info.value.checkpoint == tmp_path / "checkpoints" / "step_4"
    assert not (tmp_path / "checkpoints" / "step_6").exists()  # no NaN model was saved
    with pytest.raises(NonFiniteLossError, match="no checkpoint"):
        train(NaNFromCall(MLP(2, 16, 2), call=3), x0, form=forms.VE(), prediction="eps",
              config=TrainConfig(steps=10, batch_size=32), progress=False)  # fmt: skip


def test_ema_follows_diffusers_rule():
    """EMAModel: shadow_1 = p_1, shadow_n = d_n shadow_{n-1} + (1 - d_n) p_n with
    d_n = min(decay, n / (n + 9)) (its warm-up (1 + k)/(10 + k) at k = n - 1)."""
    x0 = load_data("moons", 512, seed=0)

    def run(steps, ema_decay):
        torch.manual_seed(0)
        config = TrainConfig(
            steps=steps, batch_size=64, lr=0.05, lr_schedule="constant", ema_decay=ema_decay
        )
        result = train(
            MLP(2, 16, 2),
            x0,
            form=forms.FlowMatching(),
            prediction="flow",
            config=config,
            progress=False,
        )
        return torch.cat([p.detach().flatten() for p in result.model.parameters()])

    p1, p2, p3 = run(1, 0.0), run(2, 0.0), run(3, 0.0)
    shadow = p1
    for n, p in ((2, p2), (3, p3)):
        d = min(0.5, n / (n + 9))
        shadow = d * shadow + (1 - d) * p
    ema = run(3, 0.5)
    torch.testing.assert_close(ema, shadow, rtol=1e-6, atol=1e-7)
    assert float((ema - p3).abs().max()) > 1e-3  # it really is an average, not the last weights


def test_config_from_toml_and_errors(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(
        '[train]\nsteps = 50\nlr = 2e-4\ntime_sampler = "logit_normal"\n'
        'time_sampler_params = { m = 0.0, s = 1.0 }\nweighting = "min_snr"\n'
    )
    config = TrainConfig.from_toml(path, table="train")
    assert (config.steps, config.lr, config.time_sampler) == (50, 2e-4, "logit_normal")
    assert config.time_sampler_params == {"m": 0.0, "s": 1.0}
    with pytest.raises(
        ValueError, match=r"unknown training option 'stepz'.*allowed: steps, batch_size"
    ):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="mixed_precision.*no, fp16, bf16"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="lr_schedule.*cosine"):
        TrainConfig(lr_schedule="exponential")
    # the names are written out (no diffusers import with the config); each is one that
    # diffusers' get_scheduler takes
    from diffusers.optimization import SchedulerType

    from rectdiff.training.config import LR_SCHEDULES

    assert set(LR_SCHEDULES) <= {s.value for s in SchedulerType} and "cosine" in LR_SCHEDULES
    with pytest.raises(ValueError, match="time_sampler.*logit_normal"):
        TrainConfig(time_sampler="lognormal")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)
