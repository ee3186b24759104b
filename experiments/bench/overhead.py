"""Overhead of rectdiff's training step and Euler sampler against the same work in plain PyTorch.

The network is the 2-D MLP of the flow-matching tutorials (facebookresearch/flow_matching,
examples/2d_flow_matching: ``[x, t]`` -> 4 x (Linear, SiLU) -> Linear), trained as flow
matching (x_t = (1 - t) x0 + t eps, target eps - x0) with Adam at lr 1e-3 and sampled with
Euler's method. Both sides use the same network class, data tensor, batch and step count:

    train    rectdiff: ``Trainer.step()`` (the body of ``train()``'s loop: accelerate
             ``accumulate``/``backward``, AdamW, lr scheduler, ``diffusion_loss``) against a
             hand-written step (index a batch, draw t and eps, MSE, backward, AdamW step).
    sample   rectdiff: ``samplers.sample(solver="euler")`` against a hand-written Euler loop
             on the same time grid.

Blocks of ``--block`` calls alternate A/B (order swapped every round) for ``--rounds`` rounds;
the ratio is median(rectdiff) / median(plain). Run:

    .venv/bin/python experiments/bench/overhead.py [--hidden 128 --batch 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from rectdiff import forms, samplers
from rectdiff.data import load_data
from rectdiff.training import TrainConfig, Trainer


class TutorialMLP(nn.Module):
    """The flow-matching tutorials' 2-D MLP: time concatenated to the input."""

    def __init__(self, dim: int = 2, hidden: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 1, hidden), nn.SiLU()]
        for _ in range(3):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.main = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.main(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


def plain_train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: Tensor, batch: int,
    t_min: float, t_max: float,
) -> Tensor:  # fmt: skip
    x0 = data[torch.randint(len(data), (batch,))]
    eps = torch.randn_like(x0)
    t = t_min + (t_max - t_min) * torch.rand(batch)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    loss = (model(x_t, t) - (eps - x0)).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def plain_euler(model: nn.Module, eps: Tensor, grid: Tensor) -> Tensor:
    x = grid[0].item() * eps
    times = grid.tolist()
    batch = len(eps)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t) * model(x, torch.full((batch,), t))
    return x


def interleaved(
    a: Callable[[], object], b: Callable[[], object], rounds: int, block: int
) -> tuple[float, float]:
    """Median seconds per call of a and of b, timed in alternating blocks."""
    times_a, times_b = interleaved_times(a, b, rounds, block)
    return statistics.median(times_a), statistics.median(times_b)


def interleaved_times(
    a: Callable[[], object], b: Callable[[], object], rounds: int, block: int
) -> tuple[list[float], list[float]]:
    """Wall-clock seconds per call of a and of b in each of ``rounds`` alternating blocks
    (the order swapped every round); their minimum is the least disturbed block, which
    ``timeit`` recommends on a shared machine."""
    times = round_robin_times({"a": a, "b": b}, rounds, block)
    return times["a"]["wall"], times["b"]["wall"]


def round_robin_times(
    fns: dict[str, Callable[[], object] | Sequence[Callable[[], object]]], rounds: int, block: int
) -> dict[str, dict[str, list[float]]]:
    """Per name, ``{"wall": [...], "cpu": [...]}``: seconds per call in each of ``rounds``
    blocks of ``block`` calls, on two clocks read around the same blocks: ``time.perf_counter``
    and ``time.thread_time`` (the calling thread's CPU time: with torch on one thread every
    operation runs there, and time spent descheduled is not counted). Every round times one
    block of each function, the order rotated by one each round, so all of them run under
    the same conditions of a shared machine and each takes every place in the order alike.

    A name may give a sequence of functions, instances of the same step on their own copies
    of the network and state: round r times instance ``r % len``, so that where each copy
    happens to sit in memory (identical steps on different copies differ by a few per cent
    on a CPU) is averaged over rather than charged to one system."""
    names = list(fns)
    instances = {n: list(f) if isinstance(f, Sequence) else [f] for n, f in fns.items()}
    out: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = instances[name][r % len(instances[name])]
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(block):
                fn()
            out[name]["wall"].append((time.perf_counter() - start_wall) / block)
            out[name]["cpu"].append((time.thread_time() - start_cpu) / block)
    return out


def median_interval_rank(n: int, level: float = 0.95) -> int:
    """The largest ``k`` for which the sorted sample's ``[x[k], x[n - 1 - k]]`` (0-based)
    covers the median with probability at least ``level`` for any continuous distribution:
    the coverage is ``1 - 2 P(B <= k)`` for ``B ~ Binomial(n, 1/2)`` (the sign-test interval;
    Conover, *Practical Nonparametric Statistics*, 3rd ed., sec. 3.2). 0 when ``n`` is too
    small for ``level``, which then widens the interval to the whole sample."""
    if n < 1:
        raise ValueError(f"need at least one ratio, got n={n}.")
    tail, k = 0.0, -1
    while k + 1 < n and 2 * (tail + math.comb(n, k + 1) / 2**n) <= 1 - level:
        k += 1
        tail += math.comb(n, k) / 2**n
    return max(k, 0)


def paired_ratio(times: list[float], plain: list[float]) -> tuple[float, float, float]:
    """The median over rounds of ``times[r] / plain[r]`` (blocks of the same round, timed
    moments apart, so a slow drift of the shared machine cancels) and its distribution-free
    95 % confidence interval (:func:`median_interval_rank`)."""
    ratios = sorted(a / b for a, b in zip(times, plain, strict=True))
    k = median_interval_rank(len(ratios))
    return statistics.median(ratios), ratios[k], ratios[len(ratios) - 1 - k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    form = forms.FlowMatching()
    data = load_data("8gaussians", 100_000, seed=0)
    net_a = TutorialMLP(hidden=args.hidden)
    net_b = copy.deepcopy(net_a)

    config = TrainConfig(
        steps=10**9, batch_size=args.batch, lr=1e-3, grad_clip=0.0, lr_schedule="constant"
    )
    trainer = Trainer(net_a, data, form=form, prediction="flow", config=config)
    optimizer = torch.optim.AdamW(net_b.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(20):  # warm-up
        trainer.step()
        plain_train_step(net_b, optimizer, data, args.batch, form.t_min, form.t_max)
    train_a, train_b = interleaved(
        trainer.step,
        lambda: plain_train_step(net_b, optimizer, data, args.batch, form.t_min, form.t_max),
        args.rounds, args.block,
    )  # fmt: skip

    eps = torch.randn(args.batch, 2)
    grid = samplers.time_grid(form, args.sample_steps, "uniform")
    net_b.eval()
    model = trainer.model.eval()
    sample_a, sample_b = interleaved(
        lambda: samplers.sample(model, eps, form=form, prediction="flow", solver="euler",
                                steps=args.sample_steps),
        lambda: plain_euler(net_b, eps, grid),
        max(5, args.rounds // 3), max(1, args.block // 10),
    )  # fmt: skip

    print(f"MLP width {args.hidden}, batch {args.batch}, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds")  # fmt: skip
    print(f"train step    rectdiff {train_a * 1e3:8.3f} ms   plain {train_b * 1e3:8.3f} ms   "
          f"ratio {train_a / train_b:.3f}")  # fmt: skip
    print(f"euler x{args.sample_steps:<4d} rectdiff {sample_a * 1e3:8.3f} ms   plain "
          f"{sample_b * 1e3:8.3f} ms   ratio {sample_a / sample_b:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
