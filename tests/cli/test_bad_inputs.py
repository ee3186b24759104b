"""Bad inputs to the `rectdiff` command: each one is answered with exit code 2 and one line
on stderr that names the offending value (no traceback), before anything is written.

Every case fails fast (no training); the shared teacher and pair store are built once.
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
from safetensors.torch import save as safetensors_save

from rectdiff import forms
from rectdiff.cli import main
from rectdiff.io.model_dir import build_model, save_model_dir

NET = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 8, "depth": 1}}
SHARD = "shard_00001.safetensors"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A teacher, another model of the same shape, and the teacher's pairs (3 shards)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    form = forms.FlowMatching()
    for seed, name in ((0, "teacher"), (1, "other")):
        torch.manual_seed(seed)
        save_model_dir(root / name, build_model(NET, form), form=form, prediction="flow",
                       net_config=NET)  # fmt: skip
    assert main(["pairs", "--model", str(root / "teacher"), "--out", str(root / "pairs"),
                 "--num", "40", "--shard-size", "16", "--steps", "2", "--solver", "ddim",
                 "--no-progress"]) == 0  # fmt: skip
    return root


def tree_digest(*roots: Path) -> str:
    """sha256 over every file's path and bytes under ``roots``."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def copy_store(base: Path, tmp: Path) -> Path:
    store = tmp / "pairs"
    shutil.copytree(base / "pairs", store)
    return store


def edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    edit(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def rewrite_shard(store: Path, k: int, tensors: dict[str, torch.Tensor]) -> None:
    """Replace shard k with ``tensors`` and record its new sha256 and size (a consistent store
    whose content is bad)."""
    data = safetensors_save(tensors)
    (store / f"shard_{k:05d}.safetensors").write_bytes(data)

    def record(manifest):
        manifest["shards"][k] |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    edit_manifest(store, record)


def rectify(base: Path, store: Path | str, tmp: Path, *extra: str, model: str = "teacher"):
    return ["rectify", "--model", str(base / model), "--pairs", str(store), "--out",
            str(tmp / "student"), "--steps", "2", "--no-progress", *extra]  # fmt: skip


# --- the pair store `rectdiff rectify` reads ------------------------------------------------
def missing_pairs(base, tmp):
    return rectify(base, tmp / "nowhere", tmp), r"'[^']*nowhere' is not a folder"


def empty_pairs(base, tmp):
    (tmp / "empty").mkdir()
    return rectify(base, tmp / "empty", tmp), r"no manifest\.json in '[^']*empty'"


def pairs_is_a_model(base, tmp):
    return rectify(base, base / "other", tmp), r"no manifest\.json in '[^']*other'"


def pairs_is_a_file(base, tmp):
    (tmp / "pairs.txt").write_text("x")
    return rectify(base, tmp / "pairs.txt", tmp), r"'[^']*pairs\.txt' is not a folder"


def truncated_shard(base, tmp):
    store = copy_store(base, tmp)
    data = (store / SHARD).read_bytes()
    (store / SHARD).write_bytes(data[:100])
    return rectify(base, store, tmp), rf"{SHARD}: 100 bytes, manifest\.json records {len(data)}"


def truncated_shard_no_verify(base, tmp):
    argv, pattern = truncated_shard(base, tmp)
    return [*argv, "--no-verify"], pattern


def flipped_byte(base, tmp):
    store = copy_store(base, tmp)
    data = bytearray((store / SHARD).read_bytes())
    data[-3] ^= 0x40
    (store / SHARD).write_bytes(bytes(data))
    return rectify(base, store, tmp), rf"{SHARD}: sha256 differs from manifest\.json"


def deleted_shard(base, tmp):
    store = copy_store(base, tmp)
    (store / SHARD).unlink()
    return rectify(base, store, tmp), rf"{SHARD}: missing\..*Rerun `rectdiff pairs`"


def garbage_shard(base, tmp):
    store = copy_store(base, tmp)
    rewrite = b"\xff" * 64
    (store / SHARD).write_bytes(rewrite)
    edit_manifest(store, lambda m: m["shards"][1].update(
        sha256=hashlib.sha256(rewrite).hexdigest(), bytes=64))  # fmt: skip
    return rectify(base, store, tmp), rf"{SHARD}: not a readable safetensors file"


def nan_in_a_shard(base, tmp):
    store = copy_store(base, tmp)
    eps, x0 = torch.randn(16, 2), torch.randn(16, 2)
    x0[5, 1] = float("nan")
    rewrite_shard(store, 1, {"eps": eps, "x0": x0})
    return rectify(base, store, tmp), rf"{SHARD}: x0 of pair 21 \(row 5\) is not finite"


def wrong_shape_in_a_shard(base, tmp):
    store = copy_store(base, tmp)
    rewrite_shard(store, 1, {"eps": torch.randn(16, 3), "x0": torch.randn(16, 3)})
    pattern = rf"{SHARD}: eps is float32 \[16, 3\], expected float32 \[16, 2\]"
    return rectify(base, store, tmp), pattern


def wrong_dtype_in_a_shard(base, tmp):
    store = copy_store(base, tmp)
    rewrite_shard(store, 1, {"eps": torch.randn(16, 2).double(), "x0": torch.randn(16, 2)})
    return rectify(base, store, tmp), rf"{SHARD}: eps is float64 \[16, 2\], expected float32"


def manifest_num_pairs(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m.update(num_pairs=41))
    return rectify(base, store, tmp), r"num_pairs = 41, but its settings give 40"


def manifest_settings_num_pairs(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m["settings"].update(num_pairs=48))
    return rectify(base, store, tmp), r"num_pairs = 40, but its settings give 48"


def manifest_shard_count(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m.update(num_shards=2, shards=m["shards"][:2]))
    return rectify(base, store, tmp), r"num_shards = 2, but its settings give 3"


def manifest_shape(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m["settings"].update(shape=[3]))
    return rectify(base, store, tmp), r"eps recorded as float32 \[2\], settings say float32 \[3\]"


def manifest_form(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m["settings"]["form"].update(shift=3.0))
    return rectify(base, store, tmp), r'made in form .*"shift": 3\.0.*--allow-other-teacher'


def manifest_prediction(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m["settings"].update(prediction="eps"))
    return rectify(base, store, tmp), r"made with prediction 'eps', the model predicts 'flow'"


def manifest_entry_count(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m["shards"][0].update(count=15))
    pattern = r"shard_00000\.safetensors: count = 15 in manifest\.json, expected 16"
    return rectify(base, store, tmp), pattern


def manifest_not_json(base, tmp):
    store = copy_store(base, tmp)
    (store / "manifest.json").write_text("{not json")
    return rectify(base, store, tmp), r"manifest\.json is not a rectdiff pair manifest"


def manifest_newer_version(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m.update(format_version=99))
    return rectify(base, store, tmp), r"format version 99, newer than this rectdiff reads"


def incomplete_store(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m.update(complete=False))
    return rectify(base, store, tmp), r"generation has not finished.*Rerun `rectdiff pairs`"


def other_teacher(base, tmp):
    argv = rectify(base, base / "pairs", tmp, model="other")
    pattern = r"made by another model \(model_fingerprint [0-9a-f]{16}\.\.\..*--allow-other-teacher"
    return argv, pattern


def store_without_fingerprint(base, tmp):
    store = copy_store(base, tmp)
    edit_manifest(store, lambda m: m["settings"].update(model_fingerprint=None))
    return rectify(base, store, tmp), r"records no model fingerprint"


def out_is_the_store(base, tmp):
    store = copy_store(base, tmp)
    argv = rectify(base, store, tmp)
    argv[argv.index("--out") + 1] = str(store)
    return argv, r"out '[^']*' exists and is not a rectdiff student folder"


# --- model folders ----------------------------------------------------------------------
def damaged_model(damage, pattern: str, name: str):
    """``rectdiff pairs`` from a copy of the teacher damaged by ``damage(folder)``."""

    def case(base, tmp):
        shutil.copytree(base / "teacher", tmp / "model")
        damage(tmp / "model")
        argv = ["pairs", "--model", str(tmp / "model"), "--out", str(tmp / "out"), "--num", "4"]
        return argv, pattern

    case.__name__ = name
    return case


def _truncate_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])


# --- flags ----------------------------------------------------------------------------------
def flag(*argv, pattern):
    def case(base, tmp):
        return [*argv, "--out", str(tmp / "out")], pattern

    case.__name__ = "_".join(a.strip("-") for a in argv[:3])
    return case


def bad_t_grid(base, tmp):
    argv = ["pairs", "--model", str(base / "teacher"), "--out", str(tmp / "out"), "--num", "4",
            "--t-grid", "cosine"]  # fmt: skip
    return argv, r"t_grid 'cosine' is not a time grid; allowed: uniform, logsnr, karras"


def bad_solver(base, tmp):
    argv = ["pairs", "--model", str(base / "teacher"), "--out", str(tmp / "out"), "--num", "4",
            "--solver", "rk9"]  # fmt: skip
    return argv, r"unknown solver 'rk9'; allowed:"


