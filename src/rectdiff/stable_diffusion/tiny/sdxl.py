"""A tiny Stable Diffusion XL pipeline (``StableDiffusionXLPipeline``).

The classes and folder layout of SDXL base 1.0 (``UNet2DConditionModel`` with
``addition_embed_type="text_time"``, ``AutoencoderKL`` with 8x downsampling, a
``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` with their two ``CLIPTokenizer``
folders) after the diffusers test suite's dummy SDXL components, shrunk: the UNet's
cross-attention dimension is the sum of the two encoders' hidden sizes (32 + 48 = 80, as
768 + 1280 = 2048 for SDXL) and its added embedding takes the six size/crop time ids
(``addition_time_embed_dim`` 8 each) and the second encoder's 32-dimensional pooled
projection: ``projection_class_embeddings_input_dim = 6 * 8 + 32 = 80`` (SDXL: 6 * 256 +
1280 = 2816). The scheduler is SDXL base's ``scheduler_config.json``, written verbatim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .parts import clip_text_encoder, clip_tokenizer, tiny_vae

__all__ = ["SDXL_SCHEDULER_CONFIG", "sdxl_parts"]

#: stable-diffusion-xl-base-1.0's ``scheduler/scheduler_config.json``: Euler, eps-prediction,
#: ``leading`` spacing with ``steps_offset`` 1
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

#: hidden sizes of the two text encoders and the second one's pooled projection
HIDDEN, HIDDEN_2, PROJECTION = 32, 48, 32
#: the dimension of each of the six time ids' sinusoidal embedding
TIME_EMBED_DIM = 8


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
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=HIDDEN + HIDDEN_2,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION,
    )


def sdxl_parts(scratch: Path, sample_size: int) -> dict[str, Any]:
    """The random-weight components of a tiny ``StableDiffusionXLPipeline``, created in a
    fixed order (same seed, same weights)."""
    unet = _unet(sample_size)
    vae = tiny_vae(sample_size, scaling_factor=0.13025, force_upcast=False)
    tokenizer = clip_tokenizer(scratch)
    tokenizer_2 = clip_tokenizer(scratch)
    text_encoder = clip_text_encoder(len(tokenizer), HIDDEN)
    text_encoder_2 = clip_text_encoder(len(tokenizer_2), HIDDEN_2, with_projection=True,
                                       projection_dim=PROJECTION, hidden_act="gelu")  # fmt: skip
    return {
        "unet": unet,
        "vae": vae,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
    }
