"""The pair store: determinism, multi-process identity, resume after a kill, corruption, reading.

The processes here are real: ``accelerate launch`` with two CPU processes, and a generation
killed with SIGKILL. The models are closed-form (rectdiff.oracles) or a small MLP.
"""

import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _pairs_worker as worker
import pytest
import torch
from safetensors.torch import load_file
from shared import F64
from torch import nn

from rectdiff import forms
from rectdiff.oracles import CouplingOracle
from rectdiff.rectify import pairs as couplings
from rectdiff.rectify.pairs import PairDataset, PairStoreError, generate_pairs, verify_store

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
N_SHARDS = 4  # worker.SETTINGS: 56 pairs in shards of 16 -> 16, 16, 16, 8
#: model calls of ddim per batch: one per step, none at t_end (the samplers contract)
CALLS_PER_BATCH = worker.SETTINGS["steps"]
BATCHES = [4, 4, 4, 2]  # per shard, batch_size 4


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard_*"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The worker's store generated once, uninterrupted, in this (single) process."""
    out = tmp_path_factory.mktemp("reference") / "pairs"
    worker.run(str(out))
    return out


# --- noise and manifest ----------------------------------------------------------------
def test_shard_noise_follows_the_documented_derivation(reference):
    seed = worker.SETTINGS["seed"]
    manifest = couplings.load_manifest(reference)
    for k, entry in enumerate(manifest["shards"]):
        digest = hashlib.sha256(f"rectdiff.pairs:{seed}:{k}".encode()).digest()
        seed_k = int.from_bytes(digest[:8], "little") % 2**63
        generator = torch.Generator().manual_seed(seed_k)
        eps = torch.randn((entry["count"], 3), generator=generator)
        assert entry["seed"] == seed_k
        assert torch.equal(load_file(reference / entry["file"])["eps"], eps)
    assert len({e["seed"] for e in manifest["shards"]}) == N_SHARDS


def test_manifest_records_settings_counts_and_checksums(reference):
    manifest = couplings.load_manifest(reference)
    settings = manifest["settings"]
    assert manifest["format_version"] == couplings.FORMAT_VERSION and manifest["complete"]
    assert settings["form"] == forms.VP().config()
    for key in ("prediction", "solver", "steps", "seed", "shard_size", "num_pairs"):
        assert settings[key] == worker.SETTINGS[key]
    assert settings["shape"] == [3] and settings["dtype"] == "float32" and settings["store_eps"]
    assert [e["count"] for e in manifest["shards"]] == [16, 16, 16, 8]
    assert [e["sha256"] for e in manifest["shards"]] == [
        sha256(reference / f"shard_{k:05d}.safetensors") for k in range(N_SHARDS)
    ]
    # no sidecar or temporary file is left once generation has finished
    assert sorted(p.name for p in reference.iterdir()) == ["manifest.json"] + [
        f"shard_{k:05d}.safetensors" for k in range(N_SHARDS)
    ]


# --- the pairs themselves ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("form", "prediction"), [(forms.VP(), "eps"), (forms.FlowMatching(), "flow"), (forms.VE(), "v")]
)
def test_pairs_of_a_first_order_model_are_its_coupling(tmp_path, form, prediction):
    """A first-order model's x0- and eps-predictions are constant along its ODE trajectories
    (Rectified Diffusion, Theorem 1), so every solver is exact: from x = sigma_1 eps (alpha_1 x0
    is not in it) the model reads eps' = (sigma_1 eps - alpha_1 shift) / (alpha_1 scale +
    sigma_1), and the solve ends at x = alpha_0 (shift + scale eps') + sigma_0 eps' (sigma_0 = 0
    but for VE). The stored x0 must be that of the stored eps, row by row. In float64, so that
    the 1/alpha_1 of eps-prediction (150 for VP) does not amplify rounding."""
    scale, shift = torch.tensor([0.5, -1.5], dtype=F64), torch.tensor([2.0, 0.25], dtype=F64)
    model = CouplingOracle(form, prediction, scale=scale, shift=shift)
    pairs = generate_pairs(
        model, form=form, prediction=prediction, num_pairs=24, out=tmp_path, shard_size=10,
        batch_size=7, shape=(2,), steps=3, dtype=torch.float64, progress=False,
    )  # fmt: skip
    eps = torch.stack([pairs[i]["eps"] for i in range(len(pairs))])
    assert eps.dtype == torch.float64
    x0 = torch.stack([pairs[i]["x0"] for i in range(len(pairs))])
    alpha_1, sigma_1 = float(form.alpha(form.t_max)), float(form.sigma(form.t_max))
    eps_start = (sigma_1 * eps - alpha_1 * shift) / (alpha_1 * scale + sigma_1)
    alpha_0, sigma_0 = float(form.alpha(0.0)), float(form.sigma(0.0))
    expected = alpha_0 * (shift + scale * eps_start) + sigma_0 * eps_start
    torch.testing.assert_close(x0, expected, rtol=0, atol=1e-12)


