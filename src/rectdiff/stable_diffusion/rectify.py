"""Rectified Diffusion for Stable Diffusion: retrain the UNet on its own (noise, latent) pairs.

Rectified Diffusion (Wang et al. 2024, "Rectified Diffusion: Straightness Is Not Your Need
in Rectified Flow", Algorithm 4) keeps the checkpoint's form and prediction type (for SD 1.5:
eps-prediction on the discrete ``scaled_linear`` VP schedule) and minimises the diffusion
loss on ``x_t = alpha_t x0_hat + sigma_t eps`` built from fixed pairs ``(eps, x0_hat)`` made by
the teacher, instead of fresh noise: the retrained model's ODE becomes first order, so one
DDIM step from ``eps`` lands near the teacher's many-step latent.

The loss (:func:`rectdiff.losses.diffusion_loss`) is measured in ``loss_prediction``: by
default ``"x0"``, the x0-prediction ``(x_t - sigma_t eps_pred) / alpha_t`` of the eps-network,
as the paper's ``train.py`` does (its pseudo-Huber loss compares x0-predictions); ``"eps"``
gives the plain eps-loss. ``target_form="fm"`` is the InstaFlow-style variant (Liu et al.
2024): the same UNet, seen through the exact reparametrisation
:func:`rectdiff.reparametrize.reparametrize` as a flow-matching model (``x_s = (1 - s) x0 +
s eps``, flow prediction ``eps - x0``, s uniform over the range SD's schedule covers), is
trained with the flow-matching loss. The network stays an eps-predictor on SD's schedule, so
the saved pipeline is the same in both cases (see below); only the loss weighting and the
time distribution differ. A ``FlowMatchEulerDiscreteScheduler`` would need a UNet that takes
``x_s`` and ``1000 s`` natively, and stock diffusers cannot rescale a VP UNet's input for it.

Text encoder and VAE are frozen; the VAE is not even loaded (pairs are latents); prompts are
encoded on the fly from the stored token ids. Training runs through
:func:`rectdiff.train.train` on accelerate (mixed precision, gradient accumulation,
multi-process, diffusers ``EMAModel``, checkpoints with ``accelerator.save_state`` in
``work_dir/checkpoints`` and resume). With ``lora_rank`` a peft LoRA on the attention
projections is trained instead of the full UNet.

The output folder is a complete diffusers pipeline (``save_pretrained``): the teacher's
components with the rectified UNet (LoRA fused into it, if any) and
``DDIMScheduler.from_config(teacher_config, timestep_spacing="trailing", clip_sample=False)``,
so that ``StableDiffusionPipeline.from_pretrained(out)(prompt, num_inference_steps=1,
guidance_scale=1.0)`` gives the one-step result with no rectdiff import. With LoRA,
``out/lora/pytorch_lora_weights.safetensors`` also loads into the teacher with
``pipe.load_lora_weights(out / "lora")``. It is built in a temporary folder and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import forms
from ..io.files import publish_folder, temporary_sibling, write_json_atomic
from ..predictions import check_prediction
from ..rectify.pairs import PairDataset, PairStoreError
from ..reparametrize import reparametrize
from ..training.trainer import TrainConfig, train
from .load import check_pipeline_dir, load_pipeline, pipeline_fingerprint, pipeline_form
from .model import TextConditionedUNet
from .pairs import pipeline_differences, store_description

__all__ = [
    "TARGET_FORMS",
    "RectifyResult",
    "rectify_sd",
    "flow_matching_form",
    "student_scheduler",
    "load_record",
]

#: ``target_form`` values: None (the checkpoint's own form) or "fm"
TARGET_FORMS = (None, "fm")
#: what ``out/rectdiff.json`` is called; its presence marks a folder this module wrote
RECORD = "rectdiff.json"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class RectifyResult:
    """What :func:`rectify_sd` returns.

    Attributes:
        out_dir: the saved pipeline folder.
        losses: the mean loss of every optimizer step.
        steps: optimizer steps trained (resumed ones included).
        lora_dir: the LoRA weights folder, when ``lora_rank`` was given.
    """

    out_dir: Path
    losses: list[float]
    steps: int
    lora_dir: Path | None = None


def flow_matching_form(form: forms.Form) -> forms.FlowMatching:
    """Flow matching ``x_s = (1 - s) x0 + s eps`` restricted to ``form``'s logsnr range.

    ``t_min``/``t_max`` are the flow-matching times with the logsnr of ``form.t_min`` and
    ``form.t_max`` (for SD 1.5: s in [0.0283, 0.9360]); the network time is ``1000 s``.
    """
    full = forms.FlowMatching(time_scale=1000.0, t_min=1e-6, t_max=1.0 - 1e-6)
    lam_hi, lam_lo = float(form.logsnr(form.t_min)), float(form.logsnr(form.t_max))
    t_min, t_max = float(full.t_from_logsnr(lam_hi)), float(full.t_from_logsnr(lam_lo))
    return forms.FlowMatching(time_scale=1000.0, t_min=t_min, t_max=t_max)


def student_scheduler(teacher_scheduler: Any) -> Any:
    """``DDIMScheduler`` on the teacher's schedule with trailing spacing (first step at
    timestep 999, as one-step sampling needs) and no x0 clipping (latents are unbounded)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        teacher_scheduler.config, timestep_spacing="trailing", clip_sample=False
    )


