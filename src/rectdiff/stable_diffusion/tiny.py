"""A tiny Stable Diffusion pipeline, built offline in about ten seconds on one CPU core.

Same classes and folder layout as Stable Diffusion 1.5 (``UNet2DConditionModel``,
``AutoencoderKL`` with 8x downsampling and 4 latent channels, ``CLIPTextModel``,
``CLIPTokenizer`` and SD 1.5's scheduler config: ``scaled_linear`` betas 0.00085..0.012 over
1000 steps, eps-prediction), with 0.36 M parameters in all, so that every
``rectdiff sd`` command can be tried and tested without a download.

The weights are random, except that the UNet is then fitted for ``fit_steps`` AdamW steps
(eps-prediction, SD's own schedule) to a synthetic set of prompt-conditioned latents,
``x0 = 0.6 colour_mean + 0.6 object_pattern + 0.5 z`` for prompts "a {colour} {object}"
(10 % empty prompts, so that classifier-free guidance has an unconditional model). It then
draws latents of order one, as SD does (standard deviation about 2 at 25 steps, guidance 5).
A purely random UNet does not: its latents have a standard deviation near 15, and since SD's
schedule ends at alpha_1 = 0.068 > 0 (non-zero terminal SNR), the training input
``alpha_1 x0 + sigma_1 eps`` at t = 1 then differs from the ``sigma_1 eps`` a sampler starts
from by about as much as the noise itself, so no one-step student can be learnt from it.

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
from torch import Tensor, nn

from ..io.files import publish_folder, temporary_sibling

__all__ = [
    "SD15_SCHEDULER_CONFIG",
    "TINY_COLOURS",
    "TINY_OBJECTS",
    "build_tiny_pipeline",
    "byte_level_vocab",
    "tiny_prompts",
]

#: Stable Diffusion 1.5's ``scheduler/scheduler_config.json``, written verbatim: keys it
#: lacks (``timestep_spacing``, ``prediction_type``) take each scheduler class's defaults on
#: loading, as they do for the real checkpoint
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
_MAX_LENGTH = 77  # CLIP's context length, as in SD 1.5
#: the words of the synthetic training prompts "a {colour} {object}"
TINY_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")
TINY_OBJECTS = ("cube", "ball", "cat", "dog", "tree", "house", "car", "boat")


def tiny_prompts(split: str = "all") -> list[str]:
    """The prompts "a {colour} {object}" the tiny UNet is fitted on, colour-major.

    Args:
        split: ``"all"`` (64 prompts), or a checkerboard half of them: ``"train"`` (colour
            index + object index even) or ``"held_out"`` (odd), so that every word occurs in
            both halves but no combination does.
    """
    parity = {"all": None, "train": 0, "held_out": 1}
    if split not in parity:
        raise ValueError(f"split must be one of {', '.join(parity)}, got {split!r}.")
    return [
        f"a {colour} {obj}"
        for c, colour in enumerate(TINY_COLOURS)
        for o, obj in enumerate(TINY_OBJECTS)
        if parity[split] is None or (c + o) % 2 == parity[split]
    ]


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
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
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


def _synthetic_latents(
    count: int, sample_size: int, generator: torch.Generator, patterns: tuple[Tensor, Tensor]
) -> tuple[Tensor, list[str]]:
    """``count`` latents ``0.6 colour_mean + 0.6 object_pattern + 0.5 z`` and their prompts."""
    colour_mean, object_pattern = patterns
    colour = torch.randint(len(TINY_COLOURS), (count,), generator=generator)
    obj = torch.randint(len(TINY_OBJECTS), (count,), generator=generator)
    z = torch.randn((count, 4, sample_size, sample_size), generator=generator)
    x0 = 0.6 * colour_mean[colour] + 0.6 * object_pattern[obj] + 0.5 * z
    empty = torch.rand(count, generator=generator) < 0.1
    prompts = [
        "" if drop else f"a {TINY_COLOURS[c]} {TINY_OBJECTS[o]}"
        for c, o, drop in zip(colour.tolist(), obj.tolist(), empty.tolist(), strict=True)
    ]
    return x0, prompts


def _fit_unet(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer: Any,
    scheduler: Any,
    steps: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 3e-3,
) -> None:
    """``steps`` AdamW steps of the eps-prediction loss on the synthetic latents."""
    from .. import forms
    from ..training.losses import diffusion_loss
    from .model import TextConditionedUNet, tokenize

    form, prediction = forms.from_diffusers(scheduler)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    patterns = (
        torch.randn((len(TINY_COLOURS), 4, 1, 1), generator=generator),
        torch.randn((len(TINY_OBJECTS), 1, size, size), generator=generator),
    )
    model = TextConditionedUNet(unet, text_encoder)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    unet.train()
    for _ in range(steps):
        x0, prompts = _synthetic_latents(batch_size, size, generator, patterns)
        loss, _ = diffusion_loss(
            model, x0, form=form, prediction=prediction, time_sampler="discrete",
            cond={"input_ids": tokenize(tokenizer, prompts)}, generator=generator,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    unet.eval()


def build_tiny_pipeline(
    out_dir: str | os.PathLike[str], seed: int = 0, sample_size: int = 8, fit_steps: int = 150
) -> Path:
    """Build a tiny SD-1.5-shaped pipeline and ``save_pretrained`` it.

    Args:
        out_dir: the pipeline folder to write (replaced if it exists; written to a
            temporary folder and renamed, so it is never half-written).
        seed: seeds the random weights and the fit (same seed, same weights).
        sample_size: the UNet's default latent size; images are ``8 * sample_size`` pixels.
        fit_steps: AdamW steps fitting the UNet to the synthetic latents (see the module
            docstring); 0 keeps the random weights.

    Returns:
        ``out_dir`` as a Path; load it with ``StableDiffusionPipeline.from_pretrained``.

    Raises:
        ValueError: for a sample_size that the two-level UNet cannot halve (odd or < 2).
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    if sample_size < 2 or sample_size % 2:
        raise ValueError(f"sample_size must be an even integer >= 2, got {sample_size}.")
    if fit_steps < 0:
        raise ValueError(f"fit_steps must be >= 0, got {fit_steps}.")
    out = Path(out_dir)
    tmp = temporary_sibling(out)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet, vae = _unet(sample_size), _vae(sample_size)
            tokenizer = _tokenizer(tmp)
            text_encoder = _text_encoder(len(tokenizer))
        scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
        _fit_unet(unet, text_encoder, tokenizer, scheduler, fit_steps, seed)
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)
        for name in ("vocab.json", "merges.txt"):  # for slow tokenizers / older transformers
            shutil.move(tmp / name, tmp / "tokenizer" / name)
        config_text = json.dumps(SD15_SCHEDULER_CONFIG, indent=2) + "\n"
        (tmp / "scheduler" / "scheduler_config.json").write_text(config_text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, out)
