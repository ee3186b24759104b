"""Diagnostics against analytic answers: straight lines, a quarter circle, the closed-form
oracles, Liu et al.'s straightness identity, hand-made couplings and POT/scipy optima."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import linear_sum_assignment
from shared import F64

from rectdiff import diagnostics, forms, samplers
from rectdiff.oracles import CouplingOracle, GaussianOracle
from rectdiff.predictions import PREDICTIONS, to_x0_eps
from rectdiff.reparametrize import reparametrize
from rectdiff.samplers import Trajectory
from rectdiff.training import common_logsnr_range


def _curve_trajectory(x: torch.Tensor, t: torch.Tensor | None = None) -> Trajectory:
    """A trajectory record of given states (K+1, B, D); predictions unused (zeros)."""
    steps = x.shape[0] - 1
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=F64) if t is None else t
    zeros = torch.zeros_like(x[:-1])
    return Trajectory(t, x, zeros, zeros, steps, forms.FlowMatching(), "x0", "given")


def _exact_trajectory(oracle: GaussianOracle, eps: torch.Tensor, t: torch.Tensor) -> Trajectory:
    """States from the oracle's exact ODE solution on the grid ``t``, predictions from the
    oracle at those states (nothing here depends on a numerical solver)."""
    form = oracle.form
    x_start = float(form.sigma(t[0])) * eps
    x = torch.stack([oracle.solve(x_start, float(t[0]), float(tk)) for tk in t])
    x0_pred, eps_pred = [], []
    for k in range(len(t) - 1):
        out = oracle(x[k], form.model_time(t[k]).expand(len(eps)))
        x0, e = to_x0_eps(out, oracle.prediction, x[k], t[k], form)
        x0_pred.append(x0)
        eps_pred.append(e)
    return Trajectory(
        t,
        x,
        torch.stack(x0_pred),
        torch.stack(eps_pred),
        len(t) - 1,
        form,
        oracle.prediction,
        "exact",
    )


ALL_FORMS = {
    "vp": forms.VP(),
    "vp-cosine": forms.VPCosine(),
    "subvp": forms.SubVP(),
    "ve": forms.VE(),
    "fm": forms.FlowMatching(),
    "fm-shift3": forms.FlowMatching(shift=3.0),
    "discrete-vp": forms.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=F64)),
}


# --- straightness on given curves ---------------------------------------------------------


def test_straight_constant_speed_line_has_zero_straightness() -> None:
    # z(u) = a + u (b - a) on a non-uniform grid: every velocity equals the chord.
    t = torch.tensor([1.0, 0.9, 0.7, 0.65, 0.3, 0.1, 0.05, 0.02, 0.0], dtype=F64)
    u = (1.0 - t)[:, None, None]
    a = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=F64)
    b = torch.tensor([[-1.0, 4.0, 2.0], [2.0, 2.0, -3.0]], dtype=F64)
    traj = _curve_trajectory(a + u * (b - a), t)
    assert abs(float(diagnostics.straightness(traj))) < 1e-24
    assert abs(float(diagnostics.straightness(traj, reduction="mean"))) < 1e-24
    _, profile = diagnostics.curvature_profile(traj)
    assert float(profile.abs().max()) < 1e-24


@pytest.mark.parametrize("steps", [8, 64, 512])
def test_quarter_circle_matches_closed_form(steps: int) -> None:
    # z(u) = (cos(pi u / 2), sin(pi u / 2)): chord c = (-1, 1), velocity (pi/2)(-sin, cos), so
    # S = int ||c - v||^2 du = ||c||^2 - 2 c . int v + int ||v||^2 = 2 - 4 + pi^2/4 = pi^2/4 - 2.
    # The piecewise-linear estimator gives exactly sum_k ||dz_k||^2 / du_k - ||c||^2
    # = 4 K^2 sin^2(pi / (4K)) - 2, which falls short of S by pi^4 / (192 K^2) + O(K^-4).
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=F64)
    angle = math.pi / 2 * (1.0 - t)
    traj = _curve_trajectory(torch.stack([torch.cos(angle), torch.sin(angle)], -1)[:, None, :], t)
    estimate = float(diagnostics.straightness(traj))
    assert estimate == pytest.approx(
        4 * steps**2 * math.sin(math.pi / (4 * steps)) ** 2 - 2, abs=1e-12
    )
    exact = math.pi**2 / 4 - 2
    assert exact - estimate == pytest.approx(math.pi**4 / (192 * steps**2), rel=0.05)
    assert float(diagnostics.straightness(traj, reduction="mean")) == pytest.approx(
        estimate / 2, rel=1e-14
    )
    assert float(diagnostics.straightness(traj, relative=True)) == pytest.approx(
        estimate / 2, rel=1e-14
    )
    # the profile integrates to the straightness: sum_k du_k value_k
    t_mid, value = diagnostics.curvature_profile(traj)
    assert float((value / steps).sum()) == pytest.approx(estimate, rel=1e-12)
    assert torch.allclose(t_mid, 0.5 * (t[1:] + t[:-1]))


def test_few_steps_warn_and_bad_input_raises() -> None:
    traj = _curve_trajectory(torch.randn(4, 3, 2, dtype=F64))
    with pytest.warns(UserWarning, match="at least 8 steps"):
        diagnostics.straightness(traj)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diagnostics.straightness(_curve_trajectory(torch.randn(9, 3, 2, dtype=F64)))
    with pytest.raises(ValueError, match="reduction"):
        diagnostics.straightness(
            _curve_trajectory(torch.randn(9, 3, 2, dtype=F64)), reduction="max"
        )
    with pytest.raises(ValueError, match="coords"):
        diagnostics.curvature_profile(
            _curve_trajectory(torch.randn(9, 3, 2, dtype=F64)), coords="x"
        )
    increasing = _curve_trajectory(
        torch.randn(9, 3, 2, dtype=F64), torch.linspace(0, 1, 9, dtype=F64)
    )
    with pytest.raises(ValueError, match="decrease"):
        diagnostics.straightness(increasing)
    # FM from t_start = 1: y = x / alpha is at infinity at the start, which is left out
    x = torch.randn(10, 3, 2, dtype=F64)
    fm_from_one = _curve_trajectory(x)
    inside = _curve_trajectory(x[1:], torch.linspace(1.0, 0.0, 10, dtype=F64)[1:])
    assert float(diagnostics.straightness(fm_from_one, coords="y")) == pytest.approx(
        float(diagnostics.straightness(inside, coords="y")), rel=1e-14
    )
    with pytest.raises(ValueError, match="alpha"):  # nothing left to measure
        diagnostics.straightness(_curve_trajectory(x[:2]), coords="y")


# --- first-order models: the coupling oracle, sampled ---------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", list(ALL_FORMS))
def test_coupling_oracle_is_first_order_in_every_form(name: str, prediction: str) -> None:
    form = ALL_FORMS[name]
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(32, 2, generator=generator, dtype=F64)
    oracle = CouplingOracle(
        form, prediction, scale=torch.tensor([0.5, 2.0]), shift=torch.tensor([1.0, -1.0])
    )
    traj = samplers.sample(
        oracle,
        eps,
        form=form,
        prediction=prediction,
        solver="ddim",
        steps=16,
        return_trajectory=True,
    )
    assert float(diagnostics.first_order_deviation(traj, "x0")) < 1e-10
    assert float(diagnostics.first_order_deviation(traj, "eps")) < 1e-10
    # y = x0 + s eps: a straight line at constant speed in s, whatever the form
    assert float(diagnostics.straightness(traj, coords="y", relative=True)) < 1e-20
    s_t = float(diagnostics.straightness(traj, coords="t", relative=True))
    if name == "fm":
        assert s_t < 1e-20  # x_t = (1 - t) x0 + t eps is linear in t
    else:
        assert s_t > 1e-3  # curved (VP) or not at constant speed in t (VE, shifted FM)


# --- Gaussian data in VP: not first-order, with closed-form answers -------------------------


def test_gaussian_oracle_vp_first_order_deviation_matches_closed_form() -> None:
    # Data N(0, c^2 I). Along the exact ODE, x_t = s_t z (s_t = sqrt(alpha^2 c^2 + sigma^2)),
    # x0_pred = alpha c^2 / s_t z and eps_pred = sigma / s_t z: both move along z, so
    # d_k = |g(t_k) / g(t_ref) - 1| with g = alpha c^2 / s (x0) or sigma / s (eps), for every batch.
    form, c = forms.VP(), 0.5
    oracle = GaussianOracle(form, "eps", mean=0.0, std=c)
    t = torch.linspace(1.0, 0.0, 65, dtype=F64)
    eps = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    traj = _exact_trajectory(oracle, eps, t)
    t_eval = t[:-1]
    s = oracle.marginal_std(t_eval)
    g_x0 = form.alpha(t_eval) * c**2 / s
    g_eps = form.sigma(t_eval) / s
    expected_x0 = (g_x0 / g_x0[-1] - 1).abs()
    expected_eps = (g_eps / g_eps[0] - 1).abs()
    t_out, curve = diagnostics.first_order_deviation(traj, "x0", per_step=True)
    assert torch.equal(t_out, t_eval)
    torch.testing.assert_close(curve, expected_x0, rtol=1e-10, atol=1e-12)
    _, curve_eps = diagnostics.first_order_deviation(traj, "eps", per_step=True)
    torch.testing.assert_close(curve_eps, expected_eps, rtol=1e-10, atol=1e-12)
    deviation = float(diagnostics.first_order_deviation(traj, "x0"))
    # the average uniformly in logsnr over the evaluated span (trapezoid rule)
    lam = form.logsnr(t_eval).numpy()
    expected = np.trapezoid(expected_x0.numpy(), lam) / (lam[-1] - lam[0])
    assert deviation == pytest.approx(float(expected), rel=1e-10)
    assert deviation > 0.5  # x0_pred starts near the data mean 0 and ends at the sample
    # the same curve from a real solve (dopri5 states on the grid)
    sampled = samplers.sample(
        oracle,
        eps,
        form=form,
        prediction="eps",
        solver="dopri5",
        steps=64,
        rtol=1e-9,
        atol=1e-9,
        return_trajectory=True,
    )
    _, curve_sampled = diagnostics.first_order_deviation(sampled, "x0", per_step=True)
    torch.testing.assert_close(curve_sampled, expected_x0, rtol=1e-6, atol=1e-7)


def test_first_order_deviation_is_the_same_for_one_model_seen_in_two_forms() -> None:
    # One Gaussian-data model, written in VP (eps) and seen in flow matching (flow) through
    # reparametrize; on grids with equal logsnr its x0-predictions coincide, so must D.
    vp, fm = forms.VP(), forms.FlowMatching()
    oracle = GaussianOracle(vp, "eps", mean=0.3, std=0.5)
    as_fm = reparametrize(oracle, vp, "eps", fm, "flow")
    lo, hi = common_logsnr_range(vp, fm)
    lam = torch.linspace(lo, hi, 33, dtype=F64)
    zero = torch.zeros(1, dtype=F64)
    grids = {
        "vp": torch.cat([vp.t_from_logsnr(lam), zero]),
        "fm": torch.cat([fm.t_from_logsnr(lam), zero]),
    }
    eps = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    values = {}
    for name, form, model, prediction in (("vp", vp, oracle, "eps"), ("fm", fm, as_fm, "flow")):
        traj = samplers.sample(
            model, eps, form=form, prediction=prediction, solver="ddim", t_grid=grids[name],
            return_trajectory=True,
        )  # fmt: skip
        values[name] = float(diagnostics.first_order_deviation(traj))
    assert values["vp"] > 0.1  # Gaussian data: far from first-order
    assert values["vp"] == pytest.approx(values["fm"], rel=1e-6, abs=1e-9)


def _integral(f) -> float:
    return quad(f, 0.0, 1.0, epsabs=1e-13, epsrel=1e-12, limit=200)[0]


def test_gaussian_oracle_vp_straightness_matches_closed_form() -> None:
    # x(u) = a(u) m + s(u) z along the exact ODE (u = 1 - t normalised), so per sample
    # S = A ||m||^2 + 2 B m.z + C ||z||^2 with A = int a'^2 - (da)^2, B = int a's' - da ds,
    # C = int s'^2 - (ds)^2. In y = x / alpha against rho = sigma / alpha, y = m + q(rho) z with
    # q = sqrt(c^2 + rho^2), and int_0^1 q'(v)^2 dv = D rho [D rho - c (atan(rho_0/c) -
    # atan(rho_K/c))] with D rho = rho_0 - rho_K.
    form, c = forms.VP(), 0.5
    m = torch.tensor([1.5, -0.5], dtype=F64)
    oracle = GaussianOracle(form, "x0", mean=m, std=c)
    t = torch.linspace(1.0, 0.0, 2001, dtype=F64)
    eps = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    traj = _exact_trajectory(oracle, eps, t)
    s0 = float(oracle.marginal_std(1.0))
    z = (float(form.sigma(1.0)) * eps - float(form.alpha(1.0)) * m) / s0

    def a_du(u: float) -> float:  # d alpha / du, u = 1 - t
        return -float(form.d_alpha(1.0 - u))

    def s_du(u: float) -> float:
        tt = 1.0 - u
        alpha, sigma = float(form.alpha(tt)), float(form.sigma(tt))
        return -(alpha * float(form.d_alpha(tt)) * c**2 + sigma * float(form.d_sigma(tt))) / float(
            oracle.marginal_std(tt)
        )

    da = float(form.alpha(0.0) - form.alpha(1.0))
    ds = float(oracle.marginal_std(0.0)) - s0
    coef_a = _integral(lambda u: a_du(u) ** 2) - da**2
    coef_b = _integral(lambda u: a_du(u) * s_du(u)) - da * ds
    coef_c = _integral(lambda u: s_du(u) ** 2) - ds**2
    expected = coef_a * m.square().sum() + 2 * coef_b * (z @ m) + coef_c * z.square().sum(-1)
    estimate = diagnostics.straightness(traj, per_sample=True)
    torch.testing.assert_close(estimate, expected, rtol=1e-5, atol=0)
    assert float(estimate.min()) > 0.1

    rho0 = float(form.sigma(1.0) / form.alpha(1.0))  # rho_K = 0 at t = 0
    q_drift = math.sqrt(c**2 + rho0**2) - c
    coef_y = rho0 * (rho0 - c * math.atan(rho0 / c)) - q_drift**2
    estimate_y = diagnostics.straightness(traj, coords="y", per_sample=True)
    torch.testing.assert_close(estimate_y, coef_y * z.square().sum(-1), rtol=1e-5, atol=0)
    assert float(estimate_y.min()) > 1.0


def test_liu_straightness_identity_on_independent_gaussian_coupling() -> None:
    # Liu, Gong & Liu 2023, Thm 3.5: for the rectified flow Z of a coupling (X0, X1),
    #     E||X1 - X0||^2 - E||Z1 - Z0||^2 = S(Z) + V,  V = int_0^1 E||X1 - X0 - v(X_t, t)||^2 dt,
    # v(x, t) = E[X1 - X0 | X_t = x] (their time; X0 noise, X1 data). Proof: S(Z) =
    # int E||v(Z_t)||^2 - E||Z1 - Z0||^2 and, Z_t ~ X_t, int E||v||^2 = E||X1 - X0||^2 - V.
    # Here X0 = eps ~ N(0, I), X1 = x0 ~ N(m, c^2 I) independent; in rectdiff's flow matching
    # x_t = (1 - t) x0 + t eps, so X1 - X0 = x0 - eps = -dx_t/dt and v = -(flow prediction).
    # Closed forms (D dims): E||X1 - X0||^2 - E||Z1 - Z0||^2 = 2 c D (Z1 = m + c eps),
    # V = D int c^2 / (c^2 (1-t)^2 + t^2) dt = D c pi / 2, hence S(Z) = D c (2 - pi / 2).
    form, c, dim = forms.FlowMatching(), 0.7, 2
    m = torch.tensor([2.0, -1.0], dtype=F64)
    # a whitened joint sample: batch means of every quadratic in (eps, x0) are exact expectations
    w = torch.randn(2000, 2 * dim, generator=torch.Generator().manual_seed(3), dtype=F64)
    w = w - w.mean(0)
    w = w @ torch.linalg.inv(torch.linalg.cholesky(w.T @ w / len(w))).T
    eps, x0 = w[:, :dim], m + c * w[:, dim:]
    oracle = GaussianOracle(form, "flow", mean=m, std=c)
    traj = _exact_trajectory(oracle, eps, torch.linspace(1.0, 0.0, 401, dtype=F64))
    assert torch.allclose(traj.sample, m + c * eps)

    cost_x = float(diagnostics.transport_cost(eps, x0))
    cost_z = float(diagnostics.transport_cost(eps, traj.sample))
    straight = float(diagnostics.straightness(traj))
    nodes, weights = (torch.as_tensor(v, dtype=F64) for v in np.polynomial.legendre.leggauss(64))
    nodes, weights = 0.5 * (nodes + 1.0), 0.5 * weights  # Gauss-Legendre on [0, 1]
    residual = []
    for tk in nodes:
        x_t = form.add_noise(x0, eps, tk)
        flow = oracle(x_t, form.model_time(tk).expand(len(x0)))
        residual.append((x0 - eps + flow).square().sum(-1).mean())
    variance = float((weights * torch.stack(residual)).sum())

    assert cost_x - cost_z == pytest.approx(2 * c * dim, rel=1e-12)
    assert variance == pytest.approx(dim * c * math.pi / 2, rel=1e-9)
    assert straight == pytest.approx(dim * c * (2 - math.pi / 2), rel=1e-5)
    assert cost_x - cost_z == pytest.approx(straight + variance, rel=1e-5)


# --- coupling measures ----------------------------------------------------------------------


def test_transport_cost_conventions() -> None:
    eps = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    x0 = torch.tensor([[1.0, 1.0], [2.0, 1.0]], dtype=F64)
    assert float(diagnostics.transport_cost(eps, x0)) == pytest.approx((1.0 + 4.0) / 2)
    assert float(diagnostics.transport_cost(eps, x0, reduction="mean")) == pytest.approx(5.0 / 4)
    # with a form, the noise end is the start state sigma(t_max) eps: 50 eps in VE
    ve = forms.VE()
    expected = ((x0 - 50.0 * eps).square().sum(-1)).mean()
    assert float(diagnostics.transport_cost(eps, x0, form=ve)) == pytest.approx(
        float(expected), rel=1e-12
    )


def test_relative_transport_cost_exact_small_examples() -> None:
    eps = torch.tensor([[0.0], [1.0], [2.0]], dtype=F64)
    sorted_x0 = torch.tensor([[3.0], [4.0], [5.0]], dtype=F64)
    assert float(diagnostics.relative_transport_cost(eps, sorted_x0)) == pytest.approx(
        0.0, abs=1e-12
    )
    # pairing 0->3, 1->5, 2->4: cost (9 + 16 + 4) / 3; optimal (sorted) 9, so 29/3 - 9 = 2/3
    mixed = torch.tensor([[3.0], [5.0], [4.0]], dtype=F64)
    assert float(diagnostics.relative_transport_cost(eps, mixed)) == pytest.approx(2 / 3, abs=1e-12)
    reversed_x0 = torch.tensor([[5.0], [4.0], [3.0]], dtype=F64)  # (25 + 9 + 1) / 3 - 9
    assert float(diagnostics.relative_transport_cost(eps, reversed_x0)) == pytest.approx(
        8 / 3, abs=1e-12
    )


def test_relative_transport_cost_agrees_with_assignment() -> None:
    # with uniform weights and equal sizes, OT is the assignment problem (Birkhoff)
    generator = torch.Generator().manual_seed(4)
    eps = torch.randn(60, 3, generator=generator, dtype=F64)
    x0 = torch.randn(60, 3, generator=generator, dtype=F64) + 1.0
    cost = torch.cdist(eps, x0).square()
    rows, cols = linear_sum_assignment(cost.numpy())
    expected = float(cost.diagonal().mean()) - float(cost[rows, cols].mean())
    assert float(diagnostics.relative_transport_cost(eps, x0)) == pytest.approx(expected, rel=1e-9)
    assert float(diagnostics.relative_transport_cost(eps, x0, reduction="mean")) == pytest.approx(
        expected / 3, rel=1e-9
    )
    # above max_points: both terms on the same subset, so still >= 0 and 0 for the optimal pairing
    optimal_x0 = x0[torch.as_tensor(cols)]
    assert abs(float(diagnostics.relative_transport_cost(eps, optimal_x0, max_points=20))) < 1e-12


def test_crossing_rate_hand_made_segments() -> None:
    eps = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=F64)
    crossing = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)  # the two diagonals of a square
    parallel = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    assert float(diagnostics.crossing_rate(eps, crossing)) == 1.0
    assert float(diagnostics.crossing_rate(eps, parallel)) == 0.0
    # the same two configurations on a random 2-D plane of R^5: the projected proxy keeps them
    basis, _ = torch.linalg.qr(
        torch.randn(5, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    )
    offset = torch.arange(5, dtype=F64)
    lift = lambda p: p @ basis.T + offset  # noqa: E731
    assert float(diagnostics.crossing_rate(lift(eps), lift(crossing))) == 1.0
    assert float(diagnostics.crossing_rate(lift(eps), lift(parallel))) == 0.0
    # 1-D: order inversions
    line = torch.tensor([[0.0], [1.0], [2.0]], dtype=F64)
    assert float(diagnostics.crossing_rate(line, line + 3)) == 0.0
    assert float(diagnostics.crossing_rate(line, line.flip(0))) == 1.0


def test_crossing_rate_of_uniform_independent_segments() -> None:
    # Segments between 4 i.i.d. uniform points of a square: of the 3 pairings of 4 points in
    # convex position exactly one crosses, so P(cross) = P(convex) / 3 = (25/36) / 3 = 25/108
    # (Sylvester's four-point problem for the square).
    generator = torch.Generator().manual_seed(6)
    eps = torch.rand(4000, 2, generator=generator, dtype=F64)
    x0 = torch.rand(4000, 2, generator=generator, dtype=F64)
    rate = float(diagnostics.crossing_rate(eps, x0, max_pairs=400_000))
    assert rate == pytest.approx(25 / 108, abs=0.01)


# --- one-step gap -------------------------------------------------------------------------


def test_one_step_gap_is_zero_for_a_first_order_model() -> None:
    form = forms.VP()
    oracle = CouplingOracle(
        form, "v", scale=torch.tensor([0.5, 2.0]), shift=torch.tensor([1.0, -1.0])
    )
    eps = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    gap = diagnostics.one_step_gap(oracle, eps, form=form, prediction="v", rtol=1e-9, atol=1e-9)
    assert float(gap) < 1e-7


def test_one_step_gap_of_gaussian_vp_matches_closed_form() -> None:
    # One DDIM step from t_max returns x0_pred(x_T) = m + alpha_T c^2 / s_T^2 (x_T - alpha_T m);
    # the converged solve ends at E[x0 | x_{t_min}] = m + alpha_1 c^2 / (s_1 s_T) (x_T - alpha_T m)
    # with alpha_1, s_1 at t_min (x_{t_min} - alpha_1 m = s_1 / s_T (x_T - alpha_T m) on the ODE).
    form, c = forms.VP(), 0.5
    m = torch.tensor([1.0, -1.0], dtype=F64)
    oracle = GaussianOracle(form, "eps", mean=m, std=c)
    eps = torch.randn(16, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    gap = diagnostics.one_step_gap(
        oracle, eps, form=form, prediction="eps", rtol=1e-10, atol=1e-10, per_sample=True
    )
    t_big, t_small = form.t_max, form.t_min
    alpha_big, alpha_small = float(form.alpha(t_big)), float(form.alpha(t_small))
    s_big, s_small = float(oracle.marginal_std(t_big)), float(oracle.marginal_std(t_small))
    coef = alpha_big * c**2 / s_big**2 - alpha_small * c**2 / (s_small * s_big)
    centred = float(form.sigma(t_big)) * eps - alpha_big * m
    expected = abs(coef) * centred.square().mean(-1).sqrt()
    torch.testing.assert_close(gap, expected, rtol=1e-6, atol=0)
