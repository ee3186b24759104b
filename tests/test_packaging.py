"""A built wheel carries ``schedules/*.toml`` and ``experiments/*.toml`` and reads its own copies.

The wheel is built from a copy of the project (so the working tree gets no ``build/`` and
nothing is written into ``src/``), unpacked as an install would lay it out, and exercised in a
fresh interpreter that cannot see the source tree.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what a wheel is built from (absent ones are skipped)
PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE",
                 "src", "schedules", "experiments")  # fmt: skip
#: shipped data: (glob at the repository root, folder inside the wheel)
SHARED_DATA = (
    ("schedules/*.toml", "rectdiff/_data/schedules"),
    ("experiments/*.toml", "rectdiff/_data/experiments"),
    ("experiments/sd/*.toml", "rectdiff/_data/experiments/sd"),
)

# the PEP 517 hook that `pip wheel --no-build-isolation` calls, without pip's start-up
BUILD = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"

# run in a fresh interpreter with PYTHONPATH=<site>; prints one JSON line
CHECK = r"""
import contextlib, io, json, sys, tomllib
from importlib import metadata
from pathlib import Path

site, root, src, out = (Path(a).resolve() for a in sys.argv[1:5])
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != src]  # editable install's path

from rectdiff import forms
from rectdiff.apps.compare.config import DEFAULT_CONFIG
from rectdiff.io.resources import data_dir

def from_repo(name):
    with (root / "schedules" / f"{name}.toml").open("rb") as fh:
        return forms.from_config(tomllib.load(fh))

dist = metadata.distribution("rectdiff")
(entry,) = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "rectdiff"]
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    rc = entry.load()(["schedules", "--out", str(out), "--t", "0.5"])
names = forms.presets()
print(json.dumps({
    "outside": sorted(
        f"{name}: {module.__file__}" for name, module in list(sys.modules.items())
        if name.split(".")[0] == "rectdiff"
        and not Path(module.__file__ or "").resolve().is_relative_to(site)
    ),
    "dist": str(Path(dist.locate_file("")).resolve()),
    "data_dirs": [str(data_dir(n).resolve()) for n in ("schedules", "experiments")],
    "presets": names,
    "mismatched": [n for n in names if forms.load(n) != from_repo(n)],
    "default_config": str(DEFAULT_CONFIG.resolve()),
    "rc": rc,
    "stdout": stdout.getvalue(),
}))
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{cmd[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_ships_and_reads_the_repository_data(tmp_path):
    # build from a copy of the project, as pip does from an unpacked sdist
    project, dist, site, cwd = (tmp_path / d for d in ("project", "dist", "site", "cwd"))
    project.mkdir()
    for name in PROJECT_FILES:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
            shutil.copytree(path, project / name, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, project / name)
    run([sys.executable, "-c", BUILD, str(dist)], cwd=project)
    (wheel,) = dist.glob("rectdiff-*.whl")
    assert not (project / "src" / "rectdiff" / "_data").exists(), "src/rectdiff/_data would shadow"

    # the wheel carries exactly the top-level TOML files, at rectdiff/_data/...
    expected = {
        f"{folder}/{p.name}": p for pattern, folder in SHARED_DATA for p in ROOT.glob(pattern)
    }
    assert any(k.startswith("rectdiff/_data/schedules/") for k in expected)
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("rectdiff/_data/")}
        assert shipped == set(expected)
        for name, path in expected.items():
            assert zf.read(name) == path.read_bytes(), name
        zf.extractall(site)  # a pure-Python wheel installs by unpacking it

    # a fresh interpreter that sees the unpacked wheel and not the source tree
    cwd.mkdir()
    env = os.environ | {"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [
        sys.executable,
        "-c",
        CHECK,
        str(site),
        str(ROOT),
        str(ROOT / "src"),
        str(tmp_path / "x"),
    ]
    result = json.loads(run(cmd, cwd=cwd, env=env).stdout.strip().splitlines()[-1])
    packaged = (site / "rectdiff" / "_data").resolve()
    assert result["outside"] == []
    assert Path(result["dist"]) == site.resolve()
    assert [Path(d) for d in result["data_dirs"]] == [
        packaged / "schedules",
        packaged / "experiments",
    ]
    assert result["presets"] == sorted(p.stem for p in (ROOT / "schedules").glob("*.toml"))
    assert result["mismatched"] == []

    default_config = Path(result["default_config"])
    assert default_config == packaged / "experiments" / "compare_forms.toml"
    assert default_config.read_bytes() == (ROOT / "experiments" / "compare_forms.toml").read_bytes()

    assert result["rc"] == 0
    rows = [line for line in result["stdout"].splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| preset |")
    assert [r.split("|")[1].strip() for r in rows[1:]] == result["presets"]
    assert (tmp_path / "x" / "schedules.md").is_file()
