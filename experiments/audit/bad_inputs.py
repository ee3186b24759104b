"""Bad-input audit of the ``rectdiff`` command line (issue 15's 175 bad inputs and faults).

Builds small fixtures in a temporary folder (a 2-d flow-matching teacher and another model,
its pair store, a rectified student, a tiny Stable Diffusion pipeline via ``rectdiff sd
tiny``, its pairs and student), then runs every case (over 175: every subcommand; wrong,
missing, empty and corrupt pair stores, truncated and flipped shards, edited manifests,
damaged model weights, read-only and full output folders (real tmpfs mounts when this runs
as root, else those cases are skipped), existing output folders, out-of-range numeric flags,
wrong TOML types and unknown keys, huge or malicious schedule expressions, bad data files,
typos, huge step counts, reruns with other settings) in its own process with a timeout, and
classifies each:

    OK-error     exit 2, exactly one non-empty stderr line ``rectdiff CMD: error: ...`` (as a
                 terminal shows it: a progress bar erased in place is no line) that
                 matches the case's pattern (it names the offending value), and nothing in the
                 case folder or the fixtures changed (sha256 of every file and folder name)
    right-thing  exit 0 and the case's explicit check of the documented behaviour passed
                 (a "feedback" case: killed at its timeout after its progress visibly moved)
    SILENT       exit 0 but wrong (a bad input accepted, or the check failed)
    TRACEBACK    "Traceback" on stderr
    VAGUE        an error, but not exit 2, or not one line, or the line misses the value
    WRONG        an error where the right thing was to succeed
    DIRTY        a one-line error, but files were written or changed first
    HANG         killed at the timeout without a word of progress
    AUDIT-ERROR  the case's own preparation failed (a fault of this script, not rectdiff's)

A table per class and per command goes to stdout (then every case not OK, with why), and
every result to the JSON file ``--out``. Exit code 0 when every case is OK-error or
right-thing, else 1.

Modes: by default each case runs in a child forked from this process after it imported the
heavy modules once (torch, diffusers; no thread pool is started before forking), which is
what makes ~400 cases take minutes instead of an hour; the child calls
``rectdiff.cli.main(argv)`` exactly as the ``rectdiff`` script does. ``--spawn`` runs each
case as a fresh ``rectdiff`` process instead (faithful to the import-time behaviour, ~20 s
per case on a busy 2-core machine). The "argument" cases (typos, bad choices) always spawn,
and they must also answer within ``FAST_S`` seconds: errors found while parsing come before
any heavy import.

    .venv/bin/python experiments/audit/bad_inputs.py [--only PATTERN] [--jobs 1] [--out F]

``--only`` keeps the cases whose name or command matches the regular expression; ``--keep``
keeps the work folder (printed) for a look at what a case left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import runner

OK = ("OK-error", "right-thing")
CLASSES = ("OK-error", "right-thing", "SILENT", "TRACEBACK", "VAGUE", "WRONG", "DIRTY", "HANG",
           "AUDIT-ERROR")  # fmt: skip
TIMEOUT_S = 120.0
#: how fast an argument error must come (seconds, a fresh process, before heavy imports)
FAST_S = 8.0
SHARD = "shard_00001.safetensors"
NET = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 8, "depth": 1}}
PROGRESS = re.compile(r"\| *(\d+)(?:/\d+)? *\[")  # tqdm's "| 3/40 [" or "| 1234 ["


# --- cases ----------------------------------------------------------------------------------
@dataclass
class Ctx:
    """Where a case runs: ``fx`` the shared fixtures (read-only for cases), ``tmp`` its own
    empty folder (the working directory of its command)."""

    fx: Path
    tmp: Path
    spawn: bool = False
    mounts: list[Path] = field(default_factory=list)

    def run(self, argv: list[str], timeout: float = TIMEOUT_S) -> runner.Result:
        """A preparatory command (not audited)."""
        return runner.run(argv, self.tmp, timeout, spawn=self.spawn)

    def mount(self, name: str, size: str = "1m", *, full: bool = False, ro: bool = False) -> Path:
        """A tmpfs at ``tmp/name``: ``full`` filled up to the last byte, ``ro`` read-only."""
        path = self.tmp / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True)  # fmt: skip
        self.mounts.append(path)
        if full:  # dd stops at ENOSPC, leaving no byte free
            subprocess.run(["dd", "if=/dev/zero", f"of={path / '.filler'}", "bs=4k"],
                           capture_output=True, check=False)  # fmt: skip
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    def unmount(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], check=False)
        self.mounts.clear()


@dataclass
class Case:
    """One bad input. ``argv`` may hold ``{fx}`` and ``{tmp}``; ``setup(ctx)`` prepares files
    first. ``expect``: "error" (exit 2, one line matching ``pattern``), "ok" (exit 0 and
    ``check(ctx, result)`` returns None), "either" (one of the two), or "feedback" (a long
    run: progress on stderr before its ``timeout``, or a one-line refusal)."""

    name: str
    command: str
    category: str
    argv: list[str]
    pattern: str = ""
    expect: str = "error"
    setup: Callable[[Ctx], Any] | None = None
    check: Callable[[Ctx, runner.Result], str | None] | None = None
    timeout: float = TIMEOUT_S
    spawn: bool = False
    needs_root: bool = False


CASES: list[Case] = []
_NAMES: set[str] = set()


def add(name: str, category: str, argv: list[str], pattern: str = "", **kw: Any) -> None:
    assert name not in _NAMES, name
    _NAMES.add(name)
    command = " ".join(argv[:2]) if argv[:1] == ["sd"] else (argv or ["(parse)"])[0]
    if command.split()[0] not in (
        "pairs",
        "rectify",
        "diagnose",
        "plot",
        "schedules",
        "compare",
        "sd",
    ):
        command = "(parse)"
    CASES.append(Case(name, command, category, argv, pattern, **kw))


def sub(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced (or the flag appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


def drop(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


# base command lines (each valid and fast; a case changes one thing)
PAIRS = ["pairs", "--model", "{fx}/teacher", "--out", "{tmp}/out", "--num", "4", "--steps", "2",
         "--solver", "ddim", "--no-progress"]  # fmt: skip
RECT = ["rectify", "--model", "{fx}/teacher", "--pairs", "{fx}/pairs", "--out", "{tmp}/student",
        "--steps", "2", "--batch-size", "8", "--no-progress"]  # fmt: skip
DIAG = ["diagnose", "--model", "{fx}/teacher", "--num", "4", "--steps", "8", "--out",
        "{tmp}/d.json"]  # fmt: skip
PLOT = ["plot", "--model", "{fx}/teacher", "--num", "16", "--out", "{tmp}/fig"]
SCHED = ["schedules", "--out", "{tmp}/sched"]
CMP = ["compare", "--config", "{tmp}/c.toml", "--out", "{tmp}/out", "--no-progress"]
SDTINY = ["sd", "tiny", "{tmp}/pipe", "--fit-steps", "0"]
SDPAIRS = ["sd", "pairs", "--pipeline", "{fx}/sd_teacher", "--prompts", "{fx}/prompts.txt",
           "--num", "4", "--out", "{tmp}/out", "--steps", "2", "--batch-size", "4",
           "--shard-size", "4"]  # fmt: skip
SDRECT = ["sd", "rectify", "--pipeline", "{fx}/sd_teacher", "--pairs", "{fx}/sd_pairs", "--out",
          "{tmp}/out", "--max-steps", "2", "--batch-size", "4", "--checkpoint-every", "0"]  # fmt: skip
SDEVAL = ["sd", "eval", "--pipeline", "{fx}/sd_student", "--teacher", "{fx}/sd_teacher",
          "--prompts", "{fx}/prompts.txt", "--out", "{tmp}/out", "--num", "2", "--steps", "1",
          "--teacher-steps", "2", "--batch-size", "2"]  # fmt: skip
SDDIAG = ["sd", "diagnose", "--pipeline", "{fx}/sd_student", "--teacher", "{fx}/sd_teacher",
          "--prompts", "{fx}/prompts.txt", "--out", "{tmp}/out", "--num", "2", "--steps", "8"]  # fmt: skip
SDDEMO = ["sd", "demo", "--out", "{tmp}/demo"]

#: the compare config every compare case edits (seconds to run when accepted)
TINY = {
    "seed": 0,
    "workers": 1,
    "data": {"name": "8gaussians", "n_train": 64, "n_eval": 32, "n_holdout": 32},
    "grid": {"forms": ["fm"], "predictions": ["v"]},
    "network": {"kind": "mlp", "options": {"hidden": 8, "depth": 1}},
    "train": {"steps": 2, "batch_size": 16},
    "rectify": {
        "num_pairs": 16,
        "steps": 2,
        "shard_size": 16,
        "pair_batch_size": 16,
        "train": {"steps": 2},
    },  # fmt: skip
    "evaluation": {
        "steps": [1],
        "metrics": ["sliced_w2"],
        "diagnostics": [],
        "n_diagnostic": 8,
        "figures": False,
    },  # fmt: skip
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def dump_toml(doc: dict[str, Any]) -> str:
    """A TOML document: top-level scalars, then one table per dict (nested dicts inline)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def config(edit: Callable[[dict[str, Any]], Any] | None = None, text: str | None = None):
    """A setup writing ``tmp/c.toml``: TINY edited by ``edit``, or ``text`` verbatim."""

    def setup(ctx: Ctx) -> None:
        doc = json.loads(json.dumps(TINY))
        if edit is not None:
            edit(doc)
        body = dump_toml(doc) if text is None else text
        (ctx.tmp / "c.toml").write_text(body.replace("{tmp}", str(ctx.tmp)))

    return setup


def cfg_case(name: str, edit, pattern: str, **kw: Any) -> None:
    add(name, "config file", CMP, pattern, setup=config(edit), **kw)


def setitem(section: str | None, key: str, value: Any):
    def edit(doc: dict[str, Any]) -> None:
        (doc if section is None else doc.setdefault(section, {}))[key] = value

    return edit


def compose(*steps):
    def setup(ctx: Ctx) -> None:
        for step in steps:
            step(ctx)

    return setup


# --- file helpers -----------------------------------------------------------------------------
def copy(ctx: Ctx, name: str, to: str | None = None) -> Path:
    dst = ctx.tmp / (to or name)
    shutil.copytree(ctx.fx / name, dst)
    return dst


def edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def rewrite_shard(store: Path, k: int, arrays: dict[str, np.ndarray]) -> None:
    """Replace shard k by ``arrays``, recording its new sha256 and size (consistent, bad)."""
    from safetensors.numpy import save

    data = save(arrays)
    (store / f"shard_{k:05d}.safetensors").write_bytes(data)
    edit_json(store / "manifest.json", lambda m: m["shards"][k].update(
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))  # fmt: skip


def flip_byte(path: Path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path, n: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:n])


def store_case(name: str, damage, pattern: str, *, extra: tuple[str, ...] = (), **kw) -> None:
    """``rectdiff rectify`` from a copy of the fixture pairs damaged by ``damage(store)``."""
    add(name, "pair store", [*sub(RECT, "--pairs", "{tmp}/pairs"), *extra], pattern,
        setup=lambda ctx: damage(copy(ctx, "pairs")), **kw)  # fmt: skip


def manifest(edit):
    return lambda store: edit_json(store / "manifest.json", edit)