def diagnose_out_folder(base, tmp):
    (tmp / "d").mkdir()
    argv = ["diagnose", "--model", str(base / "teacher"), "--out", str(tmp / "d")]
    return argv, r"--out '[^']*d' is a folder; give the JSON file to write"


# --- config files ---------------------------------------------------------------------------
def compare_config(body: str, pattern: str, name: str, files: dict | None = None):
    def case(base, tmp):
        for file, write in (files or {}).items():
            write(tmp / file)
        (tmp / "c.toml").write_text(body.replace("TMP", str(tmp)))
        return ["compare", "--config", str(tmp / "c.toml"), "--out", str(tmp / "out")], pattern

    case.__name__ = name
    return case


def schedule_file(body: str, pattern: str, name: str, prediction: str | None = None):
    """A bad schedule TOML given to ``rectify --form`` (and ``--prediction``)."""

    def case(base, tmp):
        (tmp / "s.toml").write_text(body)
        argv = [*rectify(base, base / "pairs", tmp), "--form", str(tmp / "s.toml")]
        return argv + (["--prediction", prediction] if prediction else []), pattern

    case.__name__ = name
    return case


def nan_npy(path: Path) -> None:
    x = np.zeros((10, 2), dtype=np.float32)
    x[7, 1] = np.nan
    np.save(path, x)


def corrupt_png(folder: Path) -> None:
    from PIL import Image

    folder.mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes((folder / "a.png").read_bytes()[:30])


FM_T_MAX_1 = 'family = "fm"\nt_max = 1.0\n'

