"""Tiny Stable Diffusion 1.x and 2.x pipelines (``StableDiffusionPipeline``).

Same classes and folder layout as the real checkpoints (``UNet2DConditionModel``,
``AutoencoderKL`` with 8x downsampling and 4 latent channels, ``CLIPTextModel``,
``CLIPTokenizer``) at about 0.36 M parameters, with each checkpoint's own scheduler config:

* ``sd15``: SD 1.5's PNDM config, ``scaled_linear`` betas 0.00085..0.012 over 1000 steps,
  eps-prediction;
* ``sd2``: SD 2.1 (768)'s DDIM config, the same betas, v-prediction, and a UNet with linear
  attention projections as SD 2.x has;
* ``sd2-zsnr``: ``sd2`` with ``rescale_betas_zero_snr`` and trailing timesteps (Lin et al.
  2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): alpha at the last
  timestep is 0, which rectdiff's form clips to ``alphas_cumprod = 2**-24`` as diffusers'
  schedulers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .parts import clip_text_encoder, clip_tokenizer, tiny_vae

__all__ = ["SD15_SCHEDULER_CONFIG", "SD2_SCHEDULER_CONFIG", "SD2_ZSNR_SCHEDULER_CONFIG", "sd_parts"]

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

#: Stable Diffusion 2.1 (768 px)'s ``scheduler/scheduler_config.json``: v-prediction
SD2_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: SD 2.1's config with zero terminal SNR and trailing timesteps, as the zero-SNR fine-tunes
#: ship it
SD2_ZSNR_SCHEDULER_CONFIG: dict[str, Any] = SD2_SCHEDULER_CONFIG | {
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


def _unet(sample_size: int, linear_projection: bool) -> Any:
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
        use_linear_projection=linear_projection,
    )


def sd_parts(scratch: Path, sample_size: int, version: str) -> dict[str, Any]:
    """The random-weight components of a tiny ``StableDiffusionPipeline`` (``version`` 1 or
    2), created in a fixed order (same seed, same weights)."""
    unet = _unet(sample_size, linear_projection=version == "2")
    vae = tiny_vae(sample_size)
    tokenizer = clip_tokenizer(scratch)
    text_encoder = clip_text_encoder(len(tokenizer))
    return {
        "unet": unet,
        "vae": vae,
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
