"""A tiny random-weight Stable Diffusion pipeline, built offline in seconds.

Same classes and folder layout as Stable Diffusion 1.5 (``UNet2DConditionModel``,
``AutoencoderKL`` with 8x downsampling and 4 latent channels, ``CLIPTextModel``,
``CLIPTokenizer`` and SD 1.5's scheduler config: ``scaled_linear`` betas 0.00085..0.012 over
1000 steps, eps-prediction), only with a few thousand parameters per part, so that every
``rectdiff sd`` command can be tried and tested without a download.

The tokenizer is byte-level BPE with no merges: its vocabulary is the 256 byte-unicode
characters of CLIP's tokenizer, each also with the end-of-word suffix ``</w>``, plus
``<|startoftext|>`` and ``<|endoftext|>`` (514 tokens), so it tokenizes any text, one
character per token.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ._files import publish_folder, temporary_sibling

__all__ = ["SD15_SCHEDULER_CONFIG", "build_tiny_pipeline", "byte_level_vocab"]

#: Stable Diffusion 1.5's ``scheduler/scheduler_config.json``
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
_MAX_LENGTH = 77  # CLIP's context length, as in SD 1.5


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters CLIP's (and GPT-2's) byte-level BPE maps bytes to."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def byte_level_vocab() -> dict[str, int]:
    """The tiny tokenizer's vocabulary: 256 characters, their ``</w>`` forms, bos, eos."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def _tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    vocab = byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=_MAX_LENGTH,
    )


def _text_encoder(vocab_size: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def _unet(sample_size: int) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def _vae(sample_size: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8 * sample_size,
        scaling_factor=0.18215,
    )


def build_tiny_pipeline(
    out_dir: str | os.PathLike[str], seed: int = 0, sample_size: int = 8
) -> Path:
    """Build a tiny random-weight SD-1.5-shaped pipeline and ``save_pretrained`` it.

    Args:
        out_dir: the pipeline folder to write (replaced if it exists; written to a
            temporary folder and renamed, so it is never half-written).
        seed: seeds the random weights (same seed, same weights).
        sample_size: the UNet's default latent size; images are ``8 * sample_size`` pixels.

    Returns:
        ``out_dir`` as a Path; load it with ``StableDiffusionPipeline.from_pretrained``.

    Raises:
        ValueError: for a sample_size that the two-level UNet cannot halve (odd or < 2).
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    if sample_size < 2 or sample_size % 2:
        raise ValueError(f"sample_size must be an even integer >= 2, got {sample_size}.")
    out = Path(out_dir)
    tmp = temporary_sibling(out)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet, vae = _unet(sample_size), _vae(sample_size)
            tokenizer = _tokenizer(tmp)
            text_encoder = _text_encoder(len(tokenizer))
        config = {k: v for k, v in SD15_SCHEDULER_CONFIG.items() if not k.startswith("_")}
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=PNDMScheduler(**config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        for name in ("vocab.json", "merges.txt"):  # for slow tokenizers / older transformers
            shutil.move(tmp / name, tmp / "tokenizer" / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, out)
