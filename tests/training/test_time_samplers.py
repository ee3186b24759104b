"""Time samplers and weightings against their papers' formulas, and implied weightings in
closed form (Kingma & Gao 2023) for flow matching, where every quantity is elementary."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from shared import F64, pick

from rectdiff import forms
from rectdiff import training as ts

FORMS = pick("vp", "subvp", "ve", "fm", "fm-shift3")
SAMPLERS = ["uniform", "logit_normal", "u_shaped", "uniform_logsnr"]


def t_grid(form, n=200_001):
    return torch.linspace(form.t_min, form.t_max, n, dtype=F64)


#: besides the named forms: flow matching on [0, 1] (the draw is torch.rand itself) and on
#: [0, 1/2] (t_min = 0: no add)
EDGE_FORMS = {"fm[0,1]": forms.FlowMatching(t_min=0.0, t_max=1.0),
              "fm[0,1/2]": forms.FlowMatching(t_min=0.0, t_max=0.5)}  # fmt: skip


@pytest.mark.parametrize("form_name", [*FORMS, *EDGE_FORMS])
def test_uniform_draw_is_icdf_of_rand_to_the_bit(form_name):
    """Uniform.sample (uniform_(0, w) then + t_min in place) returns the numbers of
    t_min + torch.rand(float64) * w, and leaves the generator where torch.rand does: every
    trained number stays what the earlier draw gave."""
    form = {**FORMS, **EDGE_FORMS}[form_name]
    sampler = ts.time_sampler("uniform", form)
    for seed in range(20):
        fast, plain = (torch.Generator().manual_seed(seed) for _ in range(2))
        for n in (1, 7, 256, 4099):
            want = sampler.icdf(torch.rand(n, generator=plain, dtype=F64))
            assert torch.equal(sampler.sample(n, fast), want)
        assert torch.equal(fast.get_state(), plain.get_state())


@pytest.mark.parametrize("form_name", FORMS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_density_normalised_and_matches_samples(form_name, name):
    form = FORMS[form_name]
    sampler = ts.time_sampler(name, form)
    grid = t_grid(form)
    density = sampler.density(grid)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=2e-6)
    t = sampler.sample(20_000, torch.Generator().manual_seed(0))
    assert t.dtype == F64 and t.shape == (20_000,)
    assert float(t.min()) >= form.t_min and float(t.max()) <= form.t_max
    # Kolmogorov-Smirnov distance between the samples and the CDF of the density
    cdf = torch.cumulative_trapezoid(density, grid)
    cdf = torch.cat([torch.zeros(1, dtype=F64), cdf])
    t_sorted = t.sort().values
    model_cdf = torch.from_numpy(np.interp(t_sorted.numpy(), grid.numpy(), cdf.numpy()))
    empirical = torch.arange(1, len(t) + 1, dtype=F64) / len(t)
    ks = float((model_cdf - empirical).abs().max())
    assert ks < 1.63 / math.sqrt(len(t))  # the 1% critical value


def test_logit_normal_is_sd3_eq19_truncated():
    form = forms.FlowMatching()
    sampler = ts.time_sampler("logit_normal", form, m=0.5, s=0.8)
    t = torch.tensor([0.01, 0.2, 0.5, 0.77, 0.99], dtype=F64)
    logit = torch.log(t / (1 - t)).numpy()
    sd3 = stats.norm.pdf(logit, loc=0.5, scale=0.8) / (t * (1 - t)).numpy()  # eq. 19
    mass = integrate.quad(
        lambda u: stats.norm.pdf(math.log(u / (1 - u)), 0.5, 0.8) / (u * (1 - u)),
        form.t_min, form.t_max,
    )[0]  # fmt: skip
    torch.testing.assert_close(sampler.density(t), torch.from_numpy(sd3 / mass), rtol=1e-9, atol=0)


def test_u_shaped_density_and_closed_form_inverse():
    form = forms.VP()
    sampler = ts.UShaped(form, a=4.0)
    mass = integrate.quad(lambda u: math.cosh(4 * (u - 0.5)), form.t_min, form.t_max)[0]
    t = torch.tensor([0.01, 0.3, 0.5, 0.9], dtype=F64)
    expected = torch.cosh(4 * (t - 0.5)) / mass
    torch.testing.assert_close(sampler.density(t), expected, rtol=1e-10, atol=0)
    for u in (0.05, 0.5, 0.93):
        t_u = float(sampler.icdf(torch.tensor([u], dtype=F64)))
        below = integrate.quad(lambda v: math.cosh(4 * (v - 0.5)), form.t_min, t_u)[0] / mass
        assert below == pytest.approx(u, abs=1e-10)


def test_discrete_sampler_hits_the_integer_timesteps():
    form = forms.load("sd15")
    sampler = ts.time_sampler("discrete", form)
    t = sampler.sample(50_000, torch.Generator().manual_seed(1))
    steps = form.model_time(t)
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-9)
    counts = torch.bincount(steps.round().long(), minlength=1000)
    assert counts.numel() == 1000 and int(counts.min()) > 10  # all 1000 timesteps are drawn
    assert float(steps.mean()) == pytest.approx(499.5, abs=5.0)  # uniform on 0..999
    with pytest.raises(ValueError, match="DiscreteVP"):
        ts.time_sampler("discrete", forms.VP())


def test_factory_errors_name_the_allowed_values():
    with pytest.raises(
        ValueError, match="uniform, logit_normal, u_shaped, uniform_logsnr, discrete"
    ):
        ts.time_sampler("lognormal", forms.VP())
    with pytest.raises(ValueError, match="'mu'.*allowed: m, s"):
        ts.time_sampler("logit_normal", forms.VP(), mu=0.0)
    with pytest.raises(ValueError, match="none, snr, min_snr"):
        ts.loss_weighting("p2")
    with pytest.raises(ValueError, match="another form"):
        ts.time_sampler(ts.Uniform(forms.VP()), forms.VE())


# --- weightings -------------------------------------------------------------------------------
def test_min_snr_matches_the_paper_per_prediction_in_vp():
    """Hang et al. 2023: eps weight min(SNR,g)/SNR, x0 weight min(SNR,g), v weight min(SNR,g)/(SNR+1)."""
    form, gamma = forms.VP(), 5.0
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    snr = torch.exp(form.logsnr(t))
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=F64))
    weighting = ts.loss_weighting("min_snr", gamma=gamma)
    expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}
    for prediction, value in expected.items():
        got = weighting(t, form=form, prediction=prediction)
        torch.testing.assert_close(got, value, rtol=1e-10, atol=0)
    snr_weight = ts.loss_weighting("snr")(t, form=form, prediction="eps")
    torch.testing.assert_close(snr_weight, snr, rtol=1e-12, atol=0)


# --- implied weighting --------------------------------------------------------------------------
def fm_closed_form(lam, prediction):
    """Flow matching alpha = 1 - t, sigma = t: t = sigmoid(-lam/2), |dt/dlam| = t(1-t)/2 and the
    prediction factors c^2 written out by hand (module docstring of rectdiff.training)."""
    t = torch.sigmoid(-lam / 2)
    alpha, sigma = 1 - t, t
    factor = {
        "eps": torch.ones_like(t),
        "x0": (sigma / alpha) ** 2,
        "v": ((alpha**2 + sigma**2) / alpha) ** 2,
        "flow": (1 / alpha) ** 2,  # sigma' - sigma alpha'/alpha = 1 + t/(1-t)
    }[prediction]
    return t, t * (1 - t) / 2 * factor


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_implied_weighting_flow_matching_closed_form(prediction):
    form = forms.FlowMatching()
    lo, hi = form.logsnr_range()
    lam = torch.linspace(lo + 1e-6, hi - 1e-6, 101, dtype=F64)
    t, jacobian_factor = fm_closed_form(lam, prediction)
    uniform_density = 1 / (form.t_max - form.t_min)
    got = ts.implied_weighting(form, prediction, "uniform", "none", lam)
    torch.testing.assert_close(got, uniform_density * jacobian_factor, rtol=1e-9, atol=0)
    if prediction == "flow":  # rectified flow = exp(-lam/2)/2 (Kingma & Gao 2023, Table 1)
        torch.testing.assert_close(
            got, uniform_density * torch.exp(-lam / 2) / 2, rtol=1e-9, atol=0
        )
    outside = ts.implied_weighting(form, prediction, "uniform", "none", torch.tensor([hi + 1.0]))
    assert float(outside) == 0.0


def test_implied_weighting_vp_eps_uniform_is_inverse_logsnr_speed():
    """VP (Song et al. eq. 33) by hand: lam(t) = 2 log a - log(1 - a^2), d lam/dt by central
    differences; uniform t with eps-prediction gives w = 1 / |d lam / dt| / (t_max - t_min)."""
    b0, b1 = 0.1, 20.0
    form = forms.VP(b0, b1)

    def lam_of(t):
        log_a = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
        return 2 * log_a - math.log(1 - math.exp(2 * log_a))

    for t in (0.01, 0.2, 0.5, 0.9):
        h = 1e-6
        speed = abs(lam_of(t + h) - lam_of(t - h)) / (2 * h)
        got = ts.implied_weighting(form, "eps", "uniform", "none", torch.tensor([lam_of(t)]))
        assert float(got) == pytest.approx(1 / speed / (1 - 1e-3), rel=1e-7)


def test_equalized_forms_have_equal_implied_weighting():
    """Issue 6's "equal in logsnr": VP/eps, FM/v, VE/x0, SubVP/flow and FM/flow made to share
    the implied weighting of flow matching with uniform t (the reference)."""
    fm = forms.FlowMatching()
    cells = [
        (forms.VP(), "eps"),
        (fm, "v"),
        (forms.VE(), "x0"),
        (forms.SubVP(), "flow"),
        (fm, "flow"),
    ]
    lo, hi = ts.common_logsnr_range(*(form for form, _ in cells))

    def reference(lam):
        return ts.implied_weighting(fm, "flow", "uniform", "none", lam)

    grid = torch.linspace(lo, hi, 1001, dtype=F64)
    curves = []
    for form, prediction in cells:
        sampler, weighting = ts.equalize(form, prediction, reference, logsnr_range=(lo, hi))
        curves.append(ts.implied_weighting(form, prediction, sampler, weighting, grid))
    for curve in curves[1:]:
        assert float(((curve - curves[0]).abs() / curves[0]).max()) < 1e-6
    # and the common curve is the reference itself (up to its piecewise-linear interpolation)
    assert float(((curves[0] - reference(grid)).abs() / reference(grid)).max()) < 1e-5
    # while plain uniform t differs between forms by orders of magnitude
    vp_uniform = ts.implied_weighting(forms.VP(), "eps", "uniform", "none", grid)
    assert float((vp_uniform / reference(grid)).max() / (vp_uniform / reference(grid)).min()) > 10


def test_equalized_sampler_draws_the_reference_logsnr_distribution():
    form = forms.VP()
    lo, hi = form.logsnr_range()

    def reference(lam):
        return torch.exp(-((lam - 1.0) ** 2) / 8)  # an unnormalised Gaussian in logsnr

    sampler, _ = ts.equalize(form, "eps", reference)
    lam = form.logsnr(sampler.sample(20_000, torch.Generator().manual_seed(3)))
    truncated = stats.truncnorm((lo - 1.0) / 2, (hi - 1.0) / 2, loc=1.0, scale=2.0)
    ks = stats.kstest(lam.numpy(), truncated.cdf).statistic
    assert ks < 1.63 / math.sqrt(20_000)
    with pytest.raises(ValueError, match="inside the range"):
        ts.equalize(form, "eps", reference, logsnr_range=(lo - 1, hi))
