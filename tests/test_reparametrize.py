"""reparametrize: one network seen in another form, checked against models built in that form."""

import pytest
import torch
from shared import F64, MEAN, STD

from rectdiff import forms, samplers
from rectdiff.oracles import GaussianOracle
from rectdiff.reparametrize import reparametrize

VP, FM = forms.VP(), forms.FlowMatching()
PAIRS = [
    ((VP, "eps"), (FM, "flow")),
    ((FM, "flow"), (VP, "eps")),
    ((forms.VE(), "x0"), (forms.SubVP(), "v")),
    ((forms.load("sd15"), "eps"), (forms.FlowMatching(shift=3.0), "v")),
    ((forms.VPCosine(), "v"), (forms.VE(), "flow")),
]


def points(form, n=32, seed=0):
    """x_t of N(MEAN, STD^2) data at n times spread over the middle of ``form``'s range."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.05, 0.85, n, dtype=F64)
    x0 = MEAN + STD * torch.randn(n, 2, generator=g, dtype=F64)
    return form.add_noise(x0, torch.randn(n, 2, generator=g, dtype=F64), t), t


@pytest.mark.parametrize("src, dst", PAIRS, ids=lambda p: f"{p[0].name}-{p[1]}")
def test_reparametrized_oracle_is_the_oracle_built_in_the_new_form(src, dst):
    (src_form, src_prediction), (dst_form, dst_prediction) = src, dst
    model = reparametrize(
        GaussianOracle(src_form, src_prediction, mean=MEAN, std=STD),
        src_form, src_prediction, dst_form, dst_prediction,
    )  # fmt: skip
    direct = GaussianOracle(dst_form, dst_prediction, mean=MEAN, std=STD)
    x_t, t = points(dst_form)
    model_time = dst_form.model_time(t)
    torch.testing.assert_close(model(x_t, model_time), direct(x_t, model_time), rtol=0, atol=1e-10)


def test_sampling_the_reparametrized_vp_model_as_flow_matching_gives_the_same_endpoint():
    model = reparametrize(GaussianOracle(VP, "eps", mean=MEAN, std=STD), VP, "eps", FM, "flow")
    direct = GaussianOracle(FM, "flow", mean=MEAN, std=STD)
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    kwargs = dict(form=FM, prediction="flow", solver="heun", steps=16, t_end=FM.t_min)
    out = samplers.sample(model, eps, **kwargs)
    torch.testing.assert_close(out, samplers.sample(direct, eps, **kwargs), rtol=0, atol=1e-10)
    # and a converged solve of the reparametrized model is the exact ODE endpoint
    exact = direct.solve(FM.sigma(FM.t_max) * eps, FM.t_max, FM.t_min)
    converged = samplers.sample(
        model, eps, form=FM, prediction="flow", solver="dopri5", rtol=1e-10, atol=1e-10,
        t_end=FM.t_min,
    )  # fmt: skip
    torch.testing.assert_close(converged, exact, rtol=0, atol=1e-7)


def test_ddim_of_any_network_is_the_same_in_both_forms_on_equal_logsnr_grids():
    """DDIM only sees (x/alpha, sigma/alpha): a nonlinear VP eps-network sampled directly on a
    VP grid and reparametrized to flow matching on the equal-logsnr grid ends at the same x0."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).to(
        F64
    )

    def vp_model(x, model_time):
        return net(torch.cat([x, model_time[:, None]], dim=1))

    vp_grid = samplers.time_grid(VP, 12, "uniform", t_end=VP.t_min)
    fm_grid = FM.t_from_logsnr(VP.logsnr(vp_grid))
    eps = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    traj_vp = samplers.sample(
        vp_model, eps, form=VP, prediction="eps", t_grid=vp_grid,
        return_trajectory=True,
    )  # fmt: skip
    fm_model = reparametrize(vp_model, VP, "eps", FM, "flow")
    traj_fm = samplers.sample(
        fm_model, eps, form=FM, prediction="flow", t_grid=fm_grid,
        return_trajectory=True,
    )  # fmt: skip
    # equal sigma/alpha at the start: the same y = x/alpha = eps sigma/alpha, the same y-path
    torch.testing.assert_close(traj_fm.x0_pred, traj_vp.x0_pred, rtol=0, atol=1e-10)
    torch.testing.assert_close(traj_fm.eps_pred, traj_vp.eps_pred, rtol=0, atol=1e-10)
    scale = (FM.alpha(fm_grid) / VP.alpha(vp_grid))[:, None, None]
    torch.testing.assert_close(traj_fm.x, traj_vp.x * scale, rtol=0, atol=1e-10)


def test_reparametrizing_within_one_discrete_form_changes_only_the_prediction():
    # sd15 v -> eps -> v: the conversions run (no early return) and agree with the oracle
    # built directly in each prediction, at integer timesteps
    sd15 = forms.load("sd15")
    oracle = GaussianOracle(sd15, "v", mean=MEAN, std=STD)
    as_eps = reparametrize(oracle, sd15, "v", sd15, "eps")
    back = reparametrize(as_eps, sd15, "eps", sd15, "v")
    x_t, t = points(sd15)
    timesteps = sd15.model_time(t).round()  # integer timesteps stay integers
    direct_eps = GaussianOracle(sd15, "eps", mean=MEAN, std=STD)
    torch.testing.assert_close(
        as_eps(x_t, timesteps), direct_eps(x_t, timesteps), rtol=0, atol=1e-10
    )
    torch.testing.assert_close(back(x_t, timesteps), oracle(x_t, timesteps), rtol=0, atol=1e-10)
    same = reparametrize(oracle, sd15, "v", sd15, "v")
    torch.testing.assert_close(same(x_t, timesteps), oracle(x_t, timesteps), rtol=0, atol=0)


def test_bad_prediction_is_named():
    with pytest.raises(ValueError, match=r"unknown prediction type 'epsilon'; allowed: eps, x0"):
        reparametrize(torch.nn.Identity(), VP, "epsilon", FM, "flow")
