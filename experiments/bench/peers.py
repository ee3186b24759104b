"""rectdiff side by side with the peer libraries on 8 Gaussians, in one process.

Peers (the optional ``bench`` extra: ``pip install -e .[bench]``): rectified-flow-pytorch
0.14.0 (lucidrains), flow-matching 1.0.10 (facebookresearch), torchcfm 1.0.7 (I-CFM and
OT-CFM). Every system trains the same MLP (``[x, t]`` -> 3 x (Linear 128, SiLU) -> Linear)
from the same initial weights per seed, with Adam at lr 1e-3 and batch 256, for
``--teacher-steps`` steps on its own objective; then ``--pairs`` teacher pairs (each
library's dopri5 at rtol = atol = 1e-5; torchcfm has no sampler of its own, so torchdiffeq's)
retrain a copy of the teacher for ``--reflow-steps`` steps (reflow, Liu et al. 2023), and
where the library has it, online reflow (pairs drawn from the frozen teacher every step).

rectdiff runs flow matching (flow prediction, uniform t: the peers' objective) and VP,
sub-VP and VE with v-prediction, ``training.equalize``-d to that objective (importance
sampling in logsnr, its draws t-quantiles of the same uniform numbers as rectdiff FM's:
common random numbers), their networks wrapped in ``models.Preconditioned`` (c_in, c_out; time
input t): predicting flow matching's v (rows without a suffix), or its velocity turned into v
by a skip connection ("FM velocity"), or predicting v but drawing flow matching's times
("FM times": the velocity rows' sampler and weights, which then vary on the network's own
output). Its first-order sampler is DDIM (= Euler in t for flow matching) on the flow-matching
uniform grid mapped through logsnr, so every form takes the same steps in y = x / alpha.
The "OT" rows train rectdiff FM and VP v eq. with ``coupling="ot"`` (each batch's noise
re-paired with its data by the exact minibatch OT assignment, ``training.minibatch_ot``; the
generalisation of torchcfm's OT-CFM, which draws its pairs from the same plan with
replacement: the row "rectdiff FM OT, with replacement" draws as it does); their reflow
columns are OT coupling followed by reflow (the pairs are then used as given, like every
system's).

Columns: energy distance (V-statistic, ``metrics.energy_distance``) of N_EVAL = 10 000
samples against 10 000 held-out data points (the same points for every system and seed) for
the teacher at dopri5 and at 1/2/4 first-order steps, the reflowed
student at 1/2 steps and the online-reflowed one at 1 step; pair-generation seconds and
teacher training seconds. Then, on one seed's flow-matching teacher (the same velocity field
for every library), each library's dopri5 NFE and RMS endpoint error against torchdiffeq's
dopri5 at 1e-10 in float64; and the overhead per training step and per Euler step at batch
256 against hand-written PyTorch (``overhead.round_robin_times``: blocks of every system
and of the plain step, round-robin in rotated order; the median and the minimum, least
disturbed, block in wall-clock time, and the median block in the thread's CPU time, which
time spent descheduled does not count; and the median of the per-round ratios of CPU time
with its 95 % interval, ``overhead.paired_ratio``). Its first row is a control, the plain
step against itself: what the shared machine's noise alone gives. Below it, each rectdiff
step against the fastest peer's, paired per round the same way.

rectified-flow-pytorch imports torchvision (``save_image``, ``VGG16_Weights``), which has no
CPU wheel here; nothing it imports from torchvision runs in this benchmark, so a stub module
is placed in ``sys.modules`` before the import (:func:`stub_torchvision`). Run
single-threaded:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/bench/peers.py [--quick] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from rectdiff import forms, models, samplers
from rectdiff import training as ts
from rectdiff.data import load_data
from rectdiff.metrics.distances import energy_distance
from rectdiff.rectify.coupling import start_noise
from rectdiff.rectify.online import Diffusion, Reflow
from rectdiff.training.minibatch_ot import ot_assignment

sys.path.insert(0, str(Path(__file__).parent))
from overhead import paired_ratio, round_robin_times  # noqa: E402

#: N_EVAL: samples and held-out points per energy distance. The V-statistic's bias is
#: (E|X - X'| + E|Y - Y'|) / n = 5.1 / n here (E|X - X'| = 2.54 on 8 Gaussians): 2.5e-3 at
#: 2000, a third of a good teacher's value, and the estimate then moves by +-20 % between
#: evaluation sets for one fixed model (+-10-20 % at 10 000)
BATCH, LR, N_EVAL, TOL = 256, 1e-3, 10_000, 1e-5
#: the overhead table's control row: the plain step again, on its own copy of the network
CONTROL = "plain PyTorch (control)"
FM = forms.FlowMatching()


def stub_torchvision() -> None:
    """Put a stand-in ``torchvision`` in ``sys.modules`` (once).

    rectified-flow-pytorch imports ``torchvision.utils.save_image`` and
    ``torchvision.models.VGG16_Weights`` at module level (image saving and LPIPS); neither is
    used by the flow-matching objective or sampler benchmarked here, so the real package is
    never imported (it has no CPU wheel), even where it is installed.
    """
    if "torchvision" in sys.modules:
        return
    # diffusers (which rectdiff imports on first use) asks importlib whether torchvision is
    # installed, which a stand-in without a spec breaks: import it with the real answer first
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401

    root = types.ModuleType("torchvision")
    utils, tv_models, transforms = (
        types.ModuleType(f"torchvision.{n}") for n in ("utils", "models", "transforms")
    )

    def unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision is stubbed in experiments/bench/peers.py")

    utils.save_image = unavailable  # type: ignore[attr-defined]
    tv_models.VGG16_Weights = types.SimpleNamespace(DEFAULT=None)  # type: ignore[attr-defined]
    tv_models.vgg16 = unavailable  # type: ignore[attr-defined]
    transforms.Compose = unavailable  # type: ignore[attr-defined]
    root.utils, root.models, root.transforms = utils, tv_models, transforms  # type: ignore[attr-defined]
    sys.modules.update({"torchvision": root, "torchvision.utils": utils,
                        "torchvision.models": tv_models, "torchvision.transforms": transforms})  # fmt: skip


class MLP(nn.Module):
    """``[x, t]`` -> 3 x (Linear 128, SiLU) -> Linear; t a scalar or ``(B,)``, by any keyword."""

    def __init__(self, dim: int = 2, hidden: int = 128) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim),
        )  # fmt: skip

    def forward(self, x: Tensor, t: Tensor | None = None, times: Tensor | None = None) -> Tensor:
        t = times if t is None else t
        t = t.to(x.dtype).reshape(-1)
        t = t.expand(len(x)) if t.numel() == 1 else t
        return self.main(torch.cat([x, t[:, None]], dim=1))


# --- the systems: train / sample / pairs / reflow, each in its own library's terms -------
class System:
    name = "system"
    online = False

    def __init__(self, net: nn.Module, data: Tensor) -> None:
        self.net, self.data = net, data

    def loss(self, x0: Tensor, noise: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def sample(self, noise: Tensor, steps: int | None) -> Tensor:
        """``steps`` first-order steps, or dopri5 at TOL when None."""
        raise NotImplementedError

    def train(self, steps: int, pairs: tuple[Tensor, Tensor] | None = None, seed: int = 0) -> float:
        """Adam at LR, batch BATCH; on ``pairs = (noise, x0)`` when given. Returns seconds."""
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=LR)
        start = time.perf_counter()
        for _ in range(steps):
            if pairs is None:
                x0, noise = self.data[torch.randint(len(self.data), (BATCH,), generator=gen)], None
            else:
                idx = torch.randint(len(pairs[0]), (BATCH,), generator=gen)
                noise, x0 = pairs[0][idx], pairs[1][idx]
            loss = self.loss(x0, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    def online_reflow(self, steps: int, seed: int) -> nn.Module | None:
        return None


class RectdiffFM(System):
    name = "rectdiff FM"
    online = True

    def __init__(self, net: nn.Module, data: Tensor, coupling: str = "independent") -> None:
        super().__init__(net, data)
        self.form = FM
        self.diffusion = Diffusion(net, form=FM, prediction="flow", coupling=coupling,
                                   sample_shape=(2,))  # fmt: skip
        if coupling == "ot":
            self.name, self.online = "rectdiff FM OT", False

    def loss(self, x0: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is not None:
            noise = start_noise(noise, x0, self.form)
        return self.diffusion(x0, eps=noise)

    def grid(self, steps: int) -> Tensor:
        return samplers.time_grid(FM, steps, "uniform")

    def sample(self, noise: Tensor, steps: int | None) -> Tensor:
        if steps is None:
            return self.diffusion.sample(eps=noise, solver="dopri5", rtol=TOL, atol=TOL)
        return self.diffusion.sample(eps=noise, solver="ddim", t_grid=self.grid(steps))

    def online_reflow(self, steps: int, seed: int) -> nn.Module:
        reflow = Reflow(self.diffusion, solver="dpmpp_2m", steps=16)
        optimizer = torch.optim.Adam(reflow.student.parameters(), lr=LR)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            loss = reflow(BATCH, generator=gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return reflow.student


class RectdiffFMReplace(RectdiffFM):
    """rectdiff FM OT with torchcfm's draw: B pairs from the exact assignment, with
    replacement (torch's generator, seeded, where torchcfm uses numpy's global state)."""

    def __init__(self, net: nn.Module, data: Tensor) -> None:
        super().__init__(net, data)
        self.name, self.online = "rectdiff FM OT, with replacement", False

    def loss(self, x0: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is not None:  # fixed couplings (reflow pairs) are used as given
            return super().loss(x0, noise)
        eps = torch.randn_like(x0)
        paired = eps[ot_assignment(x0, eps)]
        rows = torch.randint(len(x0), (len(x0),))
        return self.diffusion(x0[rows], eps=paired[rows])


class RectdiffEqualized(RectdiffFM):
    """VP / sub-VP / VE, v-prediction, equalized to flow matching's (flow, uniform t) objective."""

    online = False

    def __init__(
        self, net: nn.Module, data: Tensor, form: forms.Form, label: str,
        coupling: str = "independent", scaling: str = "fm", times: str = "equalized",
    ) -> None:  # fmt: skip
        System.__init__(self, net, data)
        self.name, self.form = f"rectdiff {label} v eq.{' OT' if coupling == 'ot' else ''}", form

        def reference(lam: Tensor) -> Tensor:
            return ts.implied_weighting(FM, "flow", "uniform", "none", lam)

        # "fm": the network sees flow matching's x_t and t at the same logsnr and predicts
        # FM's v (c_in = 1 / (alpha + sigma), c_out = alpha + sigma), and equalize samples
        # so that each sample's weight on that output is the same: the training is then the
        # same in every form. "velocity": as "fm", and the network predicts FM's velocity
        # eps - x0, turned into v by a skip connection: the peers' regression exactly, in
        # every form. "edm": EDM's c_in and c_out for data of the data's std, the form's own
        # t as time input, and the weight constant on the loss in form units (what this
        # benchmark ran before)
        if scaling in ("velocity", "edm"):
            self.name += ", FM velocity" if scaling == "velocity" else ", EDM scaling"
        if times == "fm":
            self.name += ", FM times"
        wrapped = models.Preconditioned(
            net, form, sigma_data=float(data.std()), output_prediction="v",
            time_input="t" if scaling == "edm" else "fm", scaling=scaling,
        )  # fmt: skip
        lo_hi = ts.common_logsnr_range(form, FM)
        output_scale = None if scaling == "edm" else wrapped.c_out
        if times == "fm":  # times drawn as flow matching draws them (uniform t at equal
            # logsnr): the velocity preconditioning's equalized sampler, whose weights are
            # then constant on a velocity output and vary on this network's own output
            output_scale = models.Preconditioned(
                net, form, output_prediction="v", time_input="fm", scaling="velocity"
            ).c_out
        # quantile="t": each step's times are the same quantiles of the same uniform numbers
        # as rectdiff FM's (common random numbers; "logsnr" would mirror them)
        sampler, weighting = ts.equalize(form, "v", reference, logsnr_range=lo_hi,
                                         output_scale=output_scale, quantile="t")  # fmt: skip
        self.net = wrapped
        self.diffusion = Diffusion(wrapped, form=form, prediction="v", time_sampler=sampler,
                                   weighting=weighting, coupling=coupling,
                                   sample_shape=(2,))  # fmt: skip

    def grid(self, steps: int) -> Tensor:
        """Flow matching's uniform grid mapped through logsnr into this form's t."""
        fm_grid = samplers.time_grid(FM, steps, "uniform")
        t = self.form.t_from_logsnr(FM.logsnr(fm_grid[:-1])).clamp(self.form.t_min, self.form.t_max)
        t[0] = self.form.t_max
        return torch.cat([t, torch.zeros(1, dtype=t.dtype)])


