"""A Stable Diffusion UNet and its frozen text encoder as one rectdiff model.

rectdiff calls every model as ``model(x_t, model_time, **cond)``. For Stable Diffusion the
condition is the prompt's CLIP token ids (``input_ids``, shape ``(B, 77)``): small enough to
store with every pair, and encoded on the fly by the frozen text encoder into the UNet's
``encoder_hidden_states`` exactly as ``StableDiffusionPipeline.encode_prompt`` does
(``text_encoder(input_ids)[0]``, no attention mask, no clip skip).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TextConditionedUNet", "tokenize"]


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> Tensor:
    """CLIP token ids ``(len(prompts), model_max_length)`` as the SD pipeline makes them:
    padded to ``tokenizer.model_max_length`` and truncated."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class TextConditionedUNet(nn.Module):
    """``model(x_t, model_time, input_ids=ids) -> unet(x_t, model_time, text_encoder(ids)[0])``.

    Only the UNet is a registered submodule (its parameters are what an optimizer, DDP or a
    checkpoint see); the text encoder is frozen, kept outside the parameter list, and follows
    the UNet's device in ``.to()``. A token-id batch of size 1 (the empty prompt of
    classifier-free guidance) is broadcast over ``x_t``'s batch. The UNet runs in its own
    dtype; the output is returned in ``x_t``'s dtype.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        text_encoder: a transformers ``CLIPTextModel`` (frozen here).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        text_encoder.requires_grad_(False).eval()
        self.__dict__["text_encoder"] = text_encoder  # not a submodule: frozen, not saved
        self._cache: tuple[Tensor, Tensor] | None = None

    @property
    def config(self) -> Any:
        """The UNet's config (in_channels, sample_size, ...)."""
        return self.unet.config

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> nn.Module:
        self.text_encoder._apply(fn, *args, **kwargs)
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def encode(self, input_ids: Tensor) -> Tensor:
        """``text_encoder(input_ids)[0]``, cached for the last id batch seen."""
        cached = self._cache
        if (
            cached is not None
            and cached[0].device == input_ids.device
            and cached[0].shape == input_ids.shape
            and torch.equal(cached[0], input_ids)
        ):
            return cached[1]
        device = next(self.text_encoder.parameters()).device
        hidden = self.text_encoder(input_ids.to(device))[0]
        self._cache = (input_ids.clone(), hidden)
        return hidden

    def forward(self, x_t: Tensor, model_time: Tensor, input_ids: Tensor) -> Tensor:
        dtype = self.unet.dtype
        hidden = self.encode(input_ids).to(dtype)
        if hidden.shape[0] == 1 and x_t.shape[0] > 1:
            hidden = hidden.expand(x_t.shape[0], *hidden.shape[1:])
        out = self.unet(x_t.to(dtype), model_time, encoder_hidden_states=hidden).sample
        return out.to(x_t.dtype)
