"""A tiny Stable Diffusion 3 pipeline (``StableDiffusion3Pipeline``), built offline.

The classes and folder layout of ``stable-diffusion-3-medium-diffusers`` with random weights
(about 0.4 M parameters), after the diffusers test suite's dummy SD3 components
(``tests/pipelines/stable_diffusion_3``), scaled so that the CLIP part of the prompt embedding
is zero-padded to the joint dimension as in the real checkpoint (768 + 1280 -> 4096):

* ``SD3Transformer2DModel``: 2 joint blocks, 4 heads of 8 (inner dim 32), patch size 2,
  16 latent channels, ``joint_attention_dim`` 64, pooled projection 48;
* ``text_encoder`` / ``text_encoder_2``: 2-layer ``CLIPTextModelWithProjection`` s of width
  16 and 32 (CLIP-L and CLIP-G in miniature) over the byte-level vocabulary of
  :func:`~.parts.clip_tokenizer` (concatenated: 48, padded to 64);
* ``text_encoder_3``: a 2-layer ``T5EncoderModel`` of width 64 (the joint dimension, as T5-XXL's
  4096) and ``tokenizer_3`` a ``T5Tokenizer`` built offline from a character-level Unigram
  vocabulary (``<pad>``, ``</s>``, ``<unk>``, ``▁``, printable ASCII and ``▁``-prefixed
  letters; no sentencepiece model, no download);
* ``vae``: :func:`~.parts.tiny_vae` with SD3's 16 latent channels, ``scaling_factor`` 1.5305
  and ``shift_factor`` 0.0609, without quant convs (as SD3's VAE);
* the scheduler: SD3 medium's own ``scheduler_config.json`` (:data:`SD3_SCHEDULER_CONFIG`).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from .parts import clip_text_encoder, clip_tokenizer, tiny_vae

__all__ = ["SD3_SCHEDULER_CONFIG", "sd3_parts", "t5_tokenizer"]

#: ``stabilityai/stable-diffusion-3-medium-diffusers``'s ``scheduler/scheduler_config.json``,
#: written verbatim (FlowMatchEulerDiscreteScheduler, 1000 timesteps, shift 3.0)
SD3_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

JOINT_DIM = 64  # joint_attention_dim = T5's width; the CLIP widths 16 + 32 are padded to it
#: the CLIP tokenizers' ``model_max_length``: 77 in SD3; 32 here (every tiny prompt fits),
#: since the joint sequence (CLIP + 256 T5 tokens + 16 patches) sets the tiny model's cost
CLIP_LENGTH = 32
#: latent channels: SD3's VAE has 16; 4 keep the tiny transformer's tokens (32 wide) wider
#: than its 2 x 2 patches
LATENT_CHANNELS = 4


def t5_tokenizer() -> Any:
    """A ``T5Tokenizer`` over a character-level Unigram vocabulary (ids 0, 1, 2: pad, eos,
    unk, as T5's), built without sentencepiece or a download."""
    from transformers import T5Tokenizer

    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in characters]
    vocab += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5_encoder(vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=JOINT_DIM,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config)


def _transformer(sample_size: int) -> Any:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=32,
        num_attention_heads=1,
        joint_attention_dim=JOINT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=16 + 32,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=max(8, sample_size // 2),
    )


def _short(tokenizer: Any) -> Any:
    """The CLIP tokenizer padding to :data:`CLIP_LENGTH` tokens (the pipeline pads to it)."""
    tokenizer.model_max_length = CLIP_LENGTH
    return tokenizer


def sd3_parts(scratch: Path, sample_size: int) -> dict[str, Any]:
    """The random-weight components of a tiny ``StableDiffusion3Pipeline``, created in a
    fixed order (same seed, same weights)."""
    transformer = _transformer(sample_size)
    vae = tiny_vae(
        sample_size,
        latent_channels=LATENT_CHANNELS,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    tokenizer = _short(clip_tokenizer(scratch))
    text_encoder = clip_text_encoder(len(tokenizer), hidden_size=16, with_projection=True)
    text_encoder_2 = clip_text_encoder(len(tokenizer), hidden_size=32, with_projection=True)
    tokenizer_3 = t5_tokenizer()
    text_encoder_3 = _t5_encoder(len(tokenizer_3))
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": _short(clip_tokenizer(scratch)),
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
    }
