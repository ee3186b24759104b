"""Rectified Diffusion for Stable Diffusion: retrain the UNet on its own (noise, latent) pairs.

Rectified Diffusion (Wang et al. 2024, "Rectified Diffusion: Straightness Is Not Your Need
in Rectified Flow", Algorithm 4) keeps the checkpoint's form and prediction type (for SD 1.5:
eps-prediction on the discrete ``scaled_linear`` VP schedule) and minimises the diffusion
loss on ``x_t = alpha_t x0_hat + sigma_t eps~`` built from fixed pairs ``(eps, x0_hat)`` made
by the teacher, instead of fresh noise: the retrained model's ODE becomes first order, so one
DDIM step from the start lands near the teacher's many-step latent. The line is the one
through the student's own sampling start ``x_T = sigma(T) eps`` (T = ``form.t_max``, the
DDIM-trailing first step): ``eps~ = eps - (alpha/sigma)(T) x0_hat``
(:func:`rectdiff.rectify.start_noise`, in the student's form; SD 1.5's ``alpha(T) = 0.068``
would otherwise put every pair's line 0.068 x0_hat away from where sampling starts). The
store keeps the standard-normal eps.

The loss (:func:`rectdiff.training.losses.diffusion_loss`) is measured in ``loss_prediction``: by
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

Everything that depends on the kind of pipeline (loading, the conditioning a pair stores,
the denoiser, the form, the student scheduler, LoRA targets) comes from the teacher folder's
:class:`~rectdiff.stable_diffusion.families.PipelineFamily`. Text encoder and VAE are
frozen; the VAE is not even loaded (pairs are latents); prompts are encoded on the fly from
the stored conditioning (for SD: token ids). Training runs through
:func:`rectdiff.training.train` on accelerate (mixed precision, gradient accumulation,
multi-process, diffusers ``EMAModel``, checkpoints with ``accelerator.save_state`` in
``work_dir/checkpoints`` and resume). With ``lora_rank`` a peft LoRA on the family's
attention projections is trained instead of the full network. The settings are one
:class:`~rectdiff.stable_diffusion.config.SDRectifyConfig`.

With ``phases=K > 1`` (``--phases K``) the student is trained instead by phased
rectification on the teacher's solves inside K windows whose edges are the K timesteps of
stock DDIM-trailing sampling (:mod:`rectdiff.stable_diffusion.phased`): the saved pipeline
then samples in exactly ``num_inference_steps=K``, its K stock steps landing on the edges.

The output folder is a complete diffusers pipeline (``save_pretrained``, see
:mod:`rectdiff.stable_diffusion.output`), built in a temporary folder and renamed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch import Tensor

from .. import forms
from ..io.files import publish_folder, temporary_sibling
from ..rectify import phased_loss
from ..rectify.coupling import start_noise
from ..rectify.store import PairDataset, PairStoreError, load_manifest
from ..rectify.verify import verify_pairs
from ..reparametrize import reparametrize
from ..training.config import TrainConfig
from ..training.losses import diffusion_loss, with_cond_dropout
from ..training.trainer import new_accelerator, train
from .config import SDRectifyConfig
from .families import FAMILIES, PipelineFamily, family_for
from .load import check_pipeline_dir, load_pipeline, pipeline_fingerprint
from .output import (
    check_out,
    check_resume,
    load_record,
    record_settings,
    rectify_record,
    save_student,
)
from .pairs import pipeline_differences, store_description
from .phased import check_pipeline_phases, phase_record, sd_window_couplings

__all__ = [
    "RectifyResult",
    "SDRectifyConfig",
    "flow_matching_form",
    "load_record",
    "rectify_sd",
]


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


def _collate(
    cond_keys: tuple[str, ...], form: forms.Form, items: list[dict[str, Any]]
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """A batch ``(eps~, x0, cond)`` with ``eps~ = start_noise(eps, x0, form)``: the noise whose
    first-order line through ``x0`` passes through the student's sampling start
    ``sigma(t_max) eps`` in ``form`` (the store keeps the standard-normal eps)."""
    eps = torch.stack([item["eps"] for item in items])
    x0 = torch.stack([item["x0"] for item in items])
    cond = {key: torch.stack([item[key] for item in items]) for key in cond_keys
            if key in items[0]}  # fmt: skip
    return start_noise(eps, x0, form), x0, cond


def _check_family(
    pairs_dir: str | os.PathLike[str],
    pipeline_dir: Path,
    family: PipelineFamily,
    description: dict[str, Any],
    tensors: Any,
    required: list[str],
) -> None:
    """Refuse pairs made by a pipeline of another family (e.g. SD 1.5 pairs for an SDXL
    teacher): the store's fingerprinted parts must be ``family``'s and its conditioning must
    hold the family's keys. The message names the store's pipeline class where its parts
    are exactly one family's."""
    parts = set(description["pipeline"])
    if parts <= set(family.identity_parts) and all(key in tensors for key in required):
        return
    named = [name for name, other in FAMILIES.items() if set(other.identity_parts) == parts]
    maker = f"a {named[0]}" if len(named) == 1 else "another kind of pipeline"
    raise ValueError(
        f"pair store {str(pairs_dir)!r} holds pairs made by {maker} (parts "
        f"{', '.join(sorted(parts))}), but {str(pipeline_dir)!r} is a {family.pipeline_class} "
        f"({', '.join(family.identity_parts)}): one family's pairs cannot train another's "
        "network. Rectification retrains the pipeline that made the pairs: generate pairs with "
        f"this pipeline (rectdiff sd pairs --pipeline {pipeline_dir}) or rectify the pipeline "
        "that made them."
    )


