"""Phased (piecewise) rectification: K time windows, one first-order step each.

The time range is split into K windows ``t_0 = t_max > t_1 > ... > t_K = 0``
(:func:`phase_edges`). In window k the teacher solves from a state ``x_s`` at its start
``t_s = t_k`` to ``x_e`` at its end ``t_e = t_{k+1}``; the two states fix one first-order line
``x_t = alpha_t x0* + sigma_t eps*`` through both (:func:`window_line`, a 2x2 solve):

    x0*  = (sigma_e x_s - sigma_s x_e) / D,   eps* = (alpha_s x_e - alpha_e x_s) / D,
    D    = alpha_s sigma_e - alpha_e sigma_s.

The student is trained so that one first-order (DDIM) step from any point of that line
lands on the teacher's endpoint: at t drawn inside the window, ``x_t`` on the line, its
prediction converted to ``(x0_pred, eps_pred)``, the loss is on
``alpha_e x0_pred + sigma_e eps_pred - x_e`` (:func:`phased_loss`): Rectified Diffusion's
phased loss (Wang et al. 2024, sec. 3.3) written for any form and prediction; in flow
matching with uniform windows it is PeRFlow's piecewise reflow (Yan et al. 2024). Sampling
is K DDIM steps on the edges (``samplers.sample(..., solver="ddim", t_grid=edges)``), and each
window's trajectory is first-order (``diagnostics.window_first_order_deviation``).

The window's start state comes from real data noised to ``t_s`` (the papers' online
setting: no stored pairs) or from stored pairs ``(eps, x0_hat)``, on the pair's own line
through the sampler's start (``coupling.start_noise``). Window couplings are made in chunks
whose noise depends only on (seed, chunk), chunk c on process ``c % num_processes``, and
gathered: they do not depend on the number of processes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor, nn

from .. import samplers
from ..forms import DiscreteVP, Form, as_time, broadcast
from ..io.configs import check_choice
from ..predictions import check_prediction, to_x0_eps
from ..training.losses import LOSSES, reduce_loss, sampler_for, take_rows
from ..training.time_samplers import TimeSampler
from ..training.trainer import TrainConfig, TrainResult, train
from .coupling import Couplings, load_pairs, start_noise
from .pairs import process_state
from .store import PairDataset

__all__ = [
    "SPACINGS", "WindowCouplings", "PhasedResult", "phase_edges", "window_grid", "window_line",
    "window_couplings", "phased_loss", "rectify_phased",
]  # fmt: skip

#: how :func:`phase_edges` places the window edges
SPACINGS = ("t", "logsnr", "timesteps")
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


def window_line(
    x_start: Tensor, x_end: Tensor, t_start: Tensor, t_end: Tensor, form: Form
) -> tuple[Tensor, Tensor]:
    """``(x0*, eps*)`` of the first-order line through ``(x_start, t_start)`` and
    ``(x_end, t_end)`` (module docstring), per sample (``t_start``, ``t_end`` of shape (B,))."""
    ts, te = as_time(t_start).to(x_start.device), as_time(t_end).to(x_start.device)
    a_s, s_s = form.alpha(ts), form.sigma(ts)
    a_e, s_e = form.alpha(te), form.sigma(te)
    det = a_s * s_e - a_e * s_s
    xs, xe = x_start.to(torch.float64), x_end.to(torch.float64)
    x0 = (broadcast(s_e, xs) * xs - broadcast(s_s, xs) * xe) / broadcast(det, xs)
    eps = (broadcast(a_s, xs) * xe - broadcast(a_e, xs) * xs) / broadcast(det, xs)
    return x0.to(x_start.dtype), eps.to(x_start.dtype)


@dataclass
class WindowCouplings:
    """Per-window couplings: the line ``(x0*, eps*)`` of each and the window it lives in.

    Attributes:
        x0, eps: ``(N, ...)``, the first-order line through the teacher's window solve.
        window_start, window_end: ``(N,)`` float64 times of each coupling's window.
        cond: per-coupling conditioning (class labels), passed to the student.
    """

    x0: Tensor
    eps: Tensor
    window_start: Tensor
    window_end: Tensor
    cond: dict[str, Tensor] = field(default_factory=dict)

    def training_data(self) -> tuple[tuple[Tensor, ...], list[str]]:
        """``(eps, x0, *cond)`` for the trainer and the cond keys in order."""
        cond = {**self.cond, "window_start": self.window_start, "window_end": self.window_end}
        keys = sorted(cond)
        return (self.eps, self.x0, *(cond[k] for k in keys)), keys


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    digest = hashlib.sha256(f"rectdiff.phased:{seed}:{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def _starts(
    source: Couplings | Tensor, index: Tensor, t_s: Tensor, form: Form, gen: torch.Generator
) -> Tensor:
    """Window start states: data noised to ``t_s``, or points on the pairs' own lines."""
    if isinstance(source, Couplings):
        eps = start_noise(source.eps[index], source.x0[index], form)
        return form.add_noise(source.x0[index], eps, t_s)
    x0 = source[index]
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return form.add_noise(x0, eps, t_s)


