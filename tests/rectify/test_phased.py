"""Phased rectification: window edges, the per-window first-order property on an exact
oracle, the phased loss, training, and couplings independent of the process count."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from shared import F64, FOUR, MEAN, STD, pick

from rectdiff import diagnostics, forms, samplers
from rectdiff.models import MLP, Preconditioned
from rectdiff.oracles import GaussianOracle, PhasedOracle
from rectdiff.predictions import PREDICTIONS
from rectdiff.rectify import (
    Couplings,
    phase_edges,
    phased_loss,
    rectify_phased,
    window_couplings,
    window_grid,
)  # fmt: skip
from rectdiff.training import TrainConfig


@pytest.mark.parametrize("phases", [1, 2, 4, 5, 10, 1000])
def test_timestep_edges_are_a_stock_ddim_trailing_grid(phases: int) -> None:
    form, _ = forms.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    ddim = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    stock = samplers.scheduler_grid(ddim, form, phases)
    assert torch.equal(phase_edges(form, phases, "timesteps"), stock)


def test_bad_phases_are_named() -> None:
    form, _ = forms.from_diffusers(DDPMScheduler(num_train_timesteps=1000))
    for phases, match in ((0, "phases must be an integer >= 1, got phases=0"),
                          (3, "phases=3 cannot align with the 1000 timesteps"),
                          (2000, "phases=2000 cannot align")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            phase_edges(form, phases, "timesteps")
    with pytest.raises(ValueError, match="spacing='timesteps'.*has none"):
        phase_edges(forms.FlowMatching(), 4, "timesteps")
    with pytest.raises(ValueError, match="unknown phase spacing 'sigma'"):
        phase_edges(forms.VP(), 4, "sigma")


@pytest.mark.parametrize("name", ["vp", "ve", "fm"])
def test_edges_run_from_t_max_to_zero(name: str) -> None:
    form = pick(name)[name]
    for spacing in ("t", "logsnr"):
        edges = phase_edges(form, 4, spacing)
        assert len(edges) == 5 and float(edges[0]) == form.t_max and float(edges[-1]) == 0.0
        assert bool((torch.diff(edges) < 0).all())
    lam = form.logsnr(phase_edges(form, 4, "logsnr")[:-1])
    if float(form.sigma(0.0)) == 0:  # equal logsnr steps down to t_min, then 0
        lam = torch.cat([lam, form.logsnr(torch.tensor([form.t_min], dtype=F64))])
    steps = torch.diff(lam)
    assert torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", FOUR)
def test_phased_oracle_is_first_order_in_every_window(name: str, prediction: str) -> None:
    """One DDIM step per window reproduces the teacher's exact window solve; inside each
    window the x0-prediction does not move."""
    form = pick(name)[name]
    teacher = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    edges = phase_edges(form, 4, "t")
    oracle = PhasedOracle(teacher, edges, prediction)
    eps = torch.randn(256, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    traj = samplers.sample(oracle, eps, form=form, prediction=prediction, solver="ddim",
                           t_grid=edges, return_trajectory=True)  # fmt: skip
    for k in range(3):  # the last window ends at sigma = 0, where DDIM returns E[x0 | x]
        exact = teacher.solve(traj.x[k], float(edges[k]), float(edges[k + 1]))
        assert float((traj.x[k + 1] - exact).abs().max()) < 1e-6
    fine = samplers.sample(oracle, eps, form=form, prediction=prediction, solver="ddim",
                           t_grid=window_grid(form, edges, 8), return_trajectory=True)  # fmt: skip
    assert float(diagnostics.window_first_order_deviation(fine, edges).max()) < 1e-8
    teacher_traj = samplers.sample(teacher, eps, form=form, prediction="eps", solver="ddim",
                                   t_grid=window_grid(form, edges, 8), return_trajectory=True)  # fmt: skip
    assert float(diagnostics.window_first_order_deviation(teacher_traj, edges).max()) > 1e-2


@pytest.mark.parametrize("source", ["data", "pairs"])
@pytest.mark.parametrize("name", FOUR)
def test_phased_loss_vanishes_at_the_phased_oracle(name: str, source: str) -> None:
    """Window couplings from an exact teacher solve: the ideal phased student has loss 0 in
    every prediction, and a plain diffusion model does not."""
    form = pick(name)[name]
    teacher = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    edges = phase_edges(form, 4, "logsnr")
    gen = torch.Generator().manual_seed(1)
    data = MEAN + STD * torch.randn(512, 2, dtype=F64, generator=gen)
    if source == "pairs":
        noise = torch.randn(512, 2, dtype=F64, generator=gen)
        data = Couplings(noise, teacher.solve(float(form.sigma(form.t_max)) * noise,
                                              form.t_max, 0.0))  # fmt: skip
    couplings = window_couplings(teacher, data, form=form, prediction="eps", edges=edges,
                                 solver="dopri5", rtol=1e-10, atol=1e-10, chunk_size=200)  # fmt: skip
    assert torch.equal(couplings.window_start, edges[torch.arange(512) % 4])
    (eps, x0, *cond), keys = couplings.training_data()
    for prediction in PREDICTIONS:
        loss, per_sample = phased_loss(
            PhasedOracle(teacher, edges, prediction), x0, form=form, prediction=prediction,
            eps=eps, cond=dict(zip(keys, cond, strict=True)),
            generator=torch.Generator().manual_seed(2),
        )  # fmt: skip
        inner = couplings.window_end > 0
        assert float(per_sample[inner].max()) < 1e-14, (prediction, float(per_sample.max()))
        # the last window's solve ends with the sampler's first-order step from t_min to 0
        # (E[x0 | x_t_min]), the oracle with the exact flow to 0: they differ by O(t_min^2)
        assert float(per_sample[~inner].max()) < 1e-7, (prediction, float(per_sample.max()))
        # in the prediction's own units (PeRFlow's loss), and at times spread evenly in
        # logsnr: zero on every inner window too (in prediction space the last window's
        # O(t_min^2) difference in x0 above is divided by sigma(t) -> t_min)
        for setting in ({"space": "prediction"}, {"window_time": "logsnr"}):
            _, per_sample = phased_loss(
                PhasedOracle(teacher, edges, prediction), x0, form=form, prediction=prediction,
                eps=eps, cond=dict(zip(keys, cond, strict=True)),
                generator=torch.Generator().manual_seed(2), **setting,
            )  # fmt: skip
            assert float(per_sample[inner].max()) < 1e-14, (prediction, setting)
    plain, _ = phased_loss(teacher, x0, form=form, prediction="eps", eps=eps,
                           cond=dict(zip(keys, cond, strict=True)))  # fmt: skip
    assert float(plain) > 1e-4


@pytest.mark.parametrize("name", FOUR)
def test_trajectory_starts_follow_the_teacher_from_the_pairs_noise(name: str) -> None:
    """``starts="trajectory"``: window k of a pair starts where the teacher's exact flow from
    the pair's noise is at t_k and ends where it is at t_(k+1) (to 1e-7); the pair's own
    line (``"line"``) leaves that path after the first window."""
    form = pick(name)[name]
    teacher = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    edges = phase_edges(form, 4, "logsnr")
    noise = torch.randn(200, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    start = float(form.sigma(form.t_max)) * noise
    pairs = Couplings(noise, teacher.solve(start, form.t_max, 0.0))
    window = torch.arange(200) % 4
    t_s, t_e = edges[window], edges[window + 1]

    def states(starts: str) -> tuple[torch.Tensor, torch.Tensor]:
        made = window_couplings(teacher, pairs, form=form, prediction="eps", edges=edges,
                                solver="dopri5", rtol=1e-10, atol=1e-10, chunk_size=64,
                                starts=starts)  # fmt: skip
        assert torch.equal(made.window_start, t_s)
        on = [form.alpha(t)[:, None] * made.x0 + form.sigma(t)[:, None] * made.eps
              for t in (t_s, t_e)]  # fmt: skip
        return on[0], on[1]

    x_s, x_e = states("trajectory")
    path = {float(t): teacher.solve(start, form.t_max, float(t)) for t in edges[:-1]}
    exact_s = torch.stack([path[float(t)][i] for i, t in enumerate(t_s)])
    assert float((x_s - exact_s).abs().max()) < 1e-7
    inner = t_e > 0  # the last window ends with the sampler's step from t_min to 0
    exact_e = torch.stack([path[float(t)][i] for i, t in enumerate(t_e) if t > 0])
    assert float((x_e[inner] - exact_e).abs().max()) < 1e-7
    line_s, _ = states("line")
    first = window == 0
    assert float((line_s[first] - exact_s[first]).abs().max()) < 1e-7  # both start at the noise
    assert float((line_s[~first] - exact_s[~first]).abs().max()) > 1e-2


def test_bad_starts_are_named() -> None:
    form = forms.VP()
    teacher = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="unknown starts 'path'; allowed: line, trajectory"):
        window_couplings(teacher, MEAN + torch.zeros(8, 2, dtype=F64), form=form,
                         prediction="eps", edges=phase_edges(form, 2), starts="path")  # fmt: skip


class _TimeRecorder(torch.nn.Module):
    """Answers 0 and remembers the model times it was called at."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        self.times.append(model_time.double())
        return torch.zeros_like(x)


