"""`rectdiff compare`: config validation, equal-in-logsnr training, determinism, outputs."""

import dataclasses
import json
import tomllib

import numpy as np
import pytest
import torch

from rectdiff import diagnostics, forms, metrics, samplers
from rectdiff import training as timesteps
from rectdiff.apps.compare.config import (
    DEFAULT_CONFIG,
    config_from_dict,
    load_config,
    quick_config,
)
from rectdiff.apps.compare.evaluate import evaluate_model, standard_noise
from rectdiff.apps.compare.figures import draw_result_figures
from rectdiff.apps.compare.hyperparameters import (
    cell_train_config,
    implied_weightings,
    network_config,
    sampling_grid,
)
from rectdiff.apps.compare.run import run_compare
from rectdiff.data import load_data
from rectdiff.errors import ConfigError
from rectdiff.io.model_dir import build_model, load_model_dir
from rectdiff.rectify import load_manifest, window_grid

TINY = """
seed = 3
equal = "logsnr"
[data]
name = "8gaussians"
n_train = 2000
n_eval = 400
[grid]
forms = ["vp", "fm"]
predictions = ["eps", "v"]
[network]
options = { hidden = 32, depth = 2 }
[train]
steps = 60
batch_size = 128
lr = 2e-3
[rectify]
num_pairs = 256
steps = 8
shard_size = 256
pair_batch_size = 256
train = { steps = 30 }
[evaluation]
steps = [1, 2]
rtol = 1e-3
atol = 1e-3
metrics = ["sliced_w2", "energy"]
metric_options = { sliced_w2 = { n_projections = 32 } }
n_diagnostic = 64
diagnostic_steps = 12
figures = false
"""


def tiny(**changes):
    values = tomllib.loads(TINY)
    for key, value in changes.items():
        table, _, name = key.rpartition(".")
        (values.setdefault(table, {}) if table else values)[name] = value
    return config_from_dict(values, source="tiny")


def _net(config, prediction):
    """The cell network config ``run_compare`` builds (its c_out is equalize's output scale)."""
    x_train = load_data(config.data.name, config.data.n_train, config.seed)
    return network_config(config, x_train, prediction)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return out, run_compare(tiny(), out, progress=False)


# --- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"colour": 1}, r"unknown key 'colour' at the top level; allowed: seed, equal, "),
        ({"train": {"stpes": 5}}, r"unknown training option 'stpes'; allowed: steps, batch_size"),
        ({"evaluation": {"nfe": [1]}}, r"unknown key 'nfe' in \[evaluation\]; allowed: solvers, steps"),
        ({"grid": {"forms": ["vp", "edm"]}}, r"unknown form 'edm'; allowed: .*fm.*subvp.*ve.*vp"),
        ({"grid": {"predictions": ["eps", "score"]}}, r"unknown prediction 'score'; allowed: eps, x0, v, flow"),
        ({"evaluation": {"metrics": ["fid"]}}, r"unknown metric 'fid'; allowed: sliced_w2, w2, mmd, energy"),
        ({"evaluation": {"solvers": ["rk45"]}}, r"unknown solver 'rk45'; allowed: euler, heun, ddim, dpmpp_2m, dopri5"),
        ({"rectify": {"solver": "rk45"}}, r"unknown solver 'rk45'; allowed: euler, heun, ddim"),
        ({"evaluation": {"diagnostics": ["curl"]}}, r"unknown diagnostic 'curl'; allowed: straightness, "),
        ({"equal": "sigma"}, r"unknown equal mode 'sigma'; allowed: t, logsnr"),
        ({"rectify": {"pairs": 10}}, r"unknown key 'pairs' in \[rectify\]; allowed: rounds, num_pairs"),
        ({"train": {"time_sampler": "logit_normal"}}, r"with equal = 'logsnr' every cell's time sampler"),
        ({"grid": {"forms": ["vp"], "predictions": ["flow"]}, "network": {"scaling": "fm"}},
         r"\[network\] in form 'vp': scaling='fm' with output_prediction='flow' needs a flow-matching form"),
        ({"network": {"scaling": "velocity", "precondition_output": False}},
         r"\[network\] in form 'vp': scaling='velocity' needs output_prediction"),
        ({"network": {"scaling": "karras"}}, r"unknown network scaling 'karras'; allowed: edm, fm, velocity"),
        ({"evaluation": {"figure_formats": ["png", "jpg"]}},
         r"unknown figure format 'jpg' in \[evaluation\]; allowed: png, svg, pdf"),
        ({"evaluation": {"figure_formats": "png"}},
         r"figure_formats = 'png' in \[evaluation\] has type str; expected list\[str\]"),
        ({"rectify": {"phased_space": "x0"}},
         r"unknown \[rectify\] phased_space 'x0'; allowed: endpoint, prediction"),
        ({"rectify": {"phased_loss": "l1"}},
         r"unknown \[rectify\] phased_loss 'l1'; allowed: mse, pseudo_huber"),
        ({"rectify": {"phased_window_time": "sigma"}},
         r"unknown \[rectify\] phased_window_time 'sigma'; allowed: t, logsnr"),
    ],
    ids=["top", "train", "evaluation", "form", "prediction", "metric", "solver", "pair-solver",
         "diagnostic", "equal", "rectify", "sampler-in-logsnr", "fm-scaling-of-flow",
         "velocity-without-output", "unknown-scaling", "figure-format", "figure-format-string",
         "phased-space", "phased-loss",
         "phased-window-time"],
)  # fmt: skip
def test_config_errors_name_the_value_and_the_allowed_ones(values, pattern):
    with pytest.raises(ValueError, match=pattern):
        config_from_dict(values)