def window_couplings(
    teacher: Any,
    source: Couplings | Tensor,
    *,
    form: Form,
    prediction: str,
    edges: Tensor,
    num: int | None = None,
    cond: dict[str, Tensor] | None = None,
    solver: str = "dpmpp_2m",
    steps: int = 8,
    t_grid: str = "logsnr",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    chunk_size: int = 1024,
    seed: int = 0,
) -> WindowCouplings:
    """The teacher's window solves as first-order lines, ``num`` of them (default: one per
    source sample), coupling i in window ``i mod K`` from source sample ``i mod N``.

    Args:
        teacher: called as ``teacher(x_t, model_time, **cond)``, answering ``prediction``.
        source: clean data ``(N, ...)`` (noised to each window's start) or :class:`Couplings`
            (each window starts on the pair's line; its conditioning is used).
        form, prediction: the teacher's.
        edges: window edges from :func:`phase_edges`.
        cond: per-sample conditioning of data (e.g. ``{"class_labels": labels}``).
        solver, steps, t_grid, rtol, atol: the teacher's solve inside each window.
        chunk_size, seed: couplings are made in chunks seeded by (seed, chunk).
    """
    check_prediction(prediction)
    if isinstance(source, Couplings):
        cond = dict(source.cond)
    n_source = len(source.x0) if isinstance(source, Couplings) else len(source)
    num = n_source if num is None else int(num)
    phases = len(edges) - 1
    state = process_state()
    mine = range(state.process_index, math.ceil(num / chunk_size), state.num_processes)
    solve = {"solver": solver, "steps": steps, "t_grid": t_grid, "rtol": rtol, "atol": atol}
    made = [(c, _chunk(teacher, source, c, form, prediction, edges, num, cond or {}, solve,
                       chunk_size, seed, phases)) for c in mine]  # fmt: skip
    if state.num_processes > 1:
        made = gather_object(made)
    parts = [part for _, part in sorted(made, key=lambda item: item[0])]
    x0, eps, start, end = (torch.cat([p[i] for p in parts]) for i in range(4))
    keys = sorted(parts[0][4]) if parts else []
    return WindowCouplings(x0, eps, start, end, {k: torch.cat([p[4][k] for p in parts])
                                                  for k in keys})  # fmt: skip


