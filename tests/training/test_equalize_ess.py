"""``equalize`` as importance sampling in logsnr: the loss weight left on each sample is nearly
constant, so a batch keeps its effective sample size (Kish's ``(sum w)^2 / (n sum w^2)``) for
every form x prediction x built-in reference, computed from the sampler and weighting alone."""

import numpy as np
import pytest
import torch
from shared import F64, pick
from torch import nn

from rectdiff import forms, models
from rectdiff import training as ts

FORMS = pick("vp", "subvp", "vp-cosine", "ve", "fm", "fm-shift3", "sd15", "trig")
PREDICTIONS = ("eps", "x0", "v", "flow")
#: the references the shipped configs and the peer benchmark equalize to:
#: (form, prediction, time sampler, weighting)
REFERENCES = {
    "ddpm": (forms.VP(), "eps", "uniform", "none"),  # DDPM's L_simple: compare's default
    "reflow": (forms.FlowMatching(), "flow", "uniform", "none"),  # the peers' objective
    "sd3": (forms.FlowMatching(), "flow", "logit_normal", "none"),  # Esser et al. 2024
    "min_snr": (forms.VP(), "eps", "uniform", "min_snr"),  # Hang et al. 2023
}


def _reference_weight(reference):
    ref_form, ref_prediction, ref_sampler, ref_weighting = REFERENCES[reference]

    def weight(lam):
        return ts.implied_weighting(ref_form, ref_prediction, ref_sampler, ref_weighting, lam)

    return weight


def _equalized(form, prediction, reference, quantile="logsnr"):
    weight = _reference_weight(reference)
    lo, hi = ts.common_logsnr_range(form, REFERENCES[reference][0])
    pair = ts.equalize(form, prediction, weight, logsnr_range=(lo, hi), quantile=quantile)
    return pair, weight, (lo, hi)


def _equalized_t(form, prediction, reference):
    return _equalized(form, prediction, reference, quantile="t")


def test_effective_sample_size_is_kish():
    assert float(ts.effective_sample_size(torch.ones(8))) == 1.0
    assert float(ts.effective_sample_size(torch.tensor([1.0, 0.0, 0.0, 0.0]))) == 0.25
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    assert float(ts.effective_sample_size(w)) == pytest.approx(36 / (3 * 14), rel=1e-15)


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("form_name", FORMS)
def test_equalized_batches_keep_their_effective_size(form_name, reference):
    """ESS >= 0.9 over 4096 draws for every prediction (measured: >= 0.999998), while the
    implied weighting stays the reference's; the previous scheme (logsnr drawn from w_ref,
    weight ``total / c_pred^2``) kept 2.4 % (VP, v), 2.9 % (VE, v) and down to 0.17 %
    (flow matching, x0) of a batch for the peers' objective."""
    form = FORMS[form_name]
    worst_old = 1.0
    for prediction in PREDICTIONS:
        (sampler, weighting), weight, (lo, hi) = _equalized(form, prediction, reference)
        ess = ts.weighting_ess(form, prediction, sampler, weighting, n=4096)
        assert ess >= 0.9, (form_name, prediction, reference, ess)
        grid = torch.linspace(lo, hi, 257, dtype=F64)[1:-1]
        implied = ts.implied_weighting(form, prediction, sampler, weighting, grid)
        ref = weight(grid)
        keep = ref > 1e-12 * ref.max()
        assert float(((implied - ref).abs()[keep] / ref[keep]).max()) < 1e-4
        old_sampler = ts.Equalized(form, weight, lo, hi, prediction="eps")
        old_weighting = ts.InverseFactorWeighting(old_sampler.total)
        worst_old = min(
            worst_old, ts.weighting_ess(form, prediction, old_sampler, old_weighting, n=4096)
        )
    if form_name in ("vp", "ve") and reference == "reflow":  # the 0.3-2.5 %
        assert worst_old < 0.05, worst_old