class MLP(nn.Module):
    """A small time-conditioned network: float32 dense layers."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim + 1, 64), nn.SiLU(), nn.Linear(64, dim))

    def forward(self, x_t: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, model_time[:, None]], dim=1))


def test_pairs_do_not_depend_on_the_batch_size(tmp_path):
    model, form = MLP(), forms.FlowMatching()
    common = dict(form=form, prediction="flow", num_pairs=40, shard_size=16, shape=(3,),
                  solver="ddim", steps=4, progress=False)  # fmt: skip
    stores = {
        b: generate_pairs(model, out=tmp_path / f"b{b}", batch_size=b, **common) for b in (1, 7, 16)
    }
    shards = {b: [s.shard(k) for k in range(s.num_shards)] for b, s in stores.items()}
    for b in (1, 7):
        for got, ref in zip(shards[b], shards[16], strict=True):
            assert torch.equal(got["eps"], ref["eps"])  # the noise: bit-identical
            # Dense layers round differently in the last bit for other batch shapes (CPU GEMM
            # kernels; measured 9e-8 on one layer); 4 steps of x = x + (t' - t) u on |x| <~ 4
            # keep that below a few float32 ulps of |x|: 2**-23 * 4 * 8 = 4e-6.
            torch.testing.assert_close(got["x0"], ref["x0"], rtol=0, atol=4e-6)
    # the same batch size reproduces the store byte for byte
    again = generate_pairs(model, out=tmp_path / "again", batch_size=7, **common)
    assert shard_files(again.root) == shard_files(stores[7].root)


def test_elementwise_model_pairs_are_bit_identical_across_batch_sizes(tmp_path, reference):
    """The Gaussian oracle is elementwise arithmetic, so even x0 is exact at any batch size."""
    worker.run(str(tmp_path / "b1"), batch_size=1)
    worker.run(str(tmp_path / "b56"), batch_size=56)
    assert shard_files(tmp_path / "b1") == shard_files(reference) == shard_files(tmp_path / "b56")


# --- processes --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:  # accelerate's default 29500 may be taken by another run
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_write_the_same_shards_as_one(tmp_path, reference):
    out, report = tmp_path / "pairs", tmp_path / "report"
    report.mkdir()
    cmd = [str(Path(PYTHON).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "rectify" / "_pairs_worker.py"), str(out), "--report", str(report)]  # fmt: skip
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in report.glob("*.json"))}
    assert sorted(ranks) == [0, 1] and {r["num_processes"] for r in ranks.values()} == {2}
    # process r did shards k = r mod 2: shards 0 and 2, and shards 1 and 3 (the short one)
    assert ranks[0]["nfe"] == CALLS_PER_BATCH * (BATCHES[0] + BATCHES[2])
    assert ranks[1]["nfe"] == CALLS_PER_BATCH * (BATCHES[1] + BATCHES[3])
    assert shard_files(out) == shard_files(reference)
    assert couplings.load_manifest(out)["shards"] == couplings.load_manifest(reference)["shards"]


def test_resume_after_a_kill_mid_shard_loses_and_duplicates_nothing(tmp_path, reference):
    out = tmp_path / "pairs"
    calls = tmp_path / "calls.log"
    cmd = [PYTHON, str(ROOT / "tests" / "rectify" / "_pairs_worker.py"), str(out), "--delay", "0.05",
           "--calls", str(calls)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # shards 0 and 1 take 2 x 8 calls; kill after the second call of shard 2 (of 8)
    in_shard_2 = CALLS_PER_BATCH * (BATCHES[0] + BATCHES[1]) + 2
    try:
        deadline = time.monotonic() + 300  # a hang guard: start-up alone is slow on busy cores
        while not calls.exists() or len(calls.read_text()) < 2 * in_shard_2:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the worker never reached shard 2"
            time.sleep(0.005)
        assert (out / "shard_00001.done.json").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "shard_00002.done.json").exists()  # it really died mid-shard
    assert not couplings.load_manifest(out)["complete"]
    with pytest.raises(PairStoreError, match="incomplete"):
        PairDataset(out)
    # What a kill during a write would leave: a half-written temporary file, and (from a
    # writer without the rename) a truncated shard file with no record.
    half = (reference / "shard_00003.safetensors").read_bytes()
    (out / ".shard_00002.safetensors.99999.tmp").write_bytes(half[: len(half) // 2])
    (out / "shard_00003.safetensors").write_bytes(half[: len(half) // 2])

    pairs, nfe = worker.run(str(out))
    assert nfe == CALLS_PER_BATCH * (BATCHES[2] + BATCHES[3])  # only shards 2 and 3 redone
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert shard_files(out) == shard_files(reference)
    eps = torch.stack([pairs[i]["eps"] for i in range(len(pairs))])
    assert len(pairs) == eps.shape[0] == 56 and torch.unique(eps, dim=0).shape[0] == 56
    verify_store(out)


def test_a_corrupted_shard_is_detected_and_regenerated(tmp_path, reference):
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    path = out / "shard_00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one byte of x0
    path.write_bytes(bytes(data))
    with pytest.raises(PairStoreError, match="shard_00001.safetensors: sha256 mismatch"):
        verify_store(out)
    with pytest.raises(PairStoreError, match="shard_00001"):
        PairDataset(out, verify=True)
    _, nfe = worker.run(str(out))
    assert nfe == CALLS_PER_BATCH * BATCHES[1]  # that shard alone
    assert shard_files(out) == shard_files(reference)
    PairDataset(out, verify=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 3}, "steps: 2 in the manifest, 3 now"),
        ({"seed": 8}, "seed: 7 in the manifest, 8 now"),
        ({"form": forms.FlowMatching()}, 'form.family: "vp" in the manifest, "fm" now'),
        ({"form": forms.VP(beta_max=10.0)}, "form.beta_max: 20.0 in the manifest, 10.0 now"),
    ],
)
def test_a_store_made_with_other_settings_is_refused(tmp_path, reference, change, message):
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=message):
        worker.run(str(out), **change)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched


# --- reading ----------------------------------------------------------------------------
def test_store_eps_false_halves_the_store_and_reads_back_the_same_eps(tmp_path):
    full, _ = worker.run(str(tmp_path / "full"), shape=(64,))
    lean, _ = worker.run(str(tmp_path / "lean"), shape=(64,), store_eps=False)
    size = {s: sum(p.stat().st_size for p in s.root.glob("shard_*")) for s in (full, lean)}
    assert 0.5 <= size[lean] / size[full] < 0.51  # measured: only the small headers differ
    for i in range(len(full)):
        assert torch.equal(lean[i]["eps"], full[i]["eps"]) and torch.equal(
            lean[i]["x0"], full[i]["x0"]
        )
    assert torch.equal(lean.shard(3)["eps"], full.shard(3)["eps"])


class CenterModel(nn.Module):
    """x0-prediction model whose answer is its conditioning: x0_pred = center (first-order)."""

    def forward(
        self, x_t: torch.Tensor, model_time: torch.Tensor, center: torch.Tensor
    ) -> torch.Tensor:
        return center.to(x_t.dtype)


def test_random_access_returns_the_stored_pairs_and_conditioning(tmp_path):
    def cond_fn(k, indices):
        center = torch.stack([indices.double(), -indices.double()], dim=1)
        return {"center": center, "prompt": [f"pair {int(i)} of shard {k}" for i in indices]}

    form = forms.SubVP()
    pairs = generate_pairs(
        CenterModel(), form=form, prediction="x0", num_pairs=45, out=tmp_path, shard_size=10,
        batch_size=4, shape=(2,), steps=3, cond_fn=cond_fn, progress=False,
    )  # fmt: skip
    # independent read of every shard file
    shards = [load_file(tmp_path / f"shard_{k:05d}.safetensors") for k in range(5)]
    eps = torch.cat([s["eps"] for s in shards])
    x0 = torch.cat([s["x0"] for s in shards])
    center = torch.cat([s["center"] for s in shards])
    assert torch.equal(center[:, 0], torch.arange(45.0, dtype=torch.float64))
    torch.testing.assert_close(x0, center.float(), rtol=0, atol=1e-5)  # the cond reached its pair
    pairs = PairDataset(tmp_path, max_open_shards=2)
    assert len(pairs) == 45
    for i in torch.randperm(45, generator=torch.Generator().manual_seed(0)).tolist():
        item = pairs[i]
        assert sorted(item) == ["center", "eps", "prompt", "x0"]
        assert torch.equal(item["eps"], eps[i]) and torch.equal(item["x0"], x0[i])
        assert torch.equal(item["center"], center[i])
        assert item["prompt"] == f"pair {i} of shard {i // 10}"
        assert len(pairs._open) <= 2
    assert torch.equal(pairs[-1]["x0"], x0[44])
    with pytest.raises(IndexError):
        pairs[45]
    clone = pickle.loads(pickle.dumps(pairs))  # DataLoader workers get no open handles
    assert torch.equal(clone[17]["eps"], eps[17])


def test_missing_store_and_bad_arguments_raise(tmp_path):
    with pytest.raises(PairStoreError, match="not a pair store"):
        PairDataset("/nonexistent/pairs")
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        worker.run("/nonexistent/pairs", shard_size=0)
    with pytest.raises(ValueError, match="unknown solver 'rk45'; allowed: euler, heun, ddim"):
        worker.run(str(tmp_path / "never-written"), solver="rk45")
    assert not (tmp_path / "never-written").exists()
    with pytest.raises(ValueError, match="pass shape="):
        generate_pairs(MLP(), form=forms.VP(), prediction="eps", num_pairs=4, out=tmp_path)


# --- which model made a store -----------------------------------------------------------
def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_store_made_by_another_model_is_refused_and_left_untouched(tmp_path):
    common = dict(form=forms.VP(), prediction="eps", num_pairs=8, shard_size=4, shape=(3,),
                  solver="ddim", steps=2, progress=False)  # fmt: skip
    first, other = MLP(), MLP()
    with torch.no_grad():
        other.net[0].bias += 0.1  # MLP() seeds itself: make the second one another model
    out = tmp_path / "pairs"
    generate_pairs(first, out=out, **common)
    fingerprint = json.loads((out / "manifest.json").read_text())["settings"]["model_fingerprint"]
    assert fingerprint == couplings.model_fingerprint(first) and len(fingerprint) == 64
    before = _tree(out)
    with pytest.raises(ValueError, match=r"manifest.json was made by another model: "
                       r"model_fingerprint .* in the store, .* now.*another folder"):  # fmt: skip
        generate_pairs(other, out=out, **common)
    assert _tree(out) == before  # nothing touched
    generate_pairs(first, out=out, **common)  # the same model resumes
    assert _tree(out) == before
    # knowingly: the store is adopted and records the new model
    generate_pairs(other, out=out, allow_other_model=True, **common)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["model_fingerprint"] == couplings.model_fingerprint(other)


def test_a_store_from_before_fingerprints_is_refused_unless_allowed(tmp_path):
    common = dict(form=forms.VP(), prediction="eps", num_pairs=8, shard_size=4, shape=(3,),
                  solver="ddim", steps=2, progress=False)  # fmt: skip
    model, out = MLP(), tmp_path / "pairs"
    generate_pairs(model, out=out, **common)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["settings"]["model_fingerprint"]  # as written before fingerprints
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = _tree(out)
    with pytest.raises(ValueError, match=r"predates model fingerprints.*allow_other_model=True"):
        generate_pairs(model, out=out, **common)
    assert _tree(out) == before
    PairDataset(out, verify=True)  # still readable
    generate_pairs(model, out=out, allow_other_model=True, **common)
    assert _tree(out)["shard_00000.safetensors"] == before["shard_00000.safetensors"]


def test_the_fingerprint_ignores_a_wrapper_and_sees_every_weight():
    model = MLP()
    assert couplings.model_fingerprint(worker.SlowModel(model, 0.0)) == couplings.model_fingerprint(
        model
    )
    assert couplings.model_fingerprint(lambda x, t: x) is None
    changed = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-7
    assert couplings.model_fingerprint(changed) != couplings.model_fingerprint(model)
    doubled = pickle.loads(pickle.dumps(model)).double()
    assert couplings.model_fingerprint(doubled) != couplings.model_fingerprint(model)
