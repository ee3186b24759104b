"""The settings of a Stable Diffusion rectification: :class:`SDRectifyConfig`.

Light on purpose (no torch, no diffusers): the ``rectdiff sd rectify`` parser takes its
defaults from the fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.configs import from_mapping, read_toml_table

__all__ = ["CHECKPOINT_EVERY", "MIXED_PRECISION", "RESUMABLE", "SDRectifyConfig", "TARGET_FORMS"]

#: ``target_form`` values: None (the checkpoint's own form) or "fm"
TARGET_FORMS = (None, "fm")
#: ``mixed_precision`` values; None takes ``accelerate launch``'s setting
MIXED_PRECISION = (None, "no", "fp16", "bf16")
#: the fields a resume may change: they do not change the weights of the steps already
#: trained (max_steps extends the constant-after-warm-up schedule)
RESUMABLE = ("max_steps", "checkpoint_every", "keep_checkpoints", "work_dir", "resume",
             "num_workers", "gradient_checkpointing", "log_with", "verify")  # fmt: skip
#: the checkpoint interval by default: a resumable run at the cost of two saved states
CHECKPOINT_EVERY = 250


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


@dataclass
class SDRectifyConfig:
    """How :func:`~rectdiff.stable_diffusion.rectify.rectify_sd` trains; ``from_dict`` and
    ``from_toml`` reject unknown keys, naming them.

    Attributes:
        max_steps: optimizer steps.
        lr, weight_decay, warmup_steps, grad_clip: AdamW, constant schedule after warm-up
            (paper: lr 5e-6, weight decay 1e-3, clip 1).
        batch_size, grad_accum: pairs per micro-batch (all processes together, split among
            them: the result does not depend on the process count), micro-batches per step.
        loss, huber_c: ``"mse"`` or ``"pseudo_huber"`` (paper) and its constant.
        loss_prediction: the prediction the loss compares: default ``"x0"`` (paper) for the
            checkpoint's form, ``"flow"`` for ``target_form="fm"``.
        target_form: None (Rectified Diffusion, the checkpoint's own form) or ``"fm"``
            (InstaFlow-style flow matching through the exact reparametrisation).
        time_sampler: a :mod:`rectdiff.training.time_samplers` name; default ``"discrete"``
            (uniform over the 1000 training timesteps, as the paper) or ``"uniform"`` for
            ``"fm"``.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (accelerate autocast; the
            trained weights stay float32); None takes ``accelerate launch``'s setting.
        gradient_checkpointing: recompute network activations in the backward pass.
        ema, ema_decay: keep a diffusers ``EMAModel`` of the trained weights (its warm-up caps
            the decay at ``(1 + n) / (10 + n)`` after n steps) and save the EMA weights.
        lora_rank, lora_alpha: train a LoRA of this rank (alpha defaults to the rank).
        cond_dropout: the fraction of training pairs whose prompt is replaced by the
            unconditional (empty-prompt) conditioning, drawn anew each step, so that the
            student keeps an unconditional branch and can be sampled with a small guidance
            (the Rectified Diffusion paper evaluates at 1.5); 0 (default) trains only the
            conditional model, which is sampled at guidance 1.
        seed: training seed (batches, times, LoRA init).
        checkpoint_every: ``accelerator.save_state`` every this many steps (and at the end;
            default :data:`CHECKPOINT_EVERY`); 0 = no checkpoints, so nothing to resume.
        keep_checkpoints: the newest checkpoints kept (a full SD 1.5 state, weights and AdamW
            moments, is about 10 GB); 0 keeps all.
        work_dir: where checkpoints go; default ``<out>.train``.
        resume: continue from the newest checkpoint in ``work_dir``.
        num_workers: DataLoader workers.
        verify: check the pair store before training, on the main process: the manifest,
            every shard's presence, size and sha256, shapes, dtypes and finiteness
            (:func:`rectdiff.rectify.verify_pairs`); False (``--no-verify``) skips the sha256
            only.
        log_with: ``"tensorboard"`` or ``"wandb"`` (offline unless configured): also log the
            loss-log series (loss, learning rate, gradient norm, ESS) through accelerate's
            trackers into ``work_dir``; None (default) keeps only ``loss_log.csv``.
        phases: K time windows of phased rectification (:mod:`.phased`); 1 (default) is
            plain rectification. K > 1 must divide the schedule's timesteps (1000 for SD),
            trains on the teacher's window solves with the phased loss, takes the
            ``"uniform"`` time sampler by default and no ``loss_prediction`` or
            ``target_form`` (``rectify_sd`` refuses them); the student then samples in
            exactly K stock DDIM steps.
        phase_start_mass: with K > 1, the fraction of training times placed exactly at their
            window's start, where the K stock steps evaluate the student
            (:func:`rectdiff.rectify.phased_loss`'s ``start_mass``).
        phase_starts: with K > 1, where each window's training starts
            (:mod:`rectdiff.rectify.windows`): ``"trajectory"`` (default), the teacher's own
            path from the pair's noise, where a student that reproduces the earlier windows
            enters the window when it samples (the same K window solves per pair as
            ``"line"``); ``"line"``, the pair's straight line from its noise to its sample.

    Raises:
        ValueError: on construction, for a bad ``max_steps``, ``lora_rank``, ``target_form``,
            ``loss_prediction``, ``mixed_precision`` or ``phases`` (the training options are checked
            by :class:`rectdiff.training.TrainConfig` before anything is written).
    """

    max_steps: int = 1000
    lr: float = 5e-6
    batch_size: int = 16
    grad_accum: int = 1
    loss: str = "pseudo_huber"
    huber_c: float | None = None
    loss_prediction: str | None = None
    target_form: str | None = None
    time_sampler: str | None = None
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    lora_rank: int | None = None
    lora_alpha: float | None = None
    weight_decay: float = 1e-3
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = CHECKPOINT_EVERY
    keep_checkpoints: int = 2
    work_dir: str | os.PathLike[str] | None = None
    resume: bool = True
    num_workers: int = 0
    phases: int = 1
    phase_start_mass: float = 0.25
    phase_starts: str = "trajectory"
    cond_dropout: float = 0.0
    log_with: str | None = None
    verify: bool = True

    def __post_init__(self) -> None:
        from ..predictions import check_prediction

        if not _positive_int(self.max_steps):
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}.")
        if self.lora_rank is not None and not _positive_int(self.lora_rank):
            raise ValueError(
                f"lora_rank must be a positive integer or None, got {self.lora_rank!r}."
            )
        if self.target_form not in TARGET_FORMS:
            raise ValueError(
                "target_form must be None (the checkpoint's own form) or 'fm', got "
                f"{self.target_form!r}."
            )
        if self.loss_prediction is not None:
            check_prediction(self.loss_prediction)
        if not _positive_int(self.phases):
            raise ValueError(f"phases must be a positive integer, got phases={self.phases!r}.")
        mass = self.phase_start_mass
        if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not 0 <= mass < 1:
            raise ValueError(
                f"phase_start_mass must be a number in [0, 1), got phase_start_mass={mass!r}."
            )
        if self.phase_starts not in ("line", "trajectory"):
            raise ValueError(
                "phase_starts must be 'trajectory' (the teacher's own path) or 'line' (the "
                f"pair's line), got phase_starts={self.phase_starts!r}."
            )
        dropout = self.cond_dropout
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout < 1
        ):
            raise ValueError(
                f"cond_dropout must be a fraction in [0, 1), got {dropout!r}; 0.1 drops the "
                "prompt of one training pair in ten."
            )
        for name in ("checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{name} must be an integer >= 0, got {name}={value!r} (0: "
                    + ("no checkpoints)." if name == "checkpoint_every" else "keep all).")
                )
        if self.log_with is not None:
            from ..training.config import check_log_with

            check_log_with(self.log_with, owner="SDRectifyConfig")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(map(str, MIXED_PRECISION))}, got "
                f"{self.mixed_precision!r}."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SDRectifyConfig:
        """Build from a dict (e.g. a TOML table).

        Raises:
            ValueError: for an unknown key (naming it and listing the allowed ones) or value.
        """
        return from_mapping(cls, values, what="rectify option")

    @classmethod
    def from_toml(cls, path: str | Path, table: str | None = None) -> SDRectifyConfig:
        """Build from a TOML file, or from its ``[table]`` when given."""
        values = read_toml_table(path, table)
        where = f"in {path}" + (f" [{table}]" if table is not None else "")
        return from_mapping(cls, values, what="rectify option", where=where)

    def weight_settings(self) -> dict[str, Any]:
        """The settings that change the trained weights (all but :data:`RESUMABLE`)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE}

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready values (``work_dir`` as a string)."""
        out = dataclasses.asdict(self)
        if out["work_dir"] is not None:
            out["work_dir"] = str(out["work_dir"])
        return out
