"""What a training run reports and what its checkpoints restore.

:class:`TrainResult` is what :func:`rectdiff.training.train` returns; :class:`NonFiniteLossError`
what it raises on a NaN or infinite loss; :class:`CheckpointState` the trainer's state beyond
model, optimizer, scheduler and RNG that ``accelerator.save_state`` writes and a resumed run
loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import RectdiffError
from .batches import LoaderBatches

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

    from .trainer import Trainer

__all__ = ["NonFiniteLossError", "TrainResult", "CheckpointState", "make_ema"]


class NonFiniteLossError(RectdiffError, RuntimeError):
    """A NaN or infinite training loss; names the step and the last good checkpoint."""

    def __init__(self, step: int, value: float, checkpoint: Path | None) -> None:
        self.step, self.value, self.checkpoint = step, value, checkpoint
        where = (
            f"the last good checkpoint is {checkpoint}"
            if checkpoint is not None
            else "there is no checkpoint (set out_dir and checkpoint_every to keep one)"
        )
        super().__init__(
            f"non-finite loss {value} at step {step}; {where}. Lower the learning rate, enable "
            "grad_clip, or check the data and the time range."
        )


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained network (unwrapped; EMA weights when EMA was on).
        losses: mean loss of every optimizer step from step 1 (resumed runs included).
        step: the last step trained.
        checkpoint: the last checkpoint written or loaded, if any.
        ema: the ``EMAModel``, when EMA was on.
        ess: effective sample size of every step's loss weights, ``(sum w)^2 / (n sum w^2)``
            over the batch (``weightings.effective_sample_size``; 1 for an unweighted loss),
            aligned with ``losses``; empty for a custom ``loss_fn``.
    """

    model: nn.Module
    losses: list[float]
    step: int
    checkpoint: Path | None = None
    ema: EMAModel | None = None
    ess: list[float] = field(default_factory=list)


class CheckpointState:
    """Everything beyond model/optimizer/scheduler/RNG that a checkpoint must restore."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        tr = self.trainer
        return {
            "step": tr.step_count,
            "losses": list(tr.losses),
            "ess": list(tr.ess),
            "data_generator": tr.data_generator.get_state(),
            "batches": tr.batches.state_dict(),
            "ema": None if tr.ema is None else tr.ema.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tr = self.trainer
        tr.step_count, tr.losses = int(state["step"]), list(state["losses"])
        tr.ess = list(state.get("ess", []))
        tr.data_generator.set_state(state["data_generator"])
        if isinstance(tr.batches, LoaderBatches):
            tr.batches.load_state_dict(state["batches"], tr.accelerator)
        else:
            tr.batches.load_state_dict(state["batches"])
        if tr.ema is not None:
            if state["ema"] is None:
                raise ValueError("the checkpoint was written without EMA; set ema_decay = 0.")
            tr.ema.load_state_dict(state["ema"])


def make_ema(params: list[nn.Parameter], decay: float) -> EMAModel | None:
    """diffusers' ``EMAModel`` of ``params`` (multi-tensor), or None when ``decay`` is 0.
    Imported on use: with the module, ``diffusers.training_utils`` adds 5 s to every
    process's start on a slow CPU (each ``compare`` worker's), though few runs keep an EMA."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, foreach=True)
