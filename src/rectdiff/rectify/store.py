"""The pair store: sharded, checksummed, resumable storage of (eps, x0_hat) couplings.

Written by :func:`rectdiff.rectify.pairs.generate_pairs`, read by :class:`PairDataset`.

Store layout (the folder ``out``)::

    manifest.json               format version, settings, per shard {file, count, sha256, ...}
    shard_00000.safetensors     eps (count, *shape) [unless store_eps=False], x0, cond tensors
    shard_00000.json            lists of strings returned by cond_fn (only when there are any)
    shard_00000.done.json       per-shard record of a run in progress; merged, then removed

The noise of shard k is drawn from a generator seeded by :func:`shard_seed` ``(seed, k)``
(:func:`shard_noise`), so a store with ``store_eps=False`` keeps only that seed and
regenerates eps bit-identically when read. :func:`verify_store` re-hashes every shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import StoreError
from ..io.files import write_json_atomic
from ..io.resume import setting_differences
from .fingerprint import KEY as FINGERPRINT
from .fingerprint import check_fingerprint

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "PairSettings",
    "PairStoreError",
    "PairDataset",
    "load_manifest",
    "verify_store",
    "shard_seed",
    "shard_noise",
    "shard_name",
    "new_manifest",
    "check_settings",
    "entry_problem",
    "known_entry",
    "merge_sidecars",
    "DTYPES",
    "FORMAT_NAME",
]

#: version of the manifest and shard layout written by this module
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FORMAT_NAME = "rectdiff-pairs"
_EPS_DERIVATION = (
    "eps of shard k = torch.randn((count, *shape), generator=torch.Generator('cpu')"
    ".manual_seed(shard seed), dtype=float64 if dtype == 'float64' else float32).to(dtype); "
    "shard seed = int.from_bytes(sha256(f'rectdiff.pairs:{seed}:{k}').digest()[:8], 'little')"
    " % 2**63"
)
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class PairStoreError(StoreError):
    """A pair store that is missing, incomplete, corrupted or made by another model (a
    :class:`~rectdiff.errors.StoreError`, hence also a ``RuntimeError``)."""


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
    model_fingerprint: str | None = None

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
        return setting_differences(stored, self.to_json(), "in the manifest")


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
def shard_name(k: int) -> str:
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise PairStoreError(
            f"{path} is not a rectdiff pair manifest (unreadable or other format)."
        )
    version, shards = manifest.get("format_version", 0), manifest.get("shards", [])
    rerun = "was edited or damaged: rerun the command that made the store to repair it."
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise PairStoreError(f"{path}: format_version = {version!r}; expected an integer "
                             f"<= {FORMAT_VERSION}. The manifest {rerun}")  # fmt: skip
    if not isinstance(shards, list) or not all(isinstance(e, dict) for e in shards):
        raise PairStoreError(f"{path}: shards = {shards!r:.60}; expected a list of shard "
                             f"entries. The manifest {rerun}")  # fmt: skip
    if version > FORMAT_VERSION:
        raise PairStoreError(
            f"{path} has format version {manifest['format_version']}, newer than this rectdiff "
            f"reads ({FORMAT_VERSION}); upgrade rectdiff."
        )
    return manifest


def entry_problem(root: Path, entry: Mapping[str, Any], count: int, seed_k: int) -> str | None:
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
        problem = entry_problem(root, entry, settings.shard_count(k), shard_seed(settings.seed, k))
        if problem:
            problems.append(problem)
    if problems:
        raise PairStoreError(
            f"pair store {str(root)!r} is not intact: " + "; ".join(problems) + ". Run "
            "generate_pairs again into this folder with the same settings to regenerate it."
        )
    return manifest


# --- generation -------------------------------------------------------------------------
def known_entry(root: Path, manifest: Mapping[str, Any] | None, k: int) -> dict[str, Any] | None:
    """The record of shard ``k`` from its ``.done.json`` or the manifest, if any.

    Without a manifest nothing is trusted: records are only written once a manifest holds
    the settings, so files found without one may come from other settings.
    """
    if manifest is None:
        return None
    sidecar = _read_json(root / f"{shard_name(k)}.done.json")
    if isinstance(sidecar, dict) and "sha256" in sidecar:
        return sidecar
    shards = (manifest or {}).get("shards", [])
    return shards[k] if k < len(shards) and isinstance(shards[k], dict) else None


def new_manifest(settings: PairSettings, shards: list[dict[str, Any]], complete: bool) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": complete,
        "settings": settings.to_json(),
        "num_pairs": settings.num_pairs,
        "num_shards": settings.num_shards,
        "eps_derivation": _EPS_DERIVATION,
        "shards": shards,
    }


def check_settings(
    root: Path, settings: PairSettings, allow_other_model: bool = False
) -> dict[str, Any] | None:
    """The existing manifest if its settings equal ``settings`` and it was made by the same
    model (:func:`~.fingerprint.check_fingerprint`); raise ValueError otherwise."""
    if not (root / MANIFEST).exists():
        # only an empty folder (or one holding an interrupted write's temporary files) is new
        foreign = sorted(p.name for p in root.iterdir()
                         if not (p.name.startswith(".") and ".tmp" in p.name))  # fmt: skip
        if foreign:
            shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise PairStoreError(
                f"out {str(root)!r} holds files but no {MANIFEST} ({shown}): not a pair store "
                "to resume, and rectdiff writes only into a new or empty folder or its own "
                "store; choose another folder."
            )
        return None
    manifest = load_manifest(root)
    stored = dict(manifest["settings"])
    check_fingerprint(root, stored, settings.model_fingerprint, allow_other_model)
    stored[FINGERPRINT] = settings.model_fingerprint  # checked (or allowed) above
    differences = settings.differences(stored)
    if differences:
        raise ValueError(
            f"{root / MANIFEST} was made with other settings: " + "; ".join(differences) + ". "
            "Generate into another folder, or use the manifest's settings to resume."
        )
    return manifest


def merge_sidecars(root: Path, settings: PairSettings) -> None:
    """Main process: collect every ``.done.json`` into a complete manifest, then remove them."""
    sidecars = [root / f"{shard_name(k)}.done.json" for k in range(settings.num_shards)]
    shards = [_read_json(path) for path in sidecars]
    missing = [path.name for path, entry in zip(sidecars, shards, strict=True) if entry is None]
    if missing:
        raise PairStoreError(
            f"shards without a record after every process finished: {', '.join(missing[:10])}. "
            "A process failed; run generate_pairs again to resume."
        )
    write_json_atomic(root / MANIFEST, new_manifest(settings, shards, complete=True), indent=1)
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
        try:
            handle = safe_open(str(self.root / entry["file"]), framework="pt")
        except (OSError, SafetensorError) as err:
            raise PairStoreError(
                f"pair store {str(self.root)!r}: {entry['file']}: not a readable safetensors "
                f"file ({' '.join(str(err).split())}); rerun the command that made the store "
                "(`rectdiff pairs` or `rectdiff sd pairs`) to repair it."
            ) from err
        eps = None
        if not self.settings.store_eps:
            eps = shard_noise(
                self.settings.seed,
                k,
                entry["count"],
                self.settings.shape,
                DTYPES[self.settings.dtype],
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
