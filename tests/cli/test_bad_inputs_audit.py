"""Regressions from the bad-input audit (experiments/audit/bad_inputs.py): each input below was
once silent, a traceback, or a message of several lines or without the value. Each is now
exit code 2 and one line on stderr naming the value, with nothing written or changed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rectdiff import forms
from rectdiff.cli import main
from rectdiff.io.model_dir import build_model, save_model_dir

NET = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 8, "depth": 1}}
SHARD = "shard_00001.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A teacher, a rectified student of it, and the teacher's pairs (3 shards)."""
    root = tmp_path_factory.mktemp("audit")
    form = forms.FlowMatching()
    torch.manual_seed(0)
    save_model_dir(root / "teacher", build_model(NET, form), form=form, prediction="flow",
                   net_config=NET)  # fmt: skip
    assert main(["pairs", "--model", str(root / "teacher"), "--out", str(root / "pairs"),
                 "--num", "40", "--shard-size", "16", "--steps", "2", "--solver", "ddim",
                 "--no-progress"]) == 0  # fmt: skip
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny SD 1.5 pipeline (not fitted: only loading is exercised)."""
    from rectdiff.stable_diffusion import build_tiny_pipeline

    root = tmp_path_factory.mktemp("audit-sd")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_tiny_pipeline(root / "pipe", seed=0, fit_steps=0)
    finally:
        torch.set_num_threads(threads)
    (root / "prompts.txt").write_text("a red cube\na blue ball\n")
    return root


def tree_digest(*roots: Path) -> str:
    """sha256 over every file's and folder's path and every file's bytes under ``roots``."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")):
            digest.update(str(path).encode() + b"\0")
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def refused(argv: list[str], pattern: str, capsys, *watch: Path) -> str:
    """Run ``argv``: exit 2, one stderr line ``rectdiff ...: error: ...`` matching
    ``pattern``, and nothing under ``watch`` written or changed. The line."""
    before = tree_digest(*watch)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.match(r"rectdiff( [a-z]+){0,2}: error: ", lines[0]), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert tree_digest(*watch) == before  # nothing written, nothing changed
    return lines[0]


def copy_store(base: Path, tmp: Path) -> Path:
    shutil.copytree(base / "pairs", tmp / "pairs")
    return tmp / "pairs"


def edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def rectify(base: Path, store: Path, tmp: Path, *extra: str) -> list[str]:
    return ["rectify", "--model", str(base / "teacher"), "--pairs", str(store), "--out",
            str(tmp / "student"), "--steps", "2", "--no-progress", *extra]  # fmt: skip


def pairs(model: Path, out: Path, *extra: str) -> list[str]:
    return ["pairs", "--model", str(model), "--out", str(out), "--num", "4", "--steps", "2",
            "--solver", "ddim", "--no-progress", *extra]  # fmt: skip


# --- usage errors: one line, with the subcommand's --help ---------------------------------------
@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["rectfy"], r"^rectdiff: error: argument command: invalid choice: 'rectfy'.*see `rectdiff --help`"),
        (["sd", "tinyy"], r"invalid choice: 'tinyy'.*see `rectdiff sd --help`"),
        (["pairs", "--model", "m", "--out", "o", "--num", "3", "--nmu", "4"],
         r"^rectdiff pairs: error: unrecognized arguments: --nmu 4 \(did you mean --num\?\)"),
        (["pairs", "--model", "m", "--out", "o", "--num", "x"], r"argument --num: invalid int value: 'x'"),
        (["rectify", "--pairs", "p", "--out", "o", "--lr", "fast"], r"--lr: invalid float value: 'fast'"),
        (["rectify", "--model", "m", "--out", "o"], r"required: --pairs; see `rectdiff rectify --help`"),
        (["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o", "--loss", "l1"], r"--loss: invalid choice: 'l1'"),
        (["sd", "eval", "--pipeline", "p", "--teacher", "t", "--prompts", "x", "--steps", "1,x"], r"--steps: .*'1,x'"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)  # fmt: skip
def test_a_usage_error_is_one_line(argv, pattern, capsys, tmp_path):
    refused(argv, pattern, capsys, tmp_path)


