"""The pipeline families rectdiff supports, keyed by diffusers pipeline class name.

A pipeline folder's family is named by its ``model_index.json`` ``_class_name``; a loaded
pipeline's by its class. Adding a family is one module defining a
:class:`~.base.PipelineFamily` subclass and its instance, plus one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .base import PipelineFamily
from .sd import STABLE_DIFFUSION
from .sd3 import STABLE_DIFFUSION_3
from .sdxl import STABLE_DIFFUSION_XL

__all__ = ["FAMILIES", "PipelineFamily", "family_for", "family_named"]

#: pipeline class name -> its family
FAMILIES: dict[str, PipelineFamily] = {
    STABLE_DIFFUSION.pipeline_class: STABLE_DIFFUSION,
    STABLE_DIFFUSION_XL.pipeline_class: STABLE_DIFFUSION_XL,
    STABLE_DIFFUSION_3.pipeline_class: STABLE_DIFFUSION_3,
}


def family_named(class_name: str, where: str = "") -> PipelineFamily:
    """The family of the pipeline class ``class_name``.

    Raises:
        ValueError: for a class no family handles, listing the supported ones.
    """
    if class_name not in FAMILIES:
        subject = where or "the pipeline"
        raise ValueError(
            f"{subject} is a {class_name}, which rectdiff does not support; supported "
            f"pipeline classes (model_index.json _class_name): {', '.join(FAMILIES)}."
        )
    return FAMILIES[class_name]


def _class_name(root: Path) -> str:
    index = root / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{str(index)!r} is not a readable model_index.json ({err}).") from None
    if not isinstance(name, str):
        raise ValueError(f"{str(index)!r} names no pipeline class (_class_name).")
    return name


def family_for(pipeline: str | os.PathLike[str] | Any) -> PipelineFamily:
    """The family of a pipeline folder (by its ``model_index.json`` ``_class_name``) or of a
    loaded pipeline (by its class name).

    Raises:
        ValueError: for an unreadable ``model_index.json`` or an unsupported class, listing
            the supported ones.
    """
    if isinstance(pipeline, (str, os.PathLike)):
        root = Path(pipeline)
        return family_named(_class_name(root), f"pipeline folder {str(root)!r}")
    return family_named(type(pipeline).__name__, "the pipeline")