CASES = [
    missing_pairs, empty_pairs, pairs_is_a_model, pairs_is_a_file, truncated_shard,
    truncated_shard_no_verify, flipped_byte, deleted_shard, garbage_shard, nan_in_a_shard,
    wrong_shape_in_a_shard, wrong_dtype_in_a_shard, manifest_num_pairs,
    manifest_settings_num_pairs, manifest_shard_count, manifest_shape, manifest_form,
    manifest_prediction, manifest_entry_count, manifest_not_json, manifest_newer_version,
    incomplete_store, other_teacher, store_without_fingerprint, out_is_the_store,
    bad_t_grid, bad_solver,
    damaged_model(_truncate_weights, r"model\.safetensors is not a readable safetensors file", "truncated_weights"),
    damaged_model(lambda f: (f / "model.json").write_text("{"), r"model\.json is not valid JSON", "model_json_not_json"),
    damaged_model(lambda f: (f / "model.safetensors").unlink(), r"has model\.json but no model\.safetensors", "weights_missing"),
    flag("diagnose", "--model", "m", "--num", "0", pattern=r"--num 0: out of range; allowed: an integer >= 1"),
    flag("plot", "--model", "m", "--num", "0", pattern=r"--num 0: out of range"),
    flag("pairs", "--model", "m", "--num", "0", pattern=r"--num 0: out of range"),
    flag("rectify", "--model", "m", "--pairs", "p", "--lr", "inf", pattern=r"--lr inf: out of range; allowed: a finite number > 0"),
    flag("rectify", "--model", "m", "--pairs", "p", "--lr", "0", pattern=r"--lr 0.0: out of range"),
    flag("diagnose", "--model", "m", "--rtol", "0", "--atol", "0", pattern=r"--rtol 0 --atol 0: .*at least one > 0"),
    flag("diagnose", "--model", "m", "--rtol", "-1", pattern=r"--rtol -1.0: out of range"),
    flag("pairs", "--model", "m", "--num", "4", "--shard-size", "0", pattern=r"--shard-size 0: out of range"),
    flag("sd", "rectify", "--pipeline", "p", "--pairs", "q", "--max-steps", "0", pattern=r"--max-steps 0: out of range"),
    flag("schedules", "--t", "0.5", "nan", pattern=r"--t nan: out of range; allowed: a time in \[0, 1\]"),
    flag("schedules", "--t", "1.5", pattern=r"--t 1\.5: out of range"),
    diagnose_out_folder,
    flag("rectify", "--model", "m", "--pairs", "p", "--checkpoint-every", "-1", pattern=r"--checkpoint-every -1: out of range; allowed: an integer >= 0"),
    flag("diagnose", "--model", str(Path("/nonexistent/model")), pattern=r"--model '/nonexistent/model' is not a folder"),
    compare_config('[train]\nlr = "fast"\n', r"training option lr = 'fast' has type str; expected float", "lr_fast"),
    compare_config("[train]\nsteps = 1.5\n", r"steps = 1\.5 has type float; expected int", "steps_float"),
    compare_config('[grid]\nforms = "fm"\n', r"forms = 'fm' in \[grid\] has type str; expected list", "forms_string"),
    compare_config('[data]\nname = "digits"\nn_train = 100000\n', r"n_train.*100000.*1437", "n_train_too_big"),
    compare_config('[data]\nname = "TMP/x.npy"\n', r"x\.npy: sample 7 holds the non-finite value nan", "nan_in_data", {"x.npy": nan_npy}),
    compare_config('[data]\nname = "TMP/img"\n', r"b\.png: not a readable image", "corrupt_png", {"img": corrupt_png}),
    schedule_file('family = "vp"\nbeta_min = "0.1"\n', r"beta_min = '0\.1' in .*s\.toml has type str; expected float", "beta_min_string"),
    schedule_file('family = "custom"\nalpha = "cos(pi * t / 2)"\n', r"missing schedule key sigma in .*s\.toml", "custom_without_sigma"),
    schedule_file('family = "custom"\nalpha = 3\nsigma = "t"\n', r"alpha = 3 in .*s\.toml has type int; expected str", "alpha_int"),
    schedule_file('family = "custom"\nalpha = "' + "(" * 3000 + "t" + ")" * 3000 + '"\nsigma = "t"\n', r"alpha expression '\(+'\.\.\. has 6001 characters; allowed: at most 1000", "huge_expression"),
    schedule_file('family = "custom"\nalpha = "' + "t*" * 5000 + 't"\nsigma = "t"\n', r"has 10001 characters", "long_product"),
    schedule_file('family = "custom"\nalpha = "9**9**9**9"\nsigma = "t"\n', r"alpha\(0\.001\) = inf", "overflowing_expression"),
    schedule_file('family = "vp"\nbeta_min = 0.1\nbeta_max = 20.0\n\nthis is not toml', r"is not valid TOML", "not_toml"),
    schedule_file('family = "warp"\n', r"family = 'warp' is not a known form; allowed:", "unknown_family"),
    schedule_file(FM_T_MAX_1, r"with t_max=1\.0: alpha\(1\.0\) = 0, so an 'eps' prediction", "fm_t_max_1_eps", "eps"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, base, tmp_path, capsys):
    argv, pattern = case(base, tmp_path)
    before = tree_digest(tmp_path, base)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    command = " ".join(argv[:2]) if argv[0] == "sd" else argv[0]
    assert err.startswith(f"rectdiff {command}: error: "), err
    assert re.search(pattern, err), err
    assert tree_digest(tmp_path, base) == before  # nothing written, nothing changed
    assert not (tmp_path / "out").exists() and not (tmp_path / "student").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_output_folder_is_one_line(code, base, tmp_path, capsys, monkeypatch):
    """A read-only file system or a forbidden folder (simulated: the tests may run as root,
    whom permissions do not stop) is answered by the error boundary, naming the path."""
    out = tmp_path / "ro" / "pairs"

    def refuse(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    argv = ["pairs", "--model", str(base / "teacher"), "--out", str(out), "--num", "4",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    # the first folder made is the one the output's lock (rectdiff.io.locks) goes in
    assert err.startswith(f"rectdiff pairs: error: {os.strerror(code)}: '{out.parent}'; "), err
    assert not (tmp_path / "ro").exists()


def test_a_full_disk_mid_pairs_is_one_line_and_a_rerun_repairs(base, tmp_path, capsys, monkeypatch):
    """No space left while writing the second shard: exit 2 naming the file; the complete
    shard is kept and a rerun finishes the store byte-identical to an undisturbed one."""
    import rectdiff.rectify.pairs as pairs_module

    written = []
    write = pairs_module.write_bytes_atomic

    def fill_up(path, data):
        if len(written) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        return write(path, data)

    monkeypatch.setattr(pairs_module, "write_bytes_atomic", fill_up)
    argv = ["pairs", "--model", str(base / "teacher"), "--out", str(tmp_path / "pairs"), "--num",
            "40", "--shard-size", "16", "--steps", "2", "--solver", "ddim", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert re.fullmatch(rf"rectdiff pairs: error: No space left on device: '.*{SHARD}'; "
                        r"free some space or choose another folder, then rerun\.", err), err  # fmt: skip
    assert not json.loads((tmp_path / "pairs" / "manifest.json").read_text())["complete"]
    monkeypatch.setattr(pairs_module, "write_bytes_atomic", write)
    assert main(argv) == 0
    for k in range(3):
        name = f"shard_{k:05d}.safetensors"
        assert (tmp_path / "pairs" / name).read_bytes() == (base / "pairs" / name).read_bytes()