def _collate(items: list[dict[str, Any]]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    eps = torch.stack([item["eps"] for item in items])
    x0 = torch.stack([item["x0"] for item in items])
    return eps, x0, {"input_ids": torch.stack([item["input_ids"] for item in items])}


def _open_pairs(pairs_dir: str | os.PathLike[str], pipeline_dir: Path) -> PairDataset:
    """The complete store, refused unless ``pipeline_dir`` made it. (Shard checksums are not
    re-read here: that is every byte of the store on every process; run
    ``rectdiff.couplings.verify_store`` once for that.)"""
    try:
        dataset = PairDataset(pairs_dir)
    except PairStoreError as err:
        raise ValueError(str(err)) from None
    description = store_description(dataset.manifest)
    if description is None or "input_ids" not in dataset.manifest["shards"][0].get("tensors", {}):
        raise ValueError(
            f"pair store {str(pairs_dir)!r} was not made by `rectdiff sd pairs` (no prompt "
            "token ids); make Stable Diffusion pairs with `rectdiff sd pairs`."
        )
    differences = pipeline_differences(description["pipeline"], pipeline_fingerprint(pipeline_dir))
    if differences:
        raise ValueError(
            f"pair store {str(pairs_dir)!r} was made by another pipeline than "
            f"{str(pipeline_dir)!r} (" + "; ".join(differences) + "). Rectification retrains "
            "the model that made the pairs: generate pairs with this pipeline "
            f"(rectdiff sd pairs --pipeline {pipeline_dir}) or rectify the pipeline that made them."
        )
    return dataset


def _check_out(out: Path, pipeline_dir: Path, pairs_dir: Path) -> None:
    if out.resolve() in (pipeline_dir.resolve(), pairs_dir.resolve()):
        raise ValueError(f"out {str(out)!r} must differ from the pipeline and pairs folders.")
    if out.exists() and not (out / RECORD).is_file():
        raise ValueError(
            f"out {str(out)!r} exists and is not an earlier `rectdiff sd rectify` output "
            f"(no {RECORD}); choose a new folder, or remove it."
        )


def _validate(
    max_steps: int, lora_rank: int | None, target_form: str | None, loss_prediction: str | None
) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}.")
    if lora_rank is not None and (not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive integer or None, got {lora_rank!r}.")
    if target_form not in TARGET_FORMS:
        raise ValueError(
            f"target_form must be None (the checkpoint's own form) or 'fm', got {target_form!r}."
        )
    if loss_prediction is not None:
        check_prediction(loss_prediction)


def _add_lora(unet: Any, rank: int, alpha: float | None, seed: int) -> None:
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank if alpha is None else alpha,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
            )
        )


def _student_model(
    pipe: Any, lora_rank: int | None, lora_alpha: float | None, checkpointing: bool, seed: int
) -> TextConditionedUNet:
    """The trainable UNet (all of it, or a LoRA on it) with the frozen text encoder."""
    unet = pipe.unet
    unet.requires_grad_(lora_rank is None)
    if lora_rank is not None:
        _add_lora(unet, lora_rank, lora_alpha, seed)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return TextConditionedUNet(unet, pipe.text_encoder)


