"""The `rectdiff` subcommands over saved checkpoints give the library functions' numbers."""

import contextlib
import copy
import csv
import io
import json
import re

import pytest
import torch

from rectdiff import forms, samplers
from rectdiff.apps.compare.evaluate import standard_noise
from rectdiff.apps.compare.report import summary_markdown
from rectdiff.apps.compare.saved import diagnose_dirs
from rectdiff.cli import main
from rectdiff.io.model_dir import build_model, load_model_dir, save_model_dir
from rectdiff.rectify import load_pairs, rectify
from rectdiff.rectify.pairs import PairDataset
from rectdiff.reparametrize import Reparametrized
from rectdiff.training import TrainConfig

CONFIG = """
seed = 5
equal = "logsnr"
[data]
name = "moons"
n_train = 1000
n_eval = 300
[grid]
forms = ["vp", "fm"]
predictions = ["v"]
[network]
options = { hidden = 32, depth = 2 }
[train]
steps = 40
batch_size = 128
[rectify]
num_pairs = 128
steps = 6
shard_size = 128
pair_batch_size = 128
train = { steps = 20 }
[evaluation]
steps = [1, 2]
rtol = 1e-3
atol = 1e-3
metrics = ["energy"]
n_diagnostic = 64
diagnostic_steps = 12
figures = false
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.toml").write_text(CONFIG)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compare", "--config", str(root / "tiny.toml"), "--out", str(root / "out"),
                     "--no-progress"]) == 0  # fmt: skip
    (root / "printed.txt").write_text(printed.getvalue())
    return root, json.loads((root / "out" / "results.json").read_text())


def test_compare_prints_the_summary(run):
    root, results = run
    assert (root / "out" / "report.md").is_file()
    assert len(results["records"]) == 2 * 2 * 3  # cells x stages x (ddim 1, 2, dopri5)
    # what it printed is the summary of the results it wrote, with their numbers
    printed = (root / "printed.txt").read_text()
    assert summary_markdown(results) in printed
    one_step = [r for r in results["records"] if r["solver"] == "ddim" and r["steps"] == 1]
    assert len(one_step) == 4
    for record in one_step:
        assert f"| {record['energy']:.4g} |" in printed, record  # its one-step distances


def test_diagnose_matches_compare_and_the_library(run, capsys):
    root, results = run
    models = root / "out" / "models" / "fm_v"
    dirs = [str(models / "teacher"), str(models / "rectified")]
    out = root / "diagnose.json"
    args = ["diagnose", "--model", *dirs, "--num", "64", "--steps", "12", "--seed", "5",
            "--rtol", "1e-3", "--atol", "1e-3", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "straightness_y" in printed and "first_order_deviation" in printed
    written = json.loads(out.read_text())
    direct = diagnose_dirs(dirs, num=64, steps=12, seed=5, rtol=1e-3, atol=1e-3)
    assert written == json.loads(json.dumps(direct))
    cell = next(c for c in results["cells"] if (c["form"], c["prediction"]) == ("fm", "v"))
    for record, stage in zip(written, ("teacher", "rectified"), strict=True):
        for key in ("straightness_t", "straightness_y", "first_order_deviation",
                    "crossing_rate", "train_coupling_crossing_rate", "one_step_gap"):  # fmt: skip
            assert record[key] == cell["diagnostics"][stage][key], (stage, key)


def test_pairs_are_the_models_solves(run):
    root, _ = run
    teacher = root / "out" / "models" / "vp_v" / "teacher"
    store = root / "pairs"
    args = ["pairs", "--model", str(teacher), "--out", str(store), "--num", "48", "--steps", "4",
            "--solver", "ddim", "--seed", "2", "--shard-size", "32", "--batch-size", "16",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    pairs = PairDataset(store)
    model, form, prediction = load_model_dir(teacher)
    eps = torch.cat([pairs.shard(k)["eps"] for k in range(pairs.num_shards)])
    x0 = torch.cat([pairs.shard(k)["x0"] for k in range(pairs.num_shards)])
    expected = samplers.sample(model, eps, form=form, prediction=prediction, solver="ddim", steps=4)
    torch.testing.assert_close(x0, expected, rtol=0, atol=1e-6)
    assert len(pairs) == 48 and pairs.settings.seed == 2


def test_rectify_matches_the_library_and_reflow_reparametrizes(run):
    root, _ = run
    teacher_dir = root / "out" / "models" / "vp_v" / "teacher"
    store = root / "pairs-rectify"
    assert main(["pairs", "--model", str(teacher_dir), "--out", str(store), "--num", "64",
                 "--steps", "4", "--no-progress"]) == 0  # fmt: skip
    args = ["rectify", "--model", str(teacher_dir), "--pairs", str(store), "--out",
            str(root / "student"), "--steps", "6", "--lr", "1e-3", "--batch-size", "16",
            "--seed", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    student, form, prediction = load_model_dir(root / "student")
    teacher, t_form, t_prediction = load_model_dir(teacher_dir)
    assert (form, prediction) == (t_form, t_prediction)
    config = TrainConfig(steps=6, lr=1e-3, batch_size=16, seed=1)
    direct = rectify(copy.deepcopy(teacher).train(), store, form=form, prediction=prediction,
                     config=config, progress=False).model  # fmt: skip
    for (key, a), b in zip(student.state_dict().items(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b), key

    # classic Reflow: train the VP/v teacher as flow matching with flow prediction
    args = ["rectify", "--model", str(teacher_dir), "--pairs", str(store), "--out",
            str(root / "reflow"), "--steps", "3", "--form", "fm", "--prediction", "flow",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    reflow, form, prediction = load_model_dir(root / "reflow")
    assert (form, prediction) == (forms.load("fm"), "flow")
    assert isinstance(reflow, Reparametrized) and reflow.src_form == t_form


def test_plot_from_results_and_from_models(run):
    root, results = run
    assert main(["plot", "--results", str(root / "out" / "results.json"), "--out",
                 str(root / "figs")]) == 0  # fmt: skip
    with open(root / "figs" / "quality_vs_nfe_v.csv") as fh:
        rows = list(csv.DictReader(fh))
    expected = {(r["form"] + " " + r["stage"], r["nfe"]): r["energy"] for r in results["records"]
                if r["solver"] == "ddim"}  # fmt: skip
    assert len(rows) == len(expected)
    for row in rows:
        assert float(row["energy to held-out data (ddim, v-prediction)"]) == pytest.approx(
            expected[(row["label"], int(float(row["nfe"])))], rel=1e-9
        )

    model_dir = root / "out" / "models" / "fm_v" / "rectified"
    assert main(["plot", "--model", str(model_dir), "--out", str(root / "mfigs"), "--num", "50",
                 "--seed", "5"]) == 0  # fmt: skip
    model, form, prediction = load_model_dir(model_dir)
    noise = standard_noise((2,), 50, 5, "diagnostics")
    one_step = samplers.sample(model, noise, form=form, prediction=prediction, steps=1)
    with open(root / "mfigs" / "samples.csv") as fh:
        drawn = [r for r in csv.DictReader(fh) if r["label"].endswith("ddim@1")]
    got = torch.tensor([[float(r["x_1"]), float(r["x_2"])] for r in drawn], dtype=torch.float64)
    torch.testing.assert_close(got, one_step.double(), rtol=1e-7, atol=1e-7)
    assert (root / "mfigs" / "trajectories_xy.png").is_file()


def test_errors_exit_with_code_2_and_a_message(run, tmp_path, capsys):
    assert main(["diagnose", "--model", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "d.json")]) == 2  # fmt: skip
    assert "is not a folder" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[evaluation]\nmetrics = ["fid"]\n')
    assert main(["compare", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown metric 'fid'; allowed:" in capsys.readouterr().err


def test_pairs_of_a_class_conditional_model_carry_balanced_labels(tmp_path):
    form = forms.FlowMatching()
    net_config = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 16, "depth": 2, "num_classes": 3}}
    torch.manual_seed(0)
    model = build_model(net_config, form)
    save_model_dir(tmp_path / "teacher", model, form=form, prediction="flow", net_config=net_config)
    store = tmp_path / "pairs"
    assert main(["pairs", "--model", str(tmp_path / "teacher"), "--out", str(store), "--num", "40",
                 "--steps", "3", "--solver", "ddim", "--shard-size", "16", "--no-progress"]) == 0  # fmt: skip
    couplings = load_pairs(store)
    labels = couplings.cond["class_labels"]
    assert torch.equal(labels, torch.arange(40) % 3)
    # each pair is the model's solve for its own label
    cond = {"class_labels": labels}
    expected = samplers.sample(model, couplings.eps, form=form, prediction="flow", solver="ddim",
                               steps=3, cond=cond)  # fmt: skip
    torch.testing.assert_close(couplings.x0, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["diagnose", "--rtol", "-1"], r"--rtol -1.0: out of range; allowed: a finite number >= 0"),
        (["diagnose", "--rtol", "0", "--atol", "0"], r"--rtol 0 --atol 0: .*at least one > 0"),
        (["diagnose", "--atol", "nan"], r"--atol nan: out of range; allowed: a finite number >= 0"),
        (["diagnose", "--num", "0"], r"--num 0: out of range; allowed: an integer >= 1"),
        (["diagnose", "--steps", "-3"], r"--steps -3: out of range; allowed: an integer >= 1"),
        (["plot", "--model", "m", "--num", "0"], r"--num 0: out of range"),
        (["pairs", "--model", "m", "--num", "4", "--steps", "0"], r"--steps 0: out of range"),
        (["rectify", "--model", "m", "--pairs", "p", "--lr", "inf"], r"--lr inf: out of range; allowed: a finite number > 0"),
        (["sd", "pairs", "--pipeline", "p", "--prompts", "q", "--num", "0"], r"--num 0: out of range"),
        (["sd", "eval", "--pipeline", "p", "--teacher", "t", "--prompts", "q", "--teacher-steps", "0"], r"--teacher-steps 0: out of range"),
    ],
)  # fmt: skip
def test_numeric_flags_are_range_checked_before_any_work(argv, pattern, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(pattern, err), err
    assert err.startswith(f"rectdiff {argv[0]}")
    assert not out.exists()  # nothing written