def rand(*shape: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def with_nan(x: np.ndarray, value: float = float("nan")) -> np.ndarray:
    x = x.copy()
    x[5, 1] = value
    return x


def user_folder(name: str):
    """A setup making ``tmp/name`` a user's folder (notes.txt and a sub-folder)."""

    def setup(ctx: Ctx) -> None:
        (ctx.tmp / name / "sub").mkdir(parents=True)
        (ctx.tmp / name / "notes.txt").write_text("mine")
        (ctx.tmp / name / "sub" / "data.csv").write_text("1,2\n")

    return setup


def a_file(name: str, text: str = "x"):
    return lambda ctx: (ctx.tmp / name).write_text(text)


def ro_mount(name: str):
    return lambda ctx: ctx.mount(name, ro=True)


def full_mount(name: str):
    return lambda ctx: ctx.mount(name, "64k", full=True)


def model_case(name: str, damage, pattern: str, base: list[str] = PAIRS, **kw) -> None:
    """A command reading a copy of the teacher damaged by ``damage(folder)``."""
    flag = "--model"
    add(name, "model files", sub(base, flag, "{tmp}/model"), pattern,
        setup=lambda ctx: damage(copy(ctx, "teacher", "model")), **kw)  # fmt: skip


def write_model_json(edit):
    return lambda folder: edit_json(folder / "model.json", edit)


def nan_weights(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    save_file(tensors, folder / "model.safetensors")


def other_weights(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    save_file({k: np.zeros((3, 3), np.float32) for k in tensors}, folder / "model.safetensors")


def schedule(body: str):
    return lambda ctx: (ctx.tmp / "s.toml").write_text(body)


def form_case(name: str, body: str, pattern: str, prediction: str | None = None, **kw) -> None:
    argv = [*RECT, "--form", "{tmp}/s.toml", *(["--prediction", prediction] if prediction else [])]
    add(name, "schedule file", argv, pattern, setup=schedule(body), **kw)


def npy(array: np.ndarray, name: str = "x.npy"):
    return lambda ctx: np.save(ctx.tmp / name, array)


def images(*, corrupt: bool = False, empty: bool = False, size=(4, 4), gray_and_rgb=False):
    def setup(ctx: Ctx) -> None:
        from PIL import Image

        folder = ctx.tmp / "img"
        folder.mkdir()
        if empty:
            return
        for i in range(6):
            Image.fromarray(np.full(size, 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        if gray_and_rgb:
            Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(folder / "rgb.png")
        if corrupt:
            truncate(folder / "3.png", 30)

    return setup


def data_case(name: str, data: str, setup, pattern: str, **kw) -> None:
    cfg_case(name, setitem("data", "name", data), pattern, **kw)
    CASES[-1].setup = compose(setup, CASES[-1].setup)
    CASES[-1].category = "data"


def prompts(name: str, text: str):
    return lambda ctx: (ctx.tmp / name).write_text(text)


# --- checks of the right thing ---------------------------------------------------------------
def files_equal(a: Path, b: Path) -> str | None:
    names = sorted(p.name for p in a.glob("shard_*.safetensors"))
    if names != sorted(p.name for p in b.glob("shard_*.safetensors")):
        return f"shards {names} differ from the undisturbed store's"
    for n in names:
        if (a / n).read_bytes() != (b / n).read_bytes():
            return f"{n} differs from the undisturbed store's"
    return None


def repaired(ctx: Ctx, res: runner.Result) -> str | None:
    return files_equal(ctx.tmp / "pairs", ctx.fx / "pairs")


def finite_model(folder: str):
    def check(ctx: Ctx, res: runner.Result) -> str | None:
        from safetensors.numpy import load_file

        path = ctx.tmp / folder / "model.safetensors"
        if not path.is_file():
            return f"no {path.name} written"
        bad = [k for k, v in load_file(path).items() if not np.isfinite(v).all()]
        return f"non-finite weights {bad}" if bad else None

    return check


def stdout_no_nan(ctx: Ctx, res: runner.Result) -> str | None:
    """(logsnr = -inf where alpha = 0, at t_max = 1 of sd3, is the truth, not a failure.)"""
    return "the table holds nan" if re.search(r"\bnan\b", res.stdout, re.I) else None


def file_written(name: str):
    def check(ctx: Ctx, res: runner.Result) -> str | None:
        return None if (ctx.tmp / name).exists() else f"{name} was not written"

    return check


def user_files_kept(name: str):
    def check(ctx: Ctx, res: runner.Result) -> str | None:
        for rel in ("notes.txt", "sub/data.csv"):
            if not (ctx.tmp / name / rel).is_file():
                return f"{name}/{rel} was deleted"
        return None

    return check


def tree_digest(root: Path, rel: Path | None = None) -> str:
    """sha256 over every file's and folder's path (relative to ``rel``) and bytes."""
    digest = hashlib.sha256()
    rel = rel or root
    if not root.exists():
        return "absent"
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(rel)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# === the cases =================================================================================
# --- rectify: the pair store it reads ---------------------------------------------------------
add("pairs_missing", "pair store", sub(RECT, "--pairs", "{tmp}/nowhere"), r"nowhere")
add("pairs_empty_folder", "pair store", sub(RECT, "--pairs", "{tmp}/empty"), r"empty",
    setup=lambda ctx: (ctx.tmp / "empty").mkdir())  # fmt: skip
add(
    "pairs_is_a_model",
    "pair store",
    sub(RECT, "--pairs", "{fx}/other"),
    r"other.*manifest|manifest.*other",
)
add("pairs_is_a_file", "pair store", sub(RECT, "--pairs", "{tmp}/p.txt"), r"p\.txt",
    setup=a_file("p.txt"))  # fmt: skip
add(
    "pairs_is_an_sd_store",
    "pair store",
    sub(RECT, "--pairs", "{fx}/sd_pairs"),
    r"sd_pairs|shape|made",
)
add("pairs_flag_missing", "argument", drop(RECT, "--pairs"), r"--pairs", spawn=True)
store_case("truncated_shard", lambda s: truncate(s / SHARD), rf"{SHARD}")
store_case("truncated_shard_no_verify", lambda s: truncate(s / SHARD), rf"{SHARD}",
           extra=("--no-verify",))  # fmt: skip
store_case("empty_shard", lambda s: truncate(s / SHARD, 0), rf"{SHARD}")
store_case("flipped_byte", lambda s: flip_byte(s / SHARD), rf"{SHARD}.*sha256")
store_case("flipped_header_byte", lambda s: flip_byte(s / SHARD, 20), rf"{SHARD}")
store_case("deleted_shard", lambda s: (s / SHARD).unlink(), rf"{SHARD}.*missing")
store_case("garbage_shard", lambda s: rewrite_shard(s, 1, {}) or (s / SHARD).write_bytes(b"\xff" * 64)
           or edit_json(s / "manifest.json", lambda m: m["shards"][1].update(
               sha256=hashlib.sha256(b"\xff" * 64).hexdigest(), bytes=64)), rf"{SHARD}")  # fmt: skip
store_case("nan_in_shard", lambda s: rewrite_shard(s, 1, {"eps": rand(16, 2), "x0": with_nan(rand(16, 2))}),
           rf"{SHARD}.*x0.*finite")  # fmt: skip
store_case("inf_in_shard", lambda s: rewrite_shard(s, 1, {"eps": with_nan(rand(16, 2), float("inf")),
           "x0": rand(16, 2)}), rf"{SHARD}.*eps.*finite")  # fmt: skip
store_case("shard_wrong_shape", lambda s: rewrite_shard(s, 1, {"eps": rand(16, 3), "x0": rand(16, 3)}),
           rf"{SHARD}.*\[16, 3\]")  # fmt: skip
store_case("shard_wrong_dtype", lambda s: rewrite_shard(s, 1, {"eps": rand(16, 2, dtype=np.float64),
           "x0": rand(16, 2)}), rf"{SHARD}.*float64")  # fmt: skip
store_case(
    "shard_missing_tensor", lambda s: rewrite_shard(s, 1, {"eps": rand(16, 2)}), rf"{SHARD}.*x0"
)
store_case("shard_extra_rows", lambda s: rewrite_shard(s, 1, {"eps": rand(17, 2), "x0": rand(17, 2)}),
           rf"{SHARD}.*17")  # fmt: skip
store_case("manifest_num_pairs", manifest(lambda m: m.update(num_pairs=41)), r"num_pairs = 41")
store_case(
    "manifest_num_pairs_string", manifest(lambda m: m.update(num_pairs="40")), r"num_pairs.*'40'"
)
store_case(
    "manifest_settings_num_pairs", manifest(lambda m: m["settings"].update(num_pairs=48)), r"48"
)
store_case("manifest_shard_count", manifest(lambda m: m.update(num_shards=2, shards=m["shards"][:2])),
           r"num_shards = 2")  # fmt: skip
store_case("manifest_shape", manifest(lambda m: m["settings"].update(shape=[3])), r"\[3\]")
store_case(
    "manifest_form", manifest(lambda m: m["settings"]["form"].update(shift=3.0)), r"shift.*3\.0"
)
store_case("manifest_form_family", manifest(lambda m: m["settings"]["form"].update(family="warp")),
           r"warp")  # fmt: skip
store_case(
    "manifest_prediction", manifest(lambda m: m["settings"].update(prediction="eps")), r"'eps'"
)
store_case(
    "manifest_entry_count", manifest(lambda m: m["shards"][0].update(count=15)), r"count = 15"
)
store_case("manifest_sha_edited", manifest(lambda m: m["shards"][1].update(sha256="0" * 64)),
           rf"{SHARD}.*sha256")  # fmt: skip
store_case(
    "manifest_not_json", lambda s: (s / "manifest.json").write_text("{not json"), r"manifest\.json"
)
store_case("manifest_empty_file", lambda s: (s / "manifest.json").write_text(""), r"manifest\.json")
store_case(
    "manifest_a_list", lambda s: (s / "manifest.json").write_text("[1, 2]"), r"manifest\.json"
)
store_case("manifest_no_shards_key", manifest(lambda m: m.pop("shards")), r"shards")
store_case("manifest_no_settings_key", manifest(lambda m: m.pop("settings")), r"settings")
store_case("manifest_shards_not_list", manifest(lambda m: m.update(shards="all")), r"shards.*'all'")
store_case("manifest_newer_version", manifest(lambda m: m.update(format_version=99)), r"99")
store_case("manifest_version_string", manifest(lambda m: m.update(format_version="one")), r"'one'")
store_case("manifest_deleted", lambda s: (s / "manifest.json").unlink(), r"manifest\.json")
store_case("manifest_incomplete", manifest(lambda m: m.update(complete=False)), r"rectdiff pairs")
store_case("store_without_fingerprint", manifest(lambda m: m["settings"].update(model_fingerprint=None)),
           r"fingerprint")  # fmt: skip
add(
    "pairs_of_other_teacher",
    "pair store",
    sub(RECT, "--model", "{fx}/other"),
    r"another model.*--allow-other-teacher",
)
add("out_is_the_store", "output folder", sub(sub(RECT, "--pairs", "{tmp}/pairs"), "--out", "{tmp}/pairs"),
    r"pairs", setup=lambda ctx: copy(ctx, "pairs"))  # fmt: skip
add("out_is_the_teacher", "output folder", sub(RECT, "--out", "{tmp}/model"), r"model",
    setup=lambda ctx: copy(ctx, "teacher", "model"))  # fmt: skip

# --- rectify: flags and its output -------------------------------------------------------------
for value in ("inf", "nan", "-1", "0", "-inf"):
    add(f"rectify_lr_{value}", "numeric flag", [*RECT, f"--lr={value}"], rf"--lr {value}")
add("rectify_lr_word", "argument", sub(RECT, "--lr", "fast"), r"--lr.*'fast'", spawn=True)
add("rectify_steps_0", "numeric flag", sub(RECT, "--steps", "0"), r"--steps 0")
add("rectify_steps_negative", "numeric flag", sub(RECT, "--steps", "-3"), r"--steps -3")
add("rectify_batch_size_0", "numeric flag", sub(RECT, "--batch-size", "0"), r"--batch-size 0")
add(
    "rectify_warmup_negative",
    "numeric flag",
    [*RECT, "--warmup-steps", "-1"],
    r"warmup.* -1|-1.*warmup",
)
add(
    "rectify_ema_decay_2",
    "numeric flag",
    [*RECT, "--ema-decay", "2"],
    r"ema.*2\.0|2\.0.*ema|ema.* 2\b",
)
add("rectify_ema_decay_nan", "numeric flag", [*RECT, "--ema-decay", "nan"], r"ema.*nan")
add("rectify_ema_decay_negative", "numeric flag", [*RECT, "--ema-decay", "-0.5"], r"ema.*-0\.5")
add("rectify_lr_schedule_unknown", "argument", [*RECT, "--lr-schedule", "zigzag"], r"zigzag")
add(
    "rectify_time_sampler_unknown",
    "argument",
    [*RECT, "--time-sampler", "gaussianish"],
    r"gaussianish",
)
add("rectify_weighting_unknown", "argument", [*RECT, "--weighting", "heavy"], r"heavy")
add("rectify_form_unknown", "argument", [*RECT, "--form", "vpp"], r"vpp")
add(
    "rectify_form_toml_missing",
    "argument",
    [*RECT, "--form", "{tmp}/nothere.toml"],
    r"nothere\.toml",
)
add("rectify_prediction_unknown", "argument", [*RECT, "--prediction", "noise"], r"noise")
add(
    "rectify_checkpoint_every_negative",
    "numeric flag",
    [*RECT, "--checkpoint-every", "-1"],
    r"--checkpoint-every -1",
)
add("rectify_log_with_unknown", "argument", [*RECT, "--log-with", "mlflow"], r"mlflow", spawn=True)
add("rectify_log_with_wandb_missing", "argument", [*RECT, "--log-with", "wandb"], r"wandb", expect="either",
    check=finite_model("student"))  # fmt: skip
add("rectify_seed_word", "argument", sub(RECT, "--seed", "x"), r"--seed.*'x'", spawn=True)
add("rectify_seed_negative", "numeric flag", sub(RECT, "--seed", "-1"), r"--seed -1", expect="either",
    check=finite_model("student"))  # fmt: skip
add("rectify_out_user_folder", "output folder", RECT, r"student", setup=user_folder("student"))
add("rectify_out_is_a_file", "output folder", RECT, r"student", setup=a_file("student"))
add("rectify_out_read_only", "output folder", sub(RECT, "--out", "{tmp}/ro/student"), r"ro",
    setup=ro_mount("ro"), needs_root=True)  # fmt: skip
add("rectify_out_full_disk", "output folder", sub(RECT, "--out", "{tmp}/full/student"), r"full",
    setup=full_mount("full"), needs_root=True)  # fmt: skip
add("rectify_model_missing", "model files", sub(RECT, "--model", "{tmp}/nomodel"), r"nomodel")
add("rectify_model_is_store", "model files", sub(RECT, "--model", "{fx}/pairs"), r"pairs")
add(
    "rectify_model_and_factory",
    "argument",
    [*RECT, "--model-factory", "os:getcwd"],
    r"--model.*--model-factory|--model-factory.*--model",
)
add(
    "rectify_factory_bad_module",
    "argument",
    [*drop(RECT, "--model"), "--model-factory", "nosuchmod:build"],
    r"nosuchmod",
)
add(
    "rectify_factory_no_colon",
    "argument",
    [*drop(RECT, "--model"), "--model-factory", "nosuchmod"],
    r"nosuchmod",
)
add(
    "rectify_factory_not_callable",
    "argument",
    [*drop(RECT, "--model"), "--model-factory", "math:pi"],
    r"math:pi|pi",
)
add(
    "rectify_factory_returns_int",
    "argument",
    [*drop(RECT, "--model"), "--model-factory", "os:getpid"],
    r"os:getpid|getpid",
)
add(
    "rectify_distill_bad_prediction",
    "argument",
    [*RECT, "--distill", "--prediction", "bogus"],
    r"bogus",
)


def rerun(ctx: Ctx) -> None:
    shutil.copytree(ctx.fx / "student", ctx.tmp / "student")
    shutil.copytree(ctx.fx / "student.train", ctx.tmp / "student.train")


add("rectify_rerun_other_lr", "resume", sub(RECT, "--lr", "0.5"), r"lr", setup=rerun)
add("rectify_rerun_other_steps", "resume", sub(RECT, "--steps", "3"), r"steps", setup=rerun)
add("rectify_rerun_other_teacher", "resume", [*sub(RECT, "--model", "{fx}/other"), "--allow-other-teacher"],
    r"teacher|model|fingerprint", setup=rerun)  # fmt: skip


def same_weights(folder: str):
    """Right when ``folder``'s weights equal the fixture's (its model.json records where it
    was trained from, which differs for the copy)."""

    def check(ctx: Ctx, res: runner.Result) -> str | None:
        name = f"{folder}/model.safetensors"
        same = (ctx.tmp / name).read_bytes() == (ctx.fx / name).read_bytes()
        return None if same else "the rerun changed the finished student's weights"

    return check


add(
    "rectify_rerun_same",
    "resume",
    RECT,
    expect="either",
    setup=rerun,
    check=same_weights("student"),
)
add("rectify_huge_steps", "long run", [a for a in sub(RECT, "--steps", "100000000") if a != "--no-progress"],
    r"100000000", expect="feedback", timeout=30)  # fmt: skip
add("rectify_fm_t_max_1_flow", "schedule file", [*RECT, "--form", "{tmp}/s.toml", "--prediction", "flow"],
    expect="ok", setup=schedule('family = "fm"\nt_max = 1.0\n'), check=finite_model("student"))  # fmt: skip

# --- rectify --form: schedule TOML ---------------------------------------------------------------
form_case("beta_min_string", 'family = "vp"\nbeta_min = "0.1"\n', r"beta_min.*'0\.1'")
form_case("beta_min_negative", 'family = "vp"\nbeta_min = -0.1\n', r"beta_min.*-0\.1")
form_case(
    "beta_max_below_min", 'family = "vp"\nbeta_min = 20.0\nbeta_max = 0.1\n', r"beta_m(in|ax)"
)
form_case("beta_max_nan", 'family = "vp"\nbeta_max = nan\n', r"beta_max.*nan")
form_case("custom_without_sigma", 'family = "custom"\nalpha = "cos(pi * t / 2)"\n', r"sigma")
form_case("alpha_int", 'family = "custom"\nalpha = 3\nsigma = "t"\n', r"alpha = 3")
form_case("huge_expression", 'family = "custom"\nalpha = "' + "(" * 3000 + "t" + ")" * 3000 + '"\nsigma = "t"\n',
          r"alpha.*6001 characters")  # fmt: skip
form_case(
    "long_product", 'family = "custom"\nalpha = "' + "t*" * 5000 + 't"\nsigma = "t"\n', r"10001"
)
form_case("deep_unary", 'family = "custom"\nalpha = "' + "-" * 900 + 't"\nsigma = "t"\n', r"alpha")
form_case(
    "overflowing_expression", 'family = "custom"\nalpha = "9**9**9**9"\nsigma = "t"\n', r"alpha"
)
form_case("huge_power", 'family = "custom"\nalpha = "t**99999999999"\nsigma = "t"\n', r"alpha")
form_case("import_in_expression", 'family = "custom"\nalpha = "__import__(\'os\').system(\'touch PWNED\')"\nsigma = "t"\n',
          r"__import__|alpha")  # fmt: skip
form_case(
    "attribute_in_expression",
    'family = "custom"\nalpha = "t.__class__"\nsigma = "t"\n',
    r"__class__|alpha",
)
form_case(
    "lambda_in_expression",
    'family = "custom"\nalpha = "(lambda: 1)()"\nsigma = "t"\n',
    r"lambda|alpha",
)
form_case(
    "unknown_name_in_expression", 'family = "custom"\nalpha = "foo(t)"\nsigma = "t"\n', r"foo"
)
form_case("syntax_error_expression", 'family = "custom"\nalpha = "cos(t"\nsigma = "t"\n', r"cos\(t")
# alpha = 1/t is finite on the safe range [t_min, t_max] (logsnr still decreasing): a valid form
form_case("division_by_zero_expression", 'family = "custom"\nalpha = "1 / t"\nsigma = "t"\n', r"alpha|1 / t",
          expect="either", check=finite_model("student"))  # fmt: skip
form_case(
    "log_domain_expression",
    'family = "custom"\nalpha = "log(t - 2)"\nsigma = "t"\n',
    r"log\(t - 2\)|alpha",
)
form_case(
    "sigma_negative_expression", 'family = "custom"\nalpha = "1 - t"\nsigma = "-t"\n', r"sigma"
)
form_case("not_toml", 'family = "vp"\nthis is not toml', r"s\.toml.*TOML|TOML.*s\.toml")
form_case("unknown_family", 'family = "warp"\n', r"warp")
form_case("family_missing", "beta_min = 0.1\n", r"family")
form_case("unknown_key_typo", 'family = "vp"\nbetamin = 0.1\n', r"betamin")
form_case("t_min_above_t_max", 'family = "vp"\nt_min = 0.9\nt_max = 0.1\n', r"t_m(in|ax)")
form_case("t_min_negative", 'family = "fm"\nt_min = -0.5\n', r"t_min.*-0\.5")
form_case("t_max_above_1", 'family = "fm"\nt_max = 1.5\n', r"t_max.*1\.5")
form_case("fm_t_max_1_eps", 'family = "fm"\nt_max = 1.0\n', r"t_max=1\.0.*'eps'", prediction="eps")
form_case("fm_t_max_1_x0_start", 'family = "fm"\nt_max = 1.0\n', r"t_max", prediction="x0", expect="either",
          check=finite_model("student"))  # fmt: skip
form_case("empty_schedule_file", "", r"family|s\.toml")

# --- pairs ---------------------------------------------------------------------------------------
add("pairs_num_0", "numeric flag", sub(PAIRS, "--num", "0"), r"--num 0")
add("pairs_num_negative", "numeric flag", sub(PAIRS, "--num", "-4"), r"--num -4")
add("pairs_num_word", "argument", sub(PAIRS, "--num", "many"), r"--num.*'many'", spawn=True)
add("pairs_num_float", "argument", sub(PAIRS, "--num", "4.5"), r"--num.*'4\.5'", spawn=True)
add("pairs_steps_0", "numeric flag", sub(PAIRS, "--steps", "0"), r"--steps 0")
add("pairs_shard_size_0", "numeric flag", [*PAIRS, "--shard-size", "0"], r"--shard-size 0")
add("pairs_batch_size_0", "numeric flag", [*PAIRS, "--batch-size", "0"], r"--batch-size 0")
add("pairs_bad_t_grid", "argument", [*PAIRS, "--t-grid", "cosine"], r"cosine")
add("pairs_bad_solver", "argument", sub(PAIRS, "--solver", "rk9"), r"rk9")
add("pairs_adaptive_solver", "argument", sub(PAIRS, "--solver", "dopri5"), r"dopri5", expect="either",
    check=file_written("out/manifest.json"))  # fmt: skip
add("pairs_bad_shape", "argument", [*PAIRS, "--shape", "a,b"], r"a,b")
add("pairs_shape_zero", "argument", [*PAIRS, "--shape", "0"], r"--shape|'0'|\b0\b")
add("pairs_wrong_shape", "argument", [*PAIRS, "--shape", "3"], r"--shape")
add("pairs_model_missing", "model files", sub(PAIRS, "--model", "{tmp}/nomodel"), r"nomodel")
add(
    "pairs_model_is_a_file",
    "model files",
    sub(PAIRS, "--model", "{tmp}/m.bin"),
    r"m\.bin",
    setup=a_file("m.bin"),
)
add("pairs_no_model", "argument", drop(PAIRS, "--model"), r"--model")
add(
    "pairs_weights_without_factory",
    "argument",
    [*PAIRS, "--weights", "{tmp}/w.pt"],
    r"--weights|--model-factory",
)
add("pairs_convention_unknown", "argument", [*drop(PAIRS, "--model"), "--model-factory", "rectdiff.models:MLP",
    "--convention", "magic"], r"magic")  # fmt: skip
add("pairs_convention_arg_no_equals", "argument", [*drop(PAIRS, "--model"), "--model-factory",
    "rectdiff.models:MLP", "--convention", "torchcfm", "--convention-arg", "sigma_min"], r"sigma_min")  # fmt: skip
add("pairs_weights_missing_file", "model files", [*drop(PAIRS, "--model"), "--model-factory",
    "rectdiff.models:MLP", "--weights", "{tmp}/none.safetensors", "--convention", "torchcfm"], r"none\.safetensors")  # fmt: skip
add("pairs_out_user_folder", "output folder", PAIRS, r"out", setup=user_folder("out"))
add("pairs_out_is_a_file", "output folder", PAIRS, r"out", setup=a_file("out"))
add("pairs_out_is_a_model", "output folder", sub(PAIRS, "--out", "{tmp}/model"), r"model",
    setup=lambda ctx: copy(ctx, "teacher", "model"))  # fmt: skip
add("pairs_out_read_only", "output folder", sub(PAIRS, "--out", "{tmp}/ro/out"), r"ro",
    setup=ro_mount("ro"), needs_root=True)  # fmt: skip
add("pairs_out_full_disk", "output folder", sub(PAIRS, "--out", "{tmp}/full/out"), r"full",
    setup=full_mount("full"), needs_root=True)  # fmt: skip
FULL_PAIRS = ["pairs", "--model", "{fx}/teacher", "--out", "{tmp}/pairs", "--num", "40",
              "--shard-size", "16", "--steps", "2", "--solver", "ddim", "--no-progress"]  # fmt: skip
add("pairs_resume_other_num", "resume", sub(FULL_PAIRS, "--num", "48"), r"48|num",
    setup=lambda ctx: copy(ctx, "pairs"))  # fmt: skip
add("pairs_resume_other_steps", "resume", sub(FULL_PAIRS, "--steps", "3"), r"steps",
    setup=lambda ctx: copy(ctx, "pairs"))  # fmt: skip
add("pairs_resume_other_seed", "resume", [*FULL_PAIRS, "--seed", "5"], r"seed",
    setup=lambda ctx: copy(ctx, "pairs"))  # fmt: skip
add("pairs_resume_other_model", "resume", sub(FULL_PAIRS, "--model", "{fx}/other"), r"model|fingerprint",
    setup=lambda ctx: copy(ctx, "pairs"))  # fmt: skip
add("pairs_resume_other_shard_size", "resume", sub(FULL_PAIRS, "--shard-size", "8"), r"shard",
    setup=lambda ctx: copy(ctx, "pairs"))  # fmt: skip
add("pairs_rerun_complete", "resume", FULL_PAIRS, expect="ok", setup=lambda ctx: copy(ctx, "pairs"),
    check=repaired)  # fmt: skip
add("pairs_repairs_truncated", "pair store", FULL_PAIRS, expect="ok", check=repaired,
    setup=lambda ctx: truncate(copy(ctx, "pairs") / SHARD))  # fmt: skip
add("pairs_repairs_flipped", "pair store", FULL_PAIRS, expect="ok", check=repaired,
    setup=lambda ctx: flip_byte(copy(ctx, "pairs") / SHARD))  # fmt: skip
add("pairs_repairs_deleted", "pair store", FULL_PAIRS, expect="ok", check=repaired,
    setup=lambda ctx: (copy(ctx, "pairs") / SHARD).unlink())  # fmt: skip
add("pairs_store_manifest_garbage", "pair store", FULL_PAIRS, r"manifest\.json",
    setup=lambda ctx: (copy(ctx, "pairs") / "manifest.json").write_text("{oops"))  # fmt: skip


def after_full_disk(ctx: Ctx) -> None:
    """``rectdiff pairs`` into a tmpfs that fills at the second shard; its partial store is
    copied out (the case then reruns with space)."""
    disk = ctx.mount("disk", "64k")
    (disk / ".filler").write_bytes(b"\0" * (64 * 1024 - 2 * 4096 - 1200))
    res = runner.run([a.replace("{tmp}/pairs", str(disk / "pairs")).replace("{fx}", str(ctx.fx))
                      for a in FULL_PAIRS], ctx.tmp, TIMEOUT_S)  # fmt: skip
    if res.rc != 2:
        raise RuntimeError(f"the full-disk run did not fail as planned: {res.rc} {res.stderr}")
    shutil.copytree(disk / "pairs", ctx.tmp / "pairs")
    ctx.unmount()
    (ctx.tmp / "disk").rmdir()


add("pairs_rerun_after_full_disk", "output folder", FULL_PAIRS, expect="ok", check=repaired,
    setup=after_full_disk, needs_root=True)  # fmt: skip
add("pairs_huge_steps", "long run", [a for a in sub(PAIRS, "--steps", "100000000") if a != "--no-progress"],
    r"100000000", expect="feedback", timeout=30)  # fmt: skip
add("pairs_huge_num", "long run", [a for a in sub(PAIRS, "--num", "1000000000") if a != "--no-progress"],
    r"1000000000", expect="feedback", timeout=30)  # fmt: skip


# --- model folders (read by pairs, diagnose, plot) -------------------------------------------------
model_case("truncated_weights", lambda f: truncate(f / "model.safetensors"), r"model\.safetensors")
model_case("empty_weights", lambda f: truncate(f / "model.safetensors", 0), r"model\.safetensors")
model_case(
    "flipped_weights_header",
    lambda f: flip_byte(f / "model.safetensors", 12),
    r"model\.safetensors",
)
model_case("weights_missing", lambda f: (f / "model.safetensors").unlink(), r"model\.safetensors")
model_case("model_json_missing", lambda f: (f / "model.json").unlink(), r"model")
model_case("model_json_not_json", lambda f: (f / "model.json").write_text("{"), r"model\.json")
model_case("model_json_a_list", lambda f: (f / "model.json").write_text("[]"), r"model\.json")
model_case(
    "model_json_unknown_net",
    write_model_json(lambda m: m["net"].update(kind="transformer")),
    r"transformer",
)
model_case(
    "model_json_bad_prediction", write_model_json(lambda m: m.update(prediction="noise")), r"noise"
)
model_case(
    "model_json_bad_form", write_model_json(lambda m: m["form"].update(family="warp")), r"warp"
)
model_case("model_json_no_form", write_model_json(lambda m: m.pop("form")), r"form")
model_case(
    "model_json_wrong_width",
    write_model_json(lambda m: m["net"]["kwargs"].update(hidden=16)),
    r"model|hidden|size|shape",
)
model_case(
    "model_json_newer_version", write_model_json(lambda m: m.update(format_version=99)), r"99"
)
model_case(
    "model_json_other_format",
    write_model_json(lambda m: m.update(format="something-else")),
    r"something-else",
)
model_case("weights_of_another_net", other_weights, r"model\.safetensors|shape|size")
model_case("nan_weights", nan_weights, r"model\.safetensors|finite|nan")
model_case(
    "diagnose_truncated_weights",
    lambda f: truncate(f / "model.safetensors"),
    r"model\.safetensors",
    base=DIAG,
)
model_case(
    "plot_truncated_weights",
    lambda f: truncate(f / "model.safetensors"),
    r"model\.safetensors",
    base=PLOT,
)
model_case("diagnose_nan_weights", nan_weights, r"model\.safetensors|finite|nan", base=DIAG)

# --- diagnose ---------------------------------------------------------------------------------------
add("diagnose_num_0", "numeric flag", sub(DIAG, "--num", "0"), r"--num 0")
add("diagnose_num_negative", "numeric flag", sub(DIAG, "--num", "-1"), r"--num -1")
add("diagnose_steps_0", "numeric flag", sub(DIAG, "--steps", "0"), r"--steps 0")
add(
    "diagnose_rtol_atol_0",
    "numeric flag",
    [*DIAG, "--rtol", "0", "--atol", "0"],
    r"--rtol 0 --atol 0",
)
add("diagnose_rtol_negative", "numeric flag", [*DIAG, "--rtol", "-1"], r"--rtol -1")
add("diagnose_rtol_nan", "numeric flag", [*DIAG, "--rtol", "nan"], r"--rtol nan")
add("diagnose_atol_inf", "numeric flag", [*DIAG, "--atol", "inf"], r"--atol inf")
add("diagnose_bad_solver", "argument", [*DIAG, "--solver", "euler9"], r"euler9")
add("diagnose_out_folder", "output folder", sub(DIAG, "--out", "{tmp}/d"), r"d",
    setup=lambda ctx: (ctx.tmp / "d").mkdir())  # fmt: skip
add("diagnose_out_read_only", "output folder", sub(DIAG, "--out", "{tmp}/ro/d.json"), r"ro",
    setup=ro_mount("ro"), needs_root=True)  # fmt: skip
add("diagnose_out_full_disk", "output folder", sub(DIAG, "--out", "{tmp}/full/d.json"), r"full",
    setup=full_mount("full"), needs_root=True)  # fmt: skip
add("diagnose_out_parent_is_file", "output folder", sub(DIAG, "--out", "{tmp}/f/d.json"), r"f",
    setup=a_file("f"))  # fmt: skip
add("diagnose_out_new_subfolder", "output folder", sub(DIAG, "--out", "{tmp}/new/d.json"), expect="ok",
    check=file_written("new/d.json"))  # fmt: skip
add("diagnose_model_missing", "model files", sub(DIAG, "--model", "{tmp}/nomodel"), r"nomodel")
add("diagnose_model_is_store", "model files", sub(DIAG, "--model", "{fx}/pairs"), r"pairs")
add("diagnose_second_model_missing", "model files", [*DIAG, "--model", "{tmp}/gone"], r"gone")
add(
    "diagnose_model_is_sd_pipeline",
    "model files",
    sub(DIAG, "--model", "{fx}/sd_teacher"),
    r"sd_teacher",
)
add("diagnose_no_model", "argument", drop(DIAG, "--model"), r"--model")
add("diagnose_huge_steps", "long run", sub(DIAG, "--steps", "100000000"), r"100000000",
    expect="feedback", timeout=30)  # fmt: skip

# --- plot --------------------------------------------------------------------------------------------
add("plot_num_0", "numeric flag", sub(PLOT, "--num", "0"), r"--num 0")
add("plot_num_negative", "numeric flag", sub(PLOT, "--num", "-5"), r"--num -5")
add("plot_model_missing", "model files", sub(PLOT, "--model", "{tmp}/nomodel"), r"nomodel")
add("plot_model_is_store", "model files", sub(PLOT, "--model", "{fx}/pairs"), r"pairs")
add(
    "plot_results_missing",
    "argument",
    ["plot", "--results", "{tmp}/r.json", "--out", "{tmp}/fig"],
    r"r\.json",
)
add("plot_results_not_json", "data", ["plot", "--results", "{tmp}/r.json", "--out", "{tmp}/fig"],
    r"r\.json", setup=a_file("r.json", "{oops"))  # fmt: skip
add("plot_results_empty_object", "data", ["plot", "--results", "{tmp}/r.json", "--out", "{tmp}/fig"],
    r"r\.json", setup=a_file("r.json", "{}"))  # fmt: skip
add("plot_results_a_list", "data", ["plot", "--results", "{tmp}/r.json", "--out", "{tmp}/fig"],
    r"r\.json", setup=a_file("r.json", "[1]"))  # fmt: skip
add(
    "plot_results_is_folder",
    "argument",
    ["plot", "--results", "{tmp}", "--out", "{tmp}/fig"],
    r"tmp|folder|directory",
)
add(
    "plot_loss_log_missing",
    "argument",
    ["plot", "--loss-log", "{tmp}/l.csv", "--out", "{tmp}/fig"],
    r"l\.csv",
)
add("plot_loss_log_garbage", "data", ["plot", "--loss-log", "{tmp}/l.csv", "--out", "{tmp}/fig"],
    r"l\.csv", setup=a_file("l.csv", "\x00\x01garbage\n1;2;3\n"))  # fmt: skip
add("plot_loss_log_empty", "data", ["plot", "--loss-log", "{tmp}/l.csv", "--out", "{tmp}/fig"],
    r"l\.csv", setup=a_file("l.csv", ""))  # fmt: skip
add("plot_loss_log_header_only", "data", ["plot", "--loss-log", "{tmp}/l.csv", "--out", "{tmp}/fig"],
    r"l\.csv", setup=a_file("l.csv", "step,loss,lr\n"))  # fmt: skip
add("plot_loss_log_nan", "data", ["plot", "--loss-log", "{tmp}/l.csv", "--out", "{tmp}/fig"], r"l\.csv|nan",
    setup=a_file("l.csv", "step,loss,lr\n1,nan,0.1\n2,0.5,0.1\n"), expect="either",
    check=file_written("fig"))  # fmt: skip
add("plot_loss_log_folder_without_csv", "argument", ["plot", "--loss-log", "{tmp}/run", "--out", "{tmp}/fig"],
    r"run", setup=lambda ctx: (ctx.tmp / "run").mkdir())  # fmt: skip
add("plot_out_is_a_file", "output folder", PLOT, r"fig", setup=a_file("fig"))
add("plot_out_read_only", "output folder", sub(PLOT, "--out", "{tmp}/ro/fig"), r"ro",
    setup=ro_mount("ro"), needs_root=True)  # fmt: skip
add(
    "plot_two_sources",
    "argument",
    [*PLOT, "--results", "{tmp}/r.json"],
    r"--results|--model",
    spawn=True,
)
add("plot_no_source", "argument", ["plot", "--out", "{tmp}/fig"], r"--results|--model", spawn=True)
add("plot_loss_log_of_a_run", "right thing", ["plot", "--loss-log", "{fx}/student.train", "--out", "{tmp}/fig"],
    expect="ok", check=file_written("fig"))  # fmt: skip

# --- schedules -----------------------------------------------------------------------------------
for value in ("nan", "1.5", "-0.1", "inf"):
    add(f"schedules_t_{value}", "numeric flag", [*SCHED, "--t", "0.5", value], rf"--t {value}")
add("schedules_t_word", "argument", [*SCHED, "--t", "half"], r"--t.*'half'", spawn=True)
add("schedules_out_is_a_file", "output folder", SCHED, r"sched", setup=a_file("sched"))
add("schedules_out_read_only", "output folder", sub(SCHED, "--out", "{tmp}/ro/sched"), r"ro",
    setup=ro_mount("ro"), needs_root=True)  # fmt: skip
add("schedules_out_full_disk", "output folder", sub(SCHED, "--out", "{tmp}/full/sched"), r"full",
    setup=full_mount("full"), needs_root=True)  # fmt: skip
add(
    "schedules_endpoints",
    "right thing",
    [*SCHED, "--t", "0", "1"],
    expect="ok",
    check=stdout_no_nan,
)

# --- compare: the config file --------------------------------------------------------------------
cfg_case("lr_fast", setitem("train", "lr", "fast"), r"lr = 'fast'")
cfg_case("steps_float", setitem("train", "steps", 1.5), r"steps = 1\.5")
cfg_case("steps_zero", setitem("train", "steps", 0), r"steps.*\b0\b")
cfg_case("lr_negative", setitem("train", "lr", -0.001), r"lr.*-0\.001")
cfg_case("lr_nan", setitem("train", "lr", float("nan")), r"lr.*nan")
cfg_case("batch_size_string", setitem("train", "batch_size", "16"), r"batch_size.*'16'")
cfg_case("train_unknown_key", setitem("train", "learning_rate", 0.1), r"learning_rate")
cfg_case("top_unknown_key", setitem(None, "sed", 3), r"sed")
cfg_case("unknown_section", setitem("trian", "steps", 3), r"trian")
cfg_case("forms_string", setitem("grid", "forms", "fm"), r"forms = 'fm'")
cfg_case("forms_empty", setitem("grid", "forms", []), r"\[grid\].*form")
cfg_case("forms_unknown", setitem("grid", "forms", ["fm", "warp"]), r"warp")
cfg_case("predictions_unknown", setitem("grid", "predictions", ["v", "noise"]), r"noise")
cfg_case("predictions_string", setitem("grid", "predictions", "v"), r"predictions = 'v'")
cfg_case("grid_unknown_key", setitem("grid", "shapes", [1]), r"shapes")
cfg_case("seed_string", setitem(None, "seed", "zero"), r"seed.*'zero'")
cfg_case("seed_float", setitem(None, "seed", 1.7), r"seed.*1\.7")
cfg_case("workers_zero", setitem(None, "workers", 0), r"workers.*\b0\b")
cfg_case("workers_string", setitem(None, "workers", "two"), r"workers.*'two'")
cfg_case("threads_zero", setitem(None, "threads", 0), r"threads.*\b0\b")
cfg_case("equal_unknown", setitem(None, "equal", "snr"), r"snr")
cfg_case("data_unknown_name", setitem("data", "name", "9gaussians"), r"9gaussians")
cfg_case("n_train_too_big", lambda d: d["data"].update(name="digits", n_train=100000), r"100000")
cfg_case("n_train_zero", setitem("data", "n_train", 0), r"n_train.*\b0\b")
cfg_case("n_train_negative", setitem("data", "n_train", -5), r"n_train.*-5")
cfg_case("n_eval_zero", setitem("data", "n_eval", 0), r"n_eval.*\b0\b")
cfg_case("data_unknown_key", setitem("data", "size", 5), r"size")
cfg_case("data_params_unknown", setitem("data", "params", {"radius": 2, "wobble": 1}), r"wobble")
cfg_case("network_unknown_kind", setitem("network", "kind", "transformer"), r"transformer")
cfg_case(
    "network_bad_option",
    setitem("network", "options", {"hidden": 8, "depth": 1, "width": 3}),
    r"width",
)
cfg_case("network_hidden_string", setitem("network", "options", {"hidden": "big"}), r"hidden|big")
cfg_case("reference_bad_prediction", setitem("reference", "prediction", "noise"), r"noise")
cfg_case("rectify_num_pairs_zero", setitem("rectify", "num_pairs", 0), r"num_pairs.*\b0\b")
cfg_case(
    "rectify_methods_unknown", setitem("rectify", "methods", ["reflow", "teleport"]), r"teleport"
)
cfg_case("rectify_methods_string", setitem("rectify", "methods", "reflow"), r"'reflow'")
cfg_case("rectify_phases_negative", setitem("rectify", "phases", -2), r"phases.*-2")
cfg_case("rectify_solver_unknown", setitem("rectify", "solver", "rk9"), r"rk9")
cfg_case("rectify_t_grid_unknown", setitem("rectify", "t_grid", "cosine"), r"cosine")
cfg_case("rectify_unknown_key", setitem("rectify", "rounds_", 2), r"rounds_")
cfg_case(
    "rectify_train_lr_string", lambda d: d["rectify"]["train"].update(lr="slow"), r"lr.*'slow'"
)
cfg_case("evaluation_steps_zero", setitem("evaluation", "steps", [0, 1]), r"steps.*\b0\b")
cfg_case("evaluation_solver_unknown", setitem("evaluation", "solvers", ["ddim", "rk9"]), r"rk9")
cfg_case("evaluation_metric_unknown", setitem("evaluation", "metrics", ["fid"]), r"fid")
cfg_case(
    "evaluation_rtol_atol_zero", lambda d: d["evaluation"].update(rtol=0.0, atol=0.0), r"rtol|atol"
)
cfg_case("evaluation_unknown_key", setitem("evaluation", "stepz", [1]), r"stepz")
cfg_case("evaluation_diagnostic_unknown", setitem("evaluation", "diagnostics", ["vibes"]), r"vibes")
cfg_case("fm_t_max_1_in_grid", setitem("grid", "forms", [{"family": "fm", "t_max": 1.0}]), r"t_max")
CASES[-1].expect, CASES[-1].check = "either", file_written("out/report.md")
cfg_case(
    "grid_form_toml_missing", setitem("grid", "forms", ["{tmp}/nothere.toml"]), r"nothere\.toml"
)
add("compare_config_missing", "config file", CMP, r"c\.toml")
add(
    "compare_config_not_toml",
    "config file",
    CMP,
    r"c\.toml",
    setup=a_file("c.toml", "[train\nsteps = 2"),
)
add(
    "compare_config_is_folder",
    "config file",
    CMP,
    r"c\.toml",
    setup=lambda ctx: (ctx.tmp / "c.toml").mkdir(),
)
add(
    "compare_config_binary",
    "config file",
    CMP,
    r"c\.toml",
    setup=lambda ctx: (ctx.tmp / "c.toml").write_bytes(b"\xff\xfe\x00"),
)
add(
    "compare_workers_flag_0",
    "numeric flag",
    [*CMP, "--workers", "0"],
    r"--workers 0|workers.*\b0\b",
    setup=config(),
)
add(
    "compare_workers_flag_negative",
    "numeric flag",
    [*CMP, "--workers", "-2"],
    r"-2",
    setup=config(),
)


def earlier_compare(ctx: Ctx) -> None:
    """What an earlier compare leaves in ``out`` (as tests/apps/test_compare_out.py)."""
    out = ctx.tmp / "out"
    shutil.copytree(ctx.fx / "teacher", out / "models" / "fm_v" / "teacher")
    (out / "report.md").write_text("# old\n")
    (out / "results.json").write_text("{}")
    config()(ctx)


add("compare_out_earlier_output", "output folder", CMP, r"--overwrite", setup=earlier_compare)
add(
    "compare_out_user_folder",
    "output folder",
    CMP,
    r"notes\.txt|sub",
    setup=compose(user_folder("out"), config()),
)
add("compare_out_user_file_overwrite", "output folder", [*CMP, "--overwrite"], r"notes\.txt",
    setup=compose(earlier_compare, lambda ctx: (ctx.tmp / "out" / "notes.txt").write_text("mine")))  # fmt: skip
add("compare_out_is_a_file", "output folder", CMP, r"out", setup=compose(a_file("out"), config()))
add("compare_out_read_only", "output folder", sub(CMP, "--out", "{tmp}/ro/out"), r"ro",
    setup=compose(ro_mount("ro"), config()), needs_root=True)  # fmt: skip
add("compare_out_full_disk", "output folder", sub(CMP, "--out", "{tmp}/full/out"), r"full",
    setup=compose(full_mount("full"), config()), needs_root=True)  # fmt: skip


def quick_steps(ctx: Ctx, res: runner.Result) -> str | None:
    """--quick: the report states the steps that ran (a fifth of 10), not the config's."""
    report = (ctx.tmp / "out" / "report.md").read_text()
    results = json.loads((ctx.tmp / "out" / "results.json").read_text())
    if "10 steps" in report or re.search(r"steps\D{0,6}10\b", report):
        return "report.md quotes the config's 10 training steps"
    if '"steps": 10' in json.dumps(results.get("config", {})):
        return "results.json records 10 training steps"
    return None


add("compare_quick_reports_steps_run", "right thing", [*CMP, "--quick"], expect="ok", check=quick_steps,
    setup=config(lambda d: d["train"].update(steps=10)))  # fmt: skip

# --- compare: data files -------------------------------------------------------------------------
nan_data = np.zeros((40, 2), np.float32)
nan_data[7, 1] = np.nan
data_case("nan_in_npy", "{tmp}/x.npy", npy(nan_data), r"x\.npy.*7.*nan|x\.npy.*nan.*7")
inf_data = np.zeros((40, 2), np.float32)
inf_data[3, 0] = np.inf
data_case("inf_in_npy", "{tmp}/x.npy", npy(inf_data), r"x\.npy.*inf")
data_case("empty_npy", "{tmp}/x.npy", npy(np.zeros((0, 2), np.float32)), r"x\.npy")
data_case("npy_1d", "{tmp}/x.npy", npy(np.zeros(40, np.float32)), r"x\.npy")
data_case("npy_too_few_points", "{tmp}/x.npy", npy(np.zeros((1, 2), np.float32)), r"x\.npy")
data_case("npy_strings", "{tmp}/x.npy", npy(np.array([["a", "b"]] * 40)), r"x\.npy")
data_case("npy_corrupt", "{tmp}/x.npy", a_file("x.npy", "not numpy"), r"x\.npy")
data_case("npy_missing", "{tmp}/x.npy", lambda ctx: None, r"x\.npy")
data_case(
    "npy_pickled_objects", "{tmp}/x.npy", npy(np.array([{"a": 1}] * 40, dtype=object)), r"x\.npy"
)
data_case("corrupt_png", "{tmp}/img", images(corrupt=True), r"3\.png")
data_case("empty_image_folder", "{tmp}/img", images(empty=True), r"img")
data_case("mixed_image_sizes", "{tmp}/img", images(gray_and_rgb=True), r"rgb\.png|img", expect="either",
          check=file_written("out/report.md"))  # fmt: skip

# --- sd tiny -----------------------------------------------------------------------------------
add("sd_tiny_into_user_folder", "output folder", SDTINY, r"pipe", setup=user_folder("pipe"))
add("sd_tiny_into_a_file", "output folder", SDTINY, r"pipe", setup=a_file("pipe"))
add("sd_tiny_into_existing_pipeline", "output folder", SDTINY, r"pipe", expect="either",
    setup=lambda ctx: shutil.copytree(ctx.fx / "sd_other", ctx.tmp / "pipe"), check=file_written("pipe/model_index.json"))  # fmt: skip
add("sd_tiny_into_empty_folder", "output folder", SDTINY, expect="ok",
    setup=lambda ctx: (ctx.tmp / "pipe").mkdir(), check=file_written("pipe/model_index.json"))  # fmt: skip
add("sd_tiny_sample_size_0", "numeric flag", [*SDTINY, "--sample-size", "0"], r"\b0\b")
add("sd_tiny_sample_size_odd", "numeric flag", [*SDTINY, "--sample-size", "7"], r"\b7\b")
add("sd_tiny_sample_size_negative", "numeric flag", [*SDTINY, "--sample-size", "-8"], r"-8")
add("sd_tiny_fit_steps_negative", "numeric flag", sub(SDTINY, "--fit-steps", "-1"), r"-1")
add("sd_tiny_family_unknown", "argument", [*SDTINY, "--family", "sd9"], r"sd9", spawn=True)
add("sd_tiny_read_only", "output folder", ["sd", "tiny", "{tmp}/ro/pipe", "--fit-steps", "0"], r"ro",
    setup=ro_mount("ro"), needs_root=True)  # fmt: skip
add("sd_tiny_full_disk", "output folder", ["sd", "tiny", "{tmp}/full/pipe", "--fit-steps", "0"], r"full",
    setup=full_mount("full"), needs_root=True)  # fmt: skip
add("sd_tiny_no_dir", "argument", ["sd", "tiny"], r"dir", spawn=True)

# --- sd pairs ----------------------------------------------------------------------------------
add(
    "sd_pairs_pipeline_missing",
    "model files",
    sub(SDPAIRS, "--pipeline", "{tmp}/nopipe"),
    r"nopipe",
)
add(
    "sd_pairs_pipeline_is_rectdiff_model",
    "model files",
    sub(SDPAIRS, "--pipeline", "{fx}/teacher"),
    r"teacher",
)
add("sd_pairs_pipeline_no_unet", "model files", sub(SDPAIRS, "--pipeline", "{tmp}/pipe"), r"unet",
    setup=lambda ctx: shutil.rmtree(copy(ctx, "sd_teacher", "pipe") / "unet"))  # fmt: skip
add("sd_pairs_pipeline_truncated_unet", "model files", sub(SDPAIRS, "--pipeline", "{tmp}/pipe"), r"unet|safetensors",
    setup=lambda ctx: truncate(copy(ctx, "sd_teacher", "pipe") / "unet" / "diffusion_pytorch_model.safetensors"))  # fmt: skip
add("sd_pairs_pipeline_bad_index", "model files", sub(SDPAIRS, "--pipeline", "{tmp}/pipe"), r"model_index\.json",
    setup=lambda ctx: (copy(ctx, "sd_teacher", "pipe") / "model_index.json").write_text("{"))  # fmt: skip
add("sd_pairs_pipeline_bad_unet_config", "model files", sub(SDPAIRS, "--pipeline", "{tmp}/pipe"), r"config\.json|unet",
    setup=lambda ctx: (copy(ctx, "sd_teacher", "pipe") / "unet" / "config.json").write_text("{"))  # fmt: skip
add("sd_pairs_prompts_missing", "data", sub(SDPAIRS, "--prompts", "{tmp}/p.txt"), r"p\.txt")
add(
    "sd_pairs_prompts_empty",
    "data",
    sub(SDPAIRS, "--prompts", "{tmp}/p.txt"),
    r"p\.txt",
    setup=prompts("p.txt", "\n \n"),
)
add("sd_pairs_prompts_bad_jsonl", "data", sub(SDPAIRS, "--prompts", "{tmp}/p.jsonl"), r"p\.jsonl",
    setup=prompts("p.jsonl", '{"text": "a"}\n{oops\n'))  # fmt: skip
add("sd_pairs_prompts_csv_no_column", "data", sub(SDPAIRS, "--prompts", "{tmp}/p.csv"), r"p\.csv|caption",
    setup=prompts("p.csv", "id,words\n1,a cube\n"))  # fmt: skip
add("sd_pairs_caption_column_unknown", "data", [*sub(SDPAIRS, "--prompts", "{tmp}/p.csv"), "--caption-column", "txt"],
    r"txt", setup=prompts("p.csv", "caption\na cube\n"))  # fmt: skip
add("sd_pairs_prompts_unknown_extension", "data", sub(SDPAIRS, "--prompts", "{tmp}/p.md"), r"p\.md",
    setup=prompts("p.md", "a cube\n"), expect="either", check=file_written("out/manifest.json"))  # fmt: skip
add("sd_pairs_prompts_binary", "data", sub(SDPAIRS, "--prompts", "{tmp}/p.txt"), r"p\.txt",
    setup=lambda ctx: (ctx.tmp / "p.txt").write_bytes(b"\xff\xfe\xfa\x00\x81"))  # fmt: skip
add("sd_pairs_num_0", "numeric flag", sub(SDPAIRS, "--num", "0"), r"--num 0")
add("sd_pairs_steps_0", "numeric flag", sub(SDPAIRS, "--steps", "0"), r"--steps 0")
add("sd_pairs_guidance_nan", "numeric flag", [*SDPAIRS, "--guidance", "nan"], r"guidance.*nan")
add("sd_pairs_guidance_negative", "numeric flag", [*SDPAIRS, "--guidance", "-1"], r"guidance.*-1")
add("sd_pairs_height_odd", "numeric flag", [*SDPAIRS, "--height", "60"], r"60")
add("sd_pairs_height_0", "numeric flag", [*SDPAIRS, "--height", "0"], r"height.*\b0\b")
add("sd_pairs_batch_size_0", "numeric flag", sub(SDPAIRS, "--batch-size", "0"), r"--batch-size 0")
add("sd_pairs_shard_size_0", "numeric flag", sub(SDPAIRS, "--shard-size", "0"), r"--shard-size 0")
add("sd_pairs_solver_unknown", "argument", [*SDPAIRS, "--solver", "rk9"], r"rk9")
add("sd_pairs_dtype_unknown", "argument", [*SDPAIRS, "--dtype", "float8"], r"float8", spawn=True)
add("sd_pairs_out_user_folder", "output folder", SDPAIRS, r"out", setup=user_folder("out"))
add("sd_pairs_out_is_a_file", "output folder", SDPAIRS, r"out", setup=a_file("out"))
add("sd_pairs_out_read_only", "output folder", sub(SDPAIRS, "--out", "{tmp}/ro/out"), r"ro",
    setup=ro_mount("ro"), needs_root=True)  # fmt: skip
SD_FULL = ["sd", "pairs", "--pipeline", "{fx}/sd_teacher", "--prompts", "{fx}/prompts.txt", "--num", "8",
           "--out", "{tmp}/pairs", "--steps", "2", "--batch-size", "4", "--shard-size", "4"]  # fmt: skip
add("sd_pairs_resume_other_guidance", "resume", [*SD_FULL, "--guidance", "2"], r"guidance",
    setup=lambda ctx: copy(ctx, "sd_pairs", "pairs"))  # fmt: skip
add("sd_pairs_resume_other_pipeline", "resume", sub(SD_FULL, "--pipeline", "{fx}/sd_other"), r"pipeline|model|fingerprint",
    setup=lambda ctx: copy(ctx, "sd_pairs", "pairs"))  # fmt: skip
add("sd_pairs_resume_other_prompts", "resume", sub(SD_FULL, "--prompts", "{tmp}/p.txt"), r"prompt",
    setup=compose(lambda ctx: copy(ctx, "sd_pairs", "pairs"), prompts("p.txt", "a green ball\n")))  # fmt: skip
add("sd_pairs_repairs_flipped", "pair store", SD_FULL, expect="ok",
    setup=lambda ctx: flip_byte(copy(ctx, "sd_pairs", "pairs") / SHARD),
    check=lambda ctx, res: files_equal(ctx.tmp / "pairs", ctx.fx / "sd_pairs"))  # fmt: skip
add("sd_pairs_huge_steps", "long run", sub(SDPAIRS, "--steps", "100000000"), r"100000000",
    expect="feedback", timeout=40)  # fmt: skip

# --- sd rectify ---------------------------------------------------------------------------------
add("sd_rectify_max_steps_0", "numeric flag", sub(SDRECT, "--max-steps", "0"), r"--max-steps 0")
for value in ("inf", "nan", "-1"):
    add(f"sd_rectify_lr_{value}", "numeric flag", [*SDRECT, "--lr", value], rf"--lr {value}")
add("sd_rectify_batch_size_0", "numeric flag", sub(SDRECT, "--batch-size", "0"), r"--batch-size 0")
add("sd_rectify_grad_accum_0", "numeric flag", [*SDRECT, "--grad-accum", "0"], r"grad.accum.*\b0\b")
add(
    "sd_rectify_huber_c_negative",
    "numeric flag",
    [*SDRECT, "--loss", "pseudo_huber", "--huber-c", "-1"],
    r"huber.c.*-1",
)
add(
    "sd_rectify_ema_decay_1_5",
    "numeric flag",
    [*SDRECT, "--ema", "--ema-decay", "1.5"],
    r"ema.decay.*1\.5",
)
add(
    "sd_rectify_lora_rank_negative",
    "numeric flag",
    [*SDRECT, "--lora-rank", "-4"],
    r"lora.rank.*-4",
)
add(
    "sd_rectify_weight_decay_negative",
    "numeric flag",
    [*SDRECT, "--weight-decay", "-1"],
    r"weight.decay.*-1",
)
add("sd_rectify_warmup_negative", "numeric flag", [*SDRECT, "--warmup-steps", "-1"], r"warmup.*-1")
add(
    "sd_rectify_checkpoint_every_negative",
    "numeric flag",
    sub(SDRECT, "--checkpoint-every", "-1"),
    r"--checkpoint-every -1",
)
add(
    "sd_rectify_keep_checkpoints_negative",
    "numeric flag",
    [*SDRECT, "--keep-checkpoints", "-1"],
    r"--keep-checkpoints -1",
)
add(
    "sd_rectify_num_workers_negative",
    "numeric flag",
    [*SDRECT, "--num-workers", "-1"],
    r"num.workers.*-1",
)
add(
    "sd_rectify_cond_dropout_1_5",
    "numeric flag",
    [*SDRECT, "--cond-dropout", "1.5"],
    r"cond.dropout.*1\.5",
)
add("sd_rectify_phases_3", "numeric flag", [*SDRECT, "--phases", "3"], r"phases.*\b3\b")
add("sd_rectify_phases_0", "numeric flag", [*SDRECT, "--phases", "0"], r"phases.*\b0\b")
add(
    "sd_rectify_phase_start_mass_2",
    "numeric flag",
    [*SDRECT, "--phases", "2", "--phase-start-mass", "2"],
    r"phase.start.mass.*2",
)
add(
    "sd_rectify_time_sampler_unknown",
    "argument",
    [*SDRECT, "--time-sampler", "gaussianish"],
    r"gaussianish",
)
add("sd_rectify_loss_unknown", "argument", [*SDRECT, "--loss", "l1"], r"l1", spawn=True)
add("sd_rectify_pairs_missing", "pair store", sub(SDRECT, "--pairs", "{tmp}/nopairs"), r"nopairs")
add("sd_rectify_pairs_from_rectdiff", "pair store", sub(SDRECT, "--pairs", "{fx}/pairs"), r"pairs")
add("sd_rectify_pairs_flipped", "pair store", sub(SDRECT, "--pairs", "{tmp}/pairs"), rf"{SHARD}",
    setup=lambda ctx: flip_byte(copy(ctx, "sd_pairs", "pairs") / SHARD))  # fmt: skip
add("sd_rectify_pairs_truncated", "pair store", sub(SDRECT, "--pairs", "{tmp}/pairs"), rf"{SHARD}",
    setup=lambda ctx: truncate(copy(ctx, "sd_pairs", "pairs") / SHARD))  # fmt: skip
add("sd_rectify_pairs_manifest_guidance", "pair store", sub(SDRECT, "--pairs", "{tmp}/pairs"), r"manifest|guidance|settings",
    setup=lambda ctx: edit_json(copy(ctx, "sd_pairs", "pairs") / "manifest.json", lambda m: m["settings"].update(guidance="x")))  # fmt: skip
add(
    "sd_rectify_pairs_of_other_pipeline",
    "pair store",
    sub(SDRECT, "--pipeline", "{fx}/sd_other"),
    r"pipeline|model|fingerprint|made",
)
add(
    "sd_rectify_pipeline_missing",
    "model files",
    sub(SDRECT, "--pipeline", "{tmp}/nopipe"),
    r"nopipe",
)
add("sd_rectify_out_user_folder", "output folder", SDRECT, r"out", setup=user_folder("out"))
add("sd_rectify_out_is_a_file", "output folder", SDRECT, r"out", setup=a_file("out"))
add(
    "sd_rectify_work_dir_is_a_file",
    "output folder",
    [*SDRECT, "--work-dir", "{tmp}/w"],
    r"\bw\b",
    setup=a_file("w"),
)
add("sd_rectify_out_read_only", "output folder", sub(SDRECT, "--out", "{tmp}/ro/out"), r"ro",
    setup=ro_mount("ro"), needs_root=True)  # fmt: skip


def sd_rerun(ctx: Ctx) -> None:
    shutil.copytree(ctx.fx / "sd_student", ctx.tmp / "out")
    if (ctx.fx / "sd_student.train").exists():
        shutil.copytree(ctx.fx / "sd_student.train", ctx.tmp / "out.train")


def retrained(key: str, value: Any):
    """Right when the rerun trained anew: weights unlike the earlier output's, and its
    rectdiff.json records ``key = value`` (the weights and their description agree)."""

    def check(ctx: Ctx, res: runner.Result) -> str | None:
        unet = "unet/diffusion_pytorch_model.safetensors"
        if (ctx.tmp / "out" / unet).read_bytes() == (ctx.fx / "sd_student" / unet).read_bytes():
            return "the weights are the earlier run's (resumed), yet the flags changed"
        record = json.dumps(json.loads((ctx.tmp / "out" / "rectdiff.json").read_text()))
        if not re.search(rf'"{key}": {json.dumps(value)}', record):
            return f"rectdiff.json does not record {key} = {value!r}"
        return None

    return check


# the earlier student was trained with checkpoints (every step): a rerun with other flags
# must not resume them under the new description
SDRERUN = [a for a in SDRECT if a not in ("--checkpoint-every", "0")]
add("sd_rectify_rerun_other_lr", "resume", [*SDRERUN, "--lr", "0.5"], r"lr", setup=sd_rerun,
    expect="either", check=retrained("lr", 0.5))  # fmt: skip
add("sd_rectify_rerun_other_loss", "resume", [*SDRERUN, "--loss", "mse"], r"loss", setup=sd_rerun,
    expect="either", check=retrained("loss", "mse"))  # fmt: skip
add("sd_rectify_huge_steps", "long run", sub(SDRECT, "--max-steps", "100000000"), r"100000000",
    expect="feedback", timeout=45)  # fmt: skip

# --- sd eval / diagnose / demo ---------------------------------------------------------------------
add("sd_eval_steps_word", "numeric flag", sub(SDEVAL, "--steps", "1,x"), r"1,x")
add("sd_eval_steps_zero", "numeric flag", sub(SDEVAL, "--steps", "0"), r"steps.*\b0\b")
add("sd_eval_steps_empty", "numeric flag", sub(SDEVAL, "--steps", ""), r"steps")
add("sd_eval_num_0", "numeric flag", sub(SDEVAL, "--num", "0"), r"--num 0")
add(
    "sd_eval_teacher_steps_0",
    "numeric flag",
    sub(SDEVAL, "--teacher-steps", "0"),
    r"--teacher-steps 0",
)
add("sd_eval_guidance_nan", "numeric flag", [*SDEVAL, "--guidance", "nan"], r"guidance.*nan")
add("sd_eval_batch_size_0", "numeric flag", sub(SDEVAL, "--batch-size", "0"), r"--batch-size 0")
add("sd_eval_height_odd", "numeric flag", [*SDEVAL, "--height", "12"], r"12")
add(
    "sd_eval_teacher_missing",
    "model files",
    sub(SDEVAL, "--teacher", "{tmp}/noteacher"),
    r"noteacher",
)
add("sd_eval_pipeline_missing", "model files", sub(SDEVAL, "--pipeline", "{tmp}/nopipe"), r"nopipe")
add(
    "sd_eval_prompts_empty",
    "data",
    sub(SDEVAL, "--prompts", "{tmp}/p.txt"),
    r"p\.txt",
    setup=prompts("p.txt", ""),
)
add("sd_eval_clip_missing", "model files", [*SDEVAL, "--clip", "{tmp}/noclip"], r"noclip")
add("sd_eval_device_unknown", "argument", [*SDEVAL, "--device", "tpu9"], r"tpu9")
add("sd_eval_device_cuda_absent", "argument", [*SDEVAL, "--device", "cuda"], r"cuda", expect="either",
    check=file_written("out/metrics.json"))  # fmt: skip
add("sd_eval_out_is_a_file", "output folder", SDEVAL, r"out", setup=a_file("out"))
add("sd_eval_out_user_folder", "output folder", SDEVAL, r"out", setup=user_folder("out"), expect="either",
    check=user_files_kept("out"))  # fmt: skip
add("sd_diagnose_num_0", "numeric flag", sub(SDDIAG, "--num", "0"), r"--num 0")
add("sd_diagnose_steps_0", "numeric flag", sub(SDDIAG, "--steps", "0"), r"--steps 0")
add("sd_diagnose_solver_unknown", "argument", [*SDDIAG, "--solver", "rk9"], r"rk9")
add("sd_diagnose_guidance_nan", "numeric flag", [*SDDIAG, "--guidance", "nan"], r"guidance.*nan")
add(
    "sd_diagnose_teacher_is_rectdiff_model",
    "model files",
    sub(SDDIAG, "--teacher", "{fx}/teacher"),
    r"teacher",
)
add("sd_diagnose_prompts_missing", "data", sub(SDDIAG, "--prompts", "{tmp}/none.txt"), r"none\.txt")
add("sd_diagnose_device_unknown", "argument", [*SDDIAG, "--device", "tpu9"], r"tpu9")
add("sd_diagnose_out_is_a_file", "output folder", SDDIAG, r"out", setup=a_file("out"))
add("sd_demo_out_user_folder", "output folder", SDDEMO, r"demo", setup=user_folder("demo"))
add("sd_demo_out_is_a_file", "output folder", SDDEMO, r"demo", setup=a_file("demo"))

# --- typos and parsing (a fresh process each: answered before any heavy import) -------------------
for name, argv, pattern in [
    ("typo_subcommand", ["rectfy"], r"rectfy"),
    ("typo_sd_subcommand", ["sd", "tinyy", "x"], r"tinyy"),
    ("typo_flag_num", ["pairs", "--model", "m", "--out", "o", "--nmu", "4"], r"--nmu|--num"),
    ("typo_flag_lr", [*RECT, "--learning-rate", "0.1"], r"--learning-rate"),
    ("typo_flag_diagnose", ["diagnose", "--modle", "m"], r"--modle"),
    ("typo_flag_compare", ["compare", "--wokers", "2"], r"--wokers"),
    ("typo_flag_sd_rectify", [*SDRECT, "--max-stpes", "4"], r"--max-stpes"),
    ("no_subcommand", [], r"command|schedules"),
    ("sd_no_subcommand", ["sd"], r"sd_command|tiny"),
    ("pairs_required_missing", ["pairs", "--model", "m"], r"--out|--num"),
    ("sd_pairs_required_missing", ["sd", "pairs", "--pipeline", "p"], r"--prompts"),
    ("extra_positional", ["schedules", "now"], r"now"),
    ("compare_workers_word", ["compare", "--workers", "two"], r"two"),
    ("diagnose_rtol_word", ["diagnose", "--model", "m", "--rtol", "small"], r"small"),
    ("sd_eval_num_word", ["sd", "eval", "--pipeline", "p", "--teacher", "t", "--prompts", "x", "--num", "few"], r"few"),
    ("sd_tiny_sample_size_word", ["sd", "tiny", "d", "--sample-size", "big"], r"big"),
]:  # fmt: skip
    add(name, "argument", argv, pattern, spawn=True)


# --- fixtures ---------------------------------------------------------------------------------
def _save_models(fx: Path) -> int:
    import torch

    from rectdiff import forms
    from rectdiff.io.model_dir import build_model, save_model_dir

    torch.set_num_threads(1)
    form = forms.FlowMatching()
    for seed, name in ((0, "teacher"), (1, "other")):
        torch.manual_seed(seed)
        save_model_dir(fx / name, build_model(NET, form), form=form, prediction="flow",
                       net_config=NET)  # fmt: skip
    return 0


def build_fixtures(fx: Path, log) -> None:
    fx.mkdir(parents=True, exist_ok=True)
    (fx / "prompts.txt").write_text("a red cube\na blue ball\na green cone\na small red ball\n")
    steps: list[tuple[str, Any]] = [
        ("models", lambda: _save_models(fx)),
        ("pairs", ["pairs", "--model", f"{fx}/teacher", "--out", f"{fx}/pairs", "--num", "40",
                   "--shard-size", "16", "--steps", "2", "--solver", "ddim", "--no-progress"]),
        ("student", ["rectify", "--model", f"{fx}/teacher", "--pairs", f"{fx}/pairs", "--out",
                     f"{fx}/student", "--steps", "2", "--batch-size", "8", "--no-progress"]),
        ("sd_teacher", ["sd", "tiny", f"{fx}/sd_teacher", "--fit-steps", "2"]),
        ("sd_other", ["sd", "tiny", f"{fx}/sd_other", "--seed", "1", "--fit-steps", "0"]),
        ("sd_pairs", ["sd", "pairs", "--pipeline", f"{fx}/sd_teacher", "--prompts",
                      f"{fx}/prompts.txt", "--num", "8", "--out", f"{fx}/sd_pairs", "--steps", "2",
                      "--batch-size", "4", "--shard-size", "4"]),
        ("sd_student", ["sd", "rectify", "--pipeline", f"{fx}/sd_teacher", "--pairs",
                        f"{fx}/sd_pairs", "--out", f"{fx}/sd_student", "--max-steps", "2",
                        "--batch-size", "4", "--checkpoint-every", "1"]),
    ]  # fmt: skip
    for name, target in steps:
        if (fx / name).exists() or (name == "models" and (fx / "teacher").exists()):
            continue
        started = time.monotonic()
        res = runner.run(target, fx, 600)
        if res.rc != 0:
            raise SystemExit(f"fixture {name} failed (exit {res.rc}):\n{res.stderr[-3000:]}")
        log(f"fixture {name}: {time.monotonic() - started:.0f} s")


# --- running and classifying ---------------------------------------------------------------------
def expand(argv: list[str], ctx: Ctx) -> list[str]:
    return [a.replace("{fx}", str(ctx.fx)).replace("{tmp}", str(ctx.tmp)) for a in argv]


def visible_lines(stderr: str) -> list[str]:
    """The non-empty lines a terminal is left showing: of each line, what follows its last
    carriage return (a progress bar redrawn and erased in place is not a line)."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip()]


def advanced(stderr: str) -> bool:
    """Whether a progress display moved: two different counts ("0/4" then "1/4", or a count
    of model evaluations), not a bar that sits at its start."""
    return len({m.group(1) for m in PROGRESS.finditer(stderr)}) >= 2


def classify(case: Case, ctx: Ctx, res: runner.Result, changed: bool) -> tuple[str, str]:
    """(class, why) of one case's result (see the module docstring)."""
    lines = visible_lines(res.stderr)
    last = lines[-1] if lines else ""
    if res.timed_out:
        if case.expect == "feedback" and advanced(res.stderr):
            return "right-thing", f"showed advancing progress within {case.timeout:.0f} s"
        return "HANG", f"no answer within {case.timeout:.0f} s; stderr: {last[:200]!r}"
    if "Traceback" in res.stderr:
        return "TRACEBACK", last[:300]
    if res.rc == 0:
        if case.expect == "error":
            return "SILENT", "exit 0 on a bad input" + (f"; stdout: {res.stdout[-200:]!r}")
        if case.expect == "feedback":
            return "SILENT", "exit 0 on a huge run"
        why = case.check(ctx, res) if case.check else None
        return ("right-thing", "exit 0, checked") if why is None else ("SILENT", why)
    if case.expect == "ok":
        return "WRONG", f"exit {res.rc}: {last[:300]}"
    if res.rc != 2 or len(lines) != 1:
        return "VAGUE", f"exit {res.rc}, {len(lines)} stderr lines; last: {last[:300]!r}"
    if not re.match(r"rectdiff( [a-z]+){0,2}: error: ", last):
        return "VAGUE", f"not 'rectdiff CMD: error: ...': {last[:300]!r}"
    # matched without the work folders' paths, which hold the case's name
    message = last.split(": error: ", 1)[-1]
    message = message.replace(str(ctx.tmp), "{tmp}").replace(str(ctx.fx), "{fx}")
    if not re.search(case.pattern, message):
        return "VAGUE", f"does not match /{case.pattern}/: {last[:300]!r}"
    if changed:
        return "DIRTY", f"wrote or changed files before refusing: {last[:200]!r}"
    if case.spawn and res.seconds > FAST_S:
        return "VAGUE", f"took {res.seconds:.1f} s (> {FAST_S} s: imports before refusing)"
    return "OK-error", last[:300]


def run_case(case: Case, root: Path, fx: Path, spawn: bool) -> dict[str, Any]:
    tmp = root / "cases" / case.name
    tmp.mkdir(parents=True)
    ctx = Ctx(fx, tmp, spawn)
    argv = expand(case.argv, ctx)
    try:
        if case.setup is not None:
            case.setup(ctx)
    except Exception as err:  # the audit's own fault: reported, not counted as rectdiff's
        ctx.unmount()
        return {"name": case.name, "command": case.command, "category": case.category,
                "argv": argv, "expect": case.expect, "class": "AUDIT-ERROR",
                "why": f"setup failed: {err!r}", "rc": None, "seconds": 0.0, "stderr": "",
                "spawned": spawn or case.spawn}  # fmt: skip
    try:
        before = tree_digest(tmp) + tree_digest(fx)
        res = runner.run(argv, tmp, case.timeout, spawn=spawn or case.spawn)
        changed = tree_digest(tmp) + tree_digest(fx) != before
        cls, why = classify(case, ctx, res, changed)
    finally:
        ctx.unmount()
    if (tmp / "PWNED").exists():
        cls, why = "SILENT", "the expression ran code (PWNED written)"
    return {"name": case.name, "command": case.command, "category": case.category,
            "argv": argv, "expect": case.expect, "class": cls, "why": why, "rc": res.rc,
            "seconds": round(res.seconds, 2), "stderr": res.stderr[-2000:],
            "spawned": spawn or case.spawn}  # fmt: skip


def table(results: list[dict[str, Any]], key: str) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        counts[r[key]][r["class"]] += 1
    shown = [c for c in CLASSES if any(counts[k][c] for k in counts)]
    rows = [f"| {key} | cases | " + " | ".join(shown) + " |",
            "|---|---:|" + "---:|" * len(shown)]  # fmt: skip
    for k in sorted(counts):
        rows.append(f"| {k} | {sum(counts[k].values())} | "
                    + " | ".join(str(counts[k][c] or "") for c in shown) + " |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default=None, help="regular expression on case name/command")
    parser.add_argument("--jobs", type=int, default=1, help="cases at once (default: 1)")
    parser.add_argument("--out", default="/tmp/audit.json", help="results JSON")
    parser.add_argument("--spawn", action="store_true", help="a fresh rectdiff process per case")
    parser.add_argument("--work", default=None, help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    cases = [c for c in CASES if args.only is None or re.search(args.only, f"{c.name} {c.command}")]
    if args.list:
        for c in cases:
            print(f"{c.command:14} {c.category:14} {c.name}")
        print(f"{len(cases)} cases")
        return 0
    root_user = os.geteuid() == 0
    skipped = [c.name for c in cases if c.needs_root and not root_user]
    cases = [c for c in cases if c.name not in skipped]
    if skipped:
        print(f"not root: skipping {len(skipped)} read-only/full-disk cases: {', '.join(skipped)}")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if not args.spawn:
        started = time.monotonic()
        runner.preload()
        log(f"preloaded the heavy modules in {time.monotonic() - started:.0f} s")
    root = Path(args.work or tempfile.mkdtemp(prefix="rectdiff-audit-"))
    shutil.rmtree(root / "cases", ignore_errors=True)
    build_fixtures(root / "fx", log)
    results = []
    started = time.monotonic()
    # --jobs > 1: cases in threads, each of which forks or spawns one child at a time
    from concurrent.futures import ThreadPoolExecutor

    def one(case: Case) -> dict[str, Any]:
        r = run_case(case, root, root / "fx", args.spawn)
        log(f"{r['class']:11} {r['seconds']:6.1f} s  {case.name}: {r['why'][:150]}")
        return r

    if args.jobs > 1:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(one, cases))
    else:
        results = [one(case) for case in cases]
    total = Counter(r["class"] for r in results)
    print(f"\n{len(results)} cases in {time.monotonic() - started:.0f} s "
          f"({'spawned' if args.spawn else 'forked'}; argument cases spawned)\n")  # fmt: skip
    print("| class | cases |\n|---|---:|")
    for c in CLASSES:
        print(f"| {c} | {total[c]} |")
    print("\n" + table(results, "command") + "\n\n" + table(results, "category"))
    bad = [r for r in results if r["class"] not in OK]
    if bad:
        print("\nnot OK:")
        for r in bad:
            print(f"- {r['class']} {r['name']} ({r['command']}): {r['why']}")
    Path(args.out).write_text(json.dumps({"counts": dict(total), "skipped": skipped,
                                          "work": str(root), "results": results}, indent=1))  # fmt: skip
    print(f"\nwrote {args.out}" + (f"; work folder {root}" if args.keep else ""))
    if not args.keep and args.work is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
