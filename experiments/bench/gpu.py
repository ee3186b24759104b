"""Overhead, throughput and memory at a realistic size on one GPU (issue 14's GPU figures).

The network is DDPM's CIFAR-10 UNet (Ho et al. 2020; diffusers' ``google/ddpm-cifar10-32``
configuration, built from its config, nothing downloaded: 4 levels of 128/256/256/256
channels, 2 ResNet layers each, attention at 16x16, 35.7 M parameters) on 32x32x3, batch 128,
under bf16 autocast, trained as flow matching (x_t = (1 - t) x0 + t eps, target eps - x0,
uniform t in the form's range) with AdamW (foreach) at lr 1e-4. Every system starts from
the same weights and data (synthetic images: the figures are times, not quality):

    plain PyTorch (control)  the hand-written step again, on its own copy of the network
    rectdiff Trainer         ``Trainer.step()`` with ``mixed_precision="bf16"`` (accelerate)
    rectdiff Diffusion       ``Diffusion(net, form, "flow")(x0).backward()`` under autocast

against the hand-written step (index a batch, draw t and eps, autocast forward, float32
MSE, backward, AdamW step). Blocks of ``--block`` steps of every system run round-robin
(``overhead.round_robin_times``, the device synchronized around each block); the table gives
the median block's ratio to the plain step and the median per-round ratio with its exact
95 % interval (``overhead.paired_ratio``), the peak memory each step allocates, and
images/s. The Euler step (``samplers.sample(solver="euler")`` against a hand-written loop
on the same grid) and pair generation (``dpmpp_2m`` at 32 steps, pairs/s) follow.

    python experiments/bench/gpu.py                       # on the GPU
    python experiments/bench/gpu.py --tiny --device cpu   # the harness on a 2-level 8x8 UNet
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from rectdiff import forms, samplers
from rectdiff.models import UNet
from rectdiff.rectify.online import Diffusion
from rectdiff.training import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from overhead import paired_ratio, round_robin_times  # noqa: E402

FORM = forms.FlowMatching()
LR = 1e-4


def ddpm_cifar10_unet(tiny: bool = False) -> UNet:
    """DDPM's CIFAR-10 UNet (``google/ddpm-cifar10-32``'s config), or a 2-level 8x8 one."""
    from diffusers import UNet2DModel

    if tiny:
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                           block_out_channels=(32, 64), layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)  # fmt: skip
    else:
        unet = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
            freq_shift=1,
        )  # fmt: skip
    return UNet(unet=unet, time_scale=1000.0)  # FM's t in [0, 1] -> DDPM's 0..1000 embedding


def plain_loss(
    net: nn.Module, x0: Tensor, dtype: torch.dtype, eps: Tensor | None = None,
    t: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The hand-written flow-matching loss (float32 MSE of the autocast output); ``eps`` and
    ``t`` are drawn unless given."""
    eps = torch.randn_like(x0) if eps is None else eps
    if t is None:
        t = FORM.t_min + (FORM.t_max - FORM.t_min) * torch.rand(len(x0), device=x0.device)
    t4 = t.view(-1, 1, 1, 1)
    x_t = (1 - t4) * x0 + t4 * eps
    with autocast(x0.device, dtype):
        out = net(x_t, t)
    return (out.float() - (eps - x0)).square().mean()


