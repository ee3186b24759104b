"""Couplings: deterministic (eps, x0_hat) pairs from a pretrained model, in a sharded store.

A coupling pairs the standard-normal noise ``eps`` a sampler starts from
(``x = sigma(t_max) * eps``) with the sample ``x0_hat`` it ends at. Rectification retrains a
model on these pairs (Liu et al. 2023, "Flow Straight and Fast", Algorithm 1; Wang et al.
2024, "Rectified Diffusion", sec. 3), in any form, so the store keeps the *standard-normal*
eps and the settings that made the pairs. ``x0`` is what ``samplers.sample`` returns: for
solvers ending at sigma = 0 the x0-prediction of the last evaluation; for VE the state at
sigma_min.

Store layout (the folder ``out``)::

    manifest.json               format version, settings, per shard {file, count, sha256, ...}
    shard_00000.safetensors     eps (count, *shape) [unless store_eps=False], x0, cond tensors
    shard_00000.json            lists of strings returned by cond_fn (only when there are any)
    shard_00000.done.json       per-shard record of a run in progress; merged, then removed

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
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor, nn
from torch.utils.data import Dataset

from ._files import write_bytes_atomic, write_json_atomic
from .forms import Form
from .predictions import check_prediction

__all__ = [
    "FORMAT_VERSION",
    "PairSettings",
    "PairStoreError",
    "PairDataset",
    "generate_pairs",
    "load_manifest",
    "verify_store",
    "shard_seed",
    "shard_noise",
]

#: version of the manifest and shard layout written by this module
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FORMAT_NAME = "rectdiff-pairs"
_EPS_DERIVATION = (
    "eps of shard k = torch.randn((count, *shape), generator=torch.Generator('cpu')"
    ".manual_seed(shard seed), dtype=float64 if dtype == 'float64' else float32).to(dtype); "
    "shard seed = int.from_bytes(sha256(f'rectdiff.pairs:{seed}:{k}').digest()[:8], 'little')"
    " % 2**63"
)
_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class PairStoreError(RuntimeError):
    """A pair store that is missing, incomplete or corrupted."""


@dataclass(frozen=True)
class PairSettings:
    """Everything that determines the pairs of a store; a resumed run must match it exactly.

    ``batch_size``, the number of processes and the progress bar are not settings: the pairs
    do not depend on them (see the module docstring for adaptive solvers).
    """

    form: dict[str, Any]
    prediction: str
    solver: str
    steps: int
    seed: int
    shard_size: int
    num_pairs: int
    shape: list[int]
    dtype: str = "float32"
    store_eps: bool = True
    guidance: float | None = None
    solver_options: dict[str, Any] = field(default_factory=dict)
    model_description: str = ""

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_pairs / self.shard_size)

    def shard_count(self, k: int) -> int:
        """Number of pairs in shard ``k`` (the last shard may be short)."""
        return min(self.shard_size, self.num_pairs - k * self.shard_size)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (what ``manifest.json`` holds)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PairSettings:
        return cls(**data)

    def differences(self, stored: Mapping[str, Any]) -> list[str]:
        """Human-readable list of the settings where ``stored`` differs from these."""
        return _differences(stored, self.to_json(), "")


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(stored: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in list(stored) + [k for k in current if k not in stored]:
            name = f"{prefix}.{key}" if prefix else key
            out += _differences(stored.get(key, "<absent>"), current.get(key, "<absent>"), name)
        return out
    if stored == current:
        return []
    return [f"{prefix}: {_short(stored)} in the manifest, {_short(current)} now"]


# --- noise ------------------------------------------------------------------------------
def shard_seed(seed: int, k: int) -> int:
    """Seed of shard ``k``: sha256("rectdiff.pairs:{seed}:{k}")'s first 8 bytes, mod 2**63."""
    digest = hashlib.sha256(f"rectdiff.pairs:{int(seed)}:{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def shard_noise(
    seed: int, k: int, count: int, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """The standard-normal eps of shard ``k`` (CPU, ``(count, *shape)``), drawn in one go."""
    generator = torch.Generator("cpu").manual_seed(shard_seed(seed, k))
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.randn((count, *shape), generator=generator, dtype=draw_dtype)
    return eps.to(dtype)


# --- files ------------------------------------------------------------------------------
def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_manifest(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``out/manifest.json``.

    Raises:
        PairStoreError: if it is missing, unreadable, or of another format or a newer version.
    """
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise PairStoreError(
            f"no {MANIFEST} in {str(out)!r}: not a pair store (make one with generate_pairs)."
        )
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT_NAME:
        raise PairStoreError(
            f"{path} is not a rectdiff pair manifest (unreadable or other format)."
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise PairStoreError(
            f"{path} has format version {manifest['format_version']}, newer than this rectdiff "
            f"reads ({FORMAT_VERSION}); upgrade rectdiff."
        )
    return manifest


def _entry_problem(root: Path, entry: Mapping[str, Any], count: int, seed_k: int) -> str | None:
    """Why a shard entry does not match its files, or None when it does."""
    if entry.get("count") != count or entry.get("seed") != seed_k:
        return f"{entry.get('file')}: count/seed differ from the settings"
    path = root / entry["file"]
    if not path.is_file():
        return f"{entry['file']}: missing"
    if _sha256_file(path) != entry.get("sha256"):
        return f"{entry['file']}: sha256 mismatch (corrupted or partly written)"
    if entry.get("text_file"):
        text_path = root / entry["text_file"]
        if not text_path.is_file() or _sha256_file(text_path) != entry.get("text_sha256"):
            return f"{entry['text_file']}: missing or sha256 mismatch"
    return None


def verify_store(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that a store is complete and that every shard file has its recorded sha256.

    Returns:
        The manifest.

    Raises:
        PairStoreError: naming every bad shard; run ``generate_pairs`` again with the same
            settings to regenerate them.
    """
    root = Path(out)
    manifest = load_manifest(root)
    settings = PairSettings.from_json(manifest["settings"])
    problems = [] if manifest.get("complete") else ["generation has not finished"]
    shards = manifest.get("shards", [])
    if len(shards) != settings.num_shards:
        problems.append(f"{len(shards)} shard entries, expected {settings.num_shards}")
    for k, entry in enumerate(shards):
        problem = _entry_problem(root, entry, settings.shard_count(k), shard_seed(settings.seed, k))
        if problem:
            problems.append(problem)
    if problems:
        raise PairStoreError(
            f"pair store {str(root)!r} is not intact: " + "; ".join(problems) + ". Run "
            "generate_pairs again into this folder with the same settings to regenerate it."
        )
    return manifest


# --- generation -------------------------------------------------------------------------
def _infer_shape(model: Any, shape: Sequence[int] | None) -> list[int]:
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
    return json.loads(json.dumps(options))


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
    from . import samplers

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
            **settings.solver_options,
        )
        x0_parts.append(x0.detach().to("cpu", _DTYPES[settings.dtype]))
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
    eps = shard_noise(settings.seed, k, count, settings.shape, _DTYPES[settings.dtype])
    indices = torch.arange(k * settings.shard_size, k * settings.shard_size + count)
    cond, texts = _split_cond(cond_fn(k, indices) if cond_fn else {}, count, k)
    x0 = _solve_shard(model, eps, cond, settings, form, batch_size, device, uncond, bar)
    if not bool(torch.isfinite(x0).all()):
        raise FloatingPointError(
            f"shard {k}: the sampler returned non-finite x0; check that form, prediction and "
            "solver match the model (a wrong prediction type often diverges)."
        )
    name = _shard_name(k)
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
    meta = {_FORMAT_NAME: json.dumps({"shard": k, "count": count, "seed": seed_k})}
    data = safetensors_save({key: v.contiguous() for key, v in tensors.items()}, metadata=meta)
    write_bytes_atomic(root / entry["file"], data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    entry["tensors"] = {
        key: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
        for key, v in tensors.items()
    }
    entry["text_keys"] = sorted(texts)
    return entry


def _known_entry(root: Path, manifest: Mapping[str, Any] | None, k: int) -> dict[str, Any] | None:
    """The record of shard ``k`` from its ``.done.json`` or the manifest, if any.

    Without a manifest nothing is trusted: records are only written once a manifest holds
    the settings, so files found without one may come from other settings.
    """
    if manifest is None:
        return None
    sidecar = _read_json(root / f"{_shard_name(k)}.done.json")
    if isinstance(sidecar, dict) and "sha256" in sidecar:
        return sidecar
    shards = (manifest or {}).get("shards", [])
    return shards[k] if k < len(shards) and isinstance(shards[k], dict) else None


def _new_manifest(settings: PairSettings, shards: list[dict[str, Any]], complete: bool) -> dict:
    return {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "settings": settings.to_json(),
        "num_pairs": settings.num_pairs,
        "num_shards": settings.num_shards,
        "eps_derivation": _EPS_DERIVATION,
        "shards": shards,
    }


def _check_settings(root: Path, settings: PairSettings) -> dict[str, Any] | None:
    """The existing manifest if its settings equal ``settings``; raise ValueError otherwise."""
    if not (root / MANIFEST).exists():
        return None
    manifest = load_manifest(root)
    differences = settings.differences(manifest["settings"])
    if differences:
        raise ValueError(
            f"{root / MANIFEST} was made with other settings: " + "; ".join(differences) + ". "
            "Generate into another folder, or use the manifest's settings to resume."
        )
    return manifest


def _default_state() -> Any:
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
        ("steps", steps),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    from . import samplers  # lazily: samplers sits above this module's other neighbours

    if solver not in samplers.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(samplers.SOLVERS)}.")
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}.")


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

    Returns:
        A :class:`PairDataset` over the finished store (on every process).

    Raises:
        ValueError: bad arguments, or ``out`` holds a store made with other settings (the
            message names each differing setting with both values).
    """
    from tqdm.auto import tqdm

    _validate(num_pairs, shard_size, batch_size, steps, solver, dtype)
    state = accelerator if accelerator is not None else _default_state()
    settings = PairSettings(
        form=form.config(),
        prediction=check_prediction(prediction),
        solver=solver,
        steps=steps,
        seed=int(seed),
        shard_size=shard_size,
        num_pairs=num_pairs,
        shape=_infer_shape(model, shape),
        dtype=str(dtype).removeprefix("torch."),
        store_eps=bool(store_eps),
        guidance=None if guidance is None else float(guidance),
        solver_options=_solver_options(solver_options),
        model_description=model_description,
    )
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    manifest = _check_settings(root, settings)  # every process checks, before anyone writes
    state.wait_for_everyone()
    if state.is_main_process:  # record the settings first, so an interrupted run is resumable
        for stale in root.glob(f".{MANIFEST}.*.tmp"):
            stale.unlink(missing_ok=True)
        shards = manifest["shards"] if manifest else []
        write_json_atomic(
            root / MANIFEST, _new_manifest(settings, shards, complete=False), indent=1
        )

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
                for stale in root.glob(f".{_shard_name(k)}.*.tmp"):  # left by a killed run
                    stale.unlink(missing_ok=True)
                entry = _known_entry(root, manifest, k)
                if entry is None or _entry_problem(
                    root, entry, settings.shard_count(k), shard_seed(settings.seed, k)
                ):
                    entry = _make_shard(
                        root, k, model, settings, form, cond_fn, batch_size, device, uncond, bar
                    )
                else:
                    bar.update(settings.shard_count(k))
                write_json_atomic(root / f"{_shard_name(k)}.done.json", entry, indent=1)
    finally:
        bar.close()
        if was_training:
            model.train()

    state.wait_for_everyone()
    if state.is_main_process:
        _merge_sidecars(root, settings)
    state.wait_for_everyone()
    return PairDataset(root)


def _merge_sidecars(root: Path, settings: PairSettings) -> None:
    """Main process: collect every ``.done.json`` into a complete manifest, then remove them."""
    sidecars = [root / f"{_shard_name(k)}.done.json" for k in range(settings.num_shards)]
    shards = [_read_json(path) for path in sidecars]
    missing = [path.name for path, entry in zip(sidecars, shards, strict=True) if entry is None]
    if missing:
        raise PairStoreError(
            f"shards without a record after every process finished: {', '.join(missing[:10])}. "
            "A process failed; run generate_pairs again to resume."
        )
    write_json_atomic(root / MANIFEST, _new_manifest(settings, shards, complete=True), indent=1)
    for path in sidecars:
        path.unlink(missing_ok=True)


# --- reading ----------------------------------------------------------------------------
class PairDataset(Dataset):
    """Random access to a pair store: ``ds[i] -> {"eps", "x0", **cond}``.

    Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped; one row is read
    per item) and at most ``max_open_shards`` stay open, so memory stays flat as the store
    grows. With ``store_eps=False`` a shard's eps is regenerated from its seed when the shard
    is opened (bit-identical to the eps used in generation). Safe to use in DataLoader
    workers: open handles are not pickled.

    Args:
        out: the store's folder.
        verify: check every shard's sha256 first (:meth:`verify`).
        max_open_shards: size of the LRU of open shards.

    Raises:
        PairStoreError: missing, incomplete or (with ``verify=True``) corrupted store.
    """

    def __init__(
        self, out: str | os.PathLike[str], verify: bool = False, max_open_shards: int = 4
    ) -> None:
        self.root = Path(out)
        self._manifest = load_manifest(self.root)
        if not self._manifest.get("complete"):
            raise PairStoreError(
                f"pair store {str(self.root)!r} is incomplete (generation was interrupted); "
                "run generate_pairs again into it with the same settings to finish it."
            )
        self.settings = PairSettings.from_json(self._manifest["settings"])
        self._shards = self._manifest["shards"]
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, tuple[Any, Tensor | None, dict[str, list[str]]]] = (
            OrderedDict()
        )
        if verify:
            self.verify()

    @property
    def manifest(self) -> dict[str, Any]:
        """The store's manifest (a copy)."""
        return json.loads(json.dumps(self._manifest))

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        return self.settings.num_pairs

    def verify(self) -> None:
        """Check that every shard file has its recorded sha256 (raises PairStoreError)."""
        verify_store(self.root)

    def _shard(self, k: int) -> tuple[Any, Tensor | None, dict[str, list[str]]]:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        entry = self._shards[k]
        handle = safe_open(str(self.root / entry["file"]), framework="pt")
        eps = None
        if not self.settings.store_eps:
            eps = shard_noise(
                self.settings.seed,
                k,
                entry["count"],
                self.settings.shape,
                _DTYPES[self.settings.dtype],
            )
        texts = (
            json.loads((self.root / entry["text_file"]).read_text())
            if entry.get("text_file")
            else {}
        )
        self._open[k] = (handle, eps, texts)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return self._open[k]

    def shard(self, k: int) -> dict[str, Any]:
        """All pairs of shard ``k`` at once: ``{"eps": (count, ...), "x0": ..., **cond}``."""
        handle, eps, texts = self._shard(k)
        items: dict[str, Any] = {} if eps is None else {"eps": eps.clone()}
        items |= {key: handle.get_tensor(key) for key in handle.keys()}
        return items | {key: list(value) for key, value in texts.items()}

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"pair index {index} out of range for a store of {n} pairs.")
        index %= n
        k = index // self.settings.shard_size
        row = index - k * self.settings.shard_size
        handle, eps, texts = self._shard(k)
        item: dict[str, Any] = {} if eps is None else {"eps": eps[row].clone()}
        keys = sorted(handle.keys(), key=lambda key: (key not in ("eps", "x0"), key))
        item |= {key: handle.get_slice(key)[row : row + 1][0] for key in keys}
        return item | {key: value[row] for key, value in texts.items()}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"PairDataset({str(self.root)!r}, {s.num_pairs} pairs in {self.num_shards} shards, "
            f"{s.form.get('family')} / {s.prediction} / {s.solver} x {s.steps})"
        )
