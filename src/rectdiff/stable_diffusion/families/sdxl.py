"""Stable Diffusion XL (``StableDiffusionXLPipeline``): one UNet, two CLIP text encoders.

A pair stores one token-id tensor per tokenizer, ``input_ids`` (``tokenizer``, for
``text_encoder``, a ``CLIPTextModel``) and ``input_ids_2`` (``tokenizer_2``, for
``text_encoder_2``, a ``CLIPTextModelWithProjection``), each padded to 77 and truncated as
``StableDiffusionXLPipeline.encode_prompt`` tokenizes (the same prompt for both, no
``prompt_2``). :class:`TextConditionedXLUNet` encodes them on the fly exactly as
``encode_prompt`` does with ``clip_skip=None``:

* ``prompt_embeds = cat([text_encoder(ids).hidden_states[-2],
  text_encoder_2(ids_2).hidden_states[-2]], -1)`` (the penultimate layers, concatenated on the
  feature axis: 768 + 1280 = 2048 = the UNet's ``cross_attention_dim`` for SDXL base);
* ``pooled = text_encoder_2(ids_2)[0]``, the projected pooled embedding (``text_embeds``);
* ``time_ids = (H, W, 0, 0, H, W)``: original size, crop top-left and target size in pixels,
  ``H, W`` the latent's size times the VAE factor, as the pipeline builds them from its
  ``height``/``width`` with the default ``original_size``, ``crops_coords_top_left`` and
  ``target_size``;

and calls ``unet(x_t, t, encoder_hidden_states=prompt_embeds,
added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})``.

The unconditional (classifier-free guidance) conditioning reproduces the stock pipeline's
negative prompt: with ``force_zeros_for_empty_prompt`` (the pipeline config's flag, True for
SDXL base) ``encode_prompt`` uses *zeros* for both the negative ``prompt_embeds`` and the
negative pooled embeds, not the encoding of ``""``. :meth:`StableDiffusionXLFamily.unconditional`
then returns token ids filled with :data:`ZERO_PROMPT` (-1, no token's id); a row of ids that
are all :data:`ZERO_PROMPT` is encoded as exactly those zeros. Keys and shapes stay those of
a prompt's conditioning, so guidance batches it with the prompts like any other. Without the
flag the unconditional is the encoding of ``""``, as the pipeline's.

The form and prediction come from the checkpoint's scheduler (SDXL base: an
``EulerDiscreteScheduler`` config, ``scaled_linear`` 0.00085..0.012, eps-prediction,
``leading`` spacing with ``steps_offset`` 1, so that stock 25 DPM-Solver steps would start
at timestep 951, t = 0.952). Pairs, phased windows and the evaluation reference are solved on
the trailing DPM-Solver grid instead (:func:`.base.dpm_solver_grid`), from timestep 999, where
the student saved with the base class's DDIM-trailing scheduler starts sampling.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..model import tokenize
from .base import PipelineFamily

__all__ = ["STABLE_DIFFUSION_XL", "StableDiffusionXLFamily", "TextConditionedXLUNet", "ZERO_PROMPT"]

#: the token id that marks the zero-embedding prompt of ``force_zeros_for_empty_prompt``
ZERO_PROMPT = -1


def vae_factor(pipe: Any) -> int:
    """Pixels per latent cell of ``pipe``: its VAE's, or (loaded without VAE) the one its
    folder's ``vae/config.json`` gives, else SDXL's 8."""
    if getattr(pipe, "vae", None) is not None:
        return int(pipe.vae_scale_factor)
    config = Path(str(getattr(pipe, "name_or_path", "") or "")) / "vae" / "config.json"
    if config.is_file():
        return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)
    return 8


class TextConditionedXLUNet(nn.Module):
    """``model(x_t, model_time, input_ids=, input_ids_2=)``: SDXL's UNet with its two frozen
    CLIP text encoders, encoding as ``StableDiffusionXLPipeline`` does (module docstring).

    Only the UNet is a registered submodule (the optimizer, DDP and checkpoints see its
    parameters alone); the text encoders are frozen, kept outside the parameter list, and
    follow the UNet's device in ``.to()``. A conditioning batch of one (the unconditional
    prompt) is broadcast over ``x_t``'s batch. The UNet runs in its own dtype; the output is
    returned in ``x_t``'s dtype.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``.
        text_encoder: a transformers ``CLIPTextModel``.
        text_encoder_2: a transformers ``CLIPTextModelWithProjection``.
        vae_scale_factor: pixels per latent cell (8 for SDXL), for the size time ids.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        vae_scale_factor: int = 8,
    ) -> None:
        super().__init__()
        self.unet = unet
        for encoder in (text_encoder, text_encoder_2):
            encoder.requires_grad_(False).eval()
        self.__dict__["text_encoder"] = text_encoder  # not submodules: frozen, not saved
        self.__dict__["text_encoder_2"] = text_encoder_2
        self.vae_scale_factor = int(vae_scale_factor)
        self._cache: tuple[Tensor, Tensor, tuple[Tensor, Tensor]] | None = None

    @property
    def config(self) -> Any:
        """The UNet's config (in_channels, sample_size, ...)."""
        return self.unet.config

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> nn.Module:
        self.text_encoder._apply(fn, *args, **kwargs)
        self.text_encoder_2._apply(fn, *args, **kwargs)
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def _is_cached(self, input_ids: Tensor, input_ids_2: Tensor) -> bool:
        cached = self._cache
        return cached is not None and all(
            old.device == new.device and old.shape == new.shape and torch.equal(old, new)
            for old, new in ((cached[0], input_ids), (cached[1], input_ids_2))
        )

    @torch.no_grad()
    def encode(self, input_ids: Tensor, input_ids_2: Tensor) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds, pooled)`` as ``encode_prompt`` makes them, zeros for the rows
        whose ids are all :data:`ZERO_PROMPT`; cached for the last id batch seen."""
        if self._is_cached(input_ids, input_ids_2):
            return self._cache[2]
        hidden, pooled = [], None
        for encoder, ids in ((self.text_encoder, input_ids), (self.text_encoder_2, input_ids_2)):
            device = next(encoder.parameters()).device
            out = encoder(ids.clamp(min=0).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if out[0].ndim == 2:  # the projected pooled output of text_encoder_2
                pooled = out[0]
        embeds = torch.cat(hidden, dim=-1).to(self.text_encoder_2.dtype)
        zero = ((input_ids == ZERO_PROMPT).all(-1) & (input_ids_2 == ZERO_PROMPT).all(-1)).to(
            embeds.device
        )
        embeds = torch.where(zero[:, None, None], torch.zeros_like(embeds), embeds)
        pooled = torch.where(zero[:, None], torch.zeros_like(pooled), pooled)
        self._cache = (input_ids.clone(), input_ids_2.clone(), (embeds, pooled))
        return embeds, pooled

    def time_ids(self, x_t: Tensor, dtype: torch.dtype) -> Tensor:
        """``(H, W, 0, 0, H, W)`` per sample: original size, crop corner, target size."""
        height, width = (int(n) * self.vae_scale_factor for n in x_t.shape[-2:])
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=x_t.device)
        return ids.expand(x_t.shape[0], -1)

    def forward(
        self, x_t: Tensor, model_time: Tensor, input_ids: Tensor, input_ids_2: Tensor
    ) -> Tensor:
        dtype = self.unet.dtype
        embeds, pooled = self.encode(input_ids, input_ids_2)
        time_ids = self.time_ids(x_t, embeds.dtype)
        embeds, pooled = embeds.to(dtype), pooled.to(dtype)
        if embeds.shape[0] == 1 and x_t.shape[0] > 1:
            embeds = embeds.expand(x_t.shape[0], *embeds.shape[1:])
            pooled = pooled.expand(x_t.shape[0], -1)
        out = self.unet(
            x_t.to(dtype),
            model_time,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(dtype)},
        ).sample
        return out.to(x_t.dtype)


class StableDiffusionXLFamily(PipelineFamily):
    """``StableDiffusionXLPipeline``: UNet + two CLIP text encoders, conditioning
    ``input_ids`` and ``input_ids_2``."""

    pipeline_class = "StableDiffusionXLPipeline"
    title = "Stable Diffusion XL"
    network = "unet"
    required_parts = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                      "scheduler")  # fmt: skip
    identity_parts = required_parts
    cond_keys = ("input_ids", "input_ids_2")
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def conditioning(self, pipe: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
        return {
            "input_ids": tokenize(pipe.tokenizer, prompts),
            "input_ids_2": tokenize(pipe.tokenizer_2, prompts),
        }

    def unconditional(self, pipe: Any) -> dict[str, Tensor]:
        """:data:`ZERO_PROMPT` ids (zero embeddings) when the pipeline config has
        ``force_zeros_for_empty_prompt`` (default True, as the pipeline's), else ``""``."""
        if not getattr(pipe.config, "force_zeros_for_empty_prompt", True):
            return self.conditioning(pipe, [""])
        return {
            key: torch.full((1, tokenizer.model_max_length), ZERO_PROMPT, dtype=torch.long)
            for key, tokenizer in (("input_ids", pipe.tokenizer), ("input_ids_2", pipe.tokenizer_2))
        }

    def denoiser(self, pipe: Any) -> nn.Module:
        return TextConditionedXLUNet(pipe.unet, pipe.text_encoder, pipe.text_encoder_2,
                                     vae_factor(pipe))  # fmt: skip

    def save_lora_weights(self, pipe: Any, folder: Path, state: dict[str, Tensor]) -> None:
        type(pipe).save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True)


#: the one instance, registered in :data:`rectdiff.stable_diffusion.families.FAMILIES`
STABLE_DIFFUSION_XL = StableDiffusionXLFamily()
