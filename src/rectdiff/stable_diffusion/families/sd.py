"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): one UNet, one CLIP text encoder.

A pair stores the prompt's CLIP token ids (``input_ids``, shape ``(77,)``): small, and encoded
on the fly by the frozen text encoder exactly as ``StableDiffusionPipeline.encode_prompt``
does (:class:`~rectdiff.stable_diffusion.model.TextConditionedUNet`). The form and prediction
come from the checkpoint's scheduler (SD 1.5: a DiscreteVP on ``scaled_linear``, ``"eps"``;
SD 2.x 768: ``"v"``). The pipeline loads without safety checker.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..model import TextConditionedUNet, tokenize
from .base import PipelineFamily

__all__ = ["StableDiffusionFamily", "STABLE_DIFFUSION"]


class StableDiffusionFamily(PipelineFamily):
    """``StableDiffusionPipeline``: UNet + CLIP text encoder, conditioning ``input_ids``."""

    pipeline_class = "StableDiffusionPipeline"
    title = "Stable Diffusion"
    network = "unet"
    required_parts = ("unet", "text_encoder", "tokenizer", "scheduler")
    identity_parts = ("unet", "text_encoder", "tokenizer", "scheduler")
    cond_keys = ("input_ids",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def load_options(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def conditioning(self, pipe: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
        return {"input_ids": tokenize(pipe.tokenizer, prompts)}

    def denoiser(self, pipe: Any) -> nn.Module:
        return TextConditionedUNet(pipe.unet, pipe.text_encoder)

    def save_lora_weights(self, pipe: Any, folder: Path, state: dict[str, Tensor]) -> None:
        type(pipe).save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True)


#: the one instance, registered in :data:`rectdiff.stable_diffusion.families.FAMILIES`
STABLE_DIFFUSION = StableDiffusionFamily()
