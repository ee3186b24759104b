"""Samplers against closed forms and diffusers: exact ODE endpoints, orders, first-order exactness."""

import collections
import functools
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from shared import F64, MEAN, STD, dispatched, pick

from rectdiff import forms, predictions, samplers
from rectdiff.oracles import CouplingOracle, GaussianOracle

FORMS = pick("vp", "subvp", "ve", "fm", "vp-cosine", "sd15")
ZERO_SIGMA_AT_0 = ["vp", "subvp", "fm", "vp-cosine", "sd15"]  # VE has sigma(0) = sigma_min
SD15 = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)


def noise(n=8, dim=2, seed=0, dtype=F64):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def posterior_mean(form, x, t):
    """E[x0 | x_t] of N(MEAN, STD^2 I) data, written out here independently of the oracle."""
    alpha, sigma = form.alpha(t), form.sigma(t)
    return MEAN + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x - alpha * MEAN)


def endpoint_error(form, prediction, solver, steps, grid, **tolerances):
    """Max error of ``solver`` from t_max to t_min against the exact probability-flow solution."""
    oracle = GaussianOracle(form, prediction, mean=MEAN, std=STD)
    eps = noise()
    exact = oracle.solve(form.sigma(form.t_max) * eps, form.t_max, form.t_min)
    out = samplers.sample(
        oracle, eps, form=form, prediction=prediction, solver=solver, steps=steps, t_grid=grid,
        t_end=form.t_min, **tolerances,
    )  # fmt: skip
    return float((out - exact).abs().max())


def measured_order(form, prediction, solver, steps, grid):
    """Least-squares slope of log(error) against log(1/steps) over steps n, 2n, 4n."""
    errors = [endpoint_error(form, prediction, solver, n, grid) for n in steps]
    return math.log2(errors[0] / errors[-1]) / 2, errors


# Each form is checked with eps and one of the other predictions (all four appear per solver).
FORM_PREDICTIONS = [
    (name, prediction)
    for i, name in enumerate(FORMS)
    for prediction in ("eps", ("x0", "v", "flow")[i % 3])
]
# (grid, steps, expected order band). Euler/Heun step in t, ddim/dpmpp_2m in logsnr.
ORDERS = {
    "euler": ("uniform", (32, 64, 128), (0.8, 1.2)),
    "heun": ("uniform", (32, 64, 128), (1.7, 2.4)),
    "ddim": ("logsnr", (32, 64, 128), (0.8, 1.2)),
    "dpmpp_2m": ("logsnr", (32, 64, 128), (1.7, 2.4)),
    "midpoint": ("uniform", (32, 64, 128), (1.7, 3.1)),  # 3.0 on flow matching's Gaussian
    "rk4": ("uniform", (8, 16, 32), (3.5, 5.0)),
}


@pytest.mark.parametrize("solver", list(ORDERS))
@pytest.mark.parametrize("name, prediction", FORM_PREDICTIONS)
def test_fixed_step_solvers_converge_at_their_order(solver, name, prediction):
    form = FORMS[name]
    grid, steps, (low, high) = ORDERS[solver]
    if solver == "rk4" and name == "sd15":
        pytest.skip("rk4 in t cannot exceed first order across DiscreteVP's 1000 kinks in dx/dt")
    if solver == "rk4" and name == "fm":
        # flow matching's Gaussian flow is so smooth that 32 steps hit the 1e-8 floor and the
        # error falls faster than fourth order (measured 6.2 over 4, 8, 16 steps)
        steps, high = (4, 8, 16), 6.5
    if solver in ("heun", "midpoint") and name == "sd15":
        # DiscreteVP's log(alpha) is piecewise linear in t (1000 knots), so dx/dt jumps by
        # ~0.2% at every knot and Heun in t is second order only while a step spans many
        # knots; its error levels off near 1e-5 from ~100 steps on.
        steps = (8, 16, 32)
    order, errors = measured_order(form, prediction, solver, steps, grid)
    assert low <= order <= high, (order, errors)


