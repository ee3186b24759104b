"""experiments/bench/sd_throughput.py times a pipeline of Stable Diffusion 1.5's real shape:
its UNet, VAE and text encoder have SD 1.5's published parameter counts (built on the meta
device: no memory, no weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shared import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench" / "sd_throughput.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def test_parts_have_sd15s_parameter_counts(bench, tmp_path):
    with torch.device("meta"):
        parts = bench.sd15_parts(tmp_path)
    counts = {name: sum(p.numel() for p in parts[name].parameters())
              for name in ("unet", "vae", "text_encoder")}  # fmt: skip
    # runwayml/stable-diffusion-v1-5: UNet 859 520 964, VAE 83 653 863; CLIP ViT-L/14's text
    # tower 123 060 480 with its 49 408-token vocabulary, here the byte-level tokenizer's 514
    assert counts["unet"] == 859_520_964
    assert counts["vae"] == 83_653_863
    assert counts["text_encoder"] == 123_060_480 - (49_408 - 514) * 768
