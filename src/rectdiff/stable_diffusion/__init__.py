"""Rectify a pretrained Stable Diffusion pipeline: pairs, UNet retraining, a 1-step pipeline.

    build_tiny_pipeline(dir)                       a tiny offline SD pipeline for trying it out
    generate_sd_pairs(pipeline, prompts, num, out) (noise, latent, prompt) pairs in a pair store
    rectify_sd(pipeline, pairs, out)               retrain the UNet; save a diffusers pipeline
    evaluate(student, teacher, prompts, out)       few-step latent MSE vs the teacher, a grid

The modules import diffusers and transformers lazily where they can; the command line is
``rectdiff sd tiny|pairs|rectify|eval|demo``.
"""

from .demo import run_demo
from .eval import evaluate
from .load import load_pipeline, pipeline_fingerprint, pipeline_form
from .model import TextConditionedUNet, tokenize
from .pairs import generate_sd_pairs, sd_time_grid
from .prompts import read_prompts
from .rectify import RectifyResult, rectify_sd
from .tiny import build_tiny_pipeline, tiny_prompts

__all__ = [
    "RectifyResult",
    "TextConditionedUNet",
    "build_tiny_pipeline",
    "evaluate",
    "generate_sd_pairs",
    "load_pipeline",
    "pipeline_fingerprint",
    "pipeline_form",
    "read_prompts",
    "rectify_sd",
    "run_demo",
    "sd_time_grid",
    "tiny_prompts",
    "tokenize",
]
