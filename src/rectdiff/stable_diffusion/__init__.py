"""Rectify a pretrained Stable Diffusion pipeline: pairs, UNet retraining, a 1-step pipeline.

    build_tiny_pipeline(dir)                       a tiny offline SD pipeline for trying it out
    generate_sd_pairs(pipeline, prompts, num, out) (noise, latent, prompt) pairs in a pair store
    rectify_sd(pipeline, pairs, out, config)       retrain the UNet; save a diffusers pipeline
    evaluate(student, teacher, prompts, out)       few-step latent MSE vs the teacher, a grid
    run_demo(out)                                  all of it on the tiny pipeline

``SDRectifyConfig`` holds rectify_sd's settings; a ``PipelineFamily`` (one per pipeline
class, in ``FAMILIES``) holds what depends on the kind of pipeline.

The command line is ``rectdiff sd tiny|pairs|rectify|eval|demo``. Names are imported on
first use, so importing this package (or its ``cli``) does not load diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_NAMES = {
    "ClipScorer": "clip_score",
    "FAMILIES": "families",
    "PipelineFamily": "families",
    "RectifyResult": "rectify",
    "SDRectifyConfig": "config",
    "TextConditionedUNet": "model",
    "build_tiny_pipeline": "tiny",
    "clip_score": "clip_score",
    "evaluate": "eval",
    "family_for": "families",
    "generate_sd_pairs": "pairs",
    "load_pipeline": "load",
    "pipeline_fingerprint": "load",
    "pipeline_form": "load",
    "read_prompts": "prompts",
    "rectify_sd": "rectify",
    "run_demo": "demo",
    "sd_time_grid": "pairs",
    "tiny_prompts": "tiny",
    "tokenize": "model",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'rectdiff.stable_diffusion' has no attribute {name!r}")
