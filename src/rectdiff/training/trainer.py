"""One training loop for every form and prediction, on accelerate.

``train(model, data, form=..., prediction=..., config=TrainConfig(...))`` minimises
:func:`rectdiff.training.losses.diffusion_loss` with AdamW, diffusers' ``get_scheduler`` warm-up,
gradient clipping, gradient accumulation and mixed precision through an accelerate
``Accelerator``, an optional diffusers ``EMAModel``, and checkpoints written with
``accelerator.save_state`` to ``out_dir/checkpoints/step_N`` (a ``latest`` file names the
newest; a re-run resumes there and ends with the same weights as an uninterrupted run).
With an ``out_dir`` the run also keeps ``out_dir/loss_log.csv`` (step, loss, lr, gradient
norm, ESS, seconds at every ``log_every`` steps; :mod:`rectdiff.training.loss_log`).

Data is either clean samples ``x0`` (fresh noise each step) or, with ``pairs=True``,
``(eps, x0[, cond])`` couplings whose noise is fixed per pair (rectification). A tensor (or a
tuple of tensors) is batched in memory on the device; a ``DataLoader`` is prepared by
accelerate as for one process (its seedable sampler, so a resumed run replays the same
batches). ``batch_size`` is the whole batch of all processes together: every process draws
the same batch, noise and t (seeded by (seed, step)) and computes its own block of rows
(``rows=`` of the loss), so the result does not depend on the number of processes. A
non-finite loss raises :class:`NonFiniteLossError` naming the step and the last good
checkpoint; losses are checked at every log and checkpoint step (and at the end) so that
the hot loop never waits on the device.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..forms import Form
from ..io.files import write_text_atomic
from ..predictions import check_prediction
from .accelerator import direct_calls, new_accelerator, tracked_settings, tracker
from .batches import (
    LoaderBatches,
    TensorBatches,
    draws_per_process,
    prepare_whole_batches,
    process_rows,
)
from .checkpoints import checkpoint_root, load_latest, save_checkpoint
from .config import TrainConfig
from .loss_log import LOSS_LOG, LossLog
from .losses import DiffusionLoss, diffusion_loss, take_rows
from .minibatch_ot import check_coupling_use
from .snapshots import take_snapshot
from .state import CheckpointState, NonFiniteLossError, TrainResult, make_ema
from .time_samplers import time_sampler
from .weightings import loss_weighting

__all__ = [
    "TrainConfig", "TrainResult", "NonFiniteLossError", "Trainer", "new_accelerator", "train",
]  # fmt: skip

CondFn = Callable[[Any], dict[str, Any]]


class Trainer:
    """The state of one training run; :meth:`step` is the hot loop's body, :meth:`run` the loop.

    Args: as :func:`train`, plus ``accelerator`` to reuse one (its mixed precision and
    gradient accumulation then apply).
    """

    def __init__(
        self,
        model: nn.Module,
        data_or_loader: Any,
        *,
        form: Form,
        prediction: str,
        config: TrainConfig,
        cond_fn: CondFn | None = None,
        pairs: bool = False,
        accelerator: Accelerator | None = None,
        loss_fn: Callable[..., tuple[Tensor, Tensor]] = diffusion_loss,
    ) -> None:
        check_prediction(prediction)
        self.form, self.prediction, self.config = form, prediction, config
        self.cond_fn, self.pairs, self.loss_fn = cond_fn, pairs, loss_fn
        self.accelerator = acc = accelerator or new_accelerator(config)
        set_seed(config.seed)
        # foreach: one multi-tensor update per step instead of a Python loop over the
        # parameters; on the CPU the same per-tensor operations, so the same weights bit for
        # bit (tests/training/test_step_path.py), and torch's default on GPUs anyway
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True
        )
        from diffusers.optimization import get_scheduler  # here: diffusers takes seconds

        scheduler = get_scheduler(  # accelerate steps it once per process: scale the lengths
            config.lr_schedule,
            optimizer,
            num_warmup_steps=config.warmup_steps * acc.num_processes,
            num_training_steps=config.steps * acc.num_processes,
        )
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        calls = direct_calls(acc, self.optimizer, self.scheduler)
        self._optimizer_step, self._zero_grad = calls.optimizer_step, calls.zero_grad
        self._scheduler_step, self._clip_grad_norm = calls.scheduler_step, calls.clip_grad_norm
        # One micro-batch per step and nothing for accelerate to scale or sync: its
        # accumulate() context is then a no-op and its backward() divides the loss by 1,
        # so the hot loop calls loss.backward() itself (the same gradients, bit for bit).
        self._direct = (
            calls.plain
            and config.grad_accum == 1
            and acc.gradient_accumulation_steps == 1
            and acc.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        )
        self.ema = make_ema(self.params, config.ema_decay)
        device = acc.device
        self.data_generator = torch.Generator(device).manual_seed(config.seed)
        self.noise_generator = torch.Generator(device)
        self.batches: TensorBatches | LoaderBatches = self._batches(data_or_loader)
        # each process computes its rows of every whole batch; a custom loss without ``rows``
        # gets them sliced and draws its own noise per process (its result depends on the count)
        process_rows(getattr(data_or_loader, "batch_size", None) or config.batch_size, acc)
        self._own_draws = draws_per_process(loss_fn, acc)
        self.sampler = time_sampler(config.time_sampler, form, **config.time_sampler_params)
        self.weighting = loss_weighting(config.weighting, **config.weighting_params)
        check_coupling_use(config.coupling, pairs, custom_loss=loss_fn is not diffusion_loss)
        self._objective = (
            DiffusionLoss(
                form, prediction, time_sampler=self.sampler, weighting=self.weighting,
                loss=config.loss, huber_c=config.huber_c, coupling=config.coupling,
            )
            if loss_fn is diffusion_loss
            else None
        )  # fmt: skip
        if self._objective is not None:
            self._objective.track_ess = not self.weighting.identity
        self.step_count, self.losses = 0, []
        self.ess: list[float] = []
        self._pending_ess: list[Tensor] = []
        self.last_checkpoint: Path | None = None
        self._pending: list[Tensor] = []
        # the loss log (run() opens it given an out_dir); the latest logged step's numbers
        self._loss_log: LossLog | None = None
        self._logging, self._grad_norm, self._lr = False, math.nan, math.nan
        self._item_shape: tuple[int, ...] | None = None
        self._conditional: bool | None = None
        self._snapshot_refused = False
        self._snapshot_noise: Tensor | None = None
        acc.register_for_checkpointing(CheckpointState(self))

    def _batches(self, data: Any) -> TensorBatches | LoaderBatches:
        acc = self.accelerator
        if isinstance(data, Tensor):
            data = (data,)
        if isinstance(data, (tuple, list)) and all(isinstance(t, Tensor) for t in data):
            tensors = tuple(t.to(acc.device) for t in data)
            return TensorBatches(tensors, self.config.batch_size, self.data_generator)
        if isinstance(data, torch.utils.data.DataLoader):
            return LoaderBatches(prepare_whole_batches(data, acc))
        raise ValueError(
            f"data must be a tensor, a tuple of tensors or a DataLoader, got {type(data).__name__}."
        )

    def _unpack(self, batch: Any) -> tuple[Tensor | None, Tensor, dict[str, Any]]:
        items = (batch,) if isinstance(batch, Tensor) else tuple(batch)
        need = 2 if self.pairs else 1
        if len(items) < need:
            raise ValueError(
                f"with pairs={self.pairs} each batch must hold "
                f"{'(eps, x0[, cond])' if self.pairs else 'x0[, cond]'}, got {len(items)} item(s)."
            )
        eps, x0 = (items[0], items[1]) if self.pairs else (None, items[0])
        if self._item_shape is None:  # what a snapshot draws (run's sample_every)
            self._item_shape = tuple(x0.shape[1:])
        rest = items[need:]  # one cond item, or several (then cond_fn gets them as a tuple)
        extra = None if not rest else rest[0] if len(rest) == 1 else rest
        if self.cond_fn is not None:
            cond = self.cond_fn(extra)
        elif extra is None:
            cond = {}
        else:
            cond = dict(extra) if isinstance(extra, dict) else {"class_labels": extra}
        if self._conditional is None:
            self._conditional = bool(cond)
        return eps, x0, cond

    def step(self) -> Tensor:
        """One optimizer step (``grad_accum`` micro-batches); returns the mean loss, detached.

        Advances ``step_count``; :meth:`run` adds the loss history, checks and checkpoints.
        """
        acc, config = self.accelerator, self.config
        # t and eps of step n depend on (seed, n) only, alike on every process: exact resume
        # without saving generator states (ints and tuples of ints hash unsalted)
        stream = acc.process_index if self._own_draws else 0
        step_seed = hash((config.seed, stream, self.step_count)) & (2**63 - 1)
        self.noise_generator.manual_seed(step_seed)
        return self._direct_step() if self._direct else self._accumulated_step()

    def _accumulated_step(self) -> Tensor:
        """:meth:`step`'s body through accelerate's ``accumulate`` and ``backward``."""
        acc, config = self.accelerator, self.config
        total = None
        for _ in range(config.grad_accum):
            eps, x0, cond = self._unpack(next(self.batches))
            with acc.accumulate(self.model):
                loss = self._loss(x0, eps, cond)
                acc.backward(loss)
                if acc.sync_gradients:
                    norm = None
                    if config.grad_clip > 0:
                        norm = self._clip_grad_norm(self.params, config.grad_clip)
                    self._note_gradients(norm)
                    self._optimizer_step()
                    self._scheduler_step()
                    self._zero_grad(set_to_none=True)
            total = loss.detach() if total is None else total + loss.detach()
        if self.ema is not None:
            self.ema.step(self.params)
        self.step_count += 1
        return total / config.grad_accum if config.grad_accum > 1 else total

    def _loss(self, x0: Tensor, eps: Tensor | None, cond: dict[str, Any]) -> Tensor:
        """The mean loss of this process's rows of one micro-batch (the resolved objective
        for the default loss)."""
        rows = process_rows(len(x0), self.accelerator)
        if self._objective is not None:
            loss, _ = self._objective(
                self.model, x0, eps=eps, cond=cond, generator=self.noise_generator, rows=rows,
                per_sample=False,
            )  # fmt: skip
            return loss
        config, rows = self.config, {} if rows is None else {"rows": rows}
        if self._own_draws:
            x0, eps, cond = take_rows((x0, eps, cond), rows.pop("rows"), len(x0))
        loss, _ = self.loss_fn(
            self.model, x0, form=self.form, prediction=self.prediction,
            time_sampler=self.sampler, weighting=self.weighting, loss=config.loss,
            huber_c=config.huber_c, eps=eps, cond=cond, generator=self.noise_generator, **rows,
        )  # fmt: skip
        return loss

    def _direct_step(self) -> Tensor:
        """:meth:`step`'s body for one micro-batch without scaler, XLA or DeepSpeed."""
        config = self.config
        eps, x0, cond = self._unpack(next(self.batches))
        loss = self._loss(x0, eps, cond)
        loss.backward()
        norm = None
        if config.grad_clip > 0:
            norm = self._clip_grad_norm(self.params, config.grad_clip)
        self._note_gradients(norm)
        self._optimizer_step()
        self._scheduler_step()
        self._zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        self.step_count += 1
        return loss.detach()

    def _logs_next_step(self) -> bool:
        """Whether the step being taken (``step_count + 1``) gets a loss-log row."""
        step = self.step_count + 1
        return self._logging and (step % self.config.log_every == 0 or step == self.config.steps)

    def _note_gradients(self, norm: Tensor | float | None) -> None:
        """At a logged step, keep the gradient norm before clipping (``norm`` when clipping
        measured it) and the learning rate this update uses."""
        if not self._logs_next_step():
            return
        if norm is None:  # max_norm = inf: measured (unscaled under fp16), never rescaled
            norm = self._clip_grad_norm(self.params, math.inf)
        self._grad_norm = math.nan if norm is None else float(norm)
        self._lr = float(self.optimizer.param_groups[0]["lr"])

    # --- loss history and checkpoints -------------------------------------------------
    def _flush(self) -> None:
        """Move pending losses (averaged over processes) to the history; raise on the first
        non-finite one, on every process alike."""
        if not self._pending:
            return
        stacked = torch.stack(self._pending).float()
        if self.accelerator.num_processes > 1:  # every process flushes at the same steps
            stacked = self.accelerator.reduce(stacked, reduction="mean")
        values = stacked.cpu().tolist()
        first_step = self.step_count - len(values) + 1
        self._pending.clear()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(first_step + i, value, self.last_checkpoint)
        self.losses.extend(values)
        if self._objective is None:
            return
        if not self._pending_ess:  # an unweighted loss: every sample counts alike
            self.ess.extend([1.0] * len(values))
            return
        ess = torch.stack(self._pending_ess).float()
        if self.accelerator.num_processes > 1:
            ess = self.accelerator.reduce(ess, reduction="mean")
        self._pending_ess.clear()
        self.ess.extend(ess.cpu().tolist())

    def checkpoint_root(self) -> Path | None:
        """``out_dir/checkpoints`` or None."""
        return checkpoint_root(self.config.out_dir)

    def save_checkpoint(self) -> Path:
        """Write ``step_N`` and point ``latest`` at it (:mod:`.checkpoints`)."""
        root = self.checkpoint_root()
        if root is None:
            raise ValueError("set TrainConfig.out_dir to save checkpoints.")
        self.last_checkpoint = save_checkpoint(
            self.accelerator, root, self.step_count, self.config.keep_checkpoints
        )
        return self.last_checkpoint

    def resume(self) -> bool:
        """Load the checkpoint named by ``latest`` if there is one; True if loaded."""
        path = load_latest(self.accelerator, self.checkpoint_root())
        if path is not None:
            self.last_checkpoint = path
        return path is not None

    # --- the loop -----------------------------------------------------------------------
    def run(self, resume: bool = True, progress: bool = True) -> TrainResult:
        """Train to ``config.steps`` (resuming first when asked) and return the result."""
        config, acc = self.config, self.accelerator
        if resume:
            self.resume()
        if config.out_dir is not None and acc.is_main_process:
            config_json = json.dumps(config.to_dict(), indent=2, default=repr)
            write_text_atomic(Path(config.out_dir) / "train_config.json", config_json)
            self._loss_log = LossLog(Path(config.out_dir) / LOSS_LOG, self.step_count)
        self._logging = config.out_dir is not None
        tracking = tracker(config) is not None and bool(acc.log_with)  # log_with's tracker
        if tracking:
            acc.init_trackers("rectdiff", config=tracked_settings(config))
        started, logged = time.perf_counter(), self.step_count
        bar = tqdm(
            total=config.steps, initial=self.step_count, desc="train", dynamic_ncols=True,
            disable=not (progress and acc.is_local_main_process),
        )  # fmt: skip
        self.model.train()
        with bar:
            while self.step_count < config.steps:
                self._pending.append(self.step())
                if self._objective is not None and self._objective.track_ess:
                    self._pending_ess.append(self._objective.last_ess)
                bar.update(1)
                done = self.step_count == config.steps
                if self.step_count % config.log_every == 0 or done:
                    self._flush()
                    if self._loss_log is not None:  # the steps since the previous row
                        row = self._loss_log.append(
                            self.step_count, self.losses[logged:], self._lr, self._grad_norm,
                            self.ess[logged:], time.perf_counter() - started,
                        )  # fmt: skip
                        if tracking:
                            acc.log(row, step=self.step_count)
                    logged = self.step_count
                    postfix = {"loss": f"{self.losses[-1]:.4g}"}
                    if self._pending_ess or (self.ess and self.ess[-1] != 1.0):
                        postfix["ess"] = f"{self.ess[-1]:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                if (
                    config.sample_every
                    and config.out_dir is not None
                    and (self.step_count % config.sample_every == 0 or done)
                ):
                    take_snapshot(self)
                if (
                    config.checkpoint_every
                    and config.out_dir is not None
                    and (self.step_count % config.checkpoint_every == 0 or done)
                ):
                    self._flush()
                    self.save_checkpoint()
        self._flush()
        if tracking:
            acc.end_training()
        model = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        if self.ema is not None:
            self.ema.copy_to(self.params)
        model.eval()
        return TrainResult(
            model, list(self.losses), self.step_count, self.last_checkpoint, self.ema,
            list(self.ess),
        )  # fmt: skip