# --- numeric flags range-checked before any work ------------------------------------------------
@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["rectify", "--pairs", "p", "--out", "o", "--seed", "-1"], r"--seed -1: out of range; allowed: an integer in \[0, 2\*\*32 - 1\]"),
        (["rectify", "--pairs", "p", "--out", "o", "--ema-decay", "2"], r"--ema-decay 2\.0: out of range; allowed: a number in \[0, 1\)"),
        (["rectify", "--pairs", "p", "--out", "o", "--warmup-steps", "-1"], r"--warmup-steps -1: out of range"),
        (["compare", "--workers", "0"], r"--workers 0: out of range; allowed: an integer >= 1"),
        (["sd", "pairs", "--pipeline", "p", "--prompts", "x", "--num", "4", "--out", "o", "--guidance", "nan"], r"--guidance nan: out of range; allowed: a finite number >= 0"),
        (["sd", "eval", "--pipeline", "p", "--teacher", "t", "--prompts", "x", "--guidance", "-1"], r"--guidance -1\.0: out of range"),
        (["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o", "--huber-c", "-1"], r"--huber-c -1\.0: out of range; allowed: a finite number > 0"),
        (["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o", "--cond-dropout", "1.5"], r"--cond-dropout 1\.5: out of range; allowed: a fraction in \[0, 1\]"),
        (["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o", "--grad-accum", "0"], r"--grad-accum 0: out of range"),
        (["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o", "--num-workers", "-1"], r"--num-workers -1: out of range"),
        (["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o", "--phases", "0"], r"--phases 0: out of range"),
        (["sd", "tiny", "d", "--sample-size", "7"], r"--sample-size 7: out of range; allowed: an even integer >= 2"),
        (["sd", "tiny", "d", "--fit-steps", "-1"], r"--fit-steps -1: out of range"),
    ],
    ids=lambda v: "_".join(v[:1] + v[-2:]) if isinstance(v, list) else None,
)  # fmt: skip
def test_a_numeric_flag_out_of_range_is_refused_first(argv, pattern, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(argv, pattern, capsys, tmp_path)


# --- pair stores ----------------------------------------------------------------------------------
def test_a_format_version_that_is_not_a_number(base, tmp_path, capsys):
    store = copy_store(base, tmp_path)
    edit_manifest(store, lambda m: m.update(format_version="one"))
    refused(
        rectify(base, store, tmp_path),
        r"format_version = 'one'; expected an integer",
        capsys,
        tmp_path,
        base,
    )


def test_shards_that_are_not_a_list(base, tmp_path, capsys):
    store = copy_store(base, tmp_path)
    edit_manifest(store, lambda m: m.update(shards="all"))
    refused(
        rectify(base, store, tmp_path), r"shards = 'all'; expected a list", capsys, tmp_path, base
    )


def test_reading_a_truncated_shard_names_it(base, tmp_path):
    """(`sd rectify` opens shards this way, without checksums.)"""
    from rectdiff.rectify.store import PairDataset, PairStoreError

    store = copy_store(base, tmp_path)
    (store / SHARD).write_bytes((store / SHARD).read_bytes()[:7])
    with pytest.raises(PairStoreError, match=rf"{SHARD}: not a readable safetensors file"):
        PairDataset(store).shard(1)


@pytest.mark.parametrize("what", ["user_folder", "model_folder"])
def test_pairs_into_a_folder_that_is_not_a_store(what, base, tmp_path, capsys):
    out = tmp_path / "out"
    if what == "user_folder":
        (out / "sub").mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
    else:
        shutil.copytree(base / "teacher", out)
    pattern = r"holds files but no manifest\.json \((model\.json|notes\.txt)"
    refused(pairs(base / "teacher", out), pattern, capsys, tmp_path, base)


# --- output folders --------------------------------------------------------------------------------
def test_rectify_out_onto_a_model_that_rectify_did_not_write(base, tmp_path, capsys):
    shutil.copytree(base / "teacher", tmp_path / "model")
    argv = rectify(base, base / "pairs", tmp_path)
    argv[argv.index("--out") + 1] = str(tmp_path / "model")
    pattern = r"out '[^']*model' exists and is not a rectdiff student folder"
    refused(argv, pattern, capsys, tmp_path, base)


def test_a_full_disk_at_the_lock_names_the_file(base, tmp_path, capsys, monkeypatch):
    """A write that fails for lack of space does not name its file; the error does."""
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if ".rectdiff.lock" in self.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    pattern = r"No space left on device: '[^']*\.out\.rectdiff\.lock\.tmp-\d+'; free some space"
    refused(pairs(base / "teacher", tmp_path / "out"), pattern, capsys, tmp_path, base)


def test_a_full_disk_at_an_atomic_write_names_the_file(tmp_path):
    from rectdiff.io.files import atomic_path, write_bytes_atomic

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space") as err, pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fail)
        write_bytes_atomic(tmp_path / "a.bin", b"x")
    assert err.value.filename == str(tmp_path / "a.bin")
    with pytest.raises(OSError) as err, atomic_path(tmp_path / "b.safetensors"):  # safetensors' own
        raise RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_sd_demo_into_a_users_folder(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    argv = ["sd", "demo", "--out", str(tmp_path / "demo")]
    refused(
        argv,
        r"--out '[^']*demo' holds files the demo did not write \(notes\.txt\)",
        capsys,
        tmp_path,
    )


# --- model folders --------------------------------------------------------------------------------
def test_non_finite_weights_are_refused_at_load(base, tmp_path, capsys):
    shutil.copytree(base / "teacher", tmp_path / "model")
    tensors = load_file(tmp_path / "model" / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name][..., 0] = float("nan")
    save_file(tensors, tmp_path / "model" / "model.safetensors")
    pattern = rf"model\.safetensors: tensor '{re.escape(name)}' holds non-finite values"
    refused(pairs(tmp_path / "model", tmp_path / "out"), pattern, capsys, tmp_path)
    argv = ["diagnose", "--model", str(tmp_path / "model"), "--num", "4", "--steps", "8",
            "--out", str(tmp_path / "d.json")]  # fmt: skip
    refused(argv, pattern, capsys, tmp_path)


def test_a_model_record_of_another_format_names_it(base, tmp_path, capsys):
    shutil.copytree(base / "teacher", tmp_path / "model")
    record = json.loads((tmp_path / "model" / "model.json").read_text())
    (tmp_path / "model" / "model.json").write_text(json.dumps(record | {"format": "other-thing"}))
    refused(
        pairs(tmp_path / "model", tmp_path / "out"),
        r"format = 'other-thing', expected 'rectdiff-model'",
        capsys,
        tmp_path,
    )


# --- long runs and late checks -------------------------------------------------------------
def test_a_huge_solver_step_count_is_refused_before_writing(base, tmp_path, capsys):
    """It used to build a grid of 10^8 times for minutes, the bar sitting at 0 pairs."""
    argv = pairs(base / "teacher", tmp_path / "out")
    argv[argv.index("--steps") + 1] = "100000000"
    pattern = r"steps=100000000: too many; allowed: an integer from 1 to 100000"
    refused(argv, pattern, capsys, tmp_path, base)
    argv = ["diagnose", "--model", str(base / "teacher"), "--steps", "100000000", "--out",
            str(tmp_path / "d.json")]  # fmt: skip
    refused(argv, pattern, capsys, tmp_path, base)


@pytest.mark.parametrize(
    "command, flags, pattern",
    [
        ("diagnose", ["--solver", "euler9"], r"unknown solver 'euler9'; allowed: euler"),
        ("diagnose", ["--out", "{tmp}/f/d.json"], r"--out '[^']*f/d\.json': '[^']*f' is a file, not a folder"),
        ("plot", ["--out", "{tmp}/f"], r"--out '[^']*f' is a file; give the folder to write"),
    ],
)  # fmt: skip
def test_diagnose_and_plot_check_before_their_progress_bar(
    command, flags, pattern, base, tmp_path, capsys
):
    (tmp_path / "f").write_text("x")
    argv = [command, "--model", str(base / "teacher"), "--num", "4", "--out", str(tmp_path / "o.json"),
            *(flag.replace("{tmp}", str(tmp_path)) for flag in flags)]  # fmt: skip
    refused(argv, pattern, capsys, tmp_path, base)


def test_a_read_only_output_folder_is_found_before_the_work(base, tmp_path, capsys, monkeypatch):
    """(Simulated: the tests may run as root, whom permissions do not stop.)"""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    argv = ["diagnose", "--model", str(base / "teacher"), "--num", "4", "--out",
            str(tmp_path / "new" / "d.json")]  # fmt: skip
    refused(
        argv, rf"(Permission denied|Read-only file system): '{tmp_path}'", capsys, tmp_path, base
    )


# --- solvers ----------------------------------------------------------------------------------------
def test_an_adaptive_solve_refuses_zero_tolerances_and_names_an_underflow():
    from rectdiff import samplers
    from rectdiff.errors import ConfigError, SolveError

    form = forms.FlowMatching()
    with pytest.raises(
        ConfigError, match=r"rtol = 0\.0, atol = 0\.0: the adaptive solver 'dopri5'"
    ):
        samplers.sample(lambda x, t: x, torch.randn(4, 2), form=form, prediction="flow",
                        solver="dopri5", rtol=0.0, atol=0.0)  # fmt: skip
    with pytest.raises(SolveError, match=r"step size underflowed.*non-finite"):
        samplers.sample(lambda x, t: x * float("nan"), torch.randn(4, 2), form=form,
                        prediction="flow", solver="dopri5")  # fmt: skip


# --- config and data files ------------------------------------------------------------------------
def test_a_config_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "c.toml").write_bytes(b"\xff\xfe[train]\n")
    argv = ["compare", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "out")]
    refused(
        argv, r"c\.toml: not valid TOML \(not UTF-8 text: byte 0xff at offset 0\)", capsys, tmp_path
    )


