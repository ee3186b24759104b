"""Scoring a model: seeded noise streams and every configured solve against held-out data."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ... import metrics, samplers
from ...forms import Form
from .tables import EvaluationConfig

__all__ = ["FIGURE_POINTS", "Evaluation", "standard_noise", "evaluate_model"]

#: how many generated samples / trajectories a cell keeps for the figures
FIGURE_POINTS = 2000


def standard_noise(shape: Sequence[int], n: int, seed: int, stream: str) -> Tensor:
    """``n`` float32 standard-normal samples of ``shape`` from a generator seeded by
    ``sha256(f"rectdiff.compare:{stream}:{seed}")`` (independent streams per purpose)."""
    digest = hashlib.sha256(f"rectdiff.compare:{stream}:{seed}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    return torch.randn((n, *shape), generator=generator)


class Evaluation(NamedTuple):
    """What :func:`evaluate_model` returns."""

    #: one record ``{solver, steps, nfe, <metric>: value, mse_to_teacher}`` per solve
    records: list[dict[str, Any]]
    #: the first samples of the one-step and reference solves, for the figures
    kept: dict[str, Tensor]
    #: the whole reference (adaptive) solve, None without one: a teacher's is its students'
    #: ``target``
    reference: Tensor | None


def evaluate_model(
    model: nn.Module,
    *,
    form: Form,
    prediction: str,
    noise: Tensor,
    reference_data: Tensor,
    evaluation: EvaluationConfig,
    grid: Any,
    seed: int = 0,
    target: Tensor | None = None,
) -> Evaluation:
    """Sample from ``noise`` with every configured solver and number of steps, and score.

    Besides the metrics against held-out data, every solve gets ``mse_to_teacher``: the
    mean squared difference, per coordinate, between its samples and ``target``, the
    teacher's adaptive solve from the same noise. It is paired (the same noise on both
    sides), so it has no data floor: it measures how far a solve lands from where the
    teacher's ODE takes each noise, which the distances to held-out data can only bound
    (issue 13's Stable Diffusion criterion, "latent MSE to the teacher's many-step
    latents", is this number).

    Args:
        model, form, prediction: the model.
        noise: standard-normal starting noise (shared by every model compared).
        reference_data: held-out data the metrics compare against.
        evaluation: solvers, steps, reference solver, metrics.
        grid: ``grid(form, steps) -> t_grid`` (see :func:`.hyperparameters.sampling_grid`).
        seed: the metrics' seed.
        target: the teacher's adaptive solve from ``noise``; None for a teacher, whose own
            reference solve is then the target (no ``mse_to_teacher`` without either).

    Returns:
        An :class:`Evaluation`: one record per solve (the adaptive reference with
        ``steps = None``), the first samples of the one-step and reference solves for the
        figures (``"ddim@1"``, ``"dopri5"``, ...), and the whole reference solve.
    """
    runs: list[tuple[str, int | None]] = [
        (s, k) for s in evaluation.solvers for k in evaluation.steps
    ]
    if evaluation.reference_solver:
        runs.append((evaluation.reference_solver, None))
    records, kept, samples = [], {}, []
    for solver, steps in runs:
        t_grid = grid(form, steps if steps is not None else 1)
        traj = samplers.sample(
            model, noise, form=form, prediction=prediction, solver=solver,
            steps=steps or 1, t_grid=t_grid, rtol=evaluation.rtol, atol=evaluation.atol,
            return_trajectory=True,
        )  # fmt: skip
        sample = traj.sample
        scores = metrics.compute_metrics(
            evaluation.metrics, sample, reference_data, seed=seed, **evaluation.metric_options
        )
        records.append({"solver": solver, "steps": steps, "nfe": int(traj.nfe), **scores})
        samples.append(sample)
        if steps in (None, 1):
            kept[solver if steps is None else f"{solver}@1"] = sample[:FIGURE_POINTS].clone()
    reference = samples[-1] if evaluation.reference_solver else None
    target = reference if target is None else target
    if target is not None:
        for record, sample in zip(records, samples, strict=True):
            record["mse_to_teacher"] = float((sample.double() - target.double()).square().mean())
    return Evaluation(records, kept, reference)
