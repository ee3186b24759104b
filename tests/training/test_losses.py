"""The diffusion loss against hand computations, and the implied-weighting identity
E_t[loss] = int w(lambda) E||eps_hat - eps||^2 dlambda (Kingma & Gao 2023) checked per t
exactly, by quadrature and by Monte Carlo."""

import math

import pytest
import torch
from shared import F64, pick
from torch import nn

from rectdiff import forms, predictions
from rectdiff import training as ts
from rectdiff.oracles import GaussianOracle
from rectdiff.training.losses import diffusion_loss


class Affine(nn.Module):
    """A fixed imperfect model: out = W x + b * time (float64)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.tensor([[0.7, -0.2], [0.1, 1.3]], dtype=F64)
        self.bias = torch.tensor([0.3, -0.5], dtype=F64)

    def forward(self, x, model_time):
        return x @ self.weight.T + model_time[:, None] * self.bias


def batch(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=gen, dtype=F64) * 1.5 + 0.5
    eps = torch.randn(n, 2, generator=gen, dtype=F64)
    t = torch.rand(n, generator=gen, dtype=F64) * 0.9 + 0.05
    return x0, eps, t


def test_mse_equals_hand_computation_flow_matching_and_vp():
    model = Affine()
    x0, eps, t = batch()
    # flow matching, flow prediction: x_t = (1-t) x0 + t eps, target eps - x0 (Liu et al. 2023)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    by_hand = ((model(x_t, t) - (eps - x0)) ** 2).mean(1)
    mean, per_sample = diffusion_loss(
        model, x0, form=forms.FlowMatching(), prediction="flow", eps=eps, t=t
    )
    torch.testing.assert_close(per_sample, by_hand, rtol=1e-12, atol=0)
    assert float(mean) == pytest.approx(float(by_hand.mean()), rel=1e-12)
    # VP (Song et al. eq. 33), v-prediction v = alpha eps - sigma x0 (Salimans & Ho 2022)
    log_a = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    alpha, sigma = torch.exp(log_a)[:, None], torch.sqrt(1 - torch.exp(2 * log_a))[:, None]
    x_t = alpha * x0 + sigma * eps
    by_hand = ((model(x_t, t) - (alpha * eps - sigma * x0)) ** 2).mean(1)
    _, per_sample = diffusion_loss(model, x0, form=forms.VP(), prediction="v", eps=eps, t=t)
    torch.testing.assert_close(per_sample, by_hand, rtol=1e-10, atol=0)
    # with SNR weighting: times alpha^2 / sigma^2
    _, weighted = diffusion_loss(
        model, x0, form=forms.VP(), prediction="v", eps=eps, t=t, weighting="snr"
    )
    torch.testing.assert_close(weighted, by_hand * (alpha / sigma)[:, 0] ** 2, rtol=1e-10, atol=0)


def test_pseudo_huber_equals_song_dhariwal_2023():
    """d = sqrt(||out - target||^2 + c^2) - c, c = 0.00054 sqrt(dim) (iCT, sec. 3.3)."""
    model = Affine()
    x0, eps, t = batch()
    form = forms.VE()
    sigma = (0.01 * (50.0 / 0.01) ** t)[:, None]  # Song et al. eq. 31
    x_t = x0 + sigma * eps
    sq = ((model(x_t, t) - eps) ** 2).sum(1)
    c = 0.00054 * math.sqrt(2)
    _, per_sample = diffusion_loss(
        model, x0, form=form, prediction="eps", eps=eps, t=t, loss="pseudo_huber"
    )
    torch.testing.assert_close(per_sample, torch.sqrt(sq + c**2) - c, rtol=1e-12, atol=0)
    _, custom = diffusion_loss(
        model, x0, form=form, prediction="eps", eps=eps, t=t, loss="pseudo_huber", huber_c=0.5
    )
    torch.testing.assert_close(custom, torch.sqrt(sq + 0.25) - 0.5, rtol=1e-12, atol=0)


def test_random_draws_follow_the_generator():
    model, form = Affine(), forms.VP()
    x0, _, _ = batch(64)
    first = diffusion_loss(
        model, x0, form=form, prediction="eps", generator=torch.Generator().manual_seed(5)
    )
    second = diffusion_loss(
        model, x0, form=form, prediction="eps", generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(first[1], second[1], rtol=0, atol=0)
    # the same draws by hand: eps first, then t from the sampler
    gen = torch.Generator().manual_seed(5)
    eps = torch.randn(x0.shape, generator=gen, dtype=F64)
    t = ts.Uniform(form).sample(64, gen)
    by_hand = diffusion_loss(model, x0, form=form, prediction="eps", eps=eps, t=t)[1]
    torch.testing.assert_close(first[1], by_hand, rtol=0, atol=0)


def test_errors():
    model, form = Affine(), forms.VP()
    x0, eps, _ = batch()
    with pytest.raises(ValueError, match="mse, pseudo_huber"):
        diffusion_loss(model, x0, form=form, prediction="eps", loss="l1")
    with pytest.raises(ValueError, match="safe range"):
        diffusion_loss(model, x0, form=form, prediction="x0", eps=eps, t=0.0)
    with pytest.raises(ValueError, match="eps, x0, v, flow"):
        diffusion_loss(model, x0, form=form, prediction="score")


# --- the implied-weighting identity --------------------------------------------------------------
FORMS = pick("vp", "ve", "fm", "subvp")


def eps_error(form, prediction, x0, eps, t):
    """mean ||eps_hat - eps||^2 of an imperfect Gaussian denoiser (std 0.6 for data of std 1)."""
    model = GaussianOracle(form, prediction, mean=0.2, std=0.6)
    x_t = form.add_noise(x0, eps, t)
    out = model(x_t, form.model_time(t))
    eps_hat = predictions.to_x0_eps(out, prediction, x_t, t, form)[1]
    return ((eps_hat - eps) ** 2).mean(1), model


@pytest.mark.parametrize("form_name", FORMS)
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_per_sample_loss_is_prediction_factor_times_eps_error(form_name, prediction):
    form = FORMS[form_name]
    x0, eps, t = batch(32)
    err, model = eps_error(form, prediction, x0, eps, t)
    for weighting in ("none", "min_snr"):
        _, loss = diffusion_loss(
            model, x0, form=form, prediction=prediction, eps=eps, t=t, weighting=weighting
        )
        weight = ts.loss_weighting(weighting)(t, form=form, prediction=prediction)
        expected = weight * ts.prediction_factor(form, prediction, t) * err
        torch.testing.assert_close(loss, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("form_name", ["vp", "fm"])
@pytest.mark.parametrize("sampler", ["uniform", "logit_normal", "u_shaped", "uniform_logsnr"])
def test_expected_loss_equals_logsnr_integral(form_name, sampler):
    """E_{t~p}[loss(t)] by stratified quantiles of the sampler vs int w(lambda) g(lambda) dlambda
    by quadrature, with g the eps error of a fixed imperfect model on a fixed set of (x0, eps)."""
    form = FORMS[form_name]
    time_sampler = ts.time_sampler(sampler, form)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 2, generator=gen, dtype=F64)
    eps = torch.randn(16, 2, generator=gen, dtype=F64)

    def g(t):  # mean over the fixed set of the eps error at each t, shape (len(t),)
        k = len(t)
        err, _ = eps_error(form, "x0", x0.repeat(k, 1), eps.repeat(k, 1), t.repeat_interleave(16))
        return err.view(k, 16).mean(1)

    def loss_at(t):
        k = len(t)
        model = GaussianOracle(form, "x0", mean=0.2, std=0.6)
        _, per_sample = diffusion_loss(
            model, x0.repeat(k, 1), form=form, prediction="x0", eps=eps.repeat(k, 1),
            t=t.repeat_interleave(16), weighting="min_snr",
        )  # fmt: skip
        return per_sample.view(k, 16).mean(1)

    k = 4_000
    t_strata = time_sampler.icdf((torch.arange(k, dtype=F64) + 0.5) / k)
    expected_loss = float(loss_at(t_strata).mean())
    lo, hi = form.logsnr_range()
    lam = torch.linspace(lo, hi, 4_001, dtype=F64)
    w = ts.implied_weighting(form, "x0", time_sampler, "min_snr", lam)
    integral = float(torch.trapezoid(w * g(form.t_from_logsnr(lam)), lam))
    assert expected_loss == pytest.approx(integral, rel=2e-5)  # midpoint/trapezoid error ~1e-6


def test_monte_carlo_loss_matches_the_logsnr_integral():
    """The loss with random t and eps (SD3's logit-normal, v-prediction, VE, min-SNR) averaged
    over 400k draws agrees with the quadrature of w(lambda) times the closed-form eps error
    within 4 standard errors."""
    form = forms.VE()
    time_sampler = ts.time_sampler("logit_normal", form, m=-0.5, s=1.2)
    model = GaussianOracle(form, "v", mean=0.2, std=0.6)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(400_000, 2, generator=gen, dtype=F64)
    _, per_sample = diffusion_loss(
        model, x0, form=form, prediction="v", time_sampler=time_sampler, weighting="min_snr",
        generator=gen,
    )  # fmt: skip
    mc, stderr = float(per_sample.mean()), float(per_sample.std()) / math.sqrt(len(per_sample))
    lo, hi = form.logsnr_range()
    lam = torch.linspace(lo, hi, 20_001, dtype=F64)
    w = ts.implied_weighting(form, "v", time_sampler, "min_snr", lam)
    integral = float(torch.trapezoid(w * oracle_eps_error(form, form.t_from_logsnr(lam)), lam))
    assert abs(mc - integral) < 4 * stderr


def oracle_eps_error(form, t, mean=0.2, std=0.6):
    """E||eps_hat - eps||^2 / dim in closed form for x0 ~ N(0, I) and the Gaussian oracle of
    N(mean, std^2): x0_hat = mean + k (x_t - alpha mean), k = alpha std^2 / (alpha^2 std^2 +
    sigma^2), so eps_hat - eps = (1 - alpha k)(alpha / sigma)(x0 - mean) - alpha k eps."""
    alpha, sigma = form.alpha(t), form.sigma(t)
    k = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
    return ((1 - alpha * k) * alpha / sigma) ** 2 * (1 + mean**2) + (alpha * k) ** 2