def _window_batch(form: forms.Form, n: int) -> tuple[torch.Tensor, ...]:
    edges = phase_edges(form, 4, "logsnr")
    gen = torch.Generator().manual_seed(3)
    window = torch.arange(n) % 4
    x0, eps = (torch.randn(n, 2, dtype=F64, generator=gen) for _ in range(2))
    return edges, x0, eps, {"window_start": edges[window], "window_end": edges[window + 1]}


def test_an_unknown_loss_space_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"unknown phased loss space 'x0'; allowed: endpoint, prediction"
    ):
        phased_loss(torch.nn.Identity(), torch.zeros(2, 2), form=forms.FlowMatching(), prediction="x0",
                    eps=torch.zeros(2, 2), cond={"window_start": torch.ones(2), "window_end": torch.zeros(2)},
                    space="x0")  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown phased loss space 'x0'"):  # before any solve
        rectify_phased(torch.nn.Identity(), torch.zeros(4, 2), form=forms.FlowMatching(),
                       prediction="x0", space="x0")  # fmt: skip


def test_start_mass_puts_that_fraction_of_times_on_the_window_start() -> None:
    """With start_mass = 0.25 a quarter of the draws (binomial, 20 000 draws: +- 0.3%
    standard error) land exactly on their window's start and the rest uniformly inside."""
    form = forms.VP()
    edges, x0, eps, cond = _window_batch(form, 20000)
    model = _TimeRecorder()
    phased_loss(model, x0, form=form, prediction="eps", eps=eps, cond=cond, start_mass=0.25,
                generator=torch.Generator().manual_seed(4))  # fmt: skip
    t = form.t_from_model_time(model.times[0])
    start = cond["window_start"].clamp(max=form.t_max)
    at_start = (t - start).abs() < 1e-6
    assert abs(float(at_start.double().mean()) - 0.25) < 0.012
    inside = (t[~at_start] - cond["window_end"][~at_start]) / (start - cond["window_end"])[
        ~at_start
    ]
    assert 0.0 <= float(inside.min()) and float(inside.max()) <= 1.0
    assert abs(float(inside.mean()) - 0.5) < 0.01  # uniform in the window: mean 1/2
    with pytest.raises(ValueError, match=r"start_mass must be in \[0, 1\), got 1.0"):
        phased_loss(model, x0, form=form, prediction="eps", eps=eps, cond=cond, start_mass=1.0)


