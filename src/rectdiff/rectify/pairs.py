"""Couplings: deterministic (eps, x0_hat) pairs from a pretrained model, in a sharded store.

A coupling pairs the standard-normal noise ``eps`` a sampler starts from
(``x = sigma(t_max) * eps``) with the sample ``x0_hat`` it ends at. Rectification retrains a
model on these pairs (Liu et al. 2023, "Flow Straight and Fast", Algorithm 1; Wang et al.
2024, "Rectified Diffusion", sec. 3), in any form, so the store keeps the *standard-normal*
eps and the settings that made the pairs. ``x0`` is what ``samplers.sample`` returns: for
solvers ending at sigma = 0 the x0-prediction of the last evaluation; for VE the state at
sigma_min. The storage format (manifest, shards, :class:`PairDataset`) is
:mod:`rectdiff.rectify.store`; its public names are re-exported here.

Determinism. Shard k holds pairs ``k * shard_size ...`` and its noise is drawn in one go on
the CPU, whatever the batch size or number of processes::

    seed_k = int.from_bytes(sha256(f"rectdiff.pairs:{seed}:{k}".encode()).digest()[:8],
                            "little") % 2**63
    eps_k  = torch.randn((count, *shape), generator=torch.Generator("cpu").manual_seed(seed_k),
                         dtype=float64 if dtype is float64 else float32).to(dtype)

then solved in batches of ``batch_size`` on the process's device. With fixed-step solvers and
a model whose per-sample output does not depend on the batch (true of elementwise models;
dense layers can differ in the last bit between batch sizes), shards do not depend on the
batch size; they never depend on the number of processes. Adaptive solvers (dopri5) control
the error over a whole batch, so their x0 depends on ``batch_size`` within the tolerance.

Safety. Every file is written to a temporary name and renamed. Under several processes
(``accelerate launch``) shard k belongs to process ``k % num_processes``, which alone writes
it and its ``.done.json`` record; only the main process writes ``manifest.json`` (at the
start, marked incomplete, and after ``wait_for_everyone()`` at the end, merging the records),
so no two processes ever write the same file. Running again into the same folder keeps
each shard whose file still has its recorded sha256 and regenerates the others; different
settings are refused.
Two separate launches writing into one folder at the same time are not supported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn

from .. import samplers
from ..errors import SolveError
from ..forms import Form
from ..io.files import write_bytes_atomic, write_json_atomic
from ..predictions import check_prediction
from .fingerprint import model_fingerprint
from .store import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PairDataset,
    PairSettings,
    PairStoreError,
    check_settings,
    entry_problem,
    known_entry,
    load_manifest,
    merge_sidecars,
    new_manifest,
    shard_name,
    shard_noise,
    shard_seed,
    verify_store,
)

__all__ = [
    "FORMAT_VERSION",
    "PairSettings",
    "PairStoreError",
    "PairDataset",
    "generate_pairs",
    "process_state",
    "load_manifest",
    "verify_store",
    "shard_seed",
    "shard_noise",
    "infer_shape",
]


def infer_shape(model: Any, shape: Sequence[int] | None) -> list[int]:
    if shape is not None:
        return [int(s) for s in shape]
    if hasattr(model, "sample_shape"):
        return [int(s) for s in model.sample_shape]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels") and hasattr(config, "sample_size"):
        size = config.sample_size
        size = [size, size] if isinstance(size, int) else list(size)
        return [int(config.in_channels), *map(int, size)]
    raise ValueError(
        "cannot infer the sample shape of this model; pass shape=(...) (one sample's shape, "
        "without the batch dimension), or give the model a `sample_shape` attribute."
    )


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, list | tuple):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def _split_cond(
    cond: Mapping[str, Any], count: int, k: int
) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """Split ``cond_fn``'s answer into per-pair tensors and per-pair string lists."""
    tensors: dict[str, Tensor] = {}
    texts: dict[str, list[str]] = {}
    for key, value in cond.items():
        if key in ("eps", "x0"):
            raise ValueError(f"cond_fn returned the reserved key {key!r}; rename it.")
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == count:
            tensors[key] = value.detach().cpu().contiguous()
        elif isinstance(value, list | tuple) and len(value) == count:
            if not all(isinstance(v, str) for v in value):
                raise ValueError(f"cond_fn[{key!r}] for shard {k} must be a list of str.")
            texts[key] = list(value)
        else:
            raise ValueError(
                f"cond_fn[{key!r}] for shard {k} must be a tensor with leading dimension "
                f"{count} or a list of {count} strings (one per pair); got {_describe(value)}."
            )
    return tensors, texts


def _expand_uncond(uncond: Mapping[str, Any] | None, n: int, device: torch.device) -> Any:
    """Unconditional inputs for a batch of ``n``: tensors of leading dimension 1 expanded."""
    if uncond is None:
        return None
    return {
        key: value.to(device).expand(n, *value.shape[1:])
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == 1
        else value
        for key, value in uncond.items()
    }


