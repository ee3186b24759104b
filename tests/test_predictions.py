"""Conversions between eps, x0, v, flow and score: round trips, closed forms, endpoints, errors."""

import itertools

import pytest
import torch
from shared import F64, pick

from rectdiff import forms, predictions

FORMS = pick("vp", "subvp", "vp-cosine", "ve", "fm", "fm-shift", "sd15", "trig")
KINDS = predictions.PREDICTIONS + predictions.DERIVED


def batch(form, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, generator=g, dtype=F64)
    eps = torch.randn(n, 3, generator=g, dtype=F64)
    # include both ends of the safe range, where alpha or sigma is smallest
    t = torch.rand(n, generator=g, dtype=F64) * (form.t_max - form.t_min) + form.t_min
    t[0], t[1] = form.t_min, form.t_max
    return x0, eps, t, form.add_noise(x0, eps, t)


@pytest.mark.parametrize("name", list(FORMS))
@pytest.mark.parametrize("src, dst", list(itertools.permutations(KINDS, 2)))
def test_round_trip_every_pair_at_1e10(name, src, dst):
    form = FORMS[name]
    x0, eps, t, x_t = batch(form)
    out = predictions.from_x0_eps(x0, eps, src, t, form)
    there = predictions.convert(out, src, dst, x_t=x_t, t=t, form=form)
    back = predictions.convert(there, dst, src, x_t=x_t, t=t, form=form)
    assert torch.isfinite(there).all()
    torch.testing.assert_close(back, out, rtol=1e-10, atol=1e-10)
    # and the converted quantity is the right one, from the true (x0, eps)
    expected = predictions.from_x0_eps(x0, eps, dst, t, form)
    scale = 1.0 + expected.abs()  # score is ~1/sigma large near t = 0
    assert ((there - expected).abs() / scale).max() < 1e-9


@pytest.mark.parametrize("name", list(FORMS))
def test_targets_have_their_closed_forms(name):
    form = FORMS[name]
    x0, eps, t, _ = batch(form)
    a, s = form.alpha(t)[:, None], form.sigma(t)[:, None]
    da, ds = form.d_alpha(t)[:, None], form.d_sigma(t)[:, None]
    target = lambda p: predictions.target(x0, eps, t, prediction=p, form=form)  # noqa: E731
    torch.testing.assert_close(target("eps"), eps)
    torch.testing.assert_close(target("x0"), x0)
    torch.testing.assert_close(target("v"), a * eps - s * x0)  # Salimans & Ho 2022
    torch.testing.assert_close(target("flow"), da * x0 + ds * eps)


def test_flow_target_of_rectified_flow_is_eps_minus_x0():
    form = forms.FlowMatching()
    x0, eps, t, _ = batch(form)
    torch.testing.assert_close(
        predictions.target(x0, eps, t, prediction="flow", form=form), eps - x0
    )


def test_flow_is_the_time_derivative_of_x_t():
    # u = d x_t / dt along a fixed (x0, eps): check against a central difference
    form = forms.VP()
    x0, eps, _, _ = batch(form, n=8)
    t = torch.full((8,), 0.4, dtype=F64)
    h = 1e-6
    central = (form.add_noise(x0, eps, t + h) - form.add_noise(x0, eps, t - h)) / (2 * h)
    flow = predictions.target(x0, eps, t, prediction="flow", form=form)
    torch.testing.assert_close(flow, central, rtol=1e-7, atol=1e-7)


def test_v_conversion_keeps_alpha2_plus_sigma2_for_non_vp():
    # VE: alpha = 1, alpha^2 + sigma^2 = 1 + sigma^2 != 1
    form = forms.VE()
    x0, eps, t, x_t = batch(form)
    v = predictions.target(x0, eps, t, prediction="v", form=form)
    x0_hat = predictions.convert(v, "v", "x0", x_t=x_t, t=t, form=form)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-10, atol=1e-10)


def test_score_is_minus_eps_over_sigma():
    form = forms.SubVP()
    x0, eps, t, x_t = batch(form)
    score = predictions.convert(eps, "eps", "score", x_t=x_t, t=t, form=form)
    torch.testing.assert_close(score, -eps / form.sigma(t)[:, None])


def test_outside_safe_range_is_an_error_naming_it():
    form = forms.FlowMatching()
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"\[t_min, t_max\] = \[0.001, 0.999\]"):
        predictions.convert(x, "eps", "x0", x_t=x, t=torch.tensor([0.5, 1.0], dtype=F64), form=form)
    # float32 rounding of the range ends is not an error
    t32 = torch.tensor([form.t_min, form.t_max], dtype=torch.float32)
    out = predictions.convert(x.float(), "eps", "x0", x_t=x.float(), t=t32, form=form)
    assert torch.isfinite(out).all() and out.dtype == torch.float32


def test_unknown_prediction_lists_the_known_ones():
    form, x = forms.VP(), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="'epsilon'.*allowed: eps, x0, v, flow"):
        predictions.convert(x, "epsilon", "x0", x_t=x, t=0.5, form=form)
    with pytest.raises(ValueError, match="allowed: eps, x0, v, flow"):
        predictions.target(x, x, 0.5, prediction="score", form=form)