@pytest.mark.parametrize("name", ["vp", "fm", "ve"])
def test_window_time_logsnr_spreads_the_draws_evenly_in_logsnr(name: str) -> None:
    """window_time="logsnr": the draws not on the window start cover each window uniformly
    in logsnr (20 000 draws: mean of the logsnr fraction 1/2 +- 0.01, variance 1/12), the
    start keeps its mass; in VE, whose logsnr is affine in t, the times equal window_time="t"'s
    to rounding."""
    form = pick(name)[name]
    edges, x0, eps, cond = _window_batch(form, 20000)
    times = {}
    for window_time in ("t", "logsnr"):
        model = _TimeRecorder()
        phased_loss(model, x0, form=form, prediction="eps", eps=eps, cond=cond, start_mass=0.25,
                    window_time=window_time, generator=torch.Generator().manual_seed(4))  # fmt: skip
        times[window_time] = form.t_from_model_time(model.times[0])
    t = times["logsnr"]
    lo = cond["window_end"].clamp(min=form.t_min)
    hi = cond["window_start"].clamp(max=form.t_max)
    at_start = t == hi
    assert abs(float(at_start.double().mean()) - 0.25) < 0.012
    frac = (form.logsnr(t) - form.logsnr(lo)) / (form.logsnr(hi) - form.logsnr(lo))
    frac = frac[~at_start]
    assert -1e-9 <= float(frac.min()) and float(frac.max()) <= 1.0 + 1e-9
    assert abs(float(frac.mean()) - 0.5) < 0.01 and abs(float(frac.var()) - 1 / 12) < 0.005
    assert torch.equal(times["t"] == hi, at_start)  # the same draws land on the start
    if name == "ve":
        assert torch.allclose(times["logsnr"], times["t"], rtol=0, atol=1e-12)
    else:  # towards the high-logsnr end of the last window: more draws near t = 0
        last = (cond["window_end"] == 0) & ~at_start
        assert float(times["logsnr"][last].median()) < 0.5 * float(times["t"][last].median())
    with pytest.raises(ValueError, match=r"unknown phased window_time 'sigma'; allowed: t, logsnr"):
        phased_loss(model, x0, form=form, prediction="eps", eps=eps, cond=cond,
                    window_time="sigma")  # fmt: skip


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_sigma_data_scales_each_endpoint_error_by_the_flow_to_zero(name: str) -> None:
    """The per-sample loss with sigma_data is the plain one times the squared factor by which
    a Gaussian teacher's flow from t_e to 0 scales errors, s^2 / (alpha_e^2 s^2 + sigma_e^2)
    (same time draws); for VE the first window's weight is far below the last one's (1)."""
    form = pick(name)[name]
    edges, x0, eps, cond = _window_batch(form, 64)
    s = 1.7
    model = MLP(dim=2, hidden=16, depth=2).double()

    def per_sample(**extra):
        return phased_loss(model, x0, form=form, prediction="eps", eps=eps, cond=dict(cond),
                           generator=torch.Generator().manual_seed(5), **extra)[1]  # fmt: skip

    a_e, s_e = form.alpha(cond["window_end"]), form.sigma(cond["window_end"])
    factor = s**2 / (a_e**2 * s**2 + s_e**2)
    torch.testing.assert_close(per_sample(sigma_data=s), per_sample() * factor, rtol=1e-12,
                               atol=0)  # fmt: skip
    last = s**2 / (s**2 + float(form.sigma(0.0)) ** 2)  # 1, less VE's sigma_min = 0.01
    assert float(factor[cond["window_end"] == 0].min()) == pytest.approx(last, abs=1e-12)
    if name == "ve":
        assert float(factor[0]) < 0.1  # window 0 ends at sigma_e = 5.9: 13x less weight
    with pytest.raises(
        ValueError, match=r"sigma_data must be 'auto', a positive number or None, got -1"
    ):
        rectify_phased(model, x0, form=form, prediction="eps", sigma_data=-1.0)


