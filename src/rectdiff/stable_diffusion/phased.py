"""Phased rectification of a Stable Diffusion pipeline: ``rectdiff sd rectify --phases K``.

With ``SDRectifyConfig(phases=K)``, K > 1, :func:`~rectdiff.stable_diffusion.rectify.rectify_sd`
trains the student with :func:`rectdiff.rectify.phased_loss` on window couplings instead of
the plain rectification loss on the pairs:

* the window edges are ``phase_edges(form, K, "timesteps")``: for SD's 1000-timestep
  DiscreteVP, timesteps ``999, 999 - 1000/K, ..., 1000/K - 1`` (t = 1, 1 - 1/K, ..., 1/K) and
  then t = 0, exactly the K timesteps a stock ``DDIMScheduler(timestep_spacing="trailing")``
  visits in K steps, and (``set_alpha_to_one=True``) its last step ends at sigma = 0. K must
  divide 1000 (1, 2, 4, 5, 8, 10, ...); any other K is a ValueError naming it, raised before
  anything is written;
* in every window the teacher (the pipeline's own denoiser, with the classifier-free
  guidance scale the pair store records, against the empty prompt, as ``sd pairs`` solved)
  solves from the pair's own first-order line (the line through the student's sampling start,
  :func:`rectdiff.rectify.start_noise`) at the window start to the window end, with the pair
  store's solver and ``ceil(steps / K)`` (at least 2) steps on a logsnr grid inside the
  window (:func:`rectdiff.rectify.window_couplings`). Every pair is solved in every window
  (the library's default puts pair i in window ``i mod K`` only, leaving each window N / K
  couplings): K couplings per pair, about one more pair generation of teacher evaluations,
  and ``2 K`` latents per pair held in memory on every process, so this suits stores of up
  to some hundred thousand SD 1.5 pairs, not the paper's 1.6 M (which would need the window
  couplings written to a store and streamed);
* the student, the same network in the same form and prediction, learns that one DDIM step
  from any point of a window's line lands on the teacher's window endpoint. The time sampler
  (default ``"uniform"``) is mapped into each window; ``loss`` and ``huber_c`` apply to the
  endpoint difference; ``loss_prediction`` and ``target_form`` do not apply and are refused.

So the saved student, a stock pipeline with the DDIM-trailing scheduler, samples with exactly
``num_inference_steps=K`` (at guidance 1: the pairs' guidance is baked in) on the window
edges. Other step counts run, but do not land on the edges it was trained for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..forms import Form
from ..rectify import Couplings, WindowCouplings, load_pairs, phase_edges, window_couplings
from ..rectify.store import PairDataset
from .families import PipelineFamily, family_for
from .pairs import sd_guidance

__all__ = [
    "GuidedModel", "window_steps", "check_phases", "check_pipeline_phases", "sd_phase_edges",
    "sd_window_couplings", "phase_record",
]  # fmt: skip


class GuidedModel(nn.Module):
    """``model(x_t, model_time, **cond)`` with classifier-free guidance baked in:
    ``uncond + w (cond - uncond)`` on the native prediction (as :func:`rectdiff.samplers.sample`
    applies ``guidance``), both evaluations in one batched call. ``guidance=None``: ``model``.

    Args:
        model: the conditional denoiser.
        guidance: the scale w, or None.
        uncond: the unconditional keyword tensors, a batch of one (broadcast over the batch).
    """

    def __init__(self, model: nn.Module, guidance: float | None, uncond: dict[str, Tensor]):
        super().__init__()
        self.model = model
        self.guidance = None if guidance is None else float(guidance)
        self.uncond = dict(uncond)

    def forward(self, x_t: Tensor, model_time: Tensor, **cond: Tensor) -> Tensor:
        if self.guidance is None:
            return self.model(x_t, model_time, **cond)
        n = x_t.shape[0]
        both = {
            key: torch.cat([self.uncond[key].to(value.device).expand(n, *value.shape[1:]), value])
            for key, value in cond.items()
        }
        time = model_time
        if isinstance(time, Tensor) and time.ndim > 0 and time.shape[0] == n:
            time = torch.cat([time, time])
        out_uncond, out_cond = self.model(torch.cat([x_t, x_t]), time, **both).chunk(2)
        return out_uncond + self.guidance * (out_cond - out_uncond)


def window_steps(pair_steps: int, phases: int) -> int:
    """Solver steps inside each window: the pairs' steps shared out, at least 2."""
    return max(2, math.ceil(int(pair_steps) / phases))