def _solver_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated extra keyword arguments of ``samplers.sample``, as JSON values."""
    allowed = ("t_grid", "rtol", "atol", "t_start", "t_end")
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"solver_options {unknown} not allowed; allowed: {', '.join(allowed)} (the other "
            "arguments of samplers.sample are set by generate_pairs)."
        )
    if isinstance(options.get("t_grid"), Tensor):
        options["t_grid"] = options["t_grid"].tolist()
    grid = options.get("t_grid")
    if isinstance(grid, str) and grid not in samplers.TIME_GRIDS:
        raise ValueError(
            f"t_grid {grid!r} is not a time grid; allowed: {', '.join(samplers.TIME_GRIDS)} "
            "(or a list of times)."
        )
    return json.loads(json.dumps(options))


#: solves of at least this many steps show their own bar of model evaluations (a huge --steps
#: would otherwise sit at "0 pairs" with no sign of life)
LONG_SOLVE_STEPS = 1000


def _solve_shard(
    model: Any,
    eps: Tensor,
    cond: dict[str, Tensor],
    settings: PairSettings,
    form: Form,
    batch_size: int,
    device: torch.device,
    uncond: Any,
    bar: Any,
) -> Tensor:

    x0_parts = []
    for start in range(0, eps.shape[0], batch_size):
        eps_batch = eps[start : start + batch_size].to(device)
        cond_batch = {key: v[start : start + batch_size].to(device) for key, v in cond.items()}
        x0 = samplers.sample(
            model,
            eps_batch,
            form=form,
            prediction=settings.prediction,
            solver=settings.solver,
            steps=settings.steps,
            cond=cond_batch or None,
            guidance=settings.guidance,
            uncond=_expand_uncond(uncond, eps_batch.shape[0], device),
            progress=settings.steps >= LONG_SOLVE_STEPS and not getattr(bar, "disable", True),
            **settings.solver_options,
        )
        x0_parts.append(x0.detach().to("cpu", DTYPES[settings.dtype]))
        bar.update(eps_batch.shape[0])
    return torch.cat(x0_parts)


def _make_shard(
    root: Path,
    k: int,
    model: Any,
    settings: PairSettings,
    form: Form,
    cond_fn: Callable[[int, Tensor], Mapping[str, Any]] | None,
    batch_size: int,
    device: torch.device,
    uncond: Any,
    bar: Any,
) -> dict[str, Any]:
    """Generate shard ``k``, write it atomically and return its manifest entry."""
    count, seed_k = settings.shard_count(k), shard_seed(settings.seed, k)
    eps = shard_noise(settings.seed, k, count, settings.shape, DTYPES[settings.dtype])
    indices = torch.arange(k * settings.shard_size, k * settings.shard_size + count)
    cond, texts = _split_cond(cond_fn(k, indices) if cond_fn else {}, count, k)
    x0 = _solve_shard(model, eps, cond, settings, form, batch_size, device, uncond, bar)
    if not bool(torch.isfinite(x0).all()):
        raise SolveError(
            f"shard {k}: the sampler returned non-finite x0; check that form, prediction and "
            "solver match the model (a wrong prediction type often diverges)."
        )
    name = shard_name(k)
    entry: dict[str, Any] = {"file": f"{name}.safetensors", "count": count, "seed": seed_k}
    if texts:
        text_bytes = (json.dumps(texts, ensure_ascii=False) + "\n").encode()
        write_bytes_atomic(root / f"{name}.json", text_bytes)
        entry |= {
            "text_file": f"{name}.json",
            "text_sha256": hashlib.sha256(text_bytes).hexdigest(),
        }
    tensors = ({"eps": eps} if settings.store_eps else {}) | {"x0": x0} | cond
    # One metadata key: safetensors writes a metadata dict in hash order, which differs
    # between processes and would make identical shards differ byte-wise.
    meta = {FORMAT_NAME: json.dumps({"shard": k, "count": count, "seed": seed_k})}
    data = safetensors_save({key: v.contiguous() for key, v in tensors.items()}, metadata=meta)
    write_bytes_atomic(root / entry["file"], data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    entry["bytes"] = len(data)
    entry["tensors"] = {
        key: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
        for key, v in tensors.items()
    }
    entry["text_keys"] = sorted(texts)
    return entry


def process_state() -> Any:
    """accelerate's process state; honours ACCELERATE_USE_CPU as ``Accelerator`` does.

    (``PartialState()`` alone ignores that variable and would make every process of
    ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`` think it is the only one.)
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _validate(
    num_pairs: int, shard_size: int, batch_size: int, steps: int, solver: str, dtype: torch.dtype
) -> None:
    for name, value in (
        ("num_pairs", num_pairs),
        ("shard_size", shard_size),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    samplers.check_steps(steps)  # before the manifest is written

    if solver not in samplers.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(samplers.SOLVERS)}.")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}.")