@pytest.mark.parametrize("name", FOUR)
def test_sigma_data_puts_the_prediction_space_target_in_unit_variance(name: str) -> None:
    """In prediction space, sigma_data divides each sample's error by the std of its target
    ``a_t x0 + b_t eps`` for data of std s, sqrt(a_t^2 s^2 + b_t^2): v, a = -sigma_t and
    b = alpha_t (same time draws); eps (a = 0, b = 1) is unchanged."""
    form = pick(name)[name]
    edges, x0, eps, cond = _window_batch(form, 64)
    s = 1.7
    model = MLP(dim=2, hidden=16, depth=2).double()

    def run(prediction, **extra):
        return phased_loss(model, x0, form=form, prediction=prediction, eps=eps, cond=dict(cond),
                           generator=torch.Generator().manual_seed(5), space="prediction",
                           **extra)  # fmt: skip

    start, end = cond["window_start"], cond["window_end"]
    u = forms_uniform_draw(form, 64, 5)
    t = end.clamp(min=form.t_min) + (start.clamp(max=form.t_max) - end.clamp(min=form.t_min)) * u
    factor = 1 / (form.sigma(t) ** 2 * s**2 + form.alpha(t) ** 2)
    torch.testing.assert_close(run("v", sigma_data=s)[1], run("v")[1] * factor, rtol=1e-10, atol=0)
    torch.testing.assert_close(run("eps", sigma_data=s)[1], run("eps")[1], rtol=0, atol=0)