def test_shipped_configs_load_and_quick_shrinks_them():
    paths = [DEFAULT_CONFIG, *DEFAULT_CONFIG.parent.glob("compare_*.toml"),
             DEFAULT_CONFIG.parent / "rectify_toy.toml"]  # fmt: skip
    for path in paths:
        config = load_config(path)
        assert len(config.cells()) >= 4, path
    config = load_config(DEFAULT_CONFIG)
    assert [c[0] for c in config.cells()[::3]] == ["vp", "subvp", "ve", "fm"]
    assert config.data.n_eval >= 5000 and config.rectify.enabled
    quick = quick_config(config)
    assert quick.train.steps == -(-config.train.steps // 20)
    assert quick.data.n_eval <= 500 and max(quick.evaluation.steps) <= 4
    assert quick.evaluation.figure_formats == ["png"] and config.evaluation.figure_formats == [
        "png",
        "svg",
    ]


def test_load_config_reports_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[grid]\nforms = ["vp", "nope"]\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown form 'nope'"):
        load_config(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


# --- equal hyperparameters ------------------------------------------------------------------
def test_equal_in_logsnr_gives_every_cell_the_reference_weighting():
    config = tiny(
        **{"grid.forms": ["vp", "subvp", "ve", "fm"], "grid.predictions": ["eps", "x0", "v"]}
    )
    lo, hi = config.logsnr_range()
    assert (lo, hi) == pytest.approx((-2 * torch.log(torch.tensor(50.0)).item(), 9.1154), abs=1e-3)
    lam = torch.linspace(lo, hi, 801, dtype=torch.float64)[1:-1]
    reference = config.reference.weight(lam)  # VP / eps / uniform t / none (DDPM's L_simple)
    assert float(reference.min()) > 0
    first = None
    for label, form, prediction in config.cells():
        assert form.logsnr_range() == pytest.approx((lo, hi), rel=1e-9)
        train = cell_train_config(config, form, prediction, net_config=_net(config, prediction))
        w = timesteps.implied_weighting(form, prediction, train.time_sampler, train.weighting, lam)
        first = w if first is None else first
        # every cell has the same weighting (one interpolant of w_ref on the same nodes) ...
        assert float(((w - first).abs() / first).max()) < 1e-6, (label, prediction)
        # ... which is the reference's, up to linear interpolation on 4097 logsnr nodes
        # (h^2 / 8 |w''| / w ~ 1e-6 for h = 17 / 4096)
        assert float(((w - reference).abs() / reference).max()) < 1e-5, (label, prediction)
    curves = implied_weightings(config)
    label = "all teachers: vp, eps, uniform t"
    shown = torch.tensor(curves[label][1], dtype=torch.float64)
    grid = torch.tensor(curves[label][0], dtype=torch.float64)
    inside = (grid > lo) & (grid < hi)
    torch.testing.assert_close(shown[inside], config.reference.weight(grid[inside]))
    assert len(curves) == 1 + 3  # + uniform t in the other forms, for contrast


def test_equal_in_t_keeps_each_form_native():
    config = tiny(equal="t", **{"train.time_sampler": "uniform"})
    cells = config.cells()
    vp = next(form for label, form, _ in cells if label == "vp")
    assert (vp.t_min, vp.t_max) == (forms.VP().t_min, forms.VP().t_max)
    train = cell_train_config(config, vp, "eps")
    assert train.time_sampler == "uniform" and train.weighting == "none"


def test_logsnr_mode_samples_every_form_on_one_logsnr_grid():
    config = tiny(**{"grid.forms": ["vp", "subvp", "ve", "fm"]})
    grids = {label: sampling_grid(form, 4, config) for label, form, _ in config.cells()[::2]}
    forms_ = {label: form for label, form, _ in config.cells()}
    logsnr = {k: forms_[k].logsnr(g[:-1]) for k, g in grids.items()}
    for label in logsnr:
        assert float(grids[label][-1]) == 0.0
        torch.testing.assert_close(logsnr[label], logsnr["vp"], rtol=0, atol=1e-9)
    # the VP grid is the reference's uniform-t grid: t = t_max, 3/4 t_max, ...
    vp = forms_["vp"]
    torch.testing.assert_close(
        grids["vp"][:-1], torch.linspace(vp.t_max, 0, 5, dtype=torch.float64)[:-1]
    )


# --- a whole (tiny) run ----------------------------------------------------------------------
def test_run_writes_report_results_and_models(tiny_run):
    out, results = tiny_run
    assert json.loads((out / "results.json").read_text())["records"] == results["records"]
    report = (out / "report.md").read_text()
    for setting in ("train.steps | `60`", "train.lr | `0.002`", "network.options.hidden | `32`",
                    "reference.prediction | `eps`", "rectify.num_pairs | `256`"):  # fmt: skip
        assert setting in report, setting
    assert report.index("## Shared hyperparameters") < report.index("## Rectification")
    # 4 cells x 2 stages x (ddim 1, ddim 2, dopri5)
    assert len(results["records"]) == 4 * 2 * 3
    keys = {"form", "prediction", "stage", "solver", "steps", "nfe", "sliced_w2", "energy",
            "straightness_t", "straightness_y", "first_order_deviation", "crossing_rate",
            "one_step_gap", "transport_cost"}  # fmt: skip
    assert all(keys <= set(r) for r in results["records"])
    assert all(isinstance(r["energy"], float) for r in results["records"])
    assert {(r["form"], r["metric"]) for r in results["summary"]} == {
        (f, m) for f in ("vp", "fm") for m in ("sliced_w2", "energy")
    }
    for cell in ("vp_eps", "vp_v", "fm_eps", "fm_v"):
        name, prediction = cell.split("_")
        preset = forms.load(name).config()
        for stage in ("teacher", "rectified"):  # each saved model is its cell's form and type
            _, form, saved_prediction = load_model_dir(out / "models" / cell / stage)
            saved = form.config()  # the preset, restricted to the common logsnr range
            assert {k: saved[k] for k in preset if k not in ("t_min", "t_max")} == {
                k: v for k, v in preset.items() if k not in ("t_min", "t_max")
            }, (cell, stage)
            assert preset["t_min"] <= saved["t_min"] < saved["t_max"] <= preset["t_max"]
            assert saved_prediction == prediction, (cell, stage)
        settings = load_manifest(out / "pairs" / cell / "round_1")["settings"]
        assert settings["num_pairs"] == 256 and settings["prediction"] == prediction


def test_recorded_numbers_are_the_library_functions_results(tiny_run):
    out, results = tiny_run
    config = tiny()
    model, form, prediction = load_model_dir(out / "models" / "fm_v" / "rectified")
    noise = standard_noise((2,), config.data.n_eval, config.seed, "evaluation")
    reference = load_data("8gaussians", config.data.n_eval, config.seed + 1)
    sample = samplers.sample(model, noise, form=form, prediction=prediction, solver="ddim",
                             steps=2, t_grid=sampling_grid(form, 2, config))  # fmt: skip
    direct = metrics.compute_metrics(["sliced_w2", "energy"], sample, reference, seed=config.seed,
                                     sliced_w2={"n_projections": 32})  # fmt: skip
    record = next(r for r in results["records"] if (r["form"], r["prediction"], r["stage"],
                  r["solver"], r["steps"]) == ("fm", "v", "rectified", "ddim", 2))  # fmt: skip
    assert record["sliced_w2"] == direct["sliced_w2"] and record["energy"] == direct["energy"]
    # mse_to_teacher: to the fm v teacher's dopri5 solve of the same noise
    teacher, _, _ = load_model_dir(out / "models" / "fm_v" / "teacher")
    target = samplers.sample(teacher, noise, form=form, prediction=prediction, solver="dopri5",
                             rtol=config.evaluation.rtol, atol=config.evaluation.atol)  # fmt: skip
    assert record["mse_to_teacher"] == pytest.approx(
        float((sample.double() - target.double()).square().mean()), rel=1e-12
    )
    row = next(r for r in results["summary"] if (r["form"], r["prediction"], r["metric"])
               == ("fm", "v", "energy"))  # fmt: skip
    one = {(r["stage"]): r["energy"] for r in results["records"] if (r["form"], r["prediction"],
           r["solver"], r["steps"]) == ("fm", "v", "ddim", 1)}  # fmt: skip
    assert row["ratio_1step"] == one["rectified"] / one["teacher"]
    # the data floor: the same metrics on 4 disjoint sets of n_eval training points
    x_train = load_data("8gaussians", config.data.n_train, config.seed)
    floor = metrics.data_floor(["sliced_w2", "energy"], x_train, reference, config.data.n_eval,
                               seed=config.seed, sliced_w2={"n_projections": 32})  # fmt: skip
    assert results["data_floor"] == floor and floor["sets"] == 4
    energy = floor["metrics"]["energy"]
    assert (f"### energy to held-out data (lower is better; data floor {energy['mean']:.4g} "
            f"± {energy['std']:.4g})") in (out / "report.md").read_text()  # fmt: skip


def test_evaluate_model_scores_the_solver_it_names():
    """A model that returns the data's mean as x0 gives the mean after one DDIM step."""
    form = forms.FlowMatching()

    class Mean(torch.nn.Module):
        def forward(self, x, model_time):
            return torch.full_like(x, 0.5)

    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    reference = torch.full((300, 2), 0.5)
    config = tiny(**{"evaluation.metrics": ["energy"], "evaluation.metric_options": {}})
    records, kept, own = evaluate_model(
        Mean(), form=form, prediction="x0", noise=noise, reference_data=reference,
        evaluation=config.evaluation, grid=lambda f, k: "uniform",
    )  # fmt: skip
    one_step = next(r for r in records if r["steps"] == 1)
    assert one_step["nfe"] == 1 and one_step["energy"] == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(kept["ddim@1"], reference)
    # a teacher's mse_to_teacher is to its own dopri5 solve (0 for that solve itself)
    adaptive = next(r for r in records if r["steps"] is None)
    assert adaptive["mse_to_teacher"] == 0.0 and own.shape == (300, 2)
    assert one_step["mse_to_teacher"] == pytest.approx(float((own - 0.5).square().mean()), rel=1e-9)
    # a student's is to the target it is given: (0.5 - 0.25)^2 per coordinate
    records, _, _ = evaluate_model(
        Mean(), form=form, prediction="x0", noise=noise, reference_data=reference,
        evaluation=config.evaluation, grid=lambda f, k: "uniform", target=torch.full((300, 2), 0.25),
    )  # fmt: skip
    assert next(r for r in records if r["steps"] == 1)["mse_to_teacher"] == pytest.approx(
        0.0625, rel=1e-12
    )


def test_same_config_and_seed_give_the_same_numbers_also_when_interrupted_and_resumed(
    tiny_run, tmp_path, monkeypatch
):
    """The same config again, stopped (Ctrl-C) as its third cell starts and rerun: the
    rerun runs only the two unfinished cells, and every number equals the uninterrupted
    run's; a rerun with another setting is refused naming it, nothing changed."""
    import rectdiff.apps.compare.run as run_module

    _, first = tiny_run
    out, real, started = tmp_path / "out", run_module.run_cell, []

    def stop_at_the_third(task):
        started.append(f"{task.label}_{task.prediction}")
        if len(started) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(run_module, "run_cell", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt, match=r"the 2 finished cell\(s\) \(vp_eps, vp_v\) "
                       r"are kept in .*; rerun the same command to resume"):  # fmt: skip
        run_compare(tiny(), out, progress=False)
    assert not (out / "report.md").exists()
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["settings.json", "vp_eps.pt",
                                                                 "vp_v.pt"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"interrupted compare with other settings "
                       r"\(train.steps: 60 there, 61 now\); rerun it with its own settings"):  # fmt: skip
        run_compare(tiny(**{"train.steps": 61}), out, progress=False)
    started.clear()
    second = run_compare(tiny(), out, progress=False)
    assert started == ["fm_eps", "fm_v"]
    assert second["records"] == first["records"]
    assert second["summary"] == first["summary"]


def test_another_seed_gives_other_numbers(tmp_path):
    config = tiny(seed=4, **{"grid.forms": ["fm"], "grid.predictions": ["v"]})
    results = run_compare(config, tmp_path, progress=False)
    first = run_compare(tiny(**{"grid.forms": ["fm"], "grid.predictions": ["v"]}), tmp_path / "b",
                        progress=False)  # fmt: skip
    assert results["records"][0]["energy"] != first["records"][0]["energy"]


def test_numbers_do_not_depend_on_the_number_of_worker_processes(tiny_run, tmp_path):
    _, serial = tiny_run
    config = tiny(workers=2)
    parallel = run_compare(config, tmp_path, progress=False)
    assert parallel["records"] == serial["records"]
    assert parallel["data_floor"] == serial["data_floor"]  # computed in a worker here


def test_every_cell_network_sees_time_on_one_scale():
    # sd15's model_time runs 0..999 and sd3's is 1000 sigma; the cells' networks must all
    # receive t in [0, 1], or "equal hyperparameters" would feed one sinusoidal embedding
    # time values 1000x apart
    config = config_from_dict({"grid": {"forms": ["vp", "sd15", "sd3"], "predictions": ["v"]}})
    x_train = torch.randn(64, 2)
    seen = {}
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    for name, form in config.grid.resolved():
        model = build_model(network_config(config, x_train, "v"), form)
        model.net.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[1]}))
        model(torch.zeros(2, 2), form.model_time(t).float())
    for name in ("vp", "sd15", "sd3"):
        torch.testing.assert_close(seen[name], t.float(), rtol=0, atol=1e-6)


