"""Faults mid `rectdiff sd rectify` (a real process, stock diffusers parts): Ctrl-C and SIGKILL,
then a rerun of the same command ends with the weights of an uninterrupted run, bit for bit
(tolerance 0: checkpoints every 5 steps by --checkpoint-every; by default every 250). And
`sd tiny` into a folder holding a user's files is refused with nothing deleted."""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared import start_rectdiff

from rectdiff.cli import main
from rectdiff.stable_diffusion import SDRectifyConfig

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
STEPS = 120


def rectify_argv(flow, out: Path) -> list[str]:
    return ["sd", "rectify", "--pipeline", str(flow.teacher), "--pairs", str(flow.pairs),
            "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "4", "--lr", "1e-3",
            "--checkpoint-every", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def whole(flow, tmp_path_factory):
    """The uninterrupted student."""
    out = tmp_path_factory.mktemp("sd_faults") / "whole"
    assert main(rectify_argv(flow, out)) == 0
    return out


def run_until_a_checkpoint(flow, out: Path, cwd: Path, sig: int) -> tuple[int, str]:
    """Start ``sd rectify`` in a process; once its second checkpoint is recorded, send
    ``sig``; return its exit code and stderr."""
    process = start_rectdiff(rectify_argv(flow, out), cwd)
    latest = Path(f"{out}.train") / "checkpoints" / "latest"
    begun = time.monotonic()
    try:
        while not latest.exists() or int(latest.read_text().strip()[5:] or 0) < 10:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() - begun < 300, "no checkpoint came"
            time.sleep(0.02)
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
        return process.returncode, err.decode(errors="replace")
    finally:
        process.kill()


def assert_same_weights(out: Path, whole: Path) -> None:
    got, want = load_file(out / WEIGHTS), load_file(whole / WEIGHTS)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_sd_rectify_resumes_to_the_uninterrupted_weights(flow, whole, sig, tmp_path):
    out = tmp_path / "student"
    code, err = run_until_a_checkpoint(flow, out, tmp_path, sig)
    checkpoints = Path(f"{out}.train") / "checkpoints"
    kept = checkpoints / (checkpoints / "latest").read_text().strip()
    if sig == signal.SIGINT:
        assert code == 130 and "Traceback" not in err, (code, err[-3000:])
        assert err.strip().splitlines()[-1] == (
            f"rectdiff sd rectify: interrupted; the latest checkpoint, {kept}, is kept; rerun "
            "the same command to resume from it."
        )
    else:
        assert code == -signal.SIGKILL
    assert 10 <= int(kept.name.removeprefix("step_")) < STEPS and not out.exists(), err[-3000:]
    assert main(rectify_argv(flow, out)) == 0
    assert_same_weights(out, whole)


def test_the_default_config_checkpoints_so_that_a_run_can_resume():
    assert SDRectifyConfig().checkpoint_every == 250 and SDRectifyConfig().keep_checkpoints == 2


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


def test_sd_tiny_into_a_folder_holding_a_users_files_is_refused_with_nothing_deleted(
    tmp_path, capsys
):
    target = tmp_path / "mine"
    (target / "drafts").mkdir(parents=True)
    (target / "notes.txt").write_text("my notes")
    (target / "drafts" / "a.md").write_text("a draft")
    before = _tree(tmp_path)
    assert main(["sd", "tiny", str(target)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"rectdiff sd tiny: error: {str(target)!r} already exists and is not "
                          "empty; `rectdiff sd tiny` writes only into")  # fmt: skip
    assert _tree(tmp_path) == before


def test_sd_rectify_refuses_a_damaged_store_naming_the_shard(flow, tmp_path, capsys):
    """A flipped byte in a shard: exit 2, one line naming the shard and the repair; nothing
    written (the store is verified before the pipeline is loaded)."""
    import shutil

    pairs = tmp_path / "pairs"
    shutil.copytree(flow.pairs, pairs)
    shard = sorted(pairs.glob("shard_*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # the last tensor's last bytes: still a finite float32
    shard.write_bytes(bytes(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["sd", "rectify", "--pipeline", str(flow.teacher), "--pairs", str(pairs), "--out",
            str(tmp_path / "student"), "--max-steps", "1", "--batch-size", "4"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == (
        f"rectdiff sd rectify: error: pair store {str(pairs)!r}: {shard.name}: sha256 differs "
        "from manifest.json (corrupted or partly written). Rerun `rectdiff sd pairs` into this "
        "folder with the same settings to repair it: intact shards are kept, the others "
        "regenerated."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before