@pytest.mark.parametrize("name, prediction", FORM_PREDICTIONS)
def test_dopri5_reaches_the_exact_ode_endpoint(name, prediction):
    assert (
        endpoint_error(FORMS[name], prediction, "dopri5", 4, "uniform", rtol=1e-8, atol=1e-8)
        < 2e-7  # measured <= 1.9e-8
    )


@pytest.mark.parametrize(
    "solver, tol, bound",
    [("dopri8", 1e-8, 1e-7), ("bosh3", 1e-6, 1e-5), ("adaptive_heun", 1e-5, 1e-4)],
)
@pytest.mark.parametrize("name", ["vp", "sd15"])
def test_other_adaptive_methods_reach_the_endpoint(solver, tol, bound, name):
    form = FORMS[name]
    oracle = GaussianOracle(form, "v", mean=MEAN, std=STD)
    eps = noise()
    exact = oracle.solve(form.sigma(form.t_max) * eps, form.t_max, form.t_min)
    out = samplers.sample(
        oracle, eps, form=form, prediction="v", solver=solver, rtol=tol, atol=tol, t_end=form.t_min
    )
    assert float((out - exact).abs().max()) < bound


def test_adaptive_trajectory_is_the_ode_solution_on_the_grid_and_counts_its_nfe():
    form = FORMS["vp"]
    oracle = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    eps = noise()
    traj = samplers.sample(
        oracle, eps, form=form, prediction="eps", solver="dopri5", steps=6, t_grid="logsnr",
        t_end=form.t_min, rtol=1e-8, atol=1e-8, return_trajectory=True,
    )  # fmt: skip
    x_start = form.sigma(form.t_max) * eps
    for k, t in enumerate(traj.t):
        exact = oracle.solve(x_start, form.t_max, float(t))
        torch.testing.assert_close(traj.x[k], exact, rtol=0, atol=1e-6)
    for k in range(6):
        torch.testing.assert_close(traj.x0_pred[k], posterior_mean(form, traj.x[k], traj.t[k]))
    # the recording evaluations (one per grid point) are not part of the solve's nfe
    assert oracle.nfe == traj.nfe + 6
    oracle.nfe = 0
    samplers.sample(
        oracle, eps, form=form, prediction="eps", solver="dopri5", steps=6, t_grid="logsnr",
        t_end=form.t_min, rtol=1e-8, atol=1e-8,
    )  # fmt: skip
    assert oracle.nfe == traj.nfe


class TimeLog(GaussianOracle):
    """A Gaussian oracle that records every time it is evaluated at."""

    def forward(self, x_t, model_time, **cond):
        self.seen = getattr(self, "seen", []) + self.form.t_from_model_time(model_time).tolist()
        return super().forward(x_t, model_time, **cond)


@pytest.mark.parametrize("name", ["vp", "fm", "sd15"])
@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "heun"])
def test_model_is_only_evaluated_in_the_safe_range(name, solver):
    form = FORMS[name]
    oracle = TimeLog(form, "flow", mean=MEAN, std=STD)
    samplers.sample(oracle, noise(), form=form, prediction="flow", solver=solver, steps=12)
    seen = torch.tensor(oracle.seen, dtype=F64)
    assert float(seen.min()) >= form.t_min - 1e-12 and float(seen.max()) <= form.t_max + 1e-12