def test_forms_are_hyperparameters_in_flow_matching_units(tmp_path):
    """With ``[network] scaling = "fm"``, ``time_input = "fm"`` (and the default
    ``equalize_units = "network"``), equalized to flow matching's objective, the VP, sub-VP, VE and FM cells
    train the same network (equal final losses to 1e-6) and VP, sub-VP and FM sample the same
    points: their teachers' DDIM numbers agree to 1e-4 relative (float32 rounding). VE's
    samples differ (0.7 % here): its grid ends at t = 0 where sigma = sigma_min = 0.01, not 0."""
    reference = {"form": "fm", "prediction": "flow", "time_sampler": "uniform"}
    network = {"options": {"hidden": 32, "depth": 2}, "scaling": "fm", "time_input": "fm"}
    config = tiny(**{"grid.forms": ["vp", "subvp", "ve", "fm"], "grid.predictions": ["v"],
                     "rectify.enabled": False, "evaluation.reference_solver": "",
                     "evaluation.diagnostics": []}, reference=reference, network=network)  # fmt: skip
    results = run_compare(config, tmp_path, progress=False)
    losses = {cell["form"]: cell["final_loss"]["teacher"] for cell in results["cells"]}
    for form in ("vp", "subvp", "ve"):
        assert losses[form] == pytest.approx(losses["fm"], rel=1e-6)
    by_form = {(r["form"], r["steps"]): r for r in results["records"] if r["stage"] == "teacher"}
    for steps in (1, 2):
        fm = by_form[("fm", steps)]
        for form in ("vp", "subvp"):
            for metric in ("sliced_w2", "energy"):
                assert by_form[(form, steps)][metric] == pytest.approx(fm[metric], rel=1e-4)


