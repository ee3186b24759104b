"""Window couplings: the teacher's solve inside each phase window, as a first-order line.

In window k the teacher solves from a state ``x_s`` at its start ``t_s`` to ``x_e`` at its end
``t_e``; the two states fix one first-order line ``x_t = alpha_t x0* + sigma_t eps*`` through
both (:func:`window_line`, a 2x2 solve):

    x0*  = (sigma_e x_s - sigma_s x_e) / D,   eps* = (alpha_s x_e - alpha_e x_s) / D,
    D    = alpha_s sigma_e - alpha_e sigma_s.

Where the start state comes from (``starts``):

- clean data noised to ``t_s`` with fresh noise (whatever ``starts`` says): the papers'
  online setting, the forward process's marginal at ``t_s`` (Rectified Diffusion, Wang et
  al. 2024; PeRFlow, Yan et al. 2024);
- stored pairs ``(eps, x0_hat)``, on the pair's own line through the sampler's start
  (``"line"``, :func:`~rectdiff.rectify.coupling.start_noise`);
- stored pairs, on the teacher's own trajectory from the pair's noise (``"trajectory"``):
  the teacher solves window after window from ``sigma(t_max) eps``, with the same solver,
  so window k starts where the teacher is at ``t_k``, which is where a student that
  reproduces the earlier windows enters window k when it samples. A line start is on the
  straight segment from the noise to the final sample instead, which the teacher's curved
  path leaves between the first and last edge. Each window of a pair's path is solved once
  per chunk: a pair used in every window (``sd rectify``) costs K window solves, as with
  line starts; a pair used in window k only costs the k + 1 windows up to its end.

Couplings are made in chunks whose noise depends only on (seed, chunk), chunk c on process
``c % num_processes``, and gathered: they do not depend on the number of processes.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor

from .. import samplers
from ..forms import Form, as_time, broadcast
from ..io.configs import check_choice
from ..predictions import check_prediction
from .coupling import Couplings, start_noise
from .pairs import process_state

__all__ = ["STARTS", "WindowCouplings", "window_line", "window_couplings"]

#: where a window's start state comes from with stored pairs (data is always noised)
STARTS = ("line", "trajectory")


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


def _path_states(
    source: Couplings,
    index: Tensor,
    window: Tensor,
    phases: int,
    edges: Tensor,
    form: Form,
    cond: dict[str, Tensor],
    solve: Any,
) -> list[tuple[Tensor, Tensor]]:
    """``(x_s, x_e)`` of window k's couplings (in ``window == k`` order), for every k: the
    teacher's path from each pair's noise, each window of each pair solved once
    (``solve(x, k, cond)``), as far as the pair's last window in the chunk."""
    rows, where = torch.unique(index, return_inverse=True)
    last = torch.full((len(rows),), -1, dtype=window.dtype).scatter_reduce(0, where, window, "amax")
    state = float(form.sigma(edges[0])) * source.eps[rows]  # the sampler's start
    states = []
    for k in range(phases):
        alive = torch.nonzero(last >= k)[:, 0]
        after = state.clone()
        if len(alive):
            window_cond = {key: value[rows[alive]] for key, value in cond.items()} or None
            after[alive] = solve(state[alive], k, window_cond)
        mine = where[window == k]
        states.append((state[mine], after[mine]))
        state = after
    return states


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
    starts: str = "trajectory",
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
        starts: with pairs, where each window starts: ``"trajectory"`` (the teacher's own
            path from the pair's noise; module docstring) or ``"line"`` (the pair's own line);
            data is always noised to the window start.
    """
    check_prediction(prediction)
    check_choice(starts, STARTS, "starts")
    if isinstance(source, Couplings):
        cond = dict(source.cond)
    n_source = len(source.x0) if isinstance(source, Couplings) else len(source)
    num = n_source if num is None else int(num)
    phases = len(edges) - 1
    state = process_state()
    mine = range(state.process_index, math.ceil(num / chunk_size), state.num_processes)
    solve = {"solver": solver, "steps": steps, "t_grid": t_grid, "rtol": rtol, "atol": atol}
    made = [(c, _chunk(teacher, source, c, form, prediction, edges, num, cond or {}, solve,
                       chunk_size, seed, phases, starts)) for c in mine]  # fmt: skip
    if state.num_processes > 1:
        made = gather_object(made)
    parts = [part for _, part in sorted(made, key=lambda item: item[0])]
    x0, eps, start, end = (torch.cat([p[i] for p in parts]) for i in range(4))
    keys = sorted(parts[0][4]) if parts else []
    return WindowCouplings(x0, eps, start, end, {k: torch.cat([p[4][k] for p in parts])
                                                  for k in keys})  # fmt: skip


def _solve_window(
    teacher: Any, x_s: Tensor, j: int, cond: dict[str, Tensor] | None, *, edges: Tensor,
    form: Form, prediction: str, solve: dict[str, Any],
) -> Tensor:  # fmt: skip
    """The teacher's solve of window j from ``x_s`` at its start to its end."""
    t_a, t_b = float(edges[j]), float(edges[j + 1])
    with torch.no_grad():
        return samplers.sample(
            teacher, x_s / float(form.sigma(t_a)), form=form, prediction=prediction,
            t_start=t_a, t_end=t_b, cond=cond, **solve,
        )  # fmt: skip


def _chunk(
    teacher: Any, source: Couplings | Tensor, chunk: int, form: Form, prediction: str,
    edges: Tensor, num: int, cond: dict[str, Tensor], solve: dict[str, Any], chunk_size: int,
    seed: int, phases: int, starts: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
    """One chunk of :func:`window_couplings`, window by window."""
    gen = _chunk_generator(seed, chunk)
    ids = torch.arange(chunk * chunk_size, min(num, (chunk + 1) * chunk_size))
    n_source = len(source.x0) if isinstance(source, Couplings) else len(source)
    window, index = ids % phases, ids % n_source
    solve_window = functools.partial(
        _solve_window, teacher, edges=edges, form=form, prediction=prediction, solve=solve
    )
    path = None
    if starts == "trajectory" and isinstance(source, Couplings):
        path = _path_states(source, index, window, phases, edges, form, cond, solve_window)
    x0s, epss, order = [], [], []
    for k in range(phases):
        mask = window == k
        if not bool(mask.any()):
            continue
        t_s, t_e = float(edges[k]), float(edges[k + 1])
        if path is not None:
            x_s, x_e = path[k]
        else:
            rows = index[mask]
            x_s = _starts(source, rows, torch.tensor(t_s, dtype=torch.float64), form, gen)
            x_e = solve_window(x_s, k, {key: v[rows] for key, v in cond.items()} or None)
        n = int(mask.sum())
        line = window_line(x_s, x_e, torch.full((n,), t_s, dtype=torch.float64),
                           torch.full((n,), t_e, dtype=torch.float64), form)  # fmt: skip
        x0s.append(line[0])
        epss.append(line[1])
        order.append(torch.nonzero(mask)[:, 0])
    order_all = torch.cat(order)
    inverse = torch.empty_like(order_all)
    inverse[order_all] = torch.arange(len(order_all))
    x0, eps = torch.cat(x0s)[inverse], torch.cat(epss)[inverse]
    return (x0, eps, edges[window], edges[window + 1],
            {key: value[index] for key, value in cond.items()})  # fmt: skip