@pytest.mark.parametrize("name", ZERO_SIGMA_AT_0)
@pytest.mark.parametrize("solver", ["euler", "heun", "ddim", "dpmpp_2m"])
def test_last_step_to_sigma_zero_returns_the_x0_prediction(name, solver):
    form = FORMS[name]
    oracle = GaussianOracle(form, "v", mean=MEAN, std=STD)
    traj = samplers.sample(
        oracle, noise(), form=form, prediction="v", solver=solver, steps=8, return_trajectory=True
    )
    assert float(traj.t[-1]) == 0.0 and float(form.sigma(0.0)) == 0.0
    expected = posterior_mean(form, traj.x[-2], traj.t[-2])  # E[x0 | x_{t_{K-1}}]
    torch.testing.assert_close(traj.sample, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(traj.x0_pred[-1], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["vp", "sd15"])
def test_dopri5_to_t0_denoises_the_ode_state_at_t_min(name):
    form = FORMS[name]
    oracle = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    eps = noise()
    x_t_min = oracle.solve(form.sigma(form.t_max) * eps, form.t_max, form.t_min)
    out = samplers.sample(
        oracle, eps, form=form, prediction="eps", solver="dopri5", rtol=1e-8, atol=1e-8
    )
    torch.testing.assert_close(out, posterior_mean(form, x_t_min, form.t_min), rtol=0, atol=1e-6)


def test_ve_ends_at_sigma_min_with_the_ode_solution():
    form = FORMS["ve"]  # t = 0 has sigma = 0.01 > 0 and lies in the safe range: Heun all the way
    oracle = GaussianOracle(form, "x0", mean=MEAN, std=STD)
    eps = noise()
    exact = oracle.solve(form.sigma(1.0) * eps, 1.0, 0.0)
    traj = samplers.sample(
        oracle, eps, form=form, prediction="x0", solver="heun", steps=400, return_trajectory=True
    )
    assert traj.nfe == oracle.nfe == 800
    torch.testing.assert_close(traj.sample, exact, rtol=0, atol=1e-3)


@pytest.mark.parametrize("name", list(FORMS))
@pytest.mark.parametrize("prediction", predictions.PREDICTIONS)
def test_one_ddim_step_is_exact_for_a_first_order_model(name, prediction):
    form = FORMS[name]
    scale, shift = torch.tensor([0.5, 1.5], dtype=F64), torch.tensor([0.3, -0.2], dtype=F64)
    oracle = CouplingOracle(form, prediction, scale=scale, shift=shift)
    eps = noise()
    x0 = oracle.coupled_x0(eps)
    # the sampler starts from sigma(t_max) eps_start; put that start on the coupling's path
    # x_t = alpha_t x0 + sigma_t eps (alpha(t_max) > 0 in every form, = 1 in VE)
    eps_start = form.add_noise(x0, eps, form.t_max) / form.sigma(form.t_max)
    traj = samplers.sample(
        oracle, eps_start, form=form, prediction=prediction, steps=1, return_trajectory=True
    )
    torch.testing.assert_close(traj.x0_pred[0], x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(traj.sample, form.add_noise(x0, eps, 0.0), rtol=0, atol=1e-10)
    if name in ZERO_SIGMA_AT_0:
        torch.testing.assert_close(traj.sample, x0, rtol=0, atol=1e-10)
    # and every intermediate DDIM state lies on the straight-in-(x/alpha, sigma/alpha) path
    traj = samplers.sample(
        oracle, eps_start, form=form, prediction=prediction, steps=7, t_grid="karras",
        return_trajectory=True,
    )  # fmt: skip
    for k, t in enumerate(traj.t):
        torch.testing.assert_close(traj.x[k], form.add_noise(x0, eps, t), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(FORMS))
def test_every_prediction_type_gives_the_same_samples(name):
    form, eps = FORMS[name], noise()
    for solver in ("heun", "dpmpp_2m"):
        outs = [
            samplers.sample(
                GaussianOracle(form, p, mean=MEAN, std=STD),
                eps,
                form=form,
                prediction=p,
                solver=solver,
                steps=10,
            )  # fmt: skip
            for p in predictions.PREDICTIONS
        ]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("shift, t_end", [(1.0, 0.0), (3.0, 0.05)])
def test_euler_on_flow_matching_is_the_rectified_flow_loop(shift, t_end):
    """x <- x + (t_{k+1} - t_k) v(x, t_k), written by hand, with a nonlinear network. (With
    shift 1 the last Euler step to t = 0 is the x0-prediction; with a shift it is not, and
    rectdiff's last step to sigma = 0 returns the x0-prediction, so that case ends earlier.)"""
    form = forms.FlowMatching(shift=shift)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    net = net.to(F64)

    def model(x, model_time):
        return net(torch.cat([x, model_time[:, None]], dim=1))

    eps = noise()
    out = samplers.sample(
        model, eps, form=form, prediction="flow", solver="euler", steps=20, t_end=t_end
    )
    t = torch.linspace(form.t_max, t_end, 21, dtype=F64)
    x = form.sigma(form.t_max) * eps
    with torch.no_grad():
        for k in range(20):
            x = x + (t[k + 1] - t[k]) * model(x, form.model_time(t[k]).expand(8))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)


def test_trajectory_record_and_nfe():
    form = FORMS["vp"]
    eps = noise()
    for solver, nfe in [("euler", 9), ("ddim", 9), ("dpmpp_2m", 9), ("heun", 17)]:
        oracle = GaussianOracle(form, "eps", mean=MEAN, std=STD)
        traj = samplers.sample(
            oracle, eps, form=form, prediction="eps", solver=solver, steps=9, t_grid="karras",
            return_trajectory=True,
        )  # fmt: skip
        assert traj.nfe == oracle.nfe == nfe  # Heun's last step to sigma = 0 is first order
        assert traj.x.shape == (10, 8, 2) and traj.x0_pred.shape == traj.eps_pred.shape == (9, 8, 2)
        assert traj.t.dtype == F64 and float(traj.t[0]) == form.t_max and float(traj.t[-1]) == 0.0
        torch.testing.assert_close(traj.t, samplers.time_grid(form, 9, "karras"), rtol=0, atol=0)
        torch.testing.assert_close(traj.x[0], form.sigma(form.t_max) * eps, rtol=0, atol=0)
        for k in range(9):
            x0 = posterior_mean(form, traj.x[k], traj.t[k])
            torch.testing.assert_close(traj.x0_pred[k], x0, rtol=0, atol=1e-10)
            x_k = form.add_noise(traj.x0_pred[k], traj.eps_pred[k], traj.t[k])
            torch.testing.assert_close(x_k, traj.x[k], rtol=0, atol=1e-10)
        plain = samplers.sample(
            oracle, eps, form=form, prediction="eps", solver=solver, steps=9, t_grid="karras"
        )
        torch.testing.assert_close(plain, traj.sample, rtol=0, atol=0)
        assert (traj.form, traj.prediction, traj.solver) == (form, "eps", solver)


@pytest.mark.parametrize(
    ("name", "prediction", "solver", "per_step"),
    [("fm", "flow", "euler", {"aten.add.Tensor": 1}),  # x + h out
     ("vp", "v", "euler", {"aten.add.Tensor": 1}),  # a = 1 + h d(alpha^2 + sigma^2)/2 = 1
     ("vp", "eps", "ddim", {"aten.mul.Tensor": 1, "aten.add.Tensor": 1})],  # a x + b out
)  # fmt: skip
def test_a_sampling_step_dispatches_only_its_update(name, prediction, solver, per_step):
    """Besides the model, a fixed-step sampler's step is its update ``a x + b out`` and nothing
    else: coefficients, model times and their (B,) inputs are made for the whole grid at the
    start of the call (a constant number of operations), none per step. Counted over 10 and
    20 steps of a model that dispatches nothing."""
    form, eps = FORMS[name], noise()
    run = functools.partial(samplers.sample, lambda x, t: x, eps, form=form,
                            prediction=prediction, solver=solver)  # fmt: skip
    counts = {steps: dispatched(functools.partial(run, steps=steps)) for steps in (10, 20)}
    assert counts[20] - counts[10] == collections.Counter(
        {op: 10 * n for op, n in per_step.items()}
    )


def test_progress_bar_counts_every_evaluation_and_changes_nothing(capsys):
    """progress=True draws a tqdm bar (on stderr) that counts each model evaluation: Heun's 9
    steps to sigma = 0 make 17; without it no bar is built at all, and the samples are the same."""
    form = FORMS["vp"]
    eps = noise()
    kwargs = dict(form=form, prediction="eps", solver="heun", steps=9, t_grid="karras")
    with_bar = samplers.sample(GaussianOracle(form, "eps", mean=MEAN, std=STD), eps,
                               progress=True, **kwargs)  # fmt: skip
    assert "heun: 17eval [" in capsys.readouterr().err
    without = samplers.sample(GaussianOracle(form, "eps", mean=MEAN, std=STD), eps, **kwargs)
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(with_bar, without, rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dopri5"])
def test_float32_noise_gives_float32_samples_close_to_float64(solver):
    form = FORMS["fm"]
    oracle = GaussianOracle(form, "flow", mean=MEAN, std=STD)
    eps = noise()
    out64 = samplers.sample(oracle, eps, form=form, prediction="flow", solver=solver, steps=10)
    out32 = samplers.sample(
        oracle, eps.float(), form=form, prediction="flow", solver=solver, steps=10
    )
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-5)


# --- time grids -----------------------------------------------------------------------------


def test_uniform_grid_is_linspace():
    grid = samplers.time_grid(FORMS["fm"], 7, "uniform", t_end=0.2)
    torch.testing.assert_close(grid, torch.linspace(0.999, 0.2, 8, dtype=F64), rtol=0, atol=0)


def test_logsnr_grid_is_uniform_in_logsnr_then_steps_to_sigma_zero():
    form = FORMS["vp"]
    grid = samplers.time_grid(form, 9, "logsnr")
    assert float(grid[-2]) == form.t_min and float(grid[-1]) == 0.0 and len(grid) == 10
    lam = form.logsnr(grid[:-1])
    expected = torch.linspace(float(form.logsnr(1.0)), float(form.logsnr(form.t_min)), 9, dtype=F64)
    torch.testing.assert_close(lam, expected, rtol=0, atol=1e-9)
    ve = FORMS["ve"]  # finite logsnr at t = 0: the spacing runs to t_end itself
    torch.testing.assert_close(
        samplers.time_grid(ve, 5, "logsnr"),
        torch.linspace(1.0, 0.0, 6, dtype=F64),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_karras_grid_is_edm_rho7_in_sigma_over_alpha(name):
    form, steps, rho = FORMS[name], 8, 7.0
    grid = samplers.time_grid(form, steps, "karras")
    s_max = float(form.sigma(1.0) / form.alpha(1.0))
    last = 0.0 if name == "ve" else form.t_min
    s_min = float(form.sigma(last) / form.alpha(last))
    n = steps if name == "ve" else steps - 1  # EDM: N points, then sigma = 0 appended
    i = torch.arange(n + 1, dtype=F64)
    edm = (s_max ** (1 / rho) + i / n * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho  # eq. 5
    model_points = grid if name == "ve" else grid[:-1]
    torch.testing.assert_close(
        form.sigma(model_points) / form.alpha(model_points), edm, rtol=1e-10, atol=0
    )
    if name == "vp":
        assert float(grid[-1]) == 0.0


# --- diffusers agreement --------------------------------------------------------------------


class TinyUNet(torch.nn.Module):
    """A fixed nonlinear eps-model of (latents, timestep): the exact eps of N(0, I) data plus
    a seeded channel-mixing MLP with a sinusoidal timestep input, so the samples stay O(1)."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("sigma_table", (1 - torch.as_tensor(alphas_cumprod, dtype=F64)).sqrt())
        self.w_in = torch.nn.Parameter(torch.randn(4, 16, generator=g, dtype=F64) * 0.5)
        self.w_out = torch.nn.Parameter(torch.randn(16, 4, generator=g, dtype=F64) * 0.5)
        self.freq = torch.nn.Parameter(torch.randn(16, generator=g, dtype=F64))

    def forward(self, x, timestep):
        timestep = torch.as_tensor(timestep, dtype=F64).reshape(-1).expand(x.shape[0])
        sigma = self.sigma_table[timestep.round().long()].reshape(-1, 1, 1, 1).to(x.dtype)
        phase = torch.sin(self.freq * 3e-3 * timestep[:, None]).to(x.dtype)[:, :, None, None]
        h = torch.einsum("bchw,cd->bdhw", x, self.w_in.to(x.dtype)) + phase
        return sigma * x + 0.1 * torch.einsum(
            "bdhw,dc->bchw", torch.tanh(h), self.w_out.to(x.dtype)
        )


def run_diffusers(scheduler, model, latents, steps):
    scheduler.set_timesteps(steps)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at eps
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            x = scheduler.step(model(x, timestep), timestep, x).prev_sample
    return x


def run_rectdiff(scheduler, model, latents, solver, t_final):
    """The same loop through rectdiff: the scheduler's timesteps as an explicit grid ending at
    ``t_final``, and eps chosen so that ``x = sigma(t_start) eps`` is diffusers' start."""
    form, prediction = forms.from_diffusers(scheduler)
    grid = [float(form.t_from_model_time(float(k))) for k in scheduler.timesteps] + [t_final]
    eps = latents / form.sigma(torch.tensor(grid[0], dtype=latents.dtype))
    return samplers.sample(model, eps, form=form, prediction=prediction, solver=solver, t_grid=grid)


class VelocityModel(torch.nn.Module):
    """A fixed nonlinear SD3-style network: ``eps - x0`` of N(0, 0.25 I) data at sigma =
    timestep / 1000, plus a seeded tanh term, so a wrong time or target map shows."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=g, dtype=F64) * 0.3)

    def forward(self, x, timestep):
        sigma = (torch.as_tensor(timestep, dtype=F64).reshape(-1) / 1000).reshape(-1, 1, 1, 1)
        var = 0.25 * (1 - sigma) ** 2 + sigma**2
        x0 = 0.25 * (1 - sigma) / var * x  # E[x0 | x] for N(0, 0.25) data
        eps = sigma / var * x
        mix = torch.tanh(torch.einsum("bchw,cd->bdhw", x, self.w.to(x.dtype)))
        return (eps - x0).to(x.dtype) + 0.05 * sigma.to(x.dtype) * mix


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 28])
def test_euler_reproduces_diffusers_flow_match_euler_with_shift(shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    model = VelocityModel()
    latents = noise(2 * 4 * 4 * 4, 1, seed=2).reshape(2, 4, 4, 4)
    expected = run_diffusers(scheduler, model, latents, steps)
    form, prediction = forms.from_diffusers(scheduler)
    grid = samplers.scheduler_grid(scheduler, form, steps)
    assert float(grid[0]) == 1.0  # x_start = sigma(1) eps = eps, as diffusers starts
    out = samplers.sample(
        model, latents, form=form, prediction=prediction, solver="euler", t_grid=grid
    )
    # float64 states; diffusers' sigmas are float32: measured <= 3.3e-7
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddim_reproduces_diffusers_ddim_scheduler_sd15(steps, dtype):
    scheduler = DDIMScheduler(**SD15, set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    model = TinyUNet(scheduler.alphas_cumprod)
    latents = noise(2 * 4 * 8 * 8, 1, seed=1, dtype=dtype).reshape(2, 4, 8, 8)
    expected = run_diffusers(scheduler, model, latents, steps)
    # set_alpha_to_one=False: the last step goes to alphas_cumprod[0], i.e. timestep 0 at
    # t = 1/N = form.t_min of the DiscreteVP
    out = run_rectdiff(scheduler, model, latents, "ddim", t_final=1.0 / 1000)
    assert float(scheduler.timesteps[-1]) == 1.0  # steps_offset=1 ("leading" spacing)
    assert out.dtype == dtype
    # measured <= 2.4e-6 in float32 and <= 2.6e-7 in float64 (diffusers' float32 table)
    atol = 1e-5 if dtype == torch.float32 else 2e-6
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "steps, final_sigmas_type, t_final",
    [
        # final_sigmas_type="zero": diffusers' last step goes to sigma = 0 and is first order
        # (lower_order_final), as rectdiff's last step to t = 0
        (10, "zero", 0.0),
        (25, "zero", 0.0),
        # "sigma_min": the last step goes to alphas_cumprod[0] (t = 1/N); with >= 15 steps
        # diffusers keeps it second order, as rectdiff does for a last step with sigma > 0
        (25, "sigma_min", 1.0 / 1000),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpmpp_2m_reproduces_diffusers_dpm_solver_multistep(
    steps, final_sigmas_type, t_final, dtype
):
    scheduler = DPMSolverMultistepScheduler(
        **SD15, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
        final_sigmas_type=final_sigmas_type,
    )  # fmt: skip
    model = TinyUNet(scheduler.alphas_cumprod)
    latents = noise(2 * 4 * 8 * 8, 1, seed=2, dtype=dtype).reshape(2, 4, 8, 8)
    expected = run_diffusers(scheduler, model, latents, steps)
    out = run_rectdiff(scheduler, model, latents, "dpmpp_2m", t_final=t_final)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)  # measured <= 2.1e-6


# --- classifier-free guidance ---------------------------------------------------------------


class ConditionalGaussian(torch.nn.Module):
    """The exact denoiser of N(mean, STD^2 I) with the data mean a keyword argument (B, 2)."""

    def __init__(self, form, prediction):
        super().__init__()
        self.form, self.prediction, self.batches = form, prediction, []

    def forward(self, x, model_time, mean=None):
        self.batches.append(x.shape[0])
        mean = torch.zeros_like(x) if mean is None else mean
        t = self.form.t_from_model_time(model_time)
        alpha, sigma = self.form.alpha(t)[:, None], self.form.sigma(t)[:, None]
        x0 = mean + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x - alpha * mean)
        eps = (x - alpha * x0) / sigma
        return predictions.from_x0_eps(x0, eps, self.prediction, t, self.form)


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_guidance_on_gaussians_is_the_gaussian_of_the_extrapolated_mean(prediction):
    """uncond + w (cond - uncond) is affine in the data mean, so guiding N(m_c) against N(m_u)
    is exactly the oracle of N(m_u + w (m_c - m_u))."""
    form, w, eps = FORMS["vp"], 2.5, noise()
    m_cond, m_uncond = torch.tensor([0.4, -0.1], dtype=F64), torch.tensor([-0.2, 0.3], dtype=F64)
    model = ConditionalGaussian(form, prediction)
    cond, uncond = {"mean": m_cond.expand(8, 2)}, {"mean": m_uncond.expand(8, 2)}
    m_guided = m_uncond + w * (m_cond - m_uncond)
    oracle = GaussianOracle(form, prediction, mean=m_guided, std=STD)
    kwargs = dict(form=form, prediction=prediction, t_end=form.t_min, return_trajectory=True)
    traj = samplers.sample(
        model, eps, solver="heun", steps=12, cond=cond, guidance=w, uncond=uncond, **kwargs
    )
    reference = samplers.sample(oracle, eps, solver="heun", steps=12, **kwargs)
    torch.testing.assert_close(traj.x, reference.x, rtol=0, atol=1e-10)
    assert traj.nfe == 2 * reference.nfe == 48
    assert model.batches == [16] * 24  # cond and uncond in one forward pass of 2B
    exact = oracle.solve(form.sigma(form.t_max) * eps, form.t_max, form.t_min)
    guided = samplers.sample(
        model, eps, form=form, prediction=prediction, solver="dopri5", rtol=1e-8, atol=1e-8,
        t_end=form.t_min, cond=cond, guidance=w, uncond=uncond,
    )  # fmt: skip
    torch.testing.assert_close(guided, exact, rtol=0, atol=1e-6)


def test_guidance_without_batchable_kwargs_calls_twice_and_agrees():
    form, eps = FORMS["fm"], noise()
    m_cond = torch.tensor([0.4, -0.1], dtype=F64).expand(8, 2)
    model = ConditionalGaussian(form, "flow")
    kwargs = dict(
        form=form, prediction="flow", solver="ddim", steps=5, cond={"mean": m_cond}, guidance=3.0
    )
    batched = samplers.sample(model, eps, uncond={"mean": torch.zeros(8, 2, dtype=F64)}, **kwargs)
    model.batches.clear()
    split = samplers.sample(model, eps, uncond={}, **kwargs)  # mean=None: two calls of B
    assert model.batches == [8] * 10
    torch.testing.assert_close(split, batched, rtol=0, atol=1e-12)
    oracle = GaussianOracle(form, "flow", mean=3.0 * m_cond[0], std=STD)
    expected = samplers.sample(oracle, eps, form=form, prediction="flow", solver="ddim", steps=5)
    torch.testing.assert_close(split, expected, rtol=0, atol=1e-12)


# --- bad input ------------------------------------------------------------------------------

ORACLE = GaussianOracle(FORMS["vp"], "eps", mean=MEAN, std=STD)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(solver="rk45"),
            r"unknown solver 'rk45'; allowed: euler, heun, ddim, dpmpp_2m, dopri5",
        ),
        (dict(steps=0), r"steps must be an integer >= 1, got steps=0"),
        (dict(steps=2.5), r"steps must be an integer >= 1, got steps=2.5"),
        (dict(t_grid="cosine"), r"unknown t_grid 'cosine'; allowed: uniform, logsnr, karras"),
        (dict(t_grid=[1.0, 0.5, 0.5, 0.0]), r"strictly decreasing.*t\[1\] = 0.5 <= t\[2\] = 0.5"),
        (dict(t_grid=[0.2, 0.5]), r"strictly decreasing"),
        (dict(t_grid=[1.5, 0.5]), r"must lie in \[0, 1\]"),
        (dict(t_grid=[0.5]), r"at least 2 finite times"),
        (dict(t_grid=[1.0, 0.0], t_end=0.1), r"explicit t_grid fixes its own start and end"),
        (dict(t_start=0.2, t_end=0.5), r"need 0 <= t_end < t_start <= 1"),
        (dict(guidance=2.0), r"guidance=2.0 needs cond="),
        (dict(prediction="score"), r"unknown prediction type 'score'"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    kwargs = {"form": FORMS["vp"], "prediction": "eps", **kwargs}
    with pytest.raises(ValueError, match=match):
        samplers.sample(ORACLE, noise(), **kwargs)


# --- a start where the conversion divides by zero --------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "ddim", "dopri5"])
def test_eps_prediction_from_alpha_zero_is_refused_naming_t_max(solver):
    form = forms.FlowMatching(t_max=1.0)  # alpha(1) = 0: x0 = (x - sigma eps) / alpha is 0/0
    eps = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"t_max=1.0: alpha\(1.0\) = 0.*t_max < 1.0.*'flow'"):
        samplers.sample(lambda x, t: torch.zeros_like(x), eps, form=form, prediction="eps",
                        solver=solver, steps=4)  # fmt: skip
    # what does work from alpha = 0: a flow (SD3), v or x0 model, or an eps model started later
    for prediction in ("flow", "v", "x0"):
        out = samplers.sample(lambda x, t: torch.zeros_like(x), eps, form=form,
                              prediction=prediction, solver=solver, steps=4)  # fmt: skip
        assert torch.isfinite(out).all()
    out = samplers.sample(lambda x, t: torch.zeros_like(x), eps, form=form, prediction="eps",
                          solver=solver, steps=4, t_start=0.999)  # fmt: skip
    assert torch.isfinite(out).all()