def test_forms_and_predictions_are_hyperparameters_with_velocity_scaling(tmp_path):
    """With ``[network] scaling = "velocity"`` every cell's network predicts flow matching's
    velocity, whatever its form and prediction, so equalized to flow matching's objective
    the VP, VE and FM cells with eps, x0 and v prediction all train the same network: equal
    final losses (1e-6 relative) and, for VP and FM, equal DDIM numbers (1e-4)."""
    reference = {"form": "fm", "prediction": "flow", "time_sampler": "uniform"}
    network = {"options": {"hidden": 32, "depth": 2}, "scaling": "velocity", "time_input": "fm"}
    config = tiny(**{"grid.forms": ["vp", "ve", "fm"], "grid.predictions": ["eps", "x0", "v"],
                     "rectify.enabled": False, "evaluation.reference_solver": "",
                     "evaluation.diagnostics": []}, reference=reference, network=network)  # fmt: skip
    results = run_compare(config, tmp_path, progress=False)
    losses = {(c["form"], c["prediction"]): c["final_loss"]["teacher"] for c in results["cells"]}
    assert len(losses) == 9
    for loss in losses.values():
        assert loss == pytest.approx(losses[("fm", "v")], rel=1e-6)
    records = {(r["form"], r["prediction"], r["steps"]): r for r in results["records"]
               if r["stage"] == "teacher" and r["solver"] == "ddim"}  # fmt: skip
    assert len(records) >= 9
    for (form, prediction, steps), record in records.items():
        if form != "ve":
            want = records[("fm", "v", steps)]["energy"]
            assert record["energy"] == pytest.approx(want, rel=1e-4), (form, prediction, steps)
    # the saved teacher reloads with its skip connection: the recorded number again
    model, form, prediction = load_model_dir(tmp_path / "models" / "vp_eps" / "teacher")
    assert (model.scaling, prediction) == ("velocity", "eps")
    noise = standard_noise((2,), config.data.n_eval, config.seed, "evaluation")
    sample = samplers.sample(model, noise, form=form, prediction=prediction, solver="ddim",
                             steps=2, t_grid=sampling_grid(form, 2, config))  # fmt: skip
    reference = load_data("8gaussians", config.data.n_eval, config.seed + 1)
    direct = metrics.compute_metrics(["energy"], sample, reference, seed=config.seed)
    assert direct["energy"] == records[("vp", "eps", 2)]["energy"]


