"""Stable Diffusion 1.5 at its real size on one GPU: pairs/s and rectify steps/s, measured.

The README's SD 1.5 table gives estimates; this script measures them in one device run. It
builds a pipeline of SD 1.5's shape from the checkpoint's configs with random weights
(nothing is downloaded; the speed of a network does not depend on its weights): the UNet
(859.5 M parameters), the VAE (83.7 M) and CLIP ViT-L/14's text encoder (123.1 M) with
rectdiff's offline byte-level tokenizer (77 tokens, as CLIP's), saved in float16. Then it
times the two commands a user runs, each at two sizes so that start-up (imports, loading
the pipeline) cancels:

    rectdiff sd pairs   --dtype float16 --steps 25 --guidance 5 --batch-size 32  (512 px)
    rectdiff sd rectify --mixed-precision fp16 --gradient-checkpointing --batch-size 16

rate = (n_2 - n_1) / (seconds_2 - seconds_1); and, on a GPU, the peak memory nvidia-smi
reports during each command.

    python experiments/bench/sd_throughput.py --work /tmp/sd_bench        # on the GPU
    python experiments/bench/sd_throughput.py --work /tmp/sd_bench --tiny # the harness on
                                                                          # the tiny pipeline
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

#: SD 1.5's ``unet/config.json`` (the keys that set its shape)
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
#: SD 1.5's ``vae/config.json``
SD15_VAE: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
)  # fmt: skip
#: CLIP ViT-L/14's text tower (SD 1.5's ``text_encoder/config.json``)
SD15_TEXT: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip


def sd15_parts(scratch: Path) -> dict[str, Any]:
    """The components of an SD-1.5-shaped ``StableDiffusionPipeline``, random weights."""
    from diffusers import UNet2DConditionModel

    from rectdiff.stable_diffusion.tiny.parts import clip_text_encoder, clip_tokenizer, tiny_vae

    tokenizer = clip_tokenizer(scratch)
    return {
        "unet": UNet2DConditionModel(**SD15_UNET),
        "vae": tiny_vae(64, **SD15_VAE),  # 512 px
        "tokenizer": tokenizer,
        "text_encoder": clip_text_encoder(len(tokenizer), **SD15_TEXT),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_pipeline(folder: Path) -> None:
    """An SD-1.5-shaped pipeline with SD 1.5's scheduler config, saved in float16."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from rectdiff.stable_diffusion.tiny.sd import SD15_SCHEDULER_CONFIG

    torch.manual_seed(0)
    parts = sd15_parts(folder.parent / "tokenizer_scratch")
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(scheduler=scheduler, **parts).to(torch.float16)
    pipe.save_pretrained(folder)


class PeakMemory:
    """The largest ``memory.used`` (MiB) nvidia-smi reports while the block runs (None
    without nvidia-smi)."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            values = [float(v) for v in out.stdout.split() if v.strip()]
            if values:
                self.peak = max(self.peak or 0.0, max(values))
            self._stop.wait(0.5)

    def __enter__(self) -> PeakMemory:
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def timed(command: list[str]) -> tuple[float, float | None]:
    """Seconds and peak GPU memory (MiB) of one ``rectdiff`` command (which must succeed)."""
    start = time.perf_counter()
    with PeakMemory() as memory:
        subprocess.run([sys.executable, "-m", "rectdiff.cli", *command], check=True)
    return time.perf_counter() - start, memory.peak


def rate(sizes: tuple[int, int], run: Any) -> tuple[float, list[float], float | None]:
    """Units per second from runs at two sizes (start-up cancels), their seconds and peak MiB."""
    (t1, m1), (t2, m2) = run(sizes[0], "a"), run(sizes[1], "b")
    peaks = [m for m in (m1, m2) if m is not None]
    per_second = (sizes[1] - sizes[0]) / (t2 - t1) if t2 > t1 else float("nan")  # nan: start-up
    return per_second, [t1, t2], max(peaks) if peaks else None  # dominates; use larger sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (tens of GB)")
    parser.add_argument("--pairs", type=int, nargs=2, default=(64, 320),
                        help="the two numbers of pairs generated")  # fmt: skip
    parser.add_argument("--steps", type=int, nargs=2, default=(10, 60),
                        help="the two numbers of rectify steps")  # fmt: skip
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny offline pipeline at float32 (a CPU check of the harness)")  # fmt: skip
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pipeline = work / "pipeline"
    if args.tiny:
        subprocess.run([sys.executable, "-m", "rectdiff.cli", "sd", "tiny", str(pipeline),
                        "--fit-steps", "0"], check=True)  # fmt: skip
        pair_opts = ["--dtype", "float32", "--batch-size", "8", "--steps", "4"]
        train_opts = ["--batch-size", "8"]
    else:
        build_pipeline(pipeline)
        pair_opts = ["--dtype", "float16", "--batch-size", "32", "--steps", "25", "--height",
                     "512", "--width", "512"]  # fmt: skip
        train_opts = ["--batch-size", "16", "--mixed-precision", "fp16",
                      "--gradient-checkpointing"]  # fmt: skip
    prompts = work / "prompts.txt"
    prompts.write_text("".join(f"a photograph of object number {i}\n" for i in range(1000)))

    def pairs_run(n: int, tag: str) -> tuple[float, float | None]:
        return timed(["sd", "pairs", "--pipeline", str(pipeline), "--prompts", str(prompts),
                      "--num", str(n), "--out", str(work / f"pairs_{tag}"), "--guidance", "5",
                      *pair_opts])  # fmt: skip

    def rectify_run(n: int, tag: str) -> tuple[float, float | None]:
        return timed(["sd", "rectify", "--pipeline", str(pipeline), "--pairs",
                      str(work / "pairs_b"), "--out", str(work / f"student_{tag}"),
                      "--max-steps", str(n), "--no-resume", *train_opts])  # fmt: skip

    pairs_per_s, pair_seconds, pair_mib = rate(tuple(args.pairs), pairs_run)
    steps_per_s, step_seconds, step_mib = rate(tuple(args.steps), rectify_run)
    batch = int(train_opts[1])
    print(f"\n{'tiny pipeline' if args.tiny else 'SD 1.5-shaped pipeline (random weights)'}\n")
    print("| stage | rate | runs (seconds) | peak GPU memory |\n|---|---|---|---|")
    print(f"| pairs ({' '.join(pair_opts)}, guidance 5) | {pairs_per_s:.2f} pairs/s | "
          f"{args.pairs[0]}: {pair_seconds[0]:.1f}, {args.pairs[1]}: {pair_seconds[1]:.1f} | "
          f"{'–' if pair_mib is None else f'{pair_mib / 1024:.1f} GiB'} |")  # fmt: skip
    print(f"| rectify ({' '.join(train_opts)}) | {steps_per_s:.2f} steps/s "
          f"({steps_per_s * batch:.1f} pairs/s) | {args.steps[0]}: {step_seconds[0]:.1f}, "
          f"{args.steps[1]}: {step_seconds[1]:.1f} | "
          f"{'–' if step_mib is None else f'{step_mib / 1024:.1f} GiB'} |")  # fmt: skip


if __name__ == "__main__":
    main()
