"""Pair-generation throughput: rectdiff's default pair solver against the tutorials' dopri5.

The rectified-flow tutorials make their (noise, sample) pairs with
``torchdiffeq.odeint(velocity, eps, [1, 0], method="dopri5", rtol=1e-5, atol=1e-5)`` on the
flow-matching ODE. rectdiff's default is DPM-Solver++(2M) (``couplings.generate_pairs``'
``solver="dpmpp_2m"``), a fixed-step exponential integrator. Compared at *matched endpoint
error*:

1. train a flow-matching teacher (2-D MLP, flow prediction) on 8 Gaussians;
2. a tight reference: rectdiff's dopri5 at rtol = atol = 1e-9 in float64, from the same noise;
3. the baseline: the tutorials' dopri5 call at 1e-5 (torchdiffeq directly, float32, the
   velocity field ``model(x, t)`` in t from t_max to 0): its RMS endpoint error and pairs/s;
4. dpmpp_2m with the fewest steps (from a ladder) whose RMS error is at or below the
   baseline's, and its pairs/s.

Timings alternate baseline and rectdiff for ``--rounds`` rounds (medians), in one process.
Run:  .venv/bin/python experiments/bench/pairs.py [--pairs 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchdiffeq import odeint

from rectdiff import forms, samplers
from rectdiff.data import load_data
from rectdiff.models import MLP, Preconditioned
from rectdiff.training import TrainConfig, train

STEP_LADDER = (4, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64)


def teacher(form: forms.Form, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = Preconditioned(MLP(dim=2, hidden=128, depth=3), form)
    data = load_data("8gaussians", 20_000, seed=0)
    config = TrainConfig(steps=steps, batch_size=256, lr=2e-3, seed=0, log_every=100)
    return train(net, data, form=form, prediction="flow", config=config, progress=False).model


def tutorial_dopri5(model, form, eps: torch.Tensor, tol: float) -> tuple[torch.Tensor, int]:
    """The tutorials' recipe: odeint on dx/dt = model(x, t) from t_max to 0 (t clamped to t_min)."""
    nfe = 0

    def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        t_model = t.clamp(form.t_min, form.t_max).to(x.dtype).expand(x.shape[0])
        return model(x, form.model_time(t_model))

    x1 = form.sigma(form.t_max) * eps
    times = torch.tensor([form.t_max, 0.0], dtype=eps.dtype)
    with torch.no_grad():
        out = odeint(velocity, x1, times, method="dopri5", rtol=tol, atol=tol)
    return out[-1], nfe


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).sum(-1).mean().sqrt())


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    form = forms.FlowMatching()
    model = teacher(form, args.train_steps).eval()
    eps = torch.randn(args.pairs, 2, generator=torch.Generator().manual_seed(1))
    common = dict(form=form, prediction="flow")
    with torch.no_grad():
        reference = samplers.sample(
            model.double(), eps.double(), solver="dopri5", rtol=1e-9, atol=1e-9, **common
        )
        model.float()
        baseline, baseline_nfe = tutorial_dopri5(model, form, eps, args.tol)
        baseline_error = rms(baseline, reference)
        chosen = None
        for steps in STEP_LADDER:
            x = samplers.sample(model, eps, solver="dpmpp_2m", steps=steps, **common)
            if rms(x, reference) <= baseline_error:
                chosen, error = steps, rms(x, reference)
                break
    if chosen is None:
        print(
            f"dpmpp_2m did not reach the dopri5 error {baseline_error:.3g} within {STEP_LADDER[-1]} steps"
        )
        return

    def run_baseline() -> None:
        tutorial_dopri5(model, form, eps, args.tol)

    def run_rectdiff() -> None:
        with torch.no_grad():
            samplers.sample(model, eps, solver="dpmpp_2m", steps=chosen, **common)

    t_base, t_rd = [], []
    for _ in range(args.rounds):  # interleaved, so load changes hit both sides alike
        t_base.append(timed(run_baseline, 1))
        t_rd.append(timed(run_rectdiff, 1))
    base_s, rd_s = statistics.median(t_base), statistics.median(t_rd)
    print(
        f"{args.pairs} pairs, flow-matching MLP teacher, {args.threads} thread(s), "
        f"reference dopri5 rtol=atol=1e-9 (float64)"
    )
    print(
        f"tutorial dopri5 rtol=atol={args.tol:g}: NFE {baseline_nfe:4d}  RMS error {baseline_error:.3e}  "
        f"{args.pairs / base_s:10.0f} pairs/s"
    )
    print(
        f"rectdiff dpmpp_2m {chosen:2d} steps:       NFE {chosen:4d}  RMS error {error:.3e}  "
        f"{args.pairs / rd_s:10.0f} pairs/s"
    )
    print(f"throughput ratio (rectdiff / dopri5) at equal or lower error: {base_s / rd_s:.2f}x")


if __name__ == "__main__":
    main()