def test_methods_reflow_distill_and_phased_at_their_budgets(tmp_path):
    """``[rectify] methods = ["reflow", "reflow+distill", "phased"]``, ``phases = 2``: the
    phased student's windows are the 2-step evaluation grid at one reflow round's budget; the
    distilled student is the reflow student distilled on its own pairs (twice the budget);
    all three in the methods table and with a quality-against-NFE figure each."""
    config = tiny(**{"rectify.phases": 2, "rectify.methods": ["reflow", "reflow+distill",
                     "phased"], "grid.forms": ["fm"], "grid.predictions": ["v"]})  # fmt: skip
    results = run_compare(config, tmp_path, progress=False)
    model, form, prediction = load_model_dir(tmp_path / "models" / "fm_v" / "phased")
    edges = sampling_grid(form, 2, config)
    info = json.loads((tmp_path / "models" / "fm_v" / "phased" / "model.json").read_text())
    assert info["info"]["edges"] == [float(t) for t in edges] and info["info"]["phases"] == 2
    noise = standard_noise((2,), config.data.n_eval, config.seed, "evaluation")
    reference = load_data("8gaussians", config.data.n_eval, config.seed + 1)
    sample = samplers.sample(model, noise, form=form, prediction=prediction, solver="ddim",
                             t_grid=edges)  # fmt: skip
    direct = metrics.compute_metrics(["sliced_w2"], sample, reference, seed=config.seed,
                                     sliced_w2={"n_projections": 32})  # fmt: skip
    record = next(r for r in results["records"] if (r["stage"], r["solver"], r["steps"])
                  == ("phased", "ddim", 2))  # fmt: skip
    assert record["sliced_w2"] == direct["sliced_w2"]
    cell = results["cells"][0]
    assert cell["budgets"]["phased"] == cell["budgets"]["rectified"] == 256 * 8
    assert cell["budgets"]["distilled"] == 2 * 256 * 8
    steps = config.rectify.config.train.steps
    assert cell["student_steps"] == {"rectified": steps, "phased": steps, "distilled": 2 * steps}
    distilled = json.loads((tmp_path / "models" / "fm_v" / "distilled" / "model.json").read_text())
    assert distilled["info"]["from"] == "rectified"
    assert distilled["info"]["pairs"] == "pairs/fm_v/distill"
    written = {p.name for p in draw_result_figures(results, tmp_path / "figures")}
    for slug in ("reflow", "reflow_distill", "phased"):
        assert f"quality_vs_nfe_{slug}_v.png" in written
    diag_noise = standard_noise((2,), config.evaluation.n_diagnostic, config.seed, "diagnostics")
    traj = samplers.sample(model, diag_noise, form=form, prediction=prediction, solver="ddim",
                           t_grid=window_grid(form, edges, 8), return_trajectory=True)  # fmt: skip
    per_window = diagnostics.window_first_order_deviation(traj, edges)
    assert cell["diagnostics"]["phased"]["window_first_order_deviation"] == float(per_window.mean())
    assert cell["diagnostics"]["phased"]["window_first_order_deviation_per_window"] == (
        per_window.tolist()
    )
    phased = cell["diagnostics"]["phased"]
    teacher_windows = phased["teacher_window_first_order_deviation_per_window"]
    report = (tmp_path / "report.md").read_text()
    # the report's row: each window's student / teacher deviation, then the ratio of the means
    row = next(
        line for line in report.splitlines() if line.startswith("| fm | v | ") and "x) |" in line
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 2 + 2 + 1
    for text, a, b in zip(cells[2:4], per_window.tolist(), teacher_windows, strict=True):
        assert text == f"{a:.3g} / {b:.3g} ({b / a:.2g}x)"
    ratio = phased["teacher_window_first_order_deviation"] / phased["window_first_order_deviation"]
    assert float(cells[4]) == pytest.approx(ratio, rel=1e-3)
    assert "### Few-step methods: sliced_w2" in report
    # equalized (logsnr) training keeps nearly every sample; the phased loss is unweighted
    assert set(cell["ess"]) == {"teacher", "rectified", "distilled"}
    assert all(0.9 <= value <= 1.0 for value in cell["ess"].values()), cell["ess"]
    assert "Effective sample size of the training batches" in report
    for method in ("reflow", "reflow+distill", "phased"):
        assert f"| {method} | fm | v |" in report
    with pytest.raises(ValueError, match=r"\[rectify\] phases must be an integer >= 0.*-1"):
        tiny(**{"rectify.phases": -1})


def test_phased_space_loss_and_window_time_reach_the_phased_student(tmp_path):
    """``[rectify] phased_space``, ``phased_loss`` and ``phased_window_time`` reach
    ``rectify_phased``: from the same teacher and couplings, the default (prediction space,
    pseudo-Huber, even in t), prediction-space MSE, the endpoint MSE and times even in logsnr
    train four different students; the report names the settings."""
    changes = {"rectify.phases": 2, "rectify.methods": ["phased"], "grid.forms": ["fm"],
               "grid.predictions": ["v"]}  # fmt: skip
    settings = [{}, {"phased_loss": "mse"}, {"phased_space": "endpoint", "phased_loss": "mse"},
                {"phased_window_time": "logsnr"}]  # fmt: skip
    defaults = {"phased_space": "prediction", "phased_loss": "pseudo_huber",
                "phased_window_time": "t"}  # fmt: skip
    weights = []
    for i, setting in enumerate(settings):
        out = tmp_path / str(i)
        run_compare(tiny(**changes, **{f"rectify.{k}": v for k, v in setting.items()}), out,
                    progress=False)  # fmt: skip
        teacher, _, _ = load_model_dir(out / "models" / "fm_v" / "teacher")
        student, _, _ = load_model_dir(out / "models" / "fm_v" / "phased")
        weights.append((teacher.state_dict(), student.state_dict()))
        report = (out / "report.md").read_text()
        for key, value in (defaults | setting).items():
            assert f"rectify.{key} | `{value}`" in report
    for (teacher_a, student_a), (teacher_b, student_b) in zip(weights, weights[1:], strict=False):
        assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)
        assert not all(torch.equal(student_a[k], student_b[k]) for k in student_a)
    assert not all(torch.equal(weights[0][1][k], weights[3][1][k]) for k in weights[0][1])


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"rectify.methods": ["reflow", "consistency"]},
         r"unknown \[rectify\] method 'consistency'; allowed: reflow, reflow\+distill, phased"),
        ({"rectify.methods": "phased"}, r"methods must be a non-empty list.*got 'phased'"),
        ({"rectify.methods": []}, r"methods must be a non-empty list"),
        ({"rectify.methods": ["phased", "phased"]}, r"lists a method twice"),
        ({"rectify.methods": ["phased"], "rectify.phases": 0}, r"'phased' but phases = 0"),
    ],
)  # fmt: skip
def test_bad_methods_are_named(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny(**changes)


def test_ot_and_ot_reflow_methods(tmp_path):
    """``methods = ["ot", "ot+reflow"]``: stage ``ot`` is exactly the library's
    minibatch-OT training of the cell's network from the teacher's initial weights, and
    ``ot_rectified`` one reflow round from it, with cumulative budgets."""
    config = tiny(**{"rectify.methods": ["ot", "ot+reflow"], "grid.forms": ["fm"],
                     "grid.predictions": ["v"]})  # fmt: skip
    results = run_compare(config, tmp_path, progress=False)
    ((label, form, prediction),) = config.cells()
    x_train = load_data("8gaussians", config.data.n_train, config.seed)
    torch.manual_seed(config.seed)
    model = build_model(network_config(config, x_train, prediction), form)
    net_config = network_config(config, x_train, prediction)
    train_config = dataclasses.replace(
        cell_train_config(config, form, prediction, net_config=net_config), coupling="ot"
    )
    direct = timesteps.train(model, x_train, form=form, prediction=prediction,
                             config=train_config, resume=False, progress=False).model  # fmt: skip
    saved, _, _ = load_model_dir(tmp_path / "models" / "fm_v" / "ot")
    for key, value in direct.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
    cell = results["cells"][0]
    teacher_steps, rect_steps = config.train.steps, config.rectify.config.train.steps
    assert cell["budgets"] == {"ot": 0, "ot_rectified": 256 * 8}
    assert cell["student_steps"] == {
        "ot": teacher_steps,
        "ot_rectified": teacher_steps + rect_steps,
    }
    info = json.loads((tmp_path / "models" / "fm_v" / "ot_rectified" / "model.json").read_text())
    assert info["info"]["pairs"] == "pairs/fm_v/ot_rectified_round_1"
    report = (tmp_path / "report.md").read_text()
    assert "| ot | fm | v |" in report and "| ot+reflow | fm | v |" in report
    with pytest.raises(ValueError, match=r"\[rectify.train\] coupling = 'ot'.*methods"):
        tiny(**{"rectify.train": {"steps": 30, "coupling": "ot"}})


def test_methods_default_and_phases_shorthand():
    assert tiny().rectify.methods == ["reflow"]
    shorthand = tiny(**{"rectify.phases": 3}).rectify
    assert (shorthand.methods, shorthand.phases) == (["reflow", "phased"], 3)
    listed = tiny(**{"rectify.methods": ["phased"]}).rectify
    assert (listed.methods, listed.phases) == (["phased"], 4)


def test_eps_cell_of_a_flow_form_reaching_t_1_is_refused_at_load():
    fm1 = {"name": "fm1", "family": "fm", "t_max": 1.0}
    with pytest.raises(
        ValueError, match=r"form 'fm1', prediction 'eps'.*t_max=1.0.*alpha\(1.0\) = 0"
    ):
        tiny(**{"equal": "t", "grid.forms": [fm1], "grid.predictions": ["eps", "flow"]})
    tiny(**{"equal": "t", "grid.forms": [fm1], "grid.predictions": ["flow", "v"]})  # these sample


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("train.steps", 1.5, r"\[train\]: training option steps = 1.5 has type float; expected int"),
        ("train.lr", "fast", r"lr = 'fast' has type str; expected float"),
        ("data.n_train", "5", r"n_train = '5' in \[data\] has type str; expected int \| None"),
        ("evaluation.steps", [1, 2.5], r"steps = \[1, 2.5\] in \[evaluation\] has type list; expected list\[int\]"),
    ],
)  # fmt: skip
def test_config_values_of_the_wrong_type_are_refused(key, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny(**{key: value})


def test_n_train_beyond_the_data_is_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "points.npy"
    np.save(data, np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    config = tiny(**{"data.name": str(data), "data.n_train": 100, "data.n_holdout": 10})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"n_train = 100, but .* has only 40 samples .*50 less "
                       r"n_holdout = 10.*set n_train <= 40"):  # fmt: skip
        run_compare(config, out, progress=False)
    assert not out.exists()


def test_quick_report_shows_the_rectify_steps_that_ran():
    config = load_config(DEFAULT_CONFIG)
    assert config.to_dict()["rectify"]["train"]["steps"] == config.rectify.config.train.steps
    quick = quick_config(config)
    ran = quick.rectify.config.train.steps
    assert ran < config.rectify.config.train.steps
    assert quick.to_dict()["rectify"]["train"]["steps"] == ran


def test_every_saved_model_records_its_full_training_settings(tiny_run):
    """A cell's model folders record the TrainConfig each stage trained with, every field:
    the teacher the shared [train] block, the rectified student [rectify.train] over it."""
    from rectdiff.io.model_dir import read_model_info

    out, _ = tiny_run
    config = tiny()
    label, form, prediction = config.cells()[0]
    folder = out / "models" / f"{label}_{prediction}"
    for stage, which in (("teacher", "teacher"), ("rectified", "rectify")):
        info = read_model_info(folder / stage)["info"]
        want = cell_train_config(config, form, prediction, which, _net(config, prediction))
        want = want.to_dict()
        assert info["training"] == json.loads(json.dumps(want)), stage
    assert read_model_info(folder / "teacher")["info"]["training"]["steps"] == 60
    assert read_model_info(folder / "rectified")["info"]["training"]["steps"] == 30


def test_the_compare_app_imports_no_diffusers_pot_or_sklearn():
    """Every compare worker imports the app first: diffusers (3-8 s on a slow CPU), POT (2 s)
    and sklearn (2 s) are imported where they are used, not with the modules; an MLP
    grid's main process never needs them."""
    import subprocess
    import sys

    code = ("import sys, rectdiff.apps.compare.run, rectdiff.training, rectdiff.models\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'ot', 'sklearn'}))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)  # fmt: skip
    assert done.stdout.strip() == "[]", done.stdout


def test_the_velocity_variant_of_the_demo_changes_only_the_network_scaling_and_time():
    """``experiments/compare_forms_velocity.toml`` is the default comparison laid under two
    keys (``base``): every other setting is the default's."""
    default = load_config()
    variant = load_config(DEFAULT_CONFIG.parent / "compare_forms_velocity.toml")
    assert (variant.network.scaling, variant.network.time_input) == ("velocity", "fm")
    assert (default.network.scaling, default.network.time_input) == ("edm", "t")
    network = dataclasses.replace(default.network, scaling="velocity", time_input="fm")
    assert dataclasses.replace(default, network=network, source=variant.source) == variant
