"""Phased (piecewise) rectification: K time windows, one first-order step each.

The time range is split into K windows ``t_0 = t_max > t_1 > ... > t_K = 0``
(:func:`phase_edges`). In window k the teacher solves from a state ``x_s`` at its start
``t_s = t_k`` to ``x_e`` at its end ``t_e = t_{k+1}``; the two states fix one first-order line
``x_t = alpha_t x0* + sigma_t eps*`` through both (:mod:`~rectdiff.rectify.windows`).

The student is trained so that one first-order (DDIM) step from any point of that line
lands on the teacher's endpoint: at t drawn inside the window, ``x_t`` on the line, its
prediction converted to ``(x0_pred, eps_pred)``, the loss is on
``alpha_e x0_pred + sigma_e eps_pred - x_e`` (:func:`phased_loss`): Rectified Diffusion's
phased loss (Wang et al. 2024, sec. 3.3) written for any form and prediction. With
``space="prediction"`` the student instead regresses its own prediction's target on the line,
``target(x0*, eps*, t)`` (for flow matching's velocity, the line's constant ``eps* - x0*``:
PeRFlow's piecewise reflow, Yan et al. 2024). Sampling
is K DDIM steps on the edges (``samplers.sample(..., solver="ddim", t_grid=edges)``), and each
window's trajectory is first-order (``diagnostics.window_first_order_deviation``).

The window's start state comes from real data noised to ``t_s`` (the papers' online
setting: no stored pairs) or from stored pairs ``(eps, x0_hat)``: on the pair's own line
through the sampler's start, or on the teacher's own path from the pair's noise
(:mod:`~rectdiff.rectify.windows`, ``starts``).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import samplers
from ..forms import DiscreteVP, Form, as_time, broadcast
from ..io.configs import check_choice
from ..predictions import target, to_x0_eps
from ..training.losses import LOSSES, reduce_loss, sampler_for, take_rows
from ..training.time_samplers import TimeSampler
from ..training.trainer import TrainConfig, TrainResult, train
from .coupling import Couplings, load_pairs
from .store import PairDataset
from .windows import WindowCouplings, window_couplings

__all__ = [
    "SPACINGS",
    "SPACES",
    "WINDOW_TIMES",
    "PhasedResult",
    "phase_edges",
    "window_grid",
    "phased_loss",
    "rectify_phased",
]

#: how :func:`phase_edges` places the window edges
SPACINGS = ("t", "logsnr", "timesteps")
#: what :func:`phased_loss` compares: the DDIM step's endpoint, or the prediction itself
SPACES = ("endpoint", "prediction")
#: how :func:`phased_loss` spreads its training times over a window: evenly in t or in logsnr
WINDOW_TIMES = ("t", "logsnr")
#: the conditioning keys that carry each coupling's window (popped before the model call)
WINDOW_KEYS = ("window_start", "window_end")


def phase_edges(form: Form, phases: int, spacing: str = "t") -> Tensor:
    """The K + 1 window edges, float64, decreasing from ``form.t_max`` to 0.

    ``"t"``: equal in the form's time. ``"logsnr"``: equal in logsnr between t_max and t_min
    (the last window ends at 0). ``"timesteps"``: for a :class:`DiscreteVP` of N timesteps,
    the times a stock ``DDIMScheduler(timestep_spacing="trailing")`` visits in K steps,
    timesteps ``N - k N / K - 1`` at ``t = 1 - k / K`` (needs K to divide N), so that the
    stock scheduler's K steps land exactly on the edges.

    Raises:
        ValueError: for K < 1, an unknown spacing, or timesteps that K cannot align with.
    """
    if isinstance(phases, bool) or not isinstance(phases, int) or phases < 1:
        raise ValueError(f"phases must be an integer >= 1, got phases={phases!r}.")
    check_choice(spacing, SPACINGS, "phase spacing")
    if spacing == "timesteps":
        return _timestep_edges(form, phases)
    if spacing == "t" or phases == 1:
        return torch.linspace(form.t_max, 0.0, phases + 1, dtype=torch.float64)
    if float(form.sigma(0.0)) > 0:  # VE: logsnr is finite at t = 0
        return samplers.time_grid(form, phases, "logsnr")
    grid = samplers.time_grid(form, phases + 1, "logsnr")  # K intervals to t_min, then 0
    return torch.cat([grid[:-2], grid[-1:]])


def _timestep_edges(form: Form, phases: int) -> Tensor:
    if not isinstance(form, DiscreteVP):
        raise ValueError(
            f"spacing='timesteps' aligns windows with a discrete schedule's timesteps; "
            f"{form!r} has none. Use spacing='t' or 'logsnr'."
        )
    n = form.num_train_timesteps
    if phases > n or n % phases:
        raise ValueError(
            f"phases={phases} cannot align with the {n} timesteps of {form!r}: a stock "
            f"DDIM-trailing schedule of K steps lands on window edges only when K divides "
            f"{n} (e.g. {', '.join(str(k) for k in (1, 2, 4, 5, 8, 10) if n % k == 0)}); "
            "choose such a K or spacing='t'."
        )
    if form.t_max != 1.0:
        raise ValueError(f"spacing='timesteps' needs t_max = 1 (timestep {n - 1}), got {form!r}.")
    timesteps = torch.tensor(
        [n - k * (n // phases) - 1 for k in range(phases)], dtype=torch.float64
    )
    return torch.cat([form.t_from_model_time(timesteps), torch.zeros(1, dtype=torch.float64)])


def window_grid(form: Form, edges: Tensor, steps: int = 8, kind: str = "uniform") -> Tensor:
    """A sampling grid with ``steps`` intervals inside each window, containing every edge
    (for trajectories measured window by window)."""
    parts = [samplers.time_grid(form, steps, kind, t_start=float(a), t_end=float(b))
             for a, b in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)]  # fmt: skip
    return torch.cat([parts[0], *(p[1:] for p in parts[1:])])


def phased_loss(
    model: Any,
    x0: Tensor,
    *,
    form: Form,
    prediction: str,
    time_sampler: str | TimeSampler = "uniform",
    weighting: Any = "none",
    loss: str = "mse",
    huber_c: float | None = None,
    eps: Tensor | None = None,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    start_mass: float = 0.0,
    sigma_data: float | None = None,
    space: str = "endpoint",
    window_time: str = "t",
    rows: slice | None = None,
) -> tuple[Tensor, Tensor]:
    """The phased loss on window couplings ``(eps*, x0*)`` (signature of ``diffusion_loss``).

    ``cond["window_start"]``, ``cond["window_end"]`` give each coupling's window; t is the
    time sampler's draw mapped affinely from ``[t_min, t_max]`` into the window (clipped to
    the safe range), or, with probability ``start_mass``, the window's start itself: the
    only time at which K-step sampling evaluates the student, and where a continuous-time
    network has to make the jump from the previous window's line to this one's. The loss
    compares the one DDIM step to the window end, ``alpha_e x0_pred + sigma_e eps_pred``, with
    the teacher's endpoint ``alpha_e x0* + sigma_e eps*`` (MSE over dimensions, or
    pseudo-Huber), times the weighting at t. With ``space="prediction"`` it compares the
    network's output with its own target on the line, ``predictions.target(x0*, eps*, t)``
    (PeRFlow's loss in flow matching), in the prediction's units: a first-order student has
    zero loss in either space, but the endpoint weighs an error at t by how much it moves
    ``x_e`` (nothing at the window's end), the prediction space alike at every t.

    ``sigma_data`` (None: off) measures each endpoint error in what it does to the final
    sample: for data of std ``sigma_data`` per dimension the teacher's flow from ``t_e`` to 0
    is the linear map ``x -> x sigma_data / sqrt(alpha_e^2 sigma_data^2 + sigma_e^2)``, so the
    difference is scaled by that factor. Without it a VE form's early windows, whose endpoints
    are ``sigma_e`` times larger, outweigh the last window by ``sigma_e^2``. In prediction
    space it divides each error by the std of the target ``a_t x0 + b_t eps`` for such data,
    ``sqrt(a_t^2 sigma_data^2 + b_t^2)`` (EDM's c_out): a v target in VE grows with sigma_t.

    ``window_time="logsnr"`` maps the draw affinely in logsnr instead of t: uniform draws then
    cover each window evenly in logsnr, the measure over which the per-window first-order
    deviation averages, which moves training times towards the ends of the range (the
    low-noise end of the last window, the high-noise end of the first); in VE, whose logsnr
    is affine in t, it is the same.

    ``rows`` (multi-process training; see ``diffusion_loss``): t is drawn for the whole
    batch, then only these rows are computed.

    Returns:
        ``(mean_loss, per_sample_loss)``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}.")
    if not 0.0 <= start_mass < 1.0:
        raise ValueError(f"start_mass must be in [0, 1), got {start_mass!r}.")
    check_choice(space, SPACES, "phased loss space")
    check_choice(window_time, WINDOW_TIMES, "phased window_time")
    cond = dict(cond or {})
    start, end = (as_time(cond.pop(key)).to(x0.device) for key in WINDOW_KEYS)
    u = sampler_for(time_sampler, form).sample(x0.shape[0], generator, x0.device)
    lo, hi = end.clamp(min=form.t_min), start.clamp(max=form.t_max)
    frac = (u - form.t_min) / (form.t_max - form.t_min)
    if start_mass > 0:
        draw = torch.rand(frac.shape, generator=generator, dtype=frac.dtype, device=frac.device)
        frac = torch.where(draw < start_mass, torch.ones_like(frac), frac)
    if window_time == "t":
        t = lo + (hi - lo) * frac
    else:  # the same fraction of the window's logsnr span; its start exactly at frac = 1
        lam_lo, lam_hi = form.logsnr(lo), form.logsnr(hi)
        inside = form.t_from_logsnr(lam_lo + (lam_hi - lam_lo) * frac).clamp(lo, hi)
        t = torch.where(frac >= 1.0, hi, inside)
    if rows is not None:
        x0, eps, t, end, cond = take_rows((x0, eps, t, end, cond), rows, len(frac))
    x_t = form.add_noise(x0, eps, t)
    out = model(x_t, form.model_time(t).to(x0.dtype), **cond)
    if space == "prediction":
        diff = out - target(x0, eps, t, prediction=prediction, form=form)
        if sigma_data is not None:  # the target a x0 + b eps has std sqrt(a^2 sd^2 + b^2)
            one = broadcast(torch.ones_like(t), x0)
            a, b = (target(signal, noise, t, prediction=prediction, form=form)
                    for signal, noise in ((one, one * 0), (one * 0, one)))  # fmt: skip
            diff = diff / (a**2 * sigma_data**2 + b**2).sqrt().to(diff.dtype)
        return reduce_loss(diff, t, form=form, prediction=prediction, loss=loss, huber_c=huber_c,
                           weighting=weighting)  # fmt: skip
    x0_pred, eps_pred = to_x0_eps(out, prediction, x_t, t, form)
    a_e, s_e = broadcast(form.alpha(end), x0), broadcast(form.sigma(end), x0)
    diff = a_e * (x0_pred - x0) + s_e * (eps_pred - eps)
    if sigma_data is not None:
        diff = diff * (sigma_data / (a_e**2 * sigma_data**2 + s_e**2).sqrt()).to(diff.dtype)
    return reduce_loss(diff, t, form=form, prediction=prediction, loss=loss, huber_c=huber_c,
                       weighting=weighting)  # fmt: skip


@dataclass
class PhasedResult:
    """What :func:`rectify_phased` returns: the training result, the edges and couplings."""

    train: TrainResult
    edges: Tensor
    couplings: WindowCouplings

    @property
    def model(self) -> nn.Module:
        """The trained student."""
        return self.train.model


def rectify_phased(
    teacher: nn.Module,
    data_or_pairs: Any,
    *,
    form: Form,
    prediction: str,
    phases: int = 4,
    spacing: str = "t",
    edges: Tensor | None = None,
    student: nn.Module | None = None,
    num: int | None = None,
    solver: str = "dpmpp_2m",
    steps: int = 8,
    config: TrainConfig | None = None,
    start_mass: float = 0.25,
    sigma_data: float | str | None = "auto",
    space: str = "endpoint",
    window_time: str = "t",
    starts: str = "trajectory",
    seed: int = 0,
    progress: bool = True,
    accelerator: Any = None,
) -> PhasedResult:
    """Phased rectification of ``teacher`` in its own form and prediction (module docstring).

    Args:
        teacher: the model to rectify (not changed).
        data_or_pairs: clean data ``(N, ...)`` or ``(x0, labels)`` (windows start from data
            noised to the window start), or pairs (a store folder, :class:`PairDataset`,
            :class:`Couplings` or ``(eps, x0)``; windows start on the pairs' lines).
        form, prediction: the teacher's (and the student's).
        phases, spacing: K windows, placed by :func:`phase_edges`.
        edges: explicit window edges instead (K + 1 decreasing times from ``form.t_max`` to
            0, e.g. the grid a K-step evaluation samples on).
        student: the network to train (default: a copy of the teacher).
        num: window couplings to make (default: one per source sample).
        solver, steps: the teacher's solve inside each window.
        config: the student's training (:class:`TrainConfig`; its time sampler is mapped
            into each window, its loss and weighting apply to the window endpoint).
        start_mass: the fraction of training times placed exactly at their window's start,
            where K-step sampling evaluates the student (:func:`phased_loss`).
        sigma_data: scale each endpoint error by what the teacher's flow does to it
            (:func:`phased_loss`): ``"auto"`` uses the std of the data (or of the pairs'
            samples), a float that value, None turns it off (in prediction space it divides
            each error by its target's std for such data, :func:`phased_loss`).
        space: ``"endpoint"`` (Rectified Diffusion's loss on the DDIM step's endpoint) or
            ``"prediction"`` (the prediction's own target on the window's line; PeRFlow's
            loss in flow matching); see :func:`phased_loss`.
        window_time: ``"t"`` (training times spread evenly over each window in t) or
            ``"logsnr"`` (evenly in logsnr); see :func:`phased_loss`.
        starts: with pairs, where each window starts (:func:`window_couplings`):
            ``"trajectory"``, the teacher's own path, or ``"line"``, the pair's own line.
        seed: seeds the couplings' noise.

    Returns:
        A :class:`PhasedResult`: sample the student with
        ``samplers.sample(result.model, eps, form=form, prediction=prediction, solver="ddim",
        t_grid=result.edges)``.
    """
    bad_scale = isinstance(sigma_data, str) and sigma_data != "auto"
    if isinstance(sigma_data, (int, float)):
        bad_scale = not (sigma_data > 0 and math.isfinite(sigma_data))
    if bad_scale:
        raise ValueError(
            f"sigma_data must be 'auto', a positive number or None, got {sigma_data!r}."
        )
    if not 0.0 <= start_mass < 1.0:
        raise ValueError(f"start_mass must be in [0, 1), got {start_mass!r}.")
    check_choice(space, SPACES, "phased loss space")  # before the window solves, not after
    check_choice(window_time, WINDOW_TIMES, "phased window_time")
    edges = phase_edges(form, phases, spacing) if edges is None else _check_edges(edges, form)
    source, cond = _source(data_or_pairs)
    couplings = window_couplings(
        teacher, source, form=form, prediction=prediction, edges=edges, num=num, cond=cond,
        solver=solver, steps=steps, seed=seed, starts=starts,
    )  # fmt: skip
    data, keys = couplings.training_data()
    student = copy.deepcopy(teacher) if student is None else student
    if sigma_data == "auto":
        sigma_data = float((source.x0 if isinstance(source, Couplings) else source).double().std())
    loss_fn = functools.partial(phased_loss, start_mass=start_mass, sigma_data=sigma_data,
                                space=space, window_time=window_time)  # fmt: skip
    result = train(
        student.train(), data, form=form, prediction=prediction, config=config or TrainConfig(),
        pairs=True, cond_fn=lambda extra: dict(zip(keys, _as_tuple(extra), strict=True)),
        progress=progress, accelerator=accelerator, loss_fn=loss_fn,
    )  # fmt: skip
    return PhasedResult(result, edges, couplings)


def _check_edges(edges: Any, form: Form) -> Tensor:
    edges = torch.as_tensor(edges, dtype=torch.float64)
    ok = edges.ndim == 1 and len(edges) >= 2 and bool((torch.diff(edges) < 0).all())
    if not ok or abs(float(edges[0]) - form.t_max) > 1e-9 or float(edges[-1]) != 0.0:
        raise ValueError(
            f"window edges must decrease from t_max = {form.t_max} to 0, got {edges.tolist()}."
        )
    return edges


def _as_tuple(extra: Any) -> tuple[Any, ...]:
    return extra if isinstance(extra, tuple) else (extra,)


def _source(data_or_pairs: Any) -> tuple[Couplings | Tensor, dict[str, Tensor] | None]:
    """Data ``x0`` (with labels) or pairs, told apart by type."""
    if isinstance(data_or_pairs, Tensor):
        return data_or_pairs, None
    if isinstance(data_or_pairs, (Couplings, PairDataset, str)) or hasattr(
        data_or_pairs, "__fspath__"
    ):
        return load_pairs(data_or_pairs), None
    if isinstance(data_or_pairs, tuple) and len(data_or_pairs) == 2:
        x0, labels = data_or_pairs
        if labels is None:
            return x0, None
        return x0, {"class_labels": labels}
    raise ValueError(
        "rectify_phased takes clean data (a tensor, or (x0, labels)) or pairs (a pair store, "
        f"PairDataset or Couplings); got {type(data_or_pairs).__name__}. Pass pairs as "
        "Couplings(eps, x0) to tell them from (x0, labels)."
    )