@pytest.mark.parametrize("scaling", ["edm", "fm"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_output_scale_makes_every_form_train_like_flow_matching(scaling, prediction):
    """``equalize(output_scale=c_out)`` of a ``Preconditioned`` network: each sample's weight
    on the network's own output error is constant (ESS >= 0.9; measured 1.0) and the implied
    weighting is still the reference's. Since c_out is r_t = alpha_t + sigma_t times FM's at
    the same logsnr in both scalings, VP, sub-VP and VE then draw flow matching's logsnr from
    the same generator and put the same weight on the network's error, to 1e-9: with
    ``time_input="fm"`` the training is flow matching's in every form. Without it (the
    loss-unit scheme) VE's network-unit ESS for v is 0.04 (EDM) / 0.11 (FM units): its
    per-sample gradient weights spread over sigma^2."""
    fms = forms.FlowMatching()
    named = {"vp": forms.VP(), "subvp": forms.SubVP(), "ve": forms.VE(), "fm": fms}
    lo, hi = ts.common_logsnr_range(*named.values())
    _, _, ref_sampler, ref_weighting = REFERENCES["reflow"]

    def weight(lam):
        return ts.implied_weighting(fms, "flow", ref_sampler, ref_weighting, lam)

    drawn = {}
    for name, form in named.items():
        net = models.Preconditioned(nn.Identity(), form, sigma_data=1.4,
                                    output_prediction=prediction, scaling=scaling)  # fmt: skip
        sampler, weighting = ts.equalize(form, prediction, weight, logsnr_range=(lo, hi),
                                         output_scale=net.c_out)  # fmt: skip
        assert ts.weighting_ess(form, prediction, sampler, weighting, n=4096) >= 0.9
        grid = torch.linspace(lo, hi, 129, dtype=F64)[1:-1]
        implied = ts.implied_weighting(form, prediction, sampler, weighting, grid)
        assert float(((implied - weight(grid)) / weight(grid)).abs().max()) < 1e-4
        t = sampler.sample(512, torch.Generator().manual_seed(7))
        on_net = weighting.network_weight(t, weighting(t, form=form, prediction=prediction))
        drawn[name] = (form.logsnr(t), on_net)
        if name == "ve" and prediction == "v":
            plain, plain_weighting = ts.equalize(form, prediction, weight, logsnr_range=(lo, hi))
            t = plain.sample(4096, torch.Generator().manual_seed(0))
            w = plain_weighting(t, form=form, prediction=prediction) * net.c_out(t) ** 2
            assert float(ts.effective_sample_size(w)) < 0.2
    for name in ("vp", "subvp", "ve"):
        torch.testing.assert_close(drawn[name][0], drawn["fm"][0], rtol=0, atol=1e-9)
        torch.testing.assert_close(drawn[name][1], drawn["fm"][1], rtol=1e-9, atol=0)


def test_vp_ve_and_fm_train_the_same_network_in_flow_matching_units():
    """The library's claim made exact: VP, VE and flow matching with v-prediction, each
    network wrapped with ``scaling="fm", time_input="fm"`` and equalized to the peers'
    objective in the network's output units, from the same initial weights and seed, train
    the same network: after 50 steps their outputs in FM units (at one logsnr, on one x in FM
    units) agree to 5e-6 (measured 2.5e-7 and 5.0e-7, float32 rounding) and their losses to
    1e-6 relative."""
    fms = forms.FlowMatching()
    named = {"vp": forms.VP(), "ve": forms.VE(), "fm": fms}
    lo, hi = ts.common_logsnr_range(*named.values())

    def weight(lam):
        return ts.implied_weighting(fms, "flow", "uniform", "none", lam)

    x0 = 2 * torch.randn(2048, 2, generator=torch.Generator().manual_seed(0))
    lam = torch.linspace(lo + 0.5, hi - 0.5, 5, dtype=F64)
    x_fm = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    outs, losses = {}, {}
    for name, form in named.items():
        torch.manual_seed(0)
        net = models.Preconditioned(models.MLP(dim=2, hidden=32, depth=2), form,
                                    output_prediction="v", time_input="fm", scaling="fm")  # fmt: skip
        sampler, weighting = ts.equalize(form, "v", weight, logsnr_range=(lo, hi),
                                         output_scale=net.c_out)  # fmt: skip
        config = ts.TrainConfig(steps=50, batch_size=128, lr=1e-3, time_sampler=sampler,
                                weighting=weighting)  # fmt: skip
        result = ts.train(net, x0, form=form, prediction="v", config=config, progress=False)
        t = form.t_from_logsnr(lam)
        r = (form.alpha(t) + form.sigma(t)).float()[:, None]
        with torch.no_grad():
            outs[name] = result.model(x_fm * r, form.model_time(t).float()) / r
        losses[name] = result.losses[-1]
    for name in ("vp", "ve"):
        torch.testing.assert_close(outs[name], outs["fm"], rtol=0, atol=5e-6)
        assert losses[name] == pytest.approx(losses["fm"], rel=1e-6)


def test_every_form_and_prediction_trains_the_flow_matching_network_with_velocity_scaling():
    """``scaling="velocity"``: the network predicts flow matching's velocity in every form and
    prediction, and with ``equalize(output_scale=c_out)`` towards flow matching's objective
    (flow, uniform t) VP with v, sub-VP with eps, VE with x0 and flow matching with v train
    the same network as flow matching with flow prediction: after 50 steps from the same
    weights and seed their networks agree to 5e-6 (float32 rounding) on one input."""
    fms = forms.FlowMatching()
    cases = {"fm flow": (fms, "flow"), "vp v": (forms.VP(), "v"),
             "subvp eps": (forms.SubVP(), "eps"), "ve x0": (forms.VE(), "x0"),
             "fm v": (fms, "v")}  # fmt: skip
    lo, hi = ts.common_logsnr_range(*(form for form, _ in cases.values()))

    def weight(lam):
        return ts.implied_weighting(fms, "flow", "uniform", "none", lam)

    x0 = 2 * torch.randn(2048, 2, generator=torch.Generator().manual_seed(0))
    x_fm = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    tau = torch.linspace(0.1, 0.9, 5)
    outs = {}
    for name, (form, prediction) in cases.items():
        torch.manual_seed(0)
        net = models.Preconditioned(models.MLP(dim=2, hidden=32, depth=2), form,
                                    output_prediction=prediction, time_input="fm",
                                    scaling="velocity")  # fmt: skip
        sampler, weighting = ts.equalize(form, prediction, weight, logsnr_range=(lo, hi),
                                         output_scale=net.c_out)  # fmt: skip
        config = ts.TrainConfig(steps=50, batch_size=128, lr=1e-3, time_sampler=sampler,
                                weighting=weighting)  # fmt: skip
        result = ts.train(net, x0, form=form, prediction=prediction, config=config,
                          progress=False)  # fmt: skip
        with torch.no_grad():
            outs[name] = result.model.net(x_fm, tau)
    moved = float((outs["fm flow"] - outs["vp v"]).abs().max())
    for name in cases:
        torch.testing.assert_close(outs[name], outs["fm flow"], rtol=0, atol=5e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        untrained = models.MLP(dim=2, hidden=32, depth=2)(x_fm, tau)
    assert float((outs["fm flow"] - untrained).abs().max()) > 1e-2 > moved


def test_trainer_logs_the_batch_ess():
    """TrainResult.ess: one value per step, 1 for an unweighted loss, near 1 for an
    equalized one, and the previous scheme's low value for the inverse-factor weighting."""
    form = forms.VP()
    (sampler, weighting), weight, (lo, hi) = _equalized(form, "v", "reflow")
    x0 = torch.randn(512, 2)
    old_sampler = ts.Equalized(form, weight, lo, hi, prediction="eps")
    results = {}
    for name, (ts_obj, w_obj) in {
        "plain": ("uniform", "none"),
        "equalized": (sampler, weighting),
        "old": (old_sampler, ts.InverseFactorWeighting(old_sampler.total)),
    }.items():
        torch.manual_seed(0)
        config = ts.TrainConfig(steps=4, batch_size=256, log_every=2, time_sampler=ts_obj,
                                weighting=w_obj)  # fmt: skip
        result = ts.train(_Net(), x0, form=form, prediction="v", config=config, progress=False)
        assert len(result.ess) == len(result.losses) == 4
        results[name] = result.ess
    assert results["plain"] == [1.0] * 4
    assert min(results["equalized"]) >= 0.9
    assert max(results["old"]) < 0.2, results["old"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x, t):
        return self.linear(torch.cat([x, t[:, None]], 1))


@pytest.mark.parametrize("form_name", ["vp", "ve", "fm"])
def test_quantile_orders_the_draws_and_logsnr_keeps_the_old_ones(form_name):
    """``quantile="t"``: t at quantile u (icdf of the same float64 draws, increasing in u,
    and the CDF of the sampler's own density at icdf(u) is u); ``"logsnr"`` (the default):
    logsnr at quantile u, which is icdf(1 - u) to the bit (1 - (1 - u) = u exactly for
    torch.rand's 53-bit u), the draws every equalized number so far was made with."""
    form = FORMS[form_name]
    (by_logsnr, _), _, _ = _equalized(form, "v", "reflow")
    (by_t, _), _, _ = _equalized_t(form, "v", "reflow")
    u = torch.rand(4096, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(by_t.sample(4096, torch.Generator().manual_seed(3)), by_t.icdf(u))
    old = by_logsnr.sample(4096, torch.Generator().manual_seed(3))
    assert torch.equal(old, by_logsnr._t(by_logsnr.logsnr_at(u)))
    assert torch.equal(old, by_t.icdf(1 - u))
    quantiles = torch.linspace(0.01, 0.99, 99, dtype=F64)
    t_q = by_t.icdf(quantiles)
    assert bool((t_q.diff() > 0).all())
    grid = torch.linspace(form.t_min, form.t_max, 400_001, dtype=F64)
    cdf = torch.cat(
        [torch.zeros(1, dtype=F64), torch.cumulative_trapezoid(by_t.density(grid), grid)]
    )
    cdf_at = torch.from_numpy(np.interp(t_q.numpy(), grid.numpy(), cdf.numpy()))
    torch.testing.assert_close(cdf_at, quantiles, rtol=0, atol=1e-4)


def test_quantile_t_gives_flow_matching_its_uniform_draws():
    """Common random numbers: flow matching's objective equalized for a velocity network
    (``Preconditioned(scaling="velocity")``, whose proposal is uniform in t) with
    ``quantile="t"`` draws uniform's times from the same generator to the interpolation
    error (measured 9.1e-8); with ``"logsnr"`` it draws 1 - them (mirrored, uncorrelated in
    order), and VP's draws map to flow matching's t within VP's shorter range (measured 0.0094)."""
    fm = forms.FlowMatching()
    uniform = ts.Uniform(fm).sample(100_000, torch.Generator().manual_seed(0))
    for form, tol in ((fm, 1e-6), (forms.VP(), 0.02)):
        net = models.Preconditioned(nn.Identity(), form, sigma_data=1.0, output_prediction="v",
                                    time_input="fm", scaling="velocity")  # fmt: skip
        drawn = {}
        for quantile in ts.QUANTILES:
            sampler, _ = ts.equalize(form, "v", _reference_weight("reflow"),
                                     logsnr_range=ts.common_logsnr_range(form, fm),
                                     output_scale=net.c_out, quantile=quantile)  # fmt: skip
            t = sampler.sample(100_000, torch.Generator().manual_seed(0))
            drawn[quantile] = fm.t_from_logsnr(form.logsnr(t))
        assert float((drawn["t"] - uniform).abs().max()) < tol
        assert float((drawn["logsnr"] - (1 - uniform)).abs().max()) < tol + 2 * fm.t_min
    with pytest.raises(ValueError, match="unknown quantile 'u'; allowed: logsnr, t"):
        ts.equalize(fm, "v", _reference_weight("reflow"), quantile="u")