def _chunk(
    teacher: Any, source: Couplings | Tensor, chunk: int, form: Form, prediction: str,
    edges: Tensor, num: int, cond: dict[str, Tensor], solve: dict[str, Any], chunk_size: int,
    seed: int, phases: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
    """One chunk of :func:`window_couplings`, window by window."""
    gen = _chunk_generator(seed, chunk)
    ids = torch.arange(chunk * chunk_size, min(num, (chunk + 1) * chunk_size))
    n_source = len(source.x0) if isinstance(source, Couplings) else len(source)
    x0s, epss, order = [], [], []
    for k in range(phases):
        mask = ids % phases == k
        if not bool(mask.any()):
            continue
        index = ids[mask] % n_source
        t_s, t_e = float(edges[k]), float(edges[k + 1])
        x_s = _starts(source, index, torch.tensor(t_s, dtype=torch.float64), form, gen)
        window_cond = {key: value[index] for key, value in cond.items()}
        with torch.no_grad():
            x_e = samplers.sample(
                teacher, x_s / float(form.sigma(t_s)), form=form, prediction=prediction,
                t_start=t_s, t_end=t_e, cond=window_cond or None, **solve,
            )  # fmt: skip
        n = len(index)
        line = window_line(x_s, x_e, torch.full((n,), t_s, dtype=torch.float64),
                           torch.full((n,), t_e, dtype=torch.float64), form)  # fmt: skip
        x0s.append(line[0])
        epss.append(line[1])
        order.append(torch.nonzero(mask)[:, 0])
    order_all = torch.cat(order)
    inverse = torch.empty_like(order_all)
    inverse[order_all] = torch.arange(len(order_all))
    x0, eps = torch.cat(x0s)[inverse], torch.cat(epss)[inverse]
    window = ids % phases
    index = ids % n_source
    return (x0, eps, edges[window], edges[window + 1],
            {key: value[index] for key, value in cond.items()})  # fmt: skip


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
    pseudo-Huber), times the weighting at t.

    ``sigma_data`` (None: off) measures each endpoint error in what it does to the final
    sample: for data of std ``sigma_data`` per dimension the teacher's flow from ``t_e`` to 0
    is the linear map ``x -> x sigma_data / sqrt(alpha_e^2 sigma_data^2 + sigma_e^2)``, so the
    difference is scaled by that factor. Without it a VE form's early windows, whose endpoints
    are ``sigma_e`` times larger, outweigh the last window by ``sigma_e^2``.

    ``rows`` (multi-process training; see ``diffusion_loss``): t is drawn for the whole
    batch, then only these rows are computed.

    Returns:
        ``(mean_loss, per_sample_loss)``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}.")
    if not 0.0 <= start_mass < 1.0:
        raise ValueError(f"start_mass must be in [0, 1), got {start_mass!r}.")
    cond = dict(cond or {})
    start, end = (as_time(cond.pop(key)).to(x0.device) for key in WINDOW_KEYS)
    u = sampler_for(time_sampler, form).sample(x0.shape[0], generator, x0.device)
    lo, hi = end.clamp(min=form.t_min), start.clamp(max=form.t_max)
    frac = (u - form.t_min) / (form.t_max - form.t_min)
    if start_mass > 0:
        draw = torch.rand(frac.shape, generator=generator, dtype=frac.dtype, device=frac.device)
        frac = torch.where(draw < start_mass, torch.ones_like(frac), frac)
    t = lo + (hi - lo) * frac
    if rows is not None:
        x0, eps, t, end, cond = take_rows((x0, eps, t, end, cond), rows, len(frac))
    x_t = form.add_noise(x0, eps, t)
    out = model(x_t, form.model_time(t).to(x0.dtype), **cond)
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
            samples), a float that value, None turns it off.
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
    edges = phase_edges(form, phases, spacing) if edges is None else _check_edges(edges, form)
    source, cond = _source(data_or_pairs)
    couplings = window_couplings(
        teacher, source, form=form, prediction=prediction, edges=edges, num=num, cond=cond,
        solver=solver, steps=steps, seed=seed,
    )  # fmt: skip
    data, keys = couplings.training_data()
    student = copy.deepcopy(teacher) if student is None else student
    if sigma_data == "auto":
        sigma_data = float((source.x0 if isinstance(source, Couplings) else source).double().std())
    loss_fn = functools.partial(phased_loss, start_mass=start_mass, sigma_data=sigma_data)
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