def _open_pairs(
    pairs_dir: str | os.PathLike[str], pipeline_dir: Path, family: PipelineFamily
) -> PairDataset:
    """The complete store, refused unless ``pipeline_dir`` made it. (Shard checksums are not
    re-read here: that is every byte of the store on every process; run
    ``rectdiff.rectify.store.verify_store`` once for that.)"""
    try:
        dataset = PairDataset(pairs_dir)
    except PairStoreError as err:
        raise ValueError(str(err)) from None
    description = store_description(dataset.manifest)
    tensors = dataset.manifest["shards"][0].get("tensors", {})
    required = [key for key in family.cond_keys if key not in family.optional_cond_keys]
    if description is not None:
        _check_family(pairs_dir, pipeline_dir, family, description, tensors, required)
    if description is None or any(key not in tensors for key in required):
        raise ValueError(
            f"pair store {str(pairs_dir)!r} was not made by `rectdiff sd pairs` (no prompt "
            f"conditioning {', '.join(family.cond_keys)}); make {family.title} pairs with "
            "`rectdiff sd pairs`."
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


def _verify(pairs_dir: str | os.PathLike[str], checksums: bool) -> None:
    """:func:`rectdiff.rectify.verify_pairs` on the main process (every shard read once),
    before the pipeline is loaded; a damaged store is a one-line ``PairStoreError`` naming
    the shard (rerun ``rectdiff sd pairs`` into the folder to repair it)."""
    state = PartialState()
    if state.is_main_process:
        try:
            verify_pairs(pairs_dir, checksums=checksums)
        except PairStoreError as err:  # the repair command of Stable Diffusion stores
            text = str(err).replace("`rectdiff pairs` (generate_pairs)", "`rectdiff sd pairs`")
            raise PairStoreError(text) from None
    state.wait_for_everyone()


def _loader(
    dataset: PairDataset, family: PipelineFamily, form: forms.Form, config: SDRectifyConfig
) -> torch.utils.data.DataLoader:
    """Shuffled pair batches ``(eps~, x0, cond)``: the noise of each pair's line through the
    start of the saved student's sampler, in the form it samples in (``target_form="fm"``
    trains in a flow-matching form whose t_max has the same logsnr, so it starts from the
    same point and gets the same eps~)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.batch_size,
        collate_fn=partial(_collate, family.cond_keys, form),
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _add_lora(network: Any, family: PipelineFamily, config: SDRectifyConfig) -> None:
    from peft import LoraConfig

    rank, alpha = config.lora_rank, config.lora_alpha
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        network.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank if alpha is None else alpha,
                init_lora_weights="gaussian",
                target_modules=list(family.lora_targets),
            )
        )


def _student_model(pipe: Any, family: PipelineFamily, config: SDRectifyConfig) -> Any:
    """The family's denoiser with its network trainable (all of it, or a LoRA on it)."""
    network = family.trained_network(pipe)
    network.requires_grad_(config.lora_rank is None)
    if config.lora_rank is not None:
        _add_lora(network, family, config)
    if config.gradient_checkpointing:
        network.enable_gradient_checkpointing()
    return family.denoiser(pipe)


def _with_dropout(loss_fn: Any, pipe: Any, family: PipelineFamily, config: SDRectifyConfig) -> Any:
    """``loss_fn`` with the prompt of a ``config.cond_dropout`` fraction of each batch replaced
    by the family's unconditional conditioning (unchanged for 0)."""
    if config.cond_dropout == 0:
        return loss_fn
    return with_cond_dropout(loss_fn, config.cond_dropout, family.unconditional(pipe))


def _mixed_precision(config: SDRectifyConfig) -> str:
    """``config.mixed_precision``, or (None) ``accelerate launch``'s setting, as accelerate
    reads it."""
    if config.mixed_precision is not None:
        return config.mixed_precision
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def _train_config(config: SDRectifyConfig, out: Path, train_form: forms.Form) -> TrainConfig:
    """The :class:`TrainConfig` of ``config``: AdamW, constant LR after warm-up, the default
    time sampler of the form it trains in (``"discrete"`` timesteps for the plain loss on a
    ``DiscreteVP``, else ``"uniform"``)."""
    plain = config.target_form is None and config.phases == 1
    discrete = plain and isinstance(train_form, forms.DiscreteVP)
    sampler = config.time_sampler or ("discrete" if discrete else "uniform")
    return TrainConfig(
        steps=config.max_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_schedule="constant_with_warmup",
        grad_clip=config.grad_clip,
        ema_decay=config.ema_decay if config.ema else 0.0,
        mixed_precision=_mixed_precision(config),
        grad_accum=config.grad_accum,
        seed=config.seed,
        time_sampler=sampler,
        loss=config.loss,
        huber_c=config.huber_c,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
        log_every=min(50, config.max_steps),
        log_with=config.log_with,
        out_dir=str(config.work_dir if config.work_dir is not None else f"{out}.train"),
    )


def _weight_settings(config: SDRectifyConfig, pairs: str | os.PathLike[str]) -> dict[str, Any]:
    """What the checkpoints' weights depend on: the settings, accelerate's resolved mixed
    precision and the pair shards (their sha256s, hashed)."""
    shards = [entry.get("sha256") for entry in load_manifest(pairs)["shards"]]
    digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()
    return config.weight_settings() | {
        "mixed_precision": _mixed_precision(config),
        "pairs_sha256": digest,
    }


def rectify_sd(
    pipeline: str | os.PathLike[str],
    pairs: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: SDRectifyConfig | None = None,
    *,
    progress: bool = True,
) -> RectifyResult:
    """Rectify a pipeline's network on pairs it generated and save a 1-step pipeline.

    Args:
        pipeline: the teacher pipeline folder (the one that made the pairs).
        pairs: a store written by :func:`~rectdiff.stable_diffusion.pairs.generate_sd_pairs`
            with this pipeline (refused otherwise).
        out: the student pipeline folder to write (an earlier output is replaced).
        config: the training settings (``SDRectifyConfig()``, the paper's, by default).
        progress: tqdm bar with the loss on the main process.

    Returns:
        A :class:`RectifyResult`.

    Raises:
        ValueError: a folder that is not a pipeline of a supported family, a store that is
            not pairs of this pipeline (or is incomplete), an existing ``out`` that rectify
            did not write, or bad settings; nothing is written then.
    """
    config = SDRectifyConfig() if config is None else config
    if not isinstance(config, SDRectifyConfig):
        raise TypeError(
            f"config must be an SDRectifyConfig, got {type(config).__name__} "
            "(SDRectifyConfig.from_dict builds one from a mapping)."
        )
    root = check_pipeline_dir(pipeline, need_vae=True)
    family = family_for(root)
    out = Path(out)
    check_out(out, root, Path(pairs))
    if config.phases > 1:  # refused before anything is loaded
        if (config.target_form, config.loss_prediction) != (None, None):
            raise ValueError(
                f"phases={config.phases} trains with the phased loss (one DDIM step to the "
                "window's end) in the checkpoint's own form: it takes no target_form or "
                "loss_prediction."
            )
        check_pipeline_phases(root, config.phases)
    dataset = _open_pairs(pairs, root, family)
    _verify(pairs, config.verify)
    settings = _weight_settings(config, pairs)
    work_dir = Path(config.work_dir if config.work_dir is not None else f"{out}.train")
    if config.resume:  # before the pipeline is loaded or anything is written
        check_resume(work_dir, settings, config.max_steps)
    pipe = load_pipeline(root, with_vae=False)
    form, prediction = family.form(pipe)
    edges = family.phase_edges(pipe.scheduler, form, config.phases) if config.phases > 1 else None
    if edges is not None:  # the phased loss compares window endpoints, in the own form
        train_form, train_prediction = form, prediction
    elif config.target_form == "fm":
        train_form, train_prediction = flow_matching_form(form), config.loss_prediction or "flow"
    else:
        train_form, train_prediction = form, config.loss_prediction or "x0"
    train_config = _train_config(config, out, train_form)
    # the trainer's own set-up: grad_accum micro-batches per optimizer step, also across an
    # epoch's end, and the seedable sampler (seeded with config.seed by train's set_seed)
    accelerator = new_accelerator(train_config)

    couplings = None
    if edges is not None:  # the teacher's window solves, before the network is trained
        couplings = sd_window_couplings(pipe, family, dataset, edges, device=accelerator.device,
                                        chunk_size=config.batch_size, starts=config.phase_starts)  # fmt: skip
    model = _student_model(pipe, family, config)
    trained = model
    if (train_form, train_prediction) != (form, prediction):
        trained = reparametrize(model, form, prediction, train_form, train_prediction)

    model.to(accelerator.device)  # the frozen encoders follow the network
    if accelerator.is_main_process:
        record_settings(work_dir, settings, config.resume)
    accelerator.wait_for_everyone()
    common = dict(form=train_form, prediction=train_prediction, config=train_config, pairs=True,
                  resume=config.resume, progress=progress, accelerator=accelerator)  # fmt: skip
    if couplings is not None:
        data, keys = couplings.training_data()
        phased = functools.partial(phased_loss, start_mass=config.phase_start_mass)
        loss_fn = _with_dropout(phased, pipe, family, config)
        result = train(trained, data, loss_fn=loss_fn,
                       cond_fn=lambda extra: dict(zip(keys, extra, strict=True)), **common)  # fmt: skip
    else:
        loss_fn = _with_dropout(diffusion_loss, pipe, family, config)
        result = train(trained, _loader(dataset, family, form, config), loss_fn=loss_fn, **common)

    record = rectify_record(root, pairs, dataset, form, prediction, config.target_form,
                            train_form, train_prediction, config.lora_rank, train_config,
                            result)  # fmt: skip
    record["phases"] = config.phases
    record["cond_dropout"] = config.cond_dropout
    if config.cond_dropout > 0:
        record["sample_with"]["guidance_scale"] = 1.5
    if edges is not None:
        record |= phase_record(form, edges, dataset, config.phase_starts)
    lora_dir = out / "lora" if config.lora_rank is not None else None
    if accelerator.is_main_process:
        tmp = temporary_sibling(out)
        try:
            save_student(tmp, family.trained_network(pipe), root, family,
                         config.lora_rank is not None, record)  # fmt: skip
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_folder(tmp, out)
    accelerator.wait_for_everyone()
    return RectifyResult(out, result.losses, result.step, lora_dir)