def check_phases(phases: int, num_train_timesteps: int) -> None:
    """Refuse a K that stock K-step DDIM-trailing sampling cannot put on window edges.

    Raises:
        ValueError: naming K when it does not divide the schedule's timesteps.
    """
    n = int(num_train_timesteps)
    if phases > n or n % phases:
        divisors = ", ".join(str(k) for k in (2, 4, 5, 8, 10, 20, 25) if n % k == 0)
        raise ValueError(
            f"phases={phases} does not divide the {n} timesteps of the pipeline's schedule: "
            f"stock DDIM-trailing sampling in K steps lands on the K window edges only when "
            f"K divides {n} (e.g. {divisors}); choose such a K."
        )


def check_pipeline_phases(root: Path, phases: int) -> None:
    """The folder's family's ``check_phases`` on its ``scheduler/`` config, before anything is
    loaded (by default :func:`check_phases` on its timesteps; an unreadable config is left
    to :func:`sd_phase_edges`)."""
    try:
        config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(config, dict):
        family_for(root).check_phases(config, phases)


def sd_phase_edges(form: Form, phases: int) -> Tensor:
    """``phase_edges(form, phases, "timesteps")`` after :func:`check_phases`."""
    n = getattr(form, "num_train_timesteps", None)
    if n is not None:
        check_phases(phases, n)
    return phase_edges(form, phases, "timesteps")


def _every_window(couplings: Couplings, phases: int, device: Any) -> Couplings:
    """Each pair ``phases`` times in a row, on ``device``: coupling i of
    :func:`window_couplings` (window ``i mod K``, source row i) is pair ``i // K`` in window
    ``i mod K``, so every pair is solved in every window."""

    def repeat(value: Tensor) -> Tensor:
        return value.to(device).repeat_interleave(phases, dim=0)

    return Couplings(repeat(couplings.eps), repeat(couplings.x0),
                     {k: repeat(v) for k, v in couplings.cond.items()})  # fmt: skip


def sd_window_couplings(
    pipe: Any,
    family: PipelineFamily,
    dataset: PairDataset,
    edges: Tensor,
    *,
    device: Any,
    chunk_size: int,
    starts: str = "trajectory",
) -> WindowCouplings:
    """The teacher's solves from every pair of ``dataset`` in every window (module
    docstring): K couplings per pair, pair-major, on CPU.

    Call before the network is trained or given a LoRA: the teacher is the pipeline's network
    as loaded. ``chunk_size`` pairs are solved at once (twice that under guidance); the
    couplings do not depend on it or on the number of processes. ``starts``: where each
    window starts (:func:`rectdiff.rectify.window_couplings`).
    """
    settings = dataset.manifest["settings"]
    form, prediction = family.form(pipe)
    denoiser = family.denoiser(pipe).to(device)
    teacher = GuidedModel(denoiser, sd_guidance(float(settings["guidance"])),
                          family.unconditional(pipe))  # fmt: skip
    pairs = _every_window(load_pairs(dataset), len(edges) - 1, device)
    made = window_couplings(
        teacher, pairs, form=form, prediction=prediction, edges=edges,
        solver=str(settings["solver"]), steps=window_steps(settings["steps"], len(edges) - 1),
        t_grid="logsnr", chunk_size=chunk_size, starts=starts,
    )  # fmt: skip
    return WindowCouplings(made.x0.cpu(), made.eps.cpu(), made.window_start.cpu(),
                           made.window_end.cpu(), {k: v.cpu() for k, v in made.cond.items()})  # fmt: skip


def phase_record(
    form: Form, edges: Tensor, dataset: PairDataset, starts: str = "trajectory"
) -> dict[str, Any]:
    """What ``rectdiff.json`` adds for K > 1: the edges (t and timesteps), the window solves
    and how to sample (exactly K stock DDIM-trailing steps)."""
    phases = len(edges) - 1
    settings = dataset.manifest["settings"]
    timesteps = [round(float(t)) for t in form.model_time(edges[:-1])]
    return {
        "phases": phases,
        "loss": "phased: one DDIM step to the teacher's window end",
        "loss_prediction": None,
        "phase_edges": {"t": [float(t) for t in edges], "timesteps": timesteps},
        "window_solver": {
            "solver": settings["solver"],
            "steps": window_steps(settings["steps"], phases),
            "t_grid": "logsnr",
            "guidance": settings["guidance"],
            "starts": starts,
        },
        "sample_with": {"num_inference_steps": phases, "guidance_scale": 1.0},
    }