def forms_uniform_draw(form, n: int, seed: int) -> torch.Tensor:
    """The window fraction ``phased_loss`` draws with the uniform sampler from ``seed``."""
    from rectdiff.training.time_samplers import time_sampler

    u = time_sampler("uniform", form).sample(n, torch.Generator().manual_seed(seed))
    return (u - form.t_min) / (form.t_max - form.t_min)


def test_rectify_phased_trains_a_first_order_student() -> None:
    """An MLP phased-rectified from a Gaussian teacher on data: its 4 DDIM steps land at
    less than half the teacher's own 4-step error from the exact ODE solution (the ideal
    phased student, PhasedOracle, lands within 1e-4; this MLP's error is its fit, largest at
    the window starts, where a continuous-time network must learn the jump between windows)."""
    form = forms.VP()
    teacher = GaussianOracle(form, "eps", mean=MEAN.float(), std=STD)
    data = (
        MEAN + STD * torch.randn(8192, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    ).float()
    torch.manual_seed(0)
    student = Preconditioned(MLP(dim=2, hidden=64, depth=2), form, sigma_data=STD)
    result = rectify_phased(teacher, data, form=form, prediction="eps", phases=4,
                            spacing="logsnr", student=student, steps=16, progress=False,
                            config=TrainConfig(steps=1500, batch_size=256, lr=2e-3))  # fmt: skip
    eps = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = samplers.sample(result.model, eps, form=form, prediction="eps", solver="ddim",
                               t_grid=result.edges)  # fmt: skip
        exact = teacher.solve(float(form.sigma(form.t_max)) * eps, form.t_max, form.t_min)
        one_step = samplers.sample(teacher, eps, form=form, prediction="eps", solver="ddim",
                                   steps=4, t_grid=result.edges)  # fmt: skip
        fine = window_grid(form, result.edges, 8)
        dev = {name: diagnostics.window_first_order_deviation(samplers.sample(
            model, eps, form=form, prediction="eps", solver="ddim", t_grid=fine,
            return_trajectory=True), result.edges) for name, model in
            (("student", result.model), ("teacher", teacher))}  # fmt: skip
    err = float((ours - exact).square().mean().sqrt())
    teacher_err = float((one_step - exact).square().mean().sqrt())
    print(
        f"\n4-step RMS error: phased student {err:.3g}, teacher's own 4 DDIM steps "
        f"{teacher_err:.3g}; window deviation {dev}"
    )
    assert err < 0.5 * teacher_err


def test_phased_rectification_does_not_depend_on_the_process_count(tmp_path) -> None:
    """Chunk c is made by process c mod 2 and gathered: the same couplings as one process;
    the phased student trained on them (each process computing its half of every batch)
    ends with the one-process weights."""
    worker = Path(__file__).with_name("_phased_worker.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(worker), str(one)], env=env, check=True, timeout=120)
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(worker),
           str(two)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(one), torch.load(two)
    assert (one["num_processes"], two["num_processes"]) == (1, 2) and len(one["x0"]) == 700
    for key in ("x0", "eps", "window_start", "window_end"):
        assert torch.equal(one[key], two[key]), key
    # the student trained on them: the same weights up to the order of float32 sums
    gap = max(float((one["student"][k] - two["student"][k]).abs().max()) for k in one["student"])
    assert gap < 1e-5, gap


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
