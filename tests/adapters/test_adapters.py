"""Outside models through rectdiff.adapters, checked against the outside code itself.

Each convention: a small network trained with the outside library's (or the tutorials')
own objective; its own accurate sampler (torchdiffeq dopri5, flow_matching's ODESolver,
diffusers' DPM-Solver++) and rectdiff's dopri5 on the adapted model agree on the same
noise; and rectdiff's pairs -> rectify halves (at least) the one-step distance to the data.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from rectdiff import adapters, forms, samplers
from rectdiff.data import eight_gaussians
from rectdiff.metrics import sliced_wasserstein
from rectdiff.rectify import generate_pairs, rectify
from rectdiff.training import TrainConfig

N_TRAIN, N_EVAL = 4096, 1000
TOL = 1e-5  # rtol = atol of both adaptive solves


class TutorialNet(nn.Module):
    """The tutorials' vector field: ``net(x, t) = MLP([x, t])``, time in [0, 1]."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return self.body(torch.cat([x, t[:, None]], dim=1))


def _fit(net: nn.Module, loss_fn, steps: int = 1500, seed: int = 0) -> nn.Module:
    """Adam 1e-3, batch 256 on 8 Gaussians, as the tutorials train."""
    torch.manual_seed(seed)
    data = eight_gaussians(N_TRAIN, seed=seed)[0]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        x1 = data[torch.randint(len(data), (256,))]
        loss = loss_fn(net, torch.randn_like(x1), x1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _noise(n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def _rectdiff_dopri5(adapted: adapters.Adapted, eps: torch.Tensor) -> torch.Tensor:
    model, form, prediction = adapted
    with torch.no_grad():
        return samplers.sample(model, eps, form=form, prediction=prediction, solver="dopri5",
                               rtol=TOL, atol=TOL)  # fmt: skip


def _one_step_improvement(adapted: adapters.Adapted, tmp_path, steps: int = 1500) -> tuple:
    """(teacher, student) one-step sliced W2 to held-out data after pairs -> rectify."""
    model, form, prediction = adapted
    store = generate_pairs(model, form=form, prediction=prediction, num_pairs=4096,
                           out=tmp_path / "pairs", solver="dpmpp_2m", steps=32, shape=(2,),
                           progress=False)  # fmt: skip
    student = copy.deepcopy(model).train()
    config = TrainConfig(steps=steps, batch_size=256, lr=1e-3, seed=0)
    rectify(student, store, form=form, prediction=prediction, config=config, progress=False)
    held_out = eight_gaussians(N_EVAL, seed=123)[0]
    eps = _noise(N_EVAL, seed=7)
    distances = []
    for net in (model, student.eval()):
        with torch.no_grad():
            x = samplers.sample(net, eps, form=form, prediction=prediction, solver="ddim", steps=1)
        distances.append(sliced_wasserstein(x, held_out))
    print(
        f"\n{type(model.net).__name__}: one-step sliced W2 {distances[0]:.3g} -> {distances[1]:.3g}"
    )
    return tuple(distances)


def _tutorial_loss(sigma_min: float):
    def loss(net, x0, x1):  # Lipman et al. 2023 eq. 20-23: noise x0 at s = 0
        s = torch.rand(len(x1), 1)
        x_s = s * x1 + (1 - (1 - sigma_min) * s) * x0
        return ((net(x_s, s[:, 0]) - (x1 - (1 - sigma_min) * x0)) ** 2).mean()

    return loss


@pytest.fixture(scope="module")
def tutorial_net() -> nn.Module:
    return _fit(TutorialNet(), _tutorial_loss(0.0))


def test_flow_tutorial_matches_torchdiffeq_and_rectifies(tutorial_net, tmp_path) -> None:
    eps = _noise()
    theirs = odeint(lambda s, x: tutorial_net(x, s), eps, torch.tensor([0.0, 1.0]),
                    method="dopri5", rtol=TOL, atol=TOL)[-1]  # fmt: skip
    adapted = adapters.adapt(tutorial_net, "flow-tutorial")
    assert adapted.form == forms.FlowMatching(t_min=adapters.T_MIN, t_max=1.0)
    assert _relative(_rectdiff_dopri5(adapted, eps), theirs) < 1e-4
    # the pitfall it removes: the bare network read as rectdiff's flow samples another ODE
    bare = samplers.sample(tutorial_net, eps, form=adapted.form, prediction="flow",
                           solver="dopri5", rtol=TOL, atol=TOL)  # fmt: skip
    assert _relative(bare, theirs) > 0.3
    teacher, student = _one_step_improvement(adapted, tmp_path)
    assert student <= 0.5 * teacher, (teacher, student)


def test_flow_tutorial_sigma_min_and_backward_time(tmp_path) -> None:
    """sigma_min > 0 is FlowMatching(sigma_min); a field already in rectdiff's direction
    (noise at t = 1, integrated backwards with rk4) needs no flip."""
    sigma_min = 0.05
    net = _fit(TutorialNet(), _tutorial_loss(sigma_min), steps=400)
    eps = _noise()
    theirs = odeint(lambda s, x: net(x, s), eps, torch.tensor([0.0, 1.0]), method="dopri5",
                    rtol=TOL, atol=TOL)[-1]  # fmt: skip
    adapted = adapters.flow_tutorial(net, sigma_min=sigma_min)
    assert adapted.form.sigma_min == sigma_min and float(adapted.form.sigma(0.0)) == sigma_min
    assert _relative(_rectdiff_dopri5(adapted, eps), theirs) < 1e-4

    backward = TutorialNet()  # trained with noise at t = 1: velocity d x / d t, t = 1 -> 0
    backward.load_state_dict(net.state_dict())

    class Backward(nn.Module):  # a VectorField(t, x) in rectdiff's direction
        def __init__(self) -> None:
            super().__init__()
            self.inner = backward

        def forward(self, t, x):
            return -self.inner(x, 1 - t)

    field = Backward()
    theirs_rk4 = odeint(field, eps, torch.linspace(1.0, 0.0, 101), method="rk4")[-1]
    model, form, prediction = adapters.flow_tutorial(field, sigma_min=sigma_min, noise_at=1,
                                                     call="t_x")  # fmt: skip
    ours = samplers.sample(model, eps, form=form, prediction=prediction, solver="rk4", steps=100,
                           t_grid="uniform")  # fmt: skip
    assert _relative(ours, theirs_rk4) < 1e-5


class LabelNet(nn.Module):
    """A class-conditional tutorial field ``net(x, t, labels)`` (labels positional)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, hidden)
        self.inp = nn.Linear(3, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))  # fmt: skip

    def forward(self, x, t, labels):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        return self.out(self.inp(torch.cat([x, t[:, None]], 1)) + self.embed(labels))


def test_class_conditional_tutorial_model_takes_its_labels_positionally() -> None:
    data, labels = eight_gaussians(N_TRAIN, seed=0)
    net = LabelNet()
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(300):
        idx = torch.randint(len(data), (256,))
        x1, y, x0, s = data[idx], labels[idx], torch.randn(256, 2), torch.rand(256)
        loss = ((net(s[:, None] * x1 + (1 - s[:, None]) * x0, s, y) - (x1 - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    eps, y = _noise(), torch.arange(256) % 8
    with torch.no_grad():
        theirs = odeint(lambda s, x: net(x, s, y), eps, torch.tensor([0.0, 1.0]),
                        method="dopri5", rtol=TOL, atol=TOL)[-1]  # fmt: skip
        model, form, prediction = adapters.flow_tutorial(net, cond_args=("class_labels",))
        ours = samplers.sample(model, eps, form=form, prediction=prediction, solver="dopri5",
                               rtol=TOL, atol=TOL, cond={"class_labels": y})  # fmt: skip
    assert _relative(ours, theirs) < 1e-4


def test_torchcfm_matches_its_odeint_and_rectifies(tmp_path) -> None:
    torchcfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    from torchcfm.models.models import MLP

    matcher = torchcfm.ConditionalFlowMatcher(sigma=0.0)

    def loss(net, x0, x1):  # torchcfm README: t, xt, ut = FM.sample_location_and_conditional_flow
        t, xt, ut = matcher.sample_location_and_conditional_flow(x0, x1)
        return ((net(torch.cat([xt, t[:, None]], dim=-1)) - ut) ** 2).mean()

    net = _fit(MLP(dim=2, w=128, time_varying=True), loss)
    eps = _noise()

    def field(t, x):  # torchcfm's examples: torchdiffeq.odeint on cat([x, t])
        return net(torch.cat([x, t.expand(x.shape[0])[:, None]], dim=-1))

    theirs = odeint(field, eps, torch.tensor([0.0, 1.0]), method="dopri5", rtol=TOL, atol=TOL)[-1]
    adapted = adapters.torchcfm(net, matcher=matcher)
    assert adapted.form == forms.FlowMatching(t_min=adapters.T_MIN, t_max=1.0)
    assert _relative(_rectdiff_dopri5(adapted, eps), theirs) < 1e-4
    teacher, student = _one_step_improvement(adapted, tmp_path)
    assert student <= 0.5 * teacher, (teacher, student)


def test_torchcfm_paths_are_the_matchers_marginals() -> None:
    """x_t of each matcher's path has the adapted form's alpha and sigma (its mean and std)."""
    torchcfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    x1 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    x0 = torch.randn(200_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for cls in (torchcfm.ConditionalFlowMatcher, torchcfm.TargetConditionalFlowMatcher,
                torchcfm.VariancePreservingConditionalFlowMatcher):  # fmt: skip
        matcher = cls(sigma=0.1)
        s = torch.full((200_000,), 0.3, dtype=torch.float64)
        torch.manual_seed(1)  # the blur z independent of the noise x0
        xt = matcher.sample_xt(x0, x1, s, matcher.sample_noise_like(x0))
        form = adapters.torchcfm(nn.Identity(), matcher=matcher).form
        alpha, sigma = float(form.alpha(0.7)), float(form.sigma(0.7))  # t = 1 - s
        assert abs(float(xt.mean()) - 0.7 * alpha) < 3e-3, cls.__name__
        assert abs(float(xt.std()) - sigma) < 3e-3, cls.__name__


class KeywordNet(TutorialNet):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # ModelWrapper: x=, t=
        return super().forward(x, t)


@pytest.mark.parametrize(
    "scheduler", ["CondOTScheduler", "CosineScheduler", "VPScheduler", "PolynomialConvexScheduler"]
)
def test_flow_matching_matches_its_ode_solver(scheduler: str) -> None:
    pytest.importorskip("flow_matching")
    from flow_matching.path import AffineProbPath
    from flow_matching.path import scheduler as schedulers
    from flow_matching.solver import ODESolver

    sched = getattr(schedulers, scheduler)(**({"n": 2.0} if "Polynomial" in scheduler else {}))
    path = AffineProbPath(scheduler=sched)

    def loss(net, x0, x1):  # flow_matching's 2-D example: path.sample, then dx_t
        t = torch.rand(len(x1)).clamp(0, 1 - 1e-3)
        sample = path.sample(t=t, x_0=x0, x_1=x1)
        return ((net(x=sample.x_t, t=sample.t) - sample.dx_t) ** 2).mean()

    net = _fit(KeywordNet(), loss, steps=400)
    adapted = adapters.flow_matching(net, path)
    eps = _noise()
    x_start = adapted.form.sigma(adapted.form.t_max).float() * eps  # rectdiff's start
    theirs = ODESolver(velocity_model=net).sample(
        x_init=x_start, step_size=None, method="dopri5", atol=TOL, rtol=TOL,
        time_grid=torch.tensor([1.0 - adapted.form.t_max, 1.0]),
    )  # fmt: skip
    assert _relative(_rectdiff_dopri5(adapted, eps), theirs) < 1e-4
    # its alpha, sigma in s are the form's at t = 1 - s
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    out = sched(s)
    torch.testing.assert_close(adapted.form.alpha(1 - s), out.alpha_t, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(adapted.form.sigma(1 - s), out.sigma_t, rtol=1e-9, atol=1e-12)


def test_flow_matching_model_rectifies(tmp_path) -> None:
    """A CondOT velocity model trained with flow_matching's AffineProbPath, rectified."""
    pytest.importorskip("flow_matching")
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    path = AffineProbPath(scheduler=CondOTScheduler())

    def loss(net, x0, x1):
        sample = path.sample(t=torch.rand(len(x1)), x_0=x0, x_1=x1)
        return ((net(x=sample.x_t, t=sample.t) - sample.dx_t) ** 2).mean()

    adapted = adapters.flow_matching(_fit(KeywordNet(), loss), path)
    teacher, student = _one_step_improvement(adapted, tmp_path)
    assert student <= 0.5 * teacher, (teacher, student)


def test_flow_matching_nfe_no_more_than_its_solver() -> None:
    """In t (form.ode_variable), rectdiff's dopri5 on flow matching takes the peer's steps."""
    pytest.importorskip("flow_matching")
    from flow_matching.path.scheduler import CondOTScheduler
    from flow_matching.solver import ODESolver

    net = _fit(KeywordNet(), _tutorial_loss(0.0), steps=300)
    calls = []

    def counted(x, t):
        calls.append(1)
        return net(x=x, t=t)

    eps = _noise()
    ODESolver(velocity_model=counted).sample(x_init=eps, step_size=None, method="dopri5",
                                             atol=TOL, rtol=TOL)  # fmt: skip
    model, form, prediction = adapters.flow_matching(net, CondOTScheduler())
    traj = samplers.sample(model, eps, form=form, prediction=prediction, solver="dopri5",
                           rtol=TOL, atol=TOL, return_trajectory=True)  # fmt: skip
    assert traj.nfe <= len(calls), (
        traj.nfe,
        len(calls),
    )  # the last stage is the final step's input


def test_rectified_flow_pytorch_matches_its_sampler() -> None:
    try:
        from rectified_flow_pytorch import RectifiedFlow
    except ImportError as err:  # it imports torchvision, which has no CPU wheel here
        pytest.skip(f"rectified-flow-pytorch does not import (it needs torchvision): {err}")

    class TimesNet(TutorialNet):
        def forward(self, x, times):
            return super().forward(x, times)

    rf = RectifiedFlow(TimesNet(), data_normalize_fn=None, data_unnormalize_fn=None,
                       odeint_kwargs={"method": "dopri5", "rtol": TOL, "atol": TOL})  # fmt: skip
    _fit(rf, lambda m, x0, x1: m(x1, noise=x0))
    eps = _noise()
    theirs = rf.sample(noise=eps, steps=2, data_shape=(2,))
    assert _relative(_rectdiff_dopri5(adapters.rectified_flow_pytorch(rf), eps), theirs) < 1e-4


def test_bad_conventions_are_named() -> None:
    with pytest.raises(ValueError, match="unknown model convention 'lucidrains'.*flow-tutorial"):
        adapters.adapt(nn.Identity(), "lucidrains")
    with pytest.raises(ValueError, match="bad options.*sigma_max.*sigma_min"):
        adapters.adapt(nn.Identity(), "flow-tutorial", sigma_max=1.0)
    with pytest.raises(ValueError, match="unknown target .*'score'"):
        adapters.flow_tutorial(nn.Identity(), target="score")
    with pytest.raises(ValueError, match="unknown torchcfm matcher 'SchrodingerBridge"):
        adapters.torchcfm(nn.Identity(), matcher="SchrodingerBridgeConditionalFlowMatcher")

    class GeodesicScheduler:
        pass

    with pytest.raises(ValueError, match="unsupported flow_matching scheduler 'GeodesicScheduler'"):
        adapters.flow_matching(nn.Identity(), GeodesicScheduler())