def _peer_dopri5(
    velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int | None
) -> Tensor:
    """torchdiffeq from noise (t = 0) to data (t = 1): Euler with ``steps`` steps, or dopri5."""
    if steps is None:
        grid = torch.tensor([0.0, 1.0])
        return odeint(velocity, noise, grid, rtol=TOL, atol=TOL, method="dopri5")[-1]
    grid = torch.linspace(0, 1, steps + 1)
    return odeint(velocity, noise, grid, method="euler")[-1]


class TorchCFM(System):
    name = "torchcfm I-CFM"

    def __init__(self, net: nn.Module, data: Tensor, ot: bool = False) -> None:
        super().__init__(net, data)
        from torchcfm.conditional_flow_matching import (
            ConditionalFlowMatcher,
            ExactOptimalTransportConditionalFlowMatcher,
        )

        self.ot = ot
        self.name = "torchcfm OT-CFM" if ot else self.name
        self.matcher = (
            ExactOptimalTransportConditionalFlowMatcher if ot else ConditionalFlowMatcher
        )(sigma=0.0)

    def loss(self, x0: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            t, x_t, u_t = self.matcher.sample_location_and_conditional_flow(
                torch.randn_like(x0), x0
            )
        else:  # fixed couplings: no re-pairing
            t = torch.rand(len(x0))
            x_t = t[:, None] * x0 + (1 - t[:, None]) * noise
            u_t = x0 - noise
        return (self.net(x_t, t) - u_t).square().mean()

    def sample(self, noise: Tensor, steps: int | None) -> Tensor:
        return _peer_dopri5(lambda t, x: self.net(x, t), noise, steps)


class FlowMatchingLib(System):
    name = "flow_matching"

    def __init__(self, net: nn.Module, data: Tensor) -> None:
        super().__init__(net, data)
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler
        from flow_matching.solver import ODESolver

        self.path = AffineProbPath(scheduler=CondOTScheduler())
        self.solver = ODESolver(velocity_model=self.net)

    def loss(self, x0: Tensor, noise: Tensor | None = None) -> Tensor:
        noise = torch.randn_like(x0) if noise is None else noise
        sample = self.path.sample(t=torch.rand(len(x0)), x_0=noise, x_1=x0)
        return (self.net(sample.x_t, sample.t) - sample.dx_t).square().mean()

    def sample(self, noise: Tensor, steps: int | None) -> Tensor:
        if steps is None:
            return self.solver.sample(
                x_init=noise, step_size=None, method="dopri5", atol=TOL, rtol=TOL
            )
        return self.solver.sample(x_init=noise, step_size=1.0 / steps, method="euler")


class LucidrainsRF(System):
    name = "rectified-flow-pytorch"
    online = True

    def __init__(self, net: nn.Module, data: Tensor) -> None:
        super().__init__(net, data)
        stub_torchvision()
        from rectified_flow_pytorch import RectifiedFlow

        self.rf = RectifiedFlow(net, data_normalize_fn=lambda x: x, data_unnormalize_fn=lambda x: x,
                                data_shape=(2,))  # fmt: skip

    def loss(self, x0: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.rf(x0, noise=noise)

    def sample(self, noise: Tensor, steps: int | None) -> Tensor:
        if steps is None:
            self.rf.odeint_kwargs = {"method": "dopri5", "rtol": TOL, "atol": TOL}
            return self.rf.sample(noise=noise, steps=2)
        self.rf.odeint_kwargs = {"method": "euler"}
        return self.rf.sample(noise=noise, steps=steps + 1)

    def online_reflow(self, steps: int, seed: int) -> nn.Module:
        from rectified_flow_pytorch import Reflow as LucidReflow

        if not isinstance(LucidReflow.__dict__.get("device"), property):
            # 0.14.0's Reflow.device lacks @property, so Reflow.forward fails: patched here
            LucidReflow.device = property(lambda self: next(self.parameters()).device)

        self.rf.odeint_kwargs = {"method": "midpoint", "rtol": TOL, "atol": TOL}  # its default
        reflow = LucidReflow(self.rf, batch_size=BATCH)  # trains self.rf, a frozen copy pairs
        optimizer = torch.optim.Adam(reflow.parameters(), lr=LR)
        torch.manual_seed(seed)
        for _ in range(steps):
            loss = reflow()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return reflow.model


def _equalized(form: Callable[[], forms.Form], label: str, **options: str) -> Callable[..., System]:
    """A ``SYSTEMS`` entry: ``RectdiffEqualized`` on a fresh ``form()`` with ``options``."""
    return lambda n, d: RectdiffEqualized(n, d, form(), label, **options)


#: the equalized forms and, per row suffix, the options that make the row
_EQ_FORMS = {"VP": forms.VP, "sub-VP": forms.SubVP, "VE": forms.VE, "FM": lambda: FM}
_EQ_VARIANTS = {"": {}, ", FM velocity": {"scaling": "velocity"}, ", FM times": {"times": "fm"}}

SYSTEMS: dict[str, Callable[[nn.Module, Tensor], System]] = {
    "rectdiff FM": RectdiffFM,
    **{
        f"rectdiff {label} v eq.{suffix}": _equalized(form, label, **options)
        for suffix, options in _EQ_VARIANTS.items()
        for label, form in _EQ_FORMS.items()
    },
    "rectdiff VP v eq., EDM scaling": _equalized(forms.VP, "VP", scaling="edm"),
    "rectdiff VE v eq., EDM scaling": _equalized(forms.VE, "VE", scaling="edm"),
    "rectdiff FM OT": lambda n, d: RectdiffFM(n, d, coupling="ot"),
    "rectdiff FM OT, with replacement": RectdiffFMReplace,
    "rectdiff VP v eq. OT": _equalized(forms.VP, "VP", coupling="ot"),
    "rectified-flow-pytorch": LucidrainsRF,
    "flow_matching": FlowMatchingLib,
    "torchcfm I-CFM": TorchCFM,
    "torchcfm OT-CFM": lambda n, d: TorchCFM(n, d, ot=True),
}


#: the peers' flow matching, in the overhead table
PEERS = ("rectified-flow-pytorch", "flow_matching", "torchcfm I-CFM")


# --- quality -------------------------------------------------------------------------------
def quality(
    name: str, seed: int, args: argparse.Namespace, data: Tensor, test: Tensor
) -> dict[str, float]:
    torch.manual_seed(seed)
    init = MLP()
    system = SYSTEMS[name](copy.deepcopy(init), data)
    row: dict[str, float] = {"train s": system.train(args.teacher_steps, seed=seed)}
    noise = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(10_000 + seed))
    system.net.eval()
    with torch.no_grad():
        row["dopri5"] = energy_distance(system.sample(noise, None), test)
        for k in (1, 2, 4):
            row[f"{k} step"] = energy_distance(system.sample(noise, k), test)
        pair_noise = torch.randn(
            args.pairs, 2, generator=torch.Generator().manual_seed(20_000 + seed)
        )
        start = time.perf_counter()
        pair_x0 = system.sample(pair_noise, None)
        row["pairs s"] = time.perf_counter() - start
    if system.online and args.online_steps > 0:
        teacher_state = copy.deepcopy(system)
        student = teacher_state.online_reflow(args.online_steps, seed)
        with torch.no_grad():
            if isinstance(teacher_state, RectdiffFM):
                x = samplers.sample(
                    student.net, noise, form=FM, prediction="flow", solver="ddim", steps=1
                )
            else:
                teacher_state.rf = student
                x = teacher_state.sample(noise, 1)
        row["online 1"] = energy_distance(x, test)
    system.net.train()
    system.train(args.reflow_steps, pairs=(pair_noise, pair_x0.detach()), seed=seed + 1)
    system.net.eval()
    with torch.no_grad():
        for k in (1, 2):
            row[f"reflow {k}"] = energy_distance(system.sample(noise, k), test)
    return row


# --- dopri5 on one velocity field ----------------------------------------------------------
def dopri5_counts(net: nn.Module) -> dict[str, tuple[int, float]]:
    """NFE and RMS endpoint error of each library's dopri5 at TOL on the rectdiff flow-matching
    teacher ``net`` (velocity towards noise in t; the peers integrate towards data in 1 - t)."""
    net = net.eval()
    calls = [0]

    def counted(x: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        return net(x, t)

    def peer_velocity(x: Tensor, t: Tensor) -> Tensor:  # their t = 0 noise, 1 data
        return -counted(x, 1 - t)

    noise = torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(1))
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        ref = odeint(lambda t, x: -net64(x, 1 - t), noise.double(), torch.tensor([0.0, 1.0], dtype=torch.float64),
                     rtol=1e-10, atol=1e-10, method="dopri5")[-1]  # fmt: skip
        out: dict[str, tuple[int, float]] = {}
        open_fm = forms.FlowMatching(t_min=0.0, t_max=1.0)
        runs = {
            "rectdiff": lambda: samplers.sample(counted, noise, form=open_fm, prediction="flow",
                                                solver="dopri5", rtol=TOL, atol=TOL),
            "torchdiffeq (torchcfm)": lambda: _peer_dopri5(lambda t, x: peer_velocity(x, t), noise, None),
        }  # fmt: skip
        from flow_matching.solver import ODESolver

        fm_solver = ODESolver(velocity_model=lambda x, t: peer_velocity(x, t))
        runs["flow_matching"] = lambda: fm_solver.sample(
            x_init=noise, step_size=None, method="dopri5", atol=TOL, rtol=TOL
        )
        try:
            stub_torchvision()
            from rectified_flow_pytorch import RectifiedFlow

            rf = RectifiedFlow(_PeerNet(peer_velocity), data_normalize_fn=lambda x: x,
                               data_unnormalize_fn=lambda x: x, data_shape=(2,),
                               odeint_kwargs={"method": "dopri5", "rtol": TOL, "atol": TOL})  # fmt: skip
            runs["rectified-flow-pytorch"] = lambda: rf.sample(noise=noise, steps=2)
        except ImportError:
            pass
        for name, run in runs.items():
            calls[0] = 0
            x = run()
            out[name] = (calls[0], float((x.double() - ref).square().mean().sqrt()))
    return out


class _PeerNet(nn.Module):
    def __init__(self, velocity: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.velocity = velocity
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, times: Tensor) -> Tensor:
        return self.velocity(x, times)


# --- overhead per step -----------------------------------------------------------------------
def overhead(
    data: Tensor, rounds: int, block: int, euler_steps: int = 100, instances: int = 1
) -> dict[str, dict[str, tuple[float, ...]]]:
    """Per system, ``{"train": (median, min, CPU median, paired, lo, hi)[, "euler": ...]}``:
    ratios to plain PyTorch over blocks of every system and the plain step timed round-robin
    (``overhead.round_robin_times``): of the median and of the least disturbed block in
    wall-clock time, of the median block in the thread's CPU time, and the median of the
    per-round CPU-time ratios with its 95 % interval (``overhead.paired_ratio``). The system
    "plain PyTorch (control)" is the plain step again, on its own copy of the network: its
    ratios show what the machine's noise alone gives. With ``instances`` > 1 every system,
    the plain step included, is built that many times on fresh copies of the network, and
    round r times copy ``r % instances`` of each: the copies' placement in memory moves
    identical steps by a few per cent, which the rotation averages over."""

    def ratios(times: dict[str, list[float]], plain: dict[str, list[float]]) -> tuple[float, ...]:
        median = statistics.median
        return (median(times["wall"]) / median(plain["wall"]), min(times["wall"]) /
                min(plain["wall"]), median(times["cpu"]) / median(plain["cpu"]),
                *paired_ratio(times["cpu"], plain["cpu"]))  # fmt: skip

    torch.manual_seed(0)
    init = MLP()
    gen = torch.Generator().manual_seed(0)

    def batch() -> Tensor:
        return data[torch.randint(len(data), (BATCH,), generator=gen)]

    def stepper(
        loss_fn: Callable[[Tensor], Tensor], params: list[nn.Parameter]
    ) -> Callable[[], None]:
        optimizer = torch.optim.Adam(params, lr=LR)

        def step() -> None:
            loss = loss_fn(batch())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def hand_written(net: nn.Module) -> tuple[Callable[[], None], Callable[[], Tensor]]:
        """The hand-written training step and Euler loop on ``net``."""

        def loss(x0: Tensor) -> Tensor:
            noise, t = torch.randn_like(x0), torch.rand(len(x0))
            x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
            return (net(x_t, t) - (noise - x0)).square().mean()

        @torch.no_grad()
        def euler() -> Tensor:
            x, times = noise, grid_peer.tolist()
            for t, t_next in zip(times[:-1], times[1:], strict=True):
                x = x + (t_next - t) * net(x, torch.full((BATCH,), t))
            return x

        return stepper(loss, list(net.parameters())), euler

    noise = torch.randn(BATCH, 2)
    grid_peer = torch.linspace(0, 1, euler_steps + 1)

    def one_set() -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
        """Every system's training and Euler step, each on its own copy of the network."""
        plain, plain_euler = hand_written(copy.deepcopy(init))
        control, control_euler = hand_written(copy.deepcopy(init))  # the same, its own network
        systems = {name: SYSTEMS[name](copy.deepcopy(init), data) for name in
                   ("rectdiff FM", *PEERS)}  # fmt: skip
        trainer = ts.Trainer(copy.deepcopy(init), data, form=FM, prediction="flow",
                             config=ts.TrainConfig(steps=10**9, batch_size=BATCH, lr=LR,
                                                   grad_clip=0.0, lr_schedule="constant"))  # fmt: skip
        train_fns = {"plain": plain, CONTROL: control, "rectdiff Trainer": trainer.step}
        train_fns.update({("rectdiff Diffusion" if n == "rectdiff FM" else n):
                          stepper(s.loss, list(s.net.parameters())) for n, s in systems.items()})  # fmt: skip
        euler_fns = {
            "plain": plain_euler,
            CONTROL: control_euler,
            "rectdiff Diffusion": lambda: systems["rectdiff FM"].diffusion.sample(eps=noise, solver="euler", steps=euler_steps),
            "rectified-flow-pytorch": lambda: systems["rectified-flow-pytorch"].sample(noise, euler_steps),
            "flow_matching": lambda: systems["flow_matching"].sample(noise, euler_steps),
            "torchcfm I-CFM": lambda: systems["torchcfm I-CFM"].sample(noise, euler_steps),
        }  # fmt: skip
        return train_fns, euler_fns

    sets = [one_set() for _ in range(instances)]
    train_fns = {name: [s[0][name] for s in sets] for name in sets[0][0]}
    euler_fns = {name: [s[1][name] for s in sets] for name in sets[0][1]}
    for fns in train_fns.values():  # warm-up
        for fn in fns:
            for _ in range(20):
                fn()
    train = round_robin_times(train_fns, rounds, block)
    with torch.no_grad():
        euler = round_robin_times(euler_fns, max(5, rounds // 3), max(1, block // 10))
    out: dict[str, dict[str, tuple[float, ...]]] = {}
    for name in (n for n in train_fns if n != "plain"):
        out[name] = {"train": ratios(train[name], train["plain"])}
        if name in euler:
            out[name]["euler"] = ratios(euler[name], euler["plain"])
    for kind, times in (("train", train), ("euler", euler)):
        # the gap to the fastest peer, measured directly: each
        # round's rectdiff block against the same round's block of the fastest peer
        fastest = min(PEERS, key=lambda peer: out[peer][kind][3])
        for name in (n for n in times if n.startswith("rectdiff")):
            out[name][f"{kind} vs fastest peer"] = (
                fastest,
                *paired_ratio(times[name]["cpu"], times[fastest]["cpu"]),
            )
    return out


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run seeds first-seed .. first-seed + seeds - 1")  # fmt: skip
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--reflow-steps", type=int, default=3000)
    parser.add_argument("--online-steps", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--instances", type=int, default=3,
                        help="overhead: copies of every system, rotated over the rounds")  # fmt: skip
    parser.add_argument("--systems", default=";".join(SYSTEMS),
                        help="the systems to run, separated by ';' (names hold commas)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="1000 teacher and reflow steps, 300 online steps, 10 rounds")  # fmt: skip
    parser.add_argument("--table-only", action="store_true",
                        help="only the quality table (no dopri5 counts, no overhead)")  # fmt: skip
    parser.add_argument("--dopri5-only", action="store_true",
                        help="only the dopri5 NFE and endpoint-error table")  # fmt: skip
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the per-step overhead table (for a quiet machine)")  # fmt: skip
    args = parser.parse_args()
    if args.instances < 1:
        parser.error(f"--instances must be >= 1 (copies of each system), got {args.instances}.")
    if args.overhead_only:
        torch.set_num_threads(1)
        print_overhead(load_data("8gaussians", 100_000, seed=0), args)
        return
    if args.quick:
        args.teacher_steps, args.reflow_steps, args.online_steps, args.rounds = 1000, 1000, 300, 10
    torch.set_num_threads(1)
    data = load_data("8gaussians", 100_000, seed=0)
    test = load_data("8gaussians", N_EVAL, seed=123)
    names = [name.strip() for name in args.systems.split(";")]
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system {unknown[0]!r}; allowed: {'; '.join(SYSTEMS)}")
    if args.dopri5_only:
        print_dopri5(data, args)
        return
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name in names:
            rows[name].append(quality(name, seed, args, data, test))
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[name][-1].items()),
                  flush=True)  # fmt: skip
    cols = [
        "dopri5",
        "1 step",
        "2 step",
        "4 step",
        "reflow 1",
        "reflow 2",
        "online 1",
        "pairs s",
        "train s",
    ]
    print(f"\n8 Gaussians, MLP 3 x 128 SiLU, Adam {LR}, batch {BATCH}, {args.teacher_steps} teacher steps, "
          f"{args.pairs} pairs, {args.reflow_steps} reflow steps, {args.online_steps} online-reflow steps, "
          f"{args.seeds} seeds (mean ± std); energy distance, first-order steps (rectdiff: DDIM)\n")  # fmt: skip
    print("| system | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in names:
        cells = [
            mean_spread([r[c] for r in rows[name]]) if c in rows[name][0] else "–" for c in cols
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.table_only:
        return
    print_dopri5(data, args)
    print_overhead(data, args)


def print_dopri5(data: Tensor, args: argparse.Namespace) -> None:
    """Each library's dopri5 NFE and endpoint error on one flow-matching teacher (seed 0)."""
    torch.manual_seed(0)
    teacher = RectdiffFM(MLP(), data)
    teacher.train(args.teacher_steps, seed=0)
    print(
        f"\ndopri5 at rtol = atol = {TOL} on one flow-matching teacher (seed 0); "
        "RMS endpoint error against dopri5 at 1e-10 (float64)\n"
    )
    print("| library | NFE | endpoint error |\n|---|---|---|")
    for name, (nfe, err) in dopri5_counts(teacher.net).items():
        print(f"| {name} | {nfe} | {err:.2e} |")


def print_overhead(data: Tensor, args: argparse.Namespace) -> None:
    """The overhead table: each system's training and Euler step against plain PyTorch."""
    print(
        f"\noverhead per step against hand-written PyTorch at batch {BATCH} "
        f"({args.rounds} round-robin rounds over {args.instances} copies of each system; "
        "Euler: 100 steps)\n"
    )
    print("| system | training step: median / min / CPU | paired CPU [95 % CI] | "
          "Euler step: median / min / CPU | paired CPU [95 % CI] |\n|---|---|---|---|---|")  # fmt: skip
    table = overhead(data, args.rounds, args.block, instances=args.instances)
    for name, ratios in table.items():
        cells = []
        for kind in ("train", "euler"):
            if kind in ratios:
                cells += ["{:.3f}x / {:.3f}x / {:.3f}x".format(*ratios[kind][:3]),
                          "{:.3f}x [{:.3f}, {:.3f}]".format(*ratios[kind][3:])]  # fmt: skip
            else:
                cells += ["–", "–"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(
        "\nrectdiff against the fastest peer (by its paired CPU ratio above), paired CPU "
        "time per round [95 % CI]:"
    )
    for name, ratios in table.items():
        for kind, label in (("train", "training step"), ("euler", "Euler step")):
            if f"{kind} vs fastest peer" in ratios:
                peer, *paired = ratios[f"{kind} vs fastest peer"]
                print(
                    f"  {name}, {label}: "
                    + "{:.3f}x [{:.3f}, {:.3f}]".format(*paired)
                    + f" of {peer}'s"
                )


if __name__ == "__main__":
    main()
