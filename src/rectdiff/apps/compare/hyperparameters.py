"""Equal hyperparameters: what every cell of a comparison trains and samples with.

``equal = "t"``: every cell uses the shared [train] block and the same kind of time grid in
its own t. ``equal = "logsnr"``: every cell gets the time sampler and weighting of
``timesteps.equalize`` that give it the reference's implied weighting over the common
logsnr range, and every fixed-step solve takes its steps between the same logsnr values
(see :mod:`rectdiff.apps.compare.config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ... import samplers
from ... import training as timesteps
from ...forms import Form
from ...models import Preconditioned
from ...training.trainer import TrainConfig
from .config import CompareConfig, restrict_form

__all__ = ["sampling_grid", "cell_train_config", "implied_weightings", "network_config"]


def sampling_grid(form: Form, steps: int, config: CompareConfig) -> str | Tensor:
    """The time grid of a fixed-step solve with ``steps`` steps in ``form``.

    ``equal = "t"``: the grid kind ``evaluation.t_grid`` in the form's own time.
    ``equal = "logsnr"``: that kind of grid in the (restricted) reference form's time,
    mapped to ``form`` through logsnr, ``t = form.t_from_logsnr(ref.logsnr(t_ref))``, and
    ending at t = 0; so every form takes its steps between the same logsnr values.
    """
    kind = config.evaluation.t_grid
    if config.equal == "t":
        return kind
    lo, hi = config.logsnr_range()
    ref = restrict_form(config.reference.resolved_form(), lo, hi)
    t_ref = samplers.time_grid(ref, steps, kind)
    logsnr = ref.logsnr(t_ref[:-1])
    grid = form.t_from_logsnr(logsnr).clamp(form.t_min, form.t_max)
    grid[0] = form.t_max
    grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    if not bool((torch.diff(grid) < 0).all()):
        raise ValueError(
            f"{steps} steps of a {kind!r} grid collapse at the ends of {form!r}'s logsnr range "
            f"[{lo:.4g}, {hi:.4g}]; use fewer steps or another t_grid."
        )
    return grid


def cell_train_config(
    config: CompareConfig,
    form: Form,
    prediction: str,
    stage: str = "teacher",
    net_config: dict[str, Any] | None = None,
) -> TrainConfig:
    """The training hyperparameters of one cell: the shared block, with (``equal =
    "logsnr"``) the time sampler and weighting of ``timesteps.equalize`` that give this form
    and prediction the reference's implied weighting on the common logsnr range.

    Args:
        config: the comparison.
        form: the cell's form (restricted to the common logsnr range in logsnr mode).
        prediction: the cell's prediction.
        stage: ``"teacher"`` or ``"rectify"`` (the rectification stage's block and reference).
        net_config: the cell's :func:`network_config`; with ``[network] equalize_units =
            "network"`` its preconditioning's c_out is equalize's ``output_scale``.
    """
    rect = stage != "teacher"
    base = config.rectify.config.train if rect else config.train
    if config.equal == "t":
        return base
    reference = (config.rectify.reference or config.reference) if rect else config.reference
    sampler, weighting = timesteps.equalize(
        form, prediction, reference.weight, logsnr_range=form.logsnr_range(),
        output_scale=_output_scale(config, form, net_config),
    )  # fmt: skip
    return dataclasses.replace(
        base, time_sampler=sampler, weighting=weighting, time_sampler_params={},
        weighting_params={},
    )  # fmt: skip


def _output_scale(config: CompareConfig, form: Form, net_config: dict[str, Any] | None) -> Any:
    """The network's c_out for ``equalize_units = "network"`` (None otherwise)."""
    if config.network.equalize_units != "network":
        return None
    if net_config is None:
        raise ValueError("equalize_units = 'network' needs the cell's network config.")
    return Preconditioned(nn.Identity(), form, **net_config["preconditioning"]).c_out


def implied_weightings(
    config: CompareConfig, points: int = 400
) -> dict[str, tuple[list[float], list[float]]]:
    """The implied eps-MSE weightings over logsnr (``timesteps.implied_weighting``) of a
    comparison, for ``figures/implied_weighting``.

    ``equal = "t"``: every cell's (its time sampler and weighting in its own t).
    ``equal = "logsnr"``: the one weighting every teacher trains with (the reference's;
    every cell's equals it, see ``tests/test_compare.py``), the rectification stage's when
    it has its own reference, and, for contrast, what uniform t without weighting gives each
    form with the grid's first prediction (the cells' weightings under ``equal = "t"``).

    Returns:
        ``label -> (logsnr, weight)`` on ``points`` logsnr values spanning the forms' ranges.
    """
    native = config.grid.resolved()
    ranges = [form.logsnr_range() for _, form in native]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    logsnr = torch.linspace(lo, hi, points, dtype=torch.float64)
    curves: dict[str, Tensor] = {}
    if config.equal == "t":
        for label, form, prediction in config.cells():
            train_config = cell_train_config(config, form, prediction)
            sampler = timesteps.time_sampler(
                train_config.time_sampler, form, **train_config.time_sampler_params
            )
            weighting = timesteps.loss_weighting(
                train_config.weighting, **train_config.weighting_params
            )
            curves[f"{label} {prediction}"] = timesteps.implied_weighting(
                form, prediction, sampler, weighting, logsnr
            )
    else:
        common_lo, common_hi = config.logsnr_range()
        inside = (logsnr >= common_lo) & (logsnr <= common_hi)
        stages = [("all teachers", config.reference)]
        if config.rectify.enabled and config.rectify.reference is not None:
            stages.append(("all rectifications", config.rectify.reference))
        for name, reference in stages:
            weight = torch.where(inside, reference.weight(logsnr), torch.zeros_like(logsnr))
            curves[f"{name}: {reference.short()}"] = weight
        prediction = config.grid.predictions[0]
        ref = config.reference
        for label, form in native:
            same = (form, prediction) == (ref.resolved_form(), ref.prediction)
            if same and ref.time_sampler == "uniform" and ref.weighting == "none":
                continue  # that is the teachers' curve
            curves[f"{label} {prediction}, uniform t"] = timesteps.implied_weighting(
                form, prediction, "uniform", "none", logsnr
            )
    return {name: (logsnr.tolist(), weight.tolist()) for name, weight in curves.items()}


def network_config(config: CompareConfig, x_train: Tensor, prediction: str) -> dict[str, Any]:
    """The model-folder network config of a cell (see ``io.model_dir.build_model``)."""
    net = config.network
    kwargs = dict(net.options)
    if net.kind == "mlp":
        kwargs.setdefault("dim", int(x_train[0].numel()))
    else:
        kwargs.setdefault("sample_size", int(x_train.shape[-1]))
        kwargs.setdefault("in_channels", int(x_train.shape[1]))
    sigma_data = net.sigma_data if net.sigma_data is not None else float(x_train.std())
    return {
        "kind": net.kind,
        "kwargs": kwargs,
        "preconditioning": {
            "sigma_data": round(sigma_data, 6),
            "scale_input": True,
            "output_prediction": prediction if net.precondition_output else None,
            # t in [0, 1] for every form: a DiscreteVP's model_time runs 0..999 and SD3's
            # 0..1000, which would put their cells on another scale of the time embedding
            # ("fm": FM's t at the same logsnr, the same time in every form)
            "time_input": net.time_input,
            "scaling": net.scaling,
        },
    }