def train(
    model: nn.Module,
    data_or_loader: Any,
    *,
    form: Form,
    prediction: str,
    config: TrainConfig | None = None,
    cond_fn: CondFn | None = None,
    pairs: bool = False,
    resume: bool = True,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    loss_fn: Callable[..., tuple[Tensor, Tensor]] = diffusion_loss,
) -> TrainResult:
    """Train ``model`` with the diffusion loss of ``form`` and ``prediction``.

    Args:
        model: called as ``model(x_t, model_time, **cond)``; wrap it in
            :class:`rectdiff.models.Preconditioned` for input scaling.
        data_or_loader: a tensor ``x0`` (N, ...), a tuple ``(x0, cond)`` of tensors, or a
            DataLoader yielding such batches; with ``pairs=True``, ``(eps, x0[, cond])``.
            Tensors are moved to the device and batched there.
        form: the diffusion form.
        prediction: ``"eps"``, ``"x0"``, ``"v"`` or ``"flow"``.
        config: hyperparameters (``TrainConfig()`` by default).
        cond_fn: maps a batch's ``cond`` item to the model's keyword arguments (e.g. label
            dropout for classifier-free guidance); by default a dict is passed as is and a
            tensor as ``class_labels``.
        pairs: the data are couplings ``(eps, x0[, cond])``; eps is used as given.
        resume: continue from ``out_dir/checkpoints/latest`` when it exists.
        progress: show a tqdm bar (main process only).
        accelerator: an existing ``Accelerator`` to use.
        loss_fn: the loss, with :func:`~rectdiff.training.losses.diffusion_loss`'s signature
            (``rectify.phased.phased_loss`` for phased rectification).

    Returns:
        A :class:`TrainResult`; its model holds the EMA weights when EMA was on.

    Raises:
        NonFiniteLossError: when a loss is NaN or infinite.
        ValueError: for bad data or configuration.
    """
    trainer = Trainer(
        model, data_or_loader, form=form, prediction=prediction, config=config or TrainConfig(),
        cond_fn=cond_fn, pairs=pairs, accelerator=accelerator, loss_fn=loss_fn,
    )  # fmt: skip
    return trainer.run(resume=resume, progress=progress)
