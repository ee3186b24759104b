"""`rectdiff compare --out`: a folder holding anything compare did not write is refused, an
earlier compare's output is refused unless --overwrite, which removes only compare's files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from rectdiff import forms
from rectdiff.apps.compare.run import _prepare_out, run_compare
from rectdiff.cli import main
from rectdiff.errors import ConfigError
from rectdiff.io.model_dir import build_model, save_model_dir

NET = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 4, "depth": 1}}


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def earlier(tmp_path):
    """What an earlier (interrupted or finished) compare leaves in ``out``."""
    out = tmp_path / "out"
    form = forms.FlowMatching()
    torch.manual_seed(0)
    save_model_dir(out / "models" / "fm_v" / "teacher", build_model(NET, form), form=form,
                   prediction="v", net_config=NET)  # fmt: skip
    (out / "models" / "fm_v" / ".rectified.123.tmp").mkdir()  # a half-written one
    (out / "pairs" / "fm_v" / "round_1").mkdir(parents=True)
    (out / "pairs" / "fm_v" / "round_1" / "manifest.json").write_text("{}")
    (out / "figures").mkdir()
    (out / "figures" / "quality.png").write_bytes(b"png")
    (out / "report.md").write_text("# old\n")
    (out / "results.json").write_text("{}")
    return out


def test_an_earlier_output_is_refused_and_overwrite_removes_only_it(earlier, tmp_path):
    before = tree(earlier)
    with pytest.raises(ConfigError, match=r"holds an earlier compare's output \(figures, models, "
                       r"pairs, report.md, results.json\).*add --overwrite"):  # fmt: skip
        _prepare_out(earlier, overwrite=False)
    assert tree(earlier) == before
    _prepare_out(earlier, overwrite=True)
    assert list(earlier.iterdir()) == []


def test_anything_compare_did_not_write_is_never_removed(earlier, capsys):
    (earlier / "models" / "fm_v" / "notes.txt").write_text("mine")
    (earlier / "draft.md").write_text("mine too")
    before = tree(earlier)
    with pytest.raises(ConfigError, match=r"holds files that rectdiff compare did not write "
                       r"\(draft.md, models/fm_v/notes.txt\)"):  # fmt: skip
        _prepare_out(earlier, overwrite=True)
    assert tree(earlier) == before
    # the command line: checked before any training, one line, exit 2, the folder unchanged
    config = earlier.parent / "c.toml"
    config.write_text('[data]\nname = "8gaussians"\nn_train = 64\n')
    code = main(["compare", "--config", str(config), "--out", str(earlier), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "draft.md" in err and len(err.strip().splitlines()) == 1, err
    assert tree(earlier) == before


def test_run_compare_refuses_an_earlier_output_before_writing(earlier):
    from rectdiff.apps.compare.config import config_from_dict

    before = tree(earlier)
    with pytest.raises(ConfigError, match="--overwrite"):
        run_compare(config_from_dict({"data": {"n_train": 64}}), earlier, progress=False)
    assert tree(earlier) == before
