"""CLIP score of images against their prompts, with a local CLIP model folder.

``CLIPScore(I, c) = 100 * max(cos(E_image(I), E_text(c)), 0)`` (Hessel et al. 2021, eq. 1,
with the factor 100 for w = 2.5 used by torchmetrics and the diffusion literature), averaged
over the pairs. Images are resized (bicubic, shorter side) and centre-cropped to the model's
``image_size`` and normalised with the folder's ``preprocessor_config.json`` mean and std
(OpenAI CLIP's by default), in torch, so no image processor backend is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["ClipScorer", "clip_score", "preprocess"]

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(B, 3, H, W)`` images in [0, 1] -> CLIP pixel values ``(B, 3, size, size)``."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized = F.interpolate(
        images.float(),
        size=(max(size, round(height * scale)), max(size, round(width * scale))),
        mode="bicubic",
        align_corners=False,
    )
    top = (resized.shape[-2] - size) // 2
    left = (resized.shape[-1] - size) // 2
    cropped = resized[..., top : top + size, left : left + size].clamp(0.0, 1.0)
    mean_t = torch.as_tensor(mean, dtype=cropped.dtype, device=cropped.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=cropped.dtype, device=cropped.device).view(1, 3, 1, 1)
    return (cropped - mean_t) / std_t


def _features(output: object) -> Tensor:
    return output if isinstance(output, Tensor) else output.pooler_output  # transformers >= 5


class ClipScorer:
    """A local ``CLIPModel`` and tokenizer, loaded once; ``scorer(images, prompts)`` gives the
    per-image scores ``100 * max(cos, 0)``.

    Args:
        clip_dir: a local transformers ``CLIPModel`` folder with its tokenizer (e.g. a copy of
            openai/clip-vit-large-patch14).
        device: where the model runs (default CPU).

    Raises:
        ValueError: when the folder is not a CLIP model folder.
    """

    def __init__(
        self, clip_dir: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        root = Path(clip_dir)
        if not (root / "config.json").is_file():
            raise ValueError(
                f"CLIP folder {str(root)!r} has no config.json; give a local CLIPModel folder "
                "(save_pretrained of a CLIPModel and its tokenizer)."
            )
        self.device = torch.device(device or "cpu")
        self.model = CLIPModel.from_pretrained(root, local_files_only=True).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        config_path = root / "preprocessor_config.json"
        settings = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.mean = settings.get("image_mean", _OPENAI_MEAN)
        self.std = settings.get("image_std", _OPENAI_STD)
        self.size = int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores ``(B,)`` of ``images`` (``(B, 3, H, W)`` in [0, 1]) against ``prompts``."""
        if len(images) != len(prompts):
            raise ValueError(
                f"{len(images)} images but {len(prompts)} prompts; give one per image."
            )
        pixels = preprocess(images.to(self.device), self.size, self.mean, self.std)
        text = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        image_features = _features(self.model.get_image_features(pixel_values=pixels))
        text_features = _features(
            self.model.get_text_features(input_ids=text.input_ids.to(self.device))
        )
        cosine = F.cosine_similarity(image_features, text_features, dim=-1)
        return (100.0 * cosine.clamp(min=0.0)).float().cpu()


def clip_score(
    images: Tensor,
    prompts: Sequence[str],
    clip_dir: str | os.PathLike[str],
    batch_size: int = 32,
) -> float:
    """Mean CLIP score of ``images`` (``(B, 3, H, W)`` in [0, 1]) against ``prompts``."""
    scorer = ClipScorer(clip_dir)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one per image.")
    scores = [
        scorer(images[start : start + batch_size], prompts[start : start + batch_size])
        for start in range(0, len(images), batch_size)
    ]
    return float(torch.cat(scores).mean())