def generate_pairs(
    model: Any,
    *,
    form: Form,
    prediction: str,
    num_pairs: int,
    out: str | os.PathLike[str],
    solver: str = "dpmpp_2m",
    steps: int = 25,
    shard_size: int = 1024,
    seed: int = 0,
    batch_size: int = 256,
    shape: Sequence[int] | None = None,
    cond_fn: Callable[[int, Tensor], Mapping[str, Any]] | None = None,
    guidance: float | None = None,
    uncond: Any = None,
    solver_options: Mapping[str, Any] | None = None,
    model_description: str = "",
    store_eps: bool = True,
    dtype: torch.dtype = torch.float32,
    accelerator: Any = None,
    progress: bool = True,
    allow_other_model: bool = False,
) -> PairDataset:
    """Sample noise, solve it to x0_hat with ``samplers.sample`` and store the pairs in shards.

    Args:
        model: called as ``model(x_t, form.model_time(t), **cond)``; an ``nn.Module`` is moved
            to the process's device and put in eval mode while generating (its mode is restored).
        form: the form the model was trained in.
        prediction: what the model predicts: eps, x0, v or flow.
        num_pairs: number of pairs in the store.
        out: the store's folder (created; an existing store there is resumed).
        solver, steps: the sampler and its number of steps.
        shard_size: pairs per shard file.
        seed: the store's seed; shard k's noise comes from ``shard_seed(seed, k)``.
        batch_size: pairs per sampler call (does not change the pairs).
        shape: one sample's shape; inferred from ``model.sample_shape`` or a diffusers
            ``config`` (in_channels, sample_size) when None.
        cond_fn: ``cond_fn(shard_index, pair_indices) -> dict``; tensors with one row per
            pair are passed to the model (in batches) and stored in the shard, lists of
            strings (one per pair) are stored in ``shard_XXXXX.json`` only.
        guidance, uncond: classifier-free guidance scale and the unconditional keyword
            arguments of the model, passed to the sampler; uncond tensors with leading
            dimension 1 are expanded to each batch. Only ``guidance`` is recorded.
        solver_options: further keyword arguments of ``samplers.sample`` (t_grid, rtol, ...),
            recorded in the manifest.
        model_description: free text recorded in the manifest (and compared on resume).
        store_eps: False stores only x0 and the shard seed; eps is regenerated on read.
        dtype: dtype of the noise, the solve and the stored tensors.
        accelerator: an accelerate ``Accelerator`` or ``PartialState``; by default accelerate's
            ``PartialState`` (a single process unless started by ``accelerate launch``).
            Shard k is generated by process ``k % num_processes``.
        progress: show a tqdm bar on the main process.
        allow_other_model: resume a store although another model made it (its
            ``model_fingerprint``, the sha256 of the state_dict, differs) or it predates
            fingerprints: the store is adopted, its finished shards kept and this model's
            fingerprint recorded.

    Returns:
        A :class:`PairDataset` over the finished store (on every process).

    Raises:
        ValueError: bad arguments, or ``out`` holds a store made with other settings or by
            another model (the message names each differing setting with both values).
    """
    from tqdm.auto import tqdm

    _validate(num_pairs, shard_size, batch_size, steps, solver, dtype)
    state = accelerator if accelerator is not None else process_state()
    settings = PairSettings(
        form=form.config(),
        prediction=check_prediction(prediction),
        solver=solver,
        steps=steps,
        seed=int(seed),
        shard_size=shard_size,
        num_pairs=num_pairs,
        shape=infer_shape(model, shape),
        dtype=str(dtype).removeprefix("torch."),
        store_eps=bool(store_eps),
        guidance=None if guidance is None else float(guidance),
        solver_options=_solver_options(solver_options),
        model_description=model_description,
        model_fingerprint=model_fingerprint(model),
    )
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    # every process checks, before anyone writes
    manifest = check_settings(root, settings, allow_other_model)
    state.wait_for_everyone()
    if state.is_main_process:  # record the settings first, so an interrupted run is resumable
        for stale in root.glob(f".{MANIFEST}.*.tmp"):
            stale.unlink(missing_ok=True)
        shards = manifest["shards"] if manifest else []
        write_json_atomic(root / MANIFEST, new_manifest(settings, shards, complete=False), indent=1)

    mine = range(state.process_index, settings.num_shards, state.num_processes)
    device = torch.device(state.device)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.to(device).eval()
    total = sum(settings.shard_count(k) for k in mine)
    bar = tqdm(
        total=total, desc="pairs", unit="pair", disable=not (progress and state.is_main_process)
    )
    try:
        with torch.no_grad():
            for k in mine:
                for stale in root.glob(f".{shard_name(k)}.*.tmp"):  # left by a killed run
                    stale.unlink(missing_ok=True)
                entry = known_entry(root, manifest, k)
                if entry is None or entry_problem(
                    root, entry, settings.shard_count(k), shard_seed(settings.seed, k)
                ):
                    entry = _make_shard(
                        root, k, model, settings, form, cond_fn, batch_size, device, uncond, bar
                    )
                else:
                    bar.update(settings.shard_count(k))
                write_json_atomic(root / f"{shard_name(k)}.done.json", entry, indent=1)
    finally:
        bar.close()
        if was_training:
            model.train()

    state.wait_for_everyone()
    if state.is_main_process:
        merge_sidecars(root, settings)
    state.wait_for_everyone()
    return PairDataset(root)