def stepper(loss_fn: Callable[[], Tensor], net: nn.Module) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, foreach=True)

    def step() -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def synchronized(device: torch.device, fns: dict[str, Callable[[], object]]) -> dict:
    """Each function followed by a device synchronization (a block's time is then its work)."""
    if device.type != "cuda":
        return fns

    def wrap(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            torch.cuda.synchronize(device)
            return out

        return run

    return {name: wrap(fn) for name, fn in fns.items()}


def peak_memory(device: torch.device, fn: Callable[[], object]) -> float | None:
    """GiB allocated at the peak of one call of ``fn`` above what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def table(times: dict[str, dict[str, list[float]]], batch: int, memory: dict) -> list[str]:
    plain = times["plain"]["wall"]
    rows = []
    for name, clocks in times.items():
        wall = clocks["wall"]
        ratio = statistics.median(wall) / statistics.median(plain)
        paired = "{:.3f}x [{:.3f}, {:.3f}]".format(*paired_ratio(wall, plain))
        mem = memory.get(name)
        rows.append(f"| {name} | {statistics.median(wall) * 1e3:.2f} | {ratio:.3f}x | {paired} | "
                    f"{batch / statistics.median(wall):.0f} | "
                    f"{'–' if mem is None else f'{mem:.2f}'} |")  # fmt: skip
    return rows


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def training_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                   init: UNet) -> nn.Module:  # fmt: skip
    """Print the training-step table; return the hand-written step's trained network."""
    side = init.sample_shape[-1]
    data = torch.randn(4096, 3, side, side, device=device)
    gen = torch.Generator(device).manual_seed(0)

    def batch() -> Tensor:
        return data[torch.randint(len(data), (args.batch,), device=device, generator=gen)]

    nets = {name: copy.deepcopy(init).to(device).train()
            for name in ("plain", "control", "diffusion")}  # fmt: skip
    diffusion = Diffusion(nets["diffusion"], form=FORM, prediction="flow")

    def diffusion_loss() -> Tensor:
        with autocast(device, dtype):
            return diffusion(batch())

    precision = {"bf16": "bf16", "fp32": "no"}[args.dtype]
    trainer = Trainer(copy.deepcopy(init), data, form=FORM, prediction="flow",
                      config=TrainConfig(steps=10**9, batch_size=args.batch, lr=LR, grad_clip=0.0,
                                         lr_schedule="constant", mixed_precision=precision))  # fmt: skip
    fns = synchronized(device, {
        "plain": stepper(lambda: plain_loss(nets["plain"], batch(), dtype), nets["plain"]),
        "plain PyTorch (control)": stepper(lambda: plain_loss(nets["control"], batch(), dtype),
                                           nets["control"]),
        "rectdiff Trainer": trainer.step,
        "rectdiff Diffusion": stepper(diffusion_loss, nets["diffusion"]),
    })  # fmt: skip
    for fn in fns.values():  # warm-up (cuDNN autotuning, allocator)
        for _ in range(3):
            fn()
    memory = {name: peak_memory(device, fn) for name, fn in fns.items()}
    times = round_robin_times(fns, args.rounds, args.block)
    print(f"{args.device}, {'tiny 8x8' if args.tiny else 'DDPM CIFAR-10'} UNet "
          f"({sum(p.numel() for p in init.parameters()) / 1e6:.1f} M parameters), batch "
          f"{args.batch}, {args.dtype}, {args.rounds} rounds of {args.block} steps\n")  # fmt: skip
    print("| training step | ms | median ratio | paired [95 % CI] | images/s | peak GiB |\n"
          "|---|---|---|---|---|---|")  # fmt: skip
    print("\n".join(table(times, args.batch, memory)))
    return nets["plain"].eval()


def euler_table(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                model: nn.Module, shape: tuple[int, ...]) -> None:  # fmt: skip
    """Print the Euler-step table: ``samplers.sample`` against a hand-written loop."""
    noise = torch.randn(args.batch, *shape, device=device)
    grid = samplers.time_grid(FORM, args.euler_steps, "uniform").tolist()

    @torch.no_grad()
    def plain_euler() -> Tensor:
        x = grid[0] * noise  # rectdiff starts at sigma(t_max) eps = t_max eps too
        with autocast(device, dtype):
            for t, t_next in zip(grid[:-1], grid[1:], strict=True):
                x = x + (t_next - t) * model(x, torch.full((len(x),), t, device=device)).float()
        return x

    @torch.no_grad()
    def rectdiff_euler() -> Tensor:
        with autocast(device, dtype):
            return samplers.sample(model, noise, form=FORM, prediction="flow", solver="euler",
                                   steps=args.euler_steps)  # fmt: skip

    fns = synchronized(device, {"plain": plain_euler, "rectdiff Euler": rectdiff_euler})
    gap = float((rectdiff_euler().float() - plain_euler().float()).abs().max())
    times = round_robin_times(fns, max(5, args.rounds // 3), 1)
    print(f"\n| {args.euler_steps} Euler steps | ms | median ratio | paired [95 % CI] | images/s | "
          "peak GiB |\n|---|---|---|---|---|---|")  # fmt: skip
    print("\n".join(table(times, args.batch, {})))
    print(f"\nthe two Euler samples differ by at most {gap:.2e} (the same work)")


def pair_rate(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
              model: nn.Module, shape: tuple[int, ...]) -> None:  # fmt: skip
    """Print the pairs/s of ``dpmpp_2m`` at 32 steps (the second of two runs)."""
    chunk_size = args.batch * 4
    with torch.no_grad(), autocast(device, dtype):
        noise = torch.randn(args.pairs, *shape, device=device)
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for chunk in noise.split(chunk_size):
                samplers.sample(model, chunk, form=FORM, prediction="flow", solver="dpmpp_2m",
                                steps=32)  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
    print(f"\npair generation (dpmpp_2m, 32 steps, batch {chunk_size}): "
          f"{args.pairs / seconds:.0f} pairs/s ({args.pairs} pairs in {seconds:.2f} s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--euler-steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=1024,
                        help="pairs generated for the throughput")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="a 2-level 8x8 UNet (a CPU check)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    init = ddpm_cifar10_unet(args.tiny)
    model = training_table(args, device, dtype, init)
    euler_table(args, device, dtype, model, init.sample_shape)
    pair_rate(args, device, dtype, model, init.sample_shape)


if __name__ == "__main__":
    main()
