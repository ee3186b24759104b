"""Scoring a model: seeded noise streams and every configured solve against held-out data."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ... import metrics, samplers
from ...forms import Form
from .tables import EvaluationConfig

__all__ = ["FIGURE_POINTS", "standard_noise", "evaluate_model"]

#: how many generated samples / trajectories a cell keeps for the figures
FIGURE_POINTS = 2000


def standard_noise(shape: Sequence[int], n: int, seed: int, stream: str) -> Tensor:
    """``n`` float32 standard-normal samples of ``shape`` from a generator seeded by
    ``sha256(f"rectdiff.compare:{stream}:{seed}")`` (independent streams per purpose)."""
    digest = hashlib.sha256(f"rectdiff.compare:{stream}:{seed}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    return torch.randn((n, *shape), generator=generator)


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
) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Sample from ``noise`` with every configured solver and number of steps, and score.

    Args:
        model, form, prediction: the model.
        noise: standard-normal starting noise (shared by every model compared).
        reference_data: held-out data the metrics compare against.
        evaluation: solvers, steps, reference solver, metrics.
        grid: ``grid(form, steps) -> t_grid`` (see :func:`.hyperparameters.sampling_grid`).
        seed: the metrics' seed.

    Returns:
        ``(records, samples)``: one record ``{solver, steps, nfe, <metric>: value}`` per
        solve (the adaptive reference with ``steps = None``), and the first samples of the
        one-step and reference solves for the figures (``"ddim@1"``, ``"dopri5"``, ...).
    """
    runs: list[tuple[str, int | None]] = [
        (s, k) for s in evaluation.solvers for k in evaluation.steps
    ]
    if evaluation.reference_solver:
        runs.append((evaluation.reference_solver, None))
    records, kept = [], {}
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
        if steps in (None, 1):
            kept[solver if steps is None else f"{solver}@1"] = sample[:FIGURE_POINTS].clone()
    return records, kept