def _record(
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


def _save(
    tmp: Path,
    unet: Any,
    pipeline_dir: Path,
    lora: bool,
    record: dict[str, Any],
) -> None:
    """Write the student pipeline (and LoRA weights) into ``tmp``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    teacher = load_pipeline(pipeline_dir)
    if lora:
        lora_dir = tmp / "lora"
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(
            lora_dir, unet_lora_layers=state, safe_serialization=True
        )
        with _quiet_diffusers():  # it notes that the LoRA has no text-encoder part
            teacher.load_lora_weights(lora_dir)  # the stock loader, as users will call it
        teacher.fuse_lora()
        teacher.unload_lora_weights()
    else:
        teacher.unet = unet
    teacher.scheduler = student_scheduler(teacher.scheduler)
    teacher.save_pretrained(tmp)
    write_json_atomic(tmp / RECORD, record)


def rectify_sd(
    pipeline_dir: str | os.PathLike[str],
    pairs_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    max_steps: int = 1000,
    lr: float = 5e-6,
    batch_size: int = 16,
    grad_accum: int = 1,
    loss: str = "pseudo_huber",
    huber_c: float | None = None,
    loss_prediction: str | None = None,
    target_form: str | None = None,
    time_sampler: str | None = None,
    mixed_precision: str | None = None,
    gradient_checkpointing: bool = False,
    ema: bool = False,
    ema_decay: float = 0.9999,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    weight_decay: float = 1e-3,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    seed: int = 0,
    checkpoint_every: int = 0,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    num_workers: int = 0,
    progress: bool = True,
) -> RectifyResult:
    """Rectify a Stable Diffusion UNet on pairs it generated and save a 1-step pipeline.

    Args:
        pipeline_dir: the teacher pipeline folder (the one that made the pairs).
        pairs_dir: a store written by :func:`~rectdiff.stable_diffusion.pairs.generate_sd_pairs`
            with this pipeline (refused otherwise).
        out_dir: the student pipeline folder to write (an earlier output is replaced).
        max_steps: optimizer steps.
        lr, weight_decay, warmup_steps, grad_clip: AdamW, constant schedule after warm-up
            (paper: lr 5e-6, weight decay 1e-3, clip 1).
        batch_size, grad_accum: pairs per process per micro-batch, micro-batches per step.
        loss, huber_c: ``"mse"`` or ``"pseudo_huber"`` (paper) and its constant.
        loss_prediction: the prediction the loss compares: default ``"x0"`` (paper) for the
            checkpoint's form, ``"flow"`` for ``target_form="fm"``.
        target_form: None (Rectified Diffusion, the checkpoint's own form) or ``"fm"``
            (InstaFlow-style flow matching through the exact reparametrisation).
        time_sampler: a :mod:`rectdiff.timesteps` name; default ``"discrete"`` (uniform over
            the 1000 training timesteps, as the paper) or ``"uniform"`` for ``"fm"``.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate autocast; the
            trained weights stay float32); None takes ``accelerate launch``'s setting.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        ema, ema_decay: keep a diffusers ``EMAModel`` of the trained weights (its warm-up caps
            the decay at ``(1 + n) / (10 + n)`` after n steps) and save the EMA weights.
        lora_rank, lora_alpha: train a LoRA of this rank (alpha defaults to the rank).
        seed: training seed (batches, times, LoRA init).
        checkpoint_every: ``accelerator.save_state`` every this many steps (and at the end);
            0 = no checkpoints.
        work_dir: where checkpoints go; default ``<out_dir>.train``.
        resume: continue from the newest checkpoint in ``work_dir``.
        num_workers: DataLoader workers.
        progress: tqdm bar with the loss on the main process.

    Returns:
        A :class:`RectifyResult`.

    Raises:
        ValueError: a folder that is not a pipeline, a store that is not SD pairs of this
            pipeline (or is incomplete), an existing ``out_dir`` that rectify did not write,
            or bad settings; nothing is written then.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    _validate(max_steps, lora_rank, target_form, loss_prediction)
    root = check_pipeline_dir(pipeline_dir, need_vae=True)
    out = Path(out_dir)
    _check_out(out, root, Path(pairs_dir))
    dataset = _open_pairs(pairs_dir, root)
    pipe = load_pipeline(root, with_vae=False)
    form, prediction = pipeline_form(pipe)
    if target_form == "fm":
        train_form, train_prediction = flow_matching_form(form), loss_prediction or "flow"
    else:
        train_form, train_prediction = form, loss_prediction or "x0"
    sampler = time_sampler or ("discrete" if target_form is None else "uniform")
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )
    config = TrainConfig(
        steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        lr_schedule="constant_with_warmup",
        grad_clip=grad_clip,
        ema_decay=ema_decay if ema else 0.0,
        mixed_precision=str(accelerator.mixed_precision),
        grad_accum=grad_accum,
        seed=seed,
        time_sampler=sampler,
        loss=loss,
        huber_c=huber_c,
        checkpoint_every=checkpoint_every,
        log_every=min(50, max_steps),
        out_dir=str(work_dir if work_dir is not None else f"{out}.train"),
    )

    model = _student_model(pipe, lora_rank, lora_alpha, gradient_checkpointing, seed)
    trained = model
    if (train_form, train_prediction) != (form, prediction):
        trained = reparametrize(model, form, prediction, train_form, train_prediction)

    pipe.text_encoder.to(accelerator.device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(dataset) >= batch_size,
        collate_fn=_collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
    result = train(
        trained, loader, form=train_form, prediction=train_prediction, config=config,
        pairs=True, resume=resume, progress=progress, accelerator=accelerator,
    )  # fmt: skip

    record = _record(root, pairs_dir, dataset, form, prediction, target_form, train_form,
                     train_prediction, lora_rank, config, result)  # fmt: skip
    lora_dir = out / "lora" if lora_rank is not None else None
    if accelerator.is_main_process:
        tmp = temporary_sibling(out)
        try:
            _save(tmp, model.unet, root, lora_rank is not None, record)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_folder(tmp, out)
    accelerator.wait_for_everyone()
    return RectifyResult(out, result.losses, result.step, lora_dir)


def load_record(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``rectdiff.json`` record of a rectified pipeline folder."""
    return json.loads((Path(out_dir) / RECORD).read_text())
