"""Rectification in any form: couplings from a teacher, a pair store, and students trained on them.

pairs     generate_pairs: a teacher's deterministic (eps, x0_hat) couplings, sharded, resumable,
          independent of the number of processes
store     the pair store on disk: manifest, safetensors shards, verification, PairDataset
coupling  Couplings in memory (eps, x0, cond), load_pairs, start_noise (the student's line)
student   rectify (one retraining), rectify_rounds (k-rectified), RectifyConfig
online    the one-object API Diffusion, and Reflow (pairs drawn on the fly)
"""

from __future__ import annotations

from .coupling import Couplings, load_pairs, start_noise
from .online import Diffusion, Reflow
from .pairs import generate_pairs, infer_shape, process_state
from .store import (
    FORMAT_VERSION,
    MANIFEST,
    PairDataset,
    PairSettings,
    PairStoreError,
    load_manifest,
    shard_noise,
    shard_seed,
    verify_store,
)
from .student import AtTime, RectifyConfig, RoundResult, rectify, rectify_rounds

__all__ = [
    "Couplings", "start_noise", "Diffusion", "Reflow", "generate_pairs", "infer_shape", "process_state", "FORMAT_VERSION",
    "MANIFEST", "PairDataset", "PairSettings", "PairStoreError", "load_manifest", "shard_noise",
    "shard_seed", "verify_store", "AtTime", "RectifyConfig", "RoundResult", "load_pairs",
    "rectify", "rectify_rounds",
]  # fmt: skip
