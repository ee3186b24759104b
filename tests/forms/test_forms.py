"""Forms against values computed independently from the source papers' formulas and diffusers."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)
from shared import F64

from rectdiff import forms
from rectdiff.forms.io import ddpm_betas

SD15 = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)
T_GRID = [0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]


def all_forms():
    return {name: forms.load(name) for name in forms.presets()} | {
        "vp-custom-beta": forms.VP(beta_min=0.5, beta_max=10.0),
        "fm-shift3-smin": forms.FlowMatching(shift=3.0, sigma_min=1e-4),
        "ve-edm": forms.VE(sigma_min=0.002, sigma_max=80.0),
    }


# --- reference formulas, written from the papers, not from rectdiff -----------------------
def ref_vp(t, b0=0.1, b1=20.0):
    """Song et al. 2021, eq. 33: mean coefficient exp(-t^2 (b1-b0)/4 - t b0/2)."""
    log_mean = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    alpha = math.exp(log_mean)
    return alpha, math.sqrt(1 - math.exp(2 * log_mean))


def ref_subvp(t, b0=0.1, b1=20.0):
    """Song et al. 2021, eq. 34: std = 1 - exp(2 * log_mean)."""
    log_mean = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    return math.exp(log_mean), 1 - math.exp(2 * log_mean)


def ref_cosine(t, s=0.008):
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar = f(t)/f(0), f = cos^2(...)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = f(t) / f(0)
    return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)


def ref_ve(t, smin=0.01, smax=50.0):
    """Song et al. 2021, eq. 31: sigma(t) = sigma_min (sigma_max/sigma_min)^t."""
    return 1.0, smin * (smax / smin) ** t


def ref_lipman(t, smin):
    """Lipman et al. 2023, eq. 20 at their time 1 - t: mu = (1-t) x1, sigma = 1 - (1-smin)(1-t)."""
    tl = 1 - t
    return tl, 1 - (1 - smin) * tl


@pytest.mark.parametrize(
    "form, ref",
    [
        (forms.VP(), ref_vp),
        (forms.load("vp"), ref_vp),
        (forms.VP(0.5, 10.0), lambda t: ref_vp(t, 0.5, 10.0)),
        (forms.SubVP(), ref_subvp),
        (forms.VPCosine(), ref_cosine),
        (forms.VE(), ref_ve),
        (forms.FlowMatching(), lambda t: (1 - t, t)),
        (forms.FlowMatching(sigma_min=1e-4), lambda t: ref_lipman(t, 1e-4)),
        (forms.load("trig"), lambda t: (math.cos(math.pi * t / 2), math.sin(math.pi * t / 2))),
    ],
    ids=["vp", "vp-preset", "vp-betas", "subvp", "vp-cosine", "ve", "fm", "fm-lipman", "trig"],
)
def test_alpha_sigma_logsnr_match_papers(form, ref):
    t = torch.tensor(T_GRID, dtype=F64)
    expected = torch.tensor([ref(float(s)) for s in t], dtype=F64)
    torch.testing.assert_close(form.alpha(t), expected[:, 0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(form.sigma(t), expected[:, 1], rtol=1e-12, atol=1e-14)
    logsnr = torch.log(expected[:, 0] ** 2 / expected[:, 1] ** 2)
    torch.testing.assert_close(form.logsnr(t), logsnr, rtol=1e-10, atol=1e-10)


def test_vp_matches_dpm_solver_linear_marginal_lambda():
    # DPM-Solver's NoiseScheduleVP('linear'): lambda = log alpha - log sigma = logsnr / 2.
    form, t = forms.VP(), 0.37
    log_alpha = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    lam = log_alpha - 0.5 * math.log(1.0 - math.exp(2.0 * log_alpha))
    assert float(form.logsnr(t)) == pytest.approx(2 * lam, rel=1e-13)


@pytest.mark.parametrize("name", list(all_forms()))
def test_derivatives_are_analytic(name):
    form = all_forms()[name]
    t = torch.linspace(form.t_min + 0.01, form.t_max - 0.01, 37, dtype=F64)
    if isinstance(form, forms.DiscreteVP):  # piecewise linear: stay inside one segment
        n = form.num_train_timesteps
        t = (torch.floor(t * n) + 0.5) / n
    h = 1e-6
    for fn, d_fn in ((form.alpha, form.d_alpha), (form.sigma, form.d_sigma)):
        central = (fn(t + h) - fn(t - h)) / (2 * h)
        torch.testing.assert_close(d_fn(t), central, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(all_forms()))
def test_logsnr_round_trip_float64(name):
    form = all_forms()[name]
    t = torch.linspace(form.t_min, form.t_max, 1001, dtype=F64)
    lam = form.logsnr(t)
    assert bool((torch.diff(lam) < 0).all()), "logsnr must be strictly decreasing"
    torch.testing.assert_close(form.t_from_logsnr(lam), t, rtol=0, atol=1e-10)
    torch.testing.assert_close(form.logsnr(form.t_from_logsnr(lam)), lam, rtol=1e-10, atol=1e-9)


def test_dtype_follows_caller():
    form = forms.VP()
    assert form.alpha(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32
    assert form.alpha(0.5).dtype == F64
    # float32 t near FM's t = 1 is computed in float64 then rounded once
    t32 = torch.tensor([0.999], dtype=torch.float32)
    assert float(forms.FlowMatching().alpha(t32)) == pytest.approx(1 - float(t32), rel=1e-6)


# --- Stable Diffusion's discrete schedule against diffusers ------------------------------
def test_sd15_preset_matches_diffusers_table():
    form, ddpm = forms.load("sd15"), DDPMScheduler(**SD15)
    n = torch.arange(1000)
    t = form.t_from_model_time(n.to(F64))
    torch.testing.assert_close(t, (n + 1).to(F64) / 1000)
    acp = ddpm.alphas_cumprod.to(F64)  # diffusers builds the table in float32
    torch.testing.assert_close(form.alpha(t) ** 2, acp, rtol=2e-6, atol=0)
    torch.testing.assert_close(form.model_time(t), n.to(F64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, PNDMScheduler,
                                 DPMSolverMultistepScheduler, EulerDiscreteScheduler])  # fmt: skip
def test_from_diffusers_is_the_schedulers_own_table(cls, schedule):
    sched = cls(beta_schedule=schedule, prediction_type="v_prediction")
    form, prediction = forms.from_diffusers(sched)
    assert prediction == "v"
    t = form.t_from_model_time(torch.arange(1000, dtype=F64))
    torch.testing.assert_close(form.alpha(t) ** 2, sched.alphas_cumprod.to(F64), rtol=1e-13, atol=0)
    betas = ddpm_betas(schedule, sched.config.beta_start, sched.config.beta_end, 1000)
    torch.testing.assert_close(betas, sched.betas.to(F64), rtol=2e-6, atol=1e-9)


def test_from_diffusers_accepts_config_dict():
    form, prediction = forms.from_diffusers(dict(DDIMScheduler(**SD15).config))
    assert prediction == "eps"
    torch.testing.assert_close(form.alphas_cumprod, DDPMScheduler(**SD15).alphas_cumprod.to(F64))


def test_discrete_vp_interpolates_log_alpha_like_dpm_solver():
    form = forms.load("sd15")
    knots_t = np.arange(1, 1001) / 1000
    knots_log_alpha = 0.5 * np.log(form.alphas_cumprod.numpy())
    t = np.random.default_rng(0).uniform(1e-3, 1.0, 500)
    expected = np.interp(t, knots_t, knots_log_alpha)
    got = torch.log(form.alpha(torch.tensor(t))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_sd15_add_noise_and_velocity_match_diffusers():
    from rectdiff import predictions

    ddpm = DDPMScheduler(**SD15)
    form, _ = forms.from_diffusers(ddpm)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    steps = torch.tensor([0, 1, 10, 500, 998, 999])
    t = form.t_from_model_time(steps.to(F64))
    torch.testing.assert_close(form.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, steps),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    v = predictions.target(x0, eps, t, prediction="v", form=form)
    torch.testing.assert_close(v, ddpm.get_velocity(x0, eps, steps), rtol=1e-6, atol=1e-6)


def test_flow_match_scheduler_is_flow_matching_in_sigma_with_the_shift_in_its_grid():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    form, prediction = forms.from_diffusers(sched)
    # the network predicts eps - x0 = dx/dsigma at timestep = 1000 sigma: t = sigma, unshifted
    assert prediction == "flow" and form.shift == 1.0 and form.time_scale == 1000.0
    assert form.t_max == 1.0  # the stock sampler starts at sigma = 1
    # diffusers' training sigmas are shift s / (1 + (shift - 1) s), s = (N..1)/N; at t = sigma
    # the form has sigma(t) = t and sees timestep 1000 t
    s = torch.arange(1000, 0, -1, dtype=F64) / 1000
    sigmas = 3.0 * s / (1 + 2.0 * s)
    torch.testing.assert_close(sched.sigmas.to(F64), sigmas, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(form.sigma(sigmas), sigmas, rtol=0, atol=0)
    torch.testing.assert_close(
        form.model_time(sigmas), sched.timesteps.to(F64), rtol=1e-6, atol=1e-4
    )
    # and its flow is eps - x0: d_alpha = -1, d_sigma = 1 everywhere
    torch.testing.assert_close(form.d_sigma(sigmas), torch.ones_like(sigmas))
    torch.testing.assert_close(form.d_alpha(sigmas), -torch.ones_like(sigmas))
    assert forms.load("sd3") == form


def test_add_noise_formula_and_time_shapes():
    form = forms.VE()
    x0, eps = torch.ones(3, 2), torch.ones(3, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    expected = 1.0 + 0.01 * (5000.0**t)
    torch.testing.assert_close(form.add_noise(x0, eps, t), expected[:, None].expand(3, 2))
    torch.testing.assert_close(
        form.add_noise(x0, eps, 0.5), torch.full((3, 2), 1 + 0.01 * 5000**0.5)
    )
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(3,\)"):
        form.add_noise(x0, eps, torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        form.add_noise(x0, eps, torch.zeros(3, 1))


# --- presets, TOML, custom expressions, errors ------------------------------------------
def test_presets_exist_and_round_trip_through_config():
    names = forms.presets()
    for required in ("vp", "vp-cosine", "subvp", "ve", "fm", "sd15", "ddpm-linear"):
        assert required in names
    for name in names:
        form = forms.load(name)
        rebuilt = forms.from_config(form.config())
        t = torch.linspace(form.t_min, form.t_max, 11, dtype=F64)
        torch.testing.assert_close(rebuilt.sigma(t), form.sigma(t), rtol=1e-12, atol=0)


def test_user_toml_with_expressions(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('family = "custom"\nalpha = "exp(-t)"\nsigma = "sqrt(1 - exp(-2 * t))"\n')
    form = forms.load(path)
    t = torch.tensor([0.2, 0.6], dtype=F64)
    torch.testing.assert_close(form.alpha(t), torch.exp(-t))
    torch.testing.assert_close(form.d_alpha(t), -torch.exp(-t))
    torch.testing.assert_close(
        form.d_sigma(t), torch.exp(-2 * t) / torch.sqrt(1 - torch.exp(-2 * t))
    )


@pytest.mark.parametrize(
    "expr, token",
    [
        ("__import__('os').system('ls')", "__import__('os').system"),
        ("__import__('os')", "__import__"),
        ("t.real", "t.real"),
        ("exp(t) if t else 1", "exp(t) if t else 1"),
        ("abs(t)", "abs"),
        ("t // 2", "t // 2"),
        ("x + 1", "x"),
        ("'a'", "'a'"),
    ],
)
def test_expression_whitelist_names_the_offending_token(expr, token):
    with pytest.raises(ValueError, match="not allowed") as info:
        forms.Custom(alpha=expr, sigma="t")
    assert repr(token) in str(info.value)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: forms.VP(beta_min=20.0, beta_max=0.1), "beta_min < beta_max"),
        (lambda: forms.VE(sigma_min=0.0), "0 < sigma_min < sigma_max"),
        (lambda: forms.VE(sigma_min=60.0, sigma_max=50.0), "sigma_min=60.0"),
        (lambda: forms.FlowMatching(shift=0.0), "shift > 0"),
        (lambda: forms.Custom(alpha="t", sigma="1 - t"), "strictly decreasing"),
        (lambda: forms.Custom(alpha="1 - 2 * t", sigma="t"), "alpha"),
        (lambda: forms.load("nope"), "known presets: .*sd15"),
        (lambda: forms.from_config({"family": "vpp"}), "allowed: vp, vp-cosine"),
        (
            lambda: forms.from_config({"family": "vp", "beta_mni": 1.0}),
            "'beta_mni'.*allowed: beta_min",
        ),
        (
            lambda: forms.from_diffusers({"_class_name": "KarrasVeScheduler"}),
            "unsupported scheduler",
        ),
    ],
)
def test_bad_input_errors_name_the_value(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unknown_toml_key_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('family = "ve"\nsigma_min = 0.01\nsigma_maxx = 50.0\n')
    with pytest.raises(ValueError, match="'sigma_maxx'.*allowed: sigma_min, sigma_max"):
        forms.load(path)
