"""Rectification in any form: couplings from a teacher, a pair store, and students trained on them.

pairs     generate_pairs: a teacher's deterministic (eps, x0_hat) couplings, sharded, resumable,
          independent of the number of processes
store     the pair store on disk: manifest, safetensors shards, verification, PairDataset
verify    a store checked before training: manifest, sizes, sha256, shapes, dtypes, finiteness,
          and the model, form and prediction that made it
coupling  Couplings in memory (eps, x0, cond), load_pairs, start_noise (the student's line)
student   rectify (one retraining), rectify_rounds (k-rectified), RectifyConfig
phased    rectify_phased: K windows, one first-order step each (Rectified Diffusion's phased
          variant, PeRFlow), phase_edges, the phased loss
windows   window couplings: the teacher's solve in each window as a first-order line, from
          noised data, a pair's line or the teacher's own path
online    the one-object API Diffusion, and Reflow (pairs drawn on the fly)
"""

from __future__ import annotations

from .coupling import Couplings, load_pairs, start_noise
from .online import Diffusion, Reflow
from .pairs import generate_pairs, infer_shape, process_state
from .phased import PhasedResult, phase_edges, phased_loss, rectify_phased, window_grid
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
from .verify import verified_shards, verify_pairs
from .windows import WindowCouplings, window_couplings, window_line

__all__ = [
    "Couplings", "start_noise", "Diffusion", "Reflow", "generate_pairs", "infer_shape", "process_state", "FORMAT_VERSION",
    "MANIFEST", "PairDataset", "PairSettings", "PairStoreError", "load_manifest", "shard_noise",
    "shard_seed", "verify_store", "AtTime", "RectifyConfig", "RoundResult", "load_pairs",
    "rectify", "rectify_rounds", "rectify_phased", "phase_edges", "phased_loss",
    "window_couplings", "window_grid", "window_line", "WindowCouplings", "PhasedResult",
    "verified_shards", "verify_pairs",
]  # fmt: skip
