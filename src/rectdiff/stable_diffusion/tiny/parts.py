"""The parts every tiny pipeline shares: an offline CLIP tokenizer and text encoder, a small
VAE, synthetic prompt-conditioned latents and the short fit that makes a random network draw
latents of order one.

The tokenizer is byte-level BPE with no merges: its vocabulary is the 256 byte-unicode
characters of CLIP's tokenizer, each also with the end-of-word suffix ``</w>``, plus
``<|startoftext|>`` and ``<|endoftext|>`` (514 tokens), so it tokenizes any text, one
character per token, with no download.

The fit (:func:`fit_network`): ``fit_steps`` AdamW steps of the family's own diffusion loss
(its form, prediction and conditioning) on ``x0 = 0.6 colour_mean + 0.6 object_pattern +
0.5 z`` for prompts "a {colour} {object}" (10 % dropped prompts, given the family's
unconditional conditioning, so that classifier-free guidance has an unconditional model). A
purely random network does not draw latents of order one (standard deviation near 15 for the
SD 1.5 UNet); since SD's schedule ends at alpha_1 = 0.068 > 0, the training input
``alpha_1 x0 + sigma_1 eps`` at t = 1 would then differ from the ``sigma_1 eps`` a sampler
starts from by about as much as the noise itself, and no one-step student could be learnt
from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MAX_LENGTH",
    "TINY_COLOURS",
    "TINY_OBJECTS",
    "byte_level_vocab",
    "clip_text_encoder",
    "clip_tokenizer",
    "fit_network",
    "tiny_prompts",
    "tiny_vae",
]

MAX_LENGTH = 77  # CLIP's context length, as in SD 1.5
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


def clip_tokenizer(scratch: Path) -> Any:
    """The byte-level CLIP tokenizer (its vocabulary files are written into ``scratch``;
    ``save_pretrained`` writes its own copies)."""
    from transformers import CLIPTokenizer

    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "vocab.json").write_text(json.dumps(byte_level_vocab()))
    (scratch / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(scratch / "vocab.json"),
        merges=str(scratch / "merges.txt"),
        model_max_length=MAX_LENGTH,
    )


def clip_text_encoder(
    vocab_size: int, hidden_size: int = 32, with_projection: bool = False, **config: Any
) -> Any:
    """A 2-layer CLIP text encoder (``CLIPTextModelWithProjection`` with ``with_projection``,
    as SDXL's second and SD3's encoders are) over the byte-level vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    settings.update(config)
    model = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model(CLIPTextConfig(**settings))


def tiny_vae(sample_size: int, latent_channels: int = 4, **config: Any) -> Any:
    """A 4-level ``AutoencoderKL`` (8x downsampling, as SD's) for ``8 * sample_size`` pixels."""
    from diffusers import AutoencoderKL

    settings = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=8 * sample_size,
        scaling_factor=0.18215,
    )
    settings.update(config)
    return AutoencoderKL(**settings)


def _synthetic_latents(
    count: int, shape: tuple[int, ...], generator: torch.Generator, patterns: tuple[Tensor, Tensor]
) -> tuple[Tensor, list[str]]:
    """``count`` latents ``0.6 colour_mean + 0.6 object_pattern + 0.5 z`` and their prompts."""
    colour_mean, object_pattern = patterns
    colour = torch.randint(len(TINY_COLOURS), (count,), generator=generator)
    obj = torch.randint(len(TINY_OBJECTS), (count,), generator=generator)
    z = torch.randn((count, *shape), generator=generator)
    x0 = 0.6 * colour_mean[colour] + 0.6 * object_pattern[obj] + 0.5 * z
    empty = torch.rand(count, generator=generator) < 0.1
    prompts = [
        "" if drop else f"a {TINY_COLOURS[c]} {TINY_OBJECTS[o]}"
        for c, o, drop in zip(colour.tolist(), obj.tolist(), empty.tolist(), strict=True)
    ]
    return x0, prompts


def _with_unconditional(
    cond: dict[str, Tensor], prompts: list[str], uncond: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``cond`` with the rows of the empty prompts replaced by the family's unconditional
    conditioning (the one classifier-free guidance uses; for SD the same tokens, for SDXL
    the zero-embedding prompt)."""
    empty = torch.tensor([prompt == "" for prompt in prompts])
    return {
        key: torch.where(empty.view(-1, *[1] * (value.ndim - 1)), uncond[key], value)
        for key, value in cond.items()
    }


def fit_network(
    pipe: Any, family: Any, steps: int, seed: int, batch_size: int = 32, lr: float = 3e-3
) -> None:
    """``steps`` AdamW steps of the family's diffusion loss on the synthetic latents.

    The loss is the pipeline's own: its scheduler's form and prediction, the family's
    denoiser and conditioning, timesteps drawn as the schedule's (``"discrete"`` on a DDPM
    table, uniform t for flow matching).
    """
    from ... import forms
    from ...training.losses import diffusion_loss

    form, prediction = family.form(pipe)
    sampler = "discrete" if isinstance(form, forms.DiscreteVP) else "uniform"
    network = family.trained_network(pipe)
    size = network.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = int(network.config.in_channels)
    generator = torch.Generator().manual_seed(seed)
    patterns = (
        torch.randn((len(TINY_COLOURS), channels, 1, 1), generator=generator),
        torch.randn((len(TINY_OBJECTS), 1, height, width), generator=generator),
    )
    model = family.denoiser(pipe)
    uncond = family.unconditional(pipe)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr)
    network.train()
    for _ in range(steps):
        x0, prompts = _synthetic_latents(batch_size, (channels, height, width), generator, patterns)
        loss, _ = diffusion_loss(
            model, x0, form=form, prediction=prediction, time_sampler=sampler,
            cond=_with_unconditional(family.conditioning(pipe, prompts), prompts, uncond),
            generator=generator,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    network.eval()
