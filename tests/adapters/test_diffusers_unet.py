"""A diffusers UNet2DModel + DDPMScheduler through adapters.diffusers_unet, against diffusers.

The UNet is trained with diffusers' own recipe (``DDPMScheduler.add_noise``, MSE on the
noise) on sklearn's 8x8 digits. On a scheduler's grid rectdiff's DDIM and DPM-Solver++(2M)
are diffusers' step for step (1e-5). rectdiff's dopri5 solves the continuous-time ODE of
the discrete schedule (DPM-Solver's interpolation, log alpha piecewise linear between the
1000 timesteps), whose field has a kink at every timestep: dopri5's local error estimate
misses them, so at rtol = atol = 1e-5 its global error is ~1e-3 (measured 8.6e-4 against a
1e-8 solve, 518 NFE) and it needs 1e-7 (2798 NFE, 5.7e-5) to be a reference; diffusers'
DPM-Solver++(2M) on all 999 knots is 3.8e-5 from that same 1e-8 solve.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from rectdiff import adapters, forms, samplers
from rectdiff.data import digits
from rectdiff.metrics import sliced_wasserstein
from rectdiff.rectify import generate_pairs, rectify
from rectdiff.training import TrainConfig

SHAPE = (1, 8, 8)


def _unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, add_attention=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ddpm() -> tuple[UNet2DModel, DDPMScheduler, torch.Tensor]:
    """(unet, scheduler, held-out digits): diffusers' DDPM training loop, 300 steps."""
    torch.manual_seed(0)
    images = digits()[0]
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, held_out = images[perm[:1400]], images[perm[1400:]]
    unet, scheduler = _unet(), DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    for _ in range(300):
        x0 = train[torch.randint(len(train), (64,))]
        noise = torch.randn_like(x0)
        steps = torch.randint(0, 1000, (len(x0),))
        pred = unet(scheduler.add_noise(x0, noise, steps), steps).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval(), scheduler, held_out


def _diffusers_sample(unet, scheduler, x: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' sampling loop (what DDPMPipeline runs), from the state ``x``."""
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def test_diffusers_unet_matches_diffusers_samplers(ddpm) -> None:
    unet, scheduler, _ = ddpm
    model, form, prediction = adapters.diffusers_unet(unet, scheduler)
    assert isinstance(form, forms.DiscreteVP) and prediction == "eps"
    eps = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(3))
    x_start = float(form.sigma(form.t_max)) * eps  # rectdiff's start; diffusers takes any state
    # diffusers' accurate sampler: DPM-Solver++(2M) on every knot, ending at timestep 0 (as
    # rectdiff's solve to t_min does)
    dpm = DPMSolverMultistepScheduler.from_config(scheduler.config, final_sigmas_type="sigma_min")
    theirs = _diffusers_sample(unet, dpm, x_start, 999)
    with torch.no_grad():
        ours = samplers.sample(model, eps, form=form, prediction=prediction, solver="dopri5",
                               rtol=1e-7, atol=1e-7, t_end=form.t_min)  # fmt: skip
    gap = float((ours - theirs).norm() / theirs.norm())
    print(f"\ndopri5 (1e-7) vs diffusers DPM-Solver++(2M), 999 steps: {gap:.2g} relative")
    assert gap < 1e-4
    config, no_clip = scheduler.config, {"clip_sample": False}  # rectdiff never clips x0
    # on a scheduler grid, rectdiff's DDIM and DPM-Solver++(2M) are diffusers' step for step
    for solver, stock, steps in (
        ("ddim", DDIMScheduler.from_config(config, timestep_spacing="trailing", **no_clip), 10),
        ("dpmpp_2m", DPMSolverMultistepScheduler.from_config(config), 10),
    ):
        theirs = _diffusers_sample(unet, stock, x_start, steps)
        grid = samplers.scheduler_grid(stock, form, steps)
        with torch.no_grad():
            ours = samplers.sample(model, eps, form=form, prediction=prediction, solver=solver,
                                   t_grid=grid)  # fmt: skip
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=solver)


def test_diffusers_unet_rectifies(ddpm, tmp_path) -> None:
    unet, scheduler, held_out = ddpm
    model, form, prediction = adapters.diffusers_unet(unet, scheduler)
    store = generate_pairs(model, form=form, prediction=prediction, num_pairs=1024,
                           out=tmp_path / "pairs", solver="dpmpp_2m", steps=25, shape=SHAPE,
                           progress=False)  # fmt: skip
    student = copy.deepcopy(model).train()
    rectify(student, store, form=form, prediction=prediction, progress=False,
            config=TrainConfig(steps=500, batch_size=64, lr=1e-3, seed=0,
                               weighting="x0"))  # fmt: skip
    eps = torch.randn(len(held_out), *SHAPE, generator=torch.Generator().manual_seed(5))
    distances = []
    for net in (model, student.eval()):
        with torch.no_grad():
            x = samplers.sample(net, eps, form=form, prediction=prediction, solver="ddim", steps=1)
        distances.append(sliced_wasserstein(x.flatten(1), held_out.flatten(1)))
    teacher, student_distance = distances
    print(
        f"\ndiffusers UNet one-step sliced W2: teacher {teacher:.3g}, student {student_distance:.3g}"
    )
    assert student_distance <= 0.5 * teacher, distances
