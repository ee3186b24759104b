"""experiments/compare_resolution.py: its report-stream, report-set scores are the compare
report's own numbers, and the other streams and held-out sets are other draws."""

from __future__ import annotations

from pathlib import Path

import pytest
from shared import load_script

from rectdiff.apps.compare.config import load_config
from rectdiff.apps.compare.run import run_compare

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "compare_resolution.py"

TOML = """
seed = 2
[data]
name = "8gaussians"
n_train = 1000
n_eval = 300
[grid]
forms = ["fm"]
predictions = ["v"]
[network]
options = { hidden = 32, depth = 2 }
[train]
steps = 40
batch_size = 128
[rectify]
num_pairs = 128
steps = 4
shard_size = 128
pair_batch_size = 128
train = { steps = 20 }
[evaluation]
steps = [1, 2]
rtol = 1e-3
atol = 1e-3
metrics = ["sliced_w2"]
metric_options = { sliced_w2 = { n_projections = 16 } }
n_diagnostic = 32
diagnostic_steps = 8
figures = false
"""


def test_stream_0_and_set_0_are_the_reports_numbers(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(TOML)
    results = run_compare(load_config(path), tmp_path / "out", progress=False)
    scores = load_script(SCRIPT).main(["--out", str(tmp_path / "out"), "--config", str(path),
                                 "--stages", "rectified", "rectified", "--steps", "2",
                                 "--streams", "2", "--references", "2"])  # fmt: skip

    def recorded(stage, solver, steps):
        return next(r["sliced_w2"] for r in results["records"]
                    if (r["stage"], r["solver"], r["steps"]) == (stage, solver, steps))  # fmt: skip

    teacher, student, again = scores["fm_v", 0, 0]
    assert teacher == recorded("teacher", "dopri5", None)
    assert student == again == recorded("rectified", "ddim", 2)
    assert len(set(scores.values())) == 4  # other noise, other held-out points: other numbers
    printed = capsys.readouterr().out
    ratio = student / teacher
    assert f"| fm v | {ratio:.2f} |" in printed
    with pytest.raises(SystemExit):
        load_script(SCRIPT).main(["--out", str(tmp_path), "--config", str(path), "--streams", "0"])
