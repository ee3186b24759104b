"""The rectified pipeline folder: a stock diffusers pipeline plus ``rectdiff.json``.

The folder is the teacher's components with the rectified network (LoRA fused into it, if
any) and the family's student scheduler (for Stable Diffusion
``DDIMScheduler.from_config(teacher_config, timestep_spacing="trailing", clip_sample=False,
set_alpha_to_one=True)``, whose last step lands on the clean endpoint sigma = 0), so that
``StableDiffusionPipeline.from_pretrained(out)(prompt, num_inference_steps=1,
guidance_scale=1.0)`` gives the one-step result with no rectdiff import. With LoRA,
``out/lora/pytorch_lora_weights.safetensors`` also loads into the teacher with
``pipe.load_lora_weights(out / "lora")``. ``out/rectdiff.json`` records teacher, pairs, forms
and training settings; its presence marks a folder rectification wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import forms
from ..io import resume
from ..io.files import write_json_atomic
from ..io.resume import SETTINGS, record_settings
from ..rectify.pairs import PairDataset
from ..training.config import TrainConfig
from .families import PipelineFamily
from .load import load_pipeline
from .pairs import store_description

__all__ = ["RECORD", "SETTINGS", "check_out", "check_resume", "load_record", "rectify_record",
           "record_settings", "save_student"]  # fmt: skip

#: what ``out/rectdiff.json`` is called; its presence marks a folder this module wrote
RECORD = "rectdiff.json"
_NO_RESUME = "Pass --no-resume (resume=False) to start over; its checkpoints are then replaced."


def check_resume(work_dir: Path, settings: dict[str, Any], max_steps: int) -> None:
    """:func:`rectdiff.io.resume.check_resume`, whose refusal names ``--no-resume``."""
    resume.check_resume(work_dir, settings, max_steps, _NO_RESUME)


def check_out(out: Path, pipeline_dir: Path, pairs_dir: Path) -> None:
    """Refuse an ``out`` that is the teacher or the pairs, or a folder rectify did not write."""
    if out.resolve() in (pipeline_dir.resolve(), pairs_dir.resolve()):
        raise ValueError(f"out {str(out)!r} must differ from the pipeline and pairs folders.")
    if out.exists() and not (out / RECORD).is_file():
        raise ValueError(
            f"out {str(out)!r} exists and is not an earlier `rectdiff sd rectify` output "
            f"(no {RECORD}); choose a new folder, or remove it."
        )


def rectify_record(
    root: Path,
    pairs_dir: str | os.PathLike[str],
    dataset: PairDataset,
    form: forms.Form,
    prediction: str,
    target_form: str | None,
    train_form: forms.Form,
    train_prediction: str,
    lora_rank: int | None,
    config: TrainConfig,
    result: Any,
) -> dict[str, Any]:
    """What ``out/rectdiff.json`` records: teacher, pairs, forms, training settings."""
    settings = dataset.manifest["settings"]
    description = store_description(dataset.manifest)
    form_config = {k: v for k, v in form.config().items() if k != "alphas_cumprod"}
    return {
        "teacher": str(root),
        "teacher_fingerprint": description["pipeline"],
        "pairs": str(pairs_dir),
        "pairs_settings": {
            k: settings[k] for k in ("solver", "steps", "guidance", "num_pairs", "seed")
        },
        "resolution": description["resolution"],
        "form": form_config | {"repr": repr(form)},
        "prediction": prediction,
        "target_form": target_form,
        "train_form": repr(train_form),
        "loss_prediction": train_prediction,
        "lora_rank": lora_rank,
        "training": config.to_dict(),
        "steps": result.step,
        "final_loss": result.losses[-1] if result.losses else None,
        "sample_with": {"num_inference_steps": 1, "guidance_scale": 1.0},
    }


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def save_student(
    tmp: Path,
    network: Any,
    pipeline_dir: Path,
    family: PipelineFamily,
    lora: bool,
    record: dict[str, Any],
) -> None:
    """Write the student pipeline (and LoRA weights) into ``tmp``: the teacher's folder with
    ``network`` (or its LoRA, fused) and the family's student scheduler."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    teacher = load_pipeline(pipeline_dir)
    if lora:
        lora_dir = tmp / "lora"
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(network))
        family.save_lora_weights(teacher, lora_dir, state)
        with _quiet_diffusers():  # it notes that the LoRA has no text-encoder part
            teacher.load_lora_weights(lora_dir)  # the stock loader, as users will call it
        teacher.fuse_lora()
        teacher.unload_lora_weights()
    else:
        setattr(teacher, family.network, network)
    teacher.scheduler = family.student_scheduler(teacher.scheduler, int(record.get("phases", 1)))
    teacher.save_pretrained(tmp)
    write_json_atomic(tmp / RECORD, record)


def load_record(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``rectdiff.json`` record of a rectified pipeline folder."""
    return json.loads((Path(out_dir) / RECORD).read_text())