def test_data_of_strings(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.array([["a", "b"]] * 20))
    (tmp_path / "c.toml").write_text(f'[data]\nname = "{tmp_path / "x.npy"}"\n')
    argv = ["compare", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "out")]
    refused(
        argv, r"x\.npy: holds <U1 values of shape \(20, 2\); expected numbers", capsys, tmp_path
    )


def test_prompts_that_are_not_utf8(tmp_path):
    from rectdiff.stable_diffusion import read_prompts

    (tmp_path / "p.txt").write_bytes(b"a cube\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"p\.txt' is not UTF-8 text \(byte 0xff at offset 7\)"):
        read_prompts(tmp_path / "p.txt")


# --- Stable Diffusion pipelines -----------------------------------------------------------------
def test_sd_errors_after_loading_are_one_line(pipeline, tmp_path, capsys):
    """Loading a pipeline prints no progress bars or library notes before the error."""
    argv = ["sd", "pairs", "--pipeline", str(pipeline / "pipe"), "--prompts",
            str(pipeline / "prompts.txt"), "--num", "4", "--out", str(tmp_path / "out"),
            "--height", "60"]  # fmt: skip
    refused(argv, r"height = 60 must be a positive multiple of 8", capsys, tmp_path, pipeline)


def test_a_damaged_pipeline_is_one_line(pipeline, tmp_path, capsys):
    shutil.copytree(pipeline / "pipe", tmp_path / "pipe")
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    argv = ["sd", "pairs", "--pipeline", str(tmp_path / "pipe"), "--prompts",
            str(pipeline / "prompts.txt"), "--num", "4", "--out", str(tmp_path / "out")]  # fmt: skip
    pattern = (
        r"pipeline folder '[^']*pipe' could not be loaded: .*diffusion_pytorch_model\.safetensors"
    )
    refused(argv, pattern, capsys, tmp_path)


@pytest.mark.parametrize("device", ["tpu9", "cuda:7"])
def test_an_unknown_or_absent_device(device, pipeline, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = ["sd", "eval", "--pipeline", str(pipeline / "pipe"), "--teacher",
            str(pipeline / "pipe"), "--prompts", str(pipeline / "prompts.txt"), "--out",
            str(tmp_path / "out"), "--num", "2", "--device", device]  # fmt: skip
    refused(argv, rf"device '{device}'", capsys, tmp_path, pipeline)


def test_sd_diagnose_into_a_file_is_found_before_sampling(pipeline, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    argv = ["sd", "diagnose", "--pipeline", str(pipeline / "pipe"), "--teacher",
            str(pipeline / "pipe"), "--prompts", str(pipeline / "prompts.txt"), "--out",
            str(tmp_path / "out"), "--num", "2", "--steps", "8"]  # fmt: skip
    refused(argv, r"out '[^']*out' is a file; give the folder to write", capsys, tmp_path, pipeline)


# --- compare configs: refused before the output folder is set up ---------------------------------
@pytest.mark.parametrize(
    "toml, pattern",
    [
        ("seed = 1.7\n", r"seed = 1\.7 has type float; expected int"),
        ('workers = "2"\n', r"workers = '2' has type str; expected int"),
        ("[train]\nlr = nan\n", r"TrainConfig\.lr must be a finite number > 0, got nan"),
        ("[train]\nlr = 0\n", r"TrainConfig\.lr must be a finite number > 0, got 0"),
        ("[evaluation]\nrtol = 0.0\natol = 0.0\n", r"rtol = atol = 0: an adaptive solve"),
        (
            "[evaluation]\nrtol = -1e-3\n",
            r"\[evaluation\] rtol = -0\.001: expected a finite number",
        ),
        ('[network]\noptions = { hidden = "wide" }\n', r"hidden|wide"),
        ("[network]\noptions = { widht = 8 }\n", r"widht"),
    ],
)
def test_a_bad_compare_setting_writes_nothing(toml, pattern, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(toml)
    argv = ["compare", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "out")]
    refused(argv, pattern, capsys, tmp_path)
    assert not (tmp_path / "out").exists()
