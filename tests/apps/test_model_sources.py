"""Model sources: the three kinds of ``--model`` open into one interface, save their students
as the same kind of folder, and refuse bad inputs with one-line errors naming the value."""

import json
import sys

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from rectdiff import forms
from rectdiff.apps.compare.saved import diagnose_dirs
from rectdiff.apps.model_sources import (
    FACTORY_FORMAT,
    ModelSource,
    open_source,
    open_sources,
    parse_options,
    parse_shape,
    sha256,
)  # fmt: skip
from rectdiff.apps.outside_sources import fit_weights
from rectdiff.forms import DiscreteVP
from rectdiff.io.model_dir import build_model, save_model_dir
from rectdiff.reparametrize import Reparametrized

NETS = '''
import torch
from torch import nn


class TimeFirst(nn.Module):
    """A torchdiffeq-style vector field ``net(t, x)``, noise at t = 0."""

    sample_shape = (2,)

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, t, x):
        return self.lin(torch.cat([x, t[:, None]], dim=1))


class Plain(nn.Module):
    """``net(x, t)`` with no sample_shape."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t[:, None]], dim=1))


def build_tx():
    return TimeFirst()


def build_plain():
    return Plain()


def build_nothing():
    return 3


def build_broken():
    raise RuntimeError("no GPU here")
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with the user's module (current directory while the tests run) and weights."""
    root = tmp_path_factory.mktemp("sources")
    (root / "rd_lib_nets.py").write_text(NETS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "path", list(sys.path))
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 2)
        torch.save({"lin.weight": lin.weight.data, "lin.bias": lin.bias.data}, root / "w.pt")
        save_file({"lin.weight": lin.weight.data, "lin.bias": lin.bias.data},
                  str(root / "w.safetensors"))  # fmt: skip
        yield root


def test_parse_shape_and_options():
    assert parse_shape("2") == (2,) and parse_shape("1,8,8") == (1, 8, 8)
    assert parse_shape([3, 4]) == (3, 4) and parse_shape(None) is None
    for bad in ("0", "a,b", ""):
        with pytest.raises(ValueError, match=f"bad --shape {bad!r}"):
            parse_shape(bad)
    options = parse_options(["sigma_min=0.0", "call=t_x", "n=3", "flag=true", "kw=none"])
    assert options == {"sigma_min": 0.0, "call": "t_x", "n": 3, "flag": True, "kw": None}
    assert isinstance(options["sigma_min"], float) and parse_options({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="bad --convention-arg 'sigma'"):
        parse_options(["sigma"])


def test_factory_with_torch_weights_and_a_time_first_call(folder):
    source = open_source(factory="rd_lib_nets:build_tx", weights="w.pt",
                         convention="flow-tutorial", convention_args=["call=t_x"])  # fmt: skip
    assert isinstance(source, ModelSource) and source.kind == "factory"
    assert source.shape == (2,) and source.cond_fn is None and source.prediction == "flow"
    assert sha256(folder / "w.pt") in source.description and "rd_lib_nets:build_tx" in source.name
    net = source.model.net
    x, t = torch.randn(5, 2), torch.rand(5)
    with torch.no_grad():  # rectdiff's flow in t = 1 - s is minus the tutorial's dx/ds
        torch.testing.assert_close(source.model(x, source.form.model_time(t)), -net(1 - t, x))
    with pytest.raises(ValueError, match="reparametrize rectdiff model folders only"):
        source.student(forms.VP(), "eps")


def test_factory_student_folder_is_the_users_state_dict_and_reopens(folder):
    options = {"form": "fm", "prediction": "flow"}  # rectdiff's own convention, a preset name
    source = open_source(factory="rd_lib_nets:build_plain", weights="w.safetensors",
                         convention="rectdiff", convention_args=options, shape="2")  # fmt: skip
    assert source.form == forms.load("fm") and source.model.__class__.__name__ == "Plain"
    student, form, prediction = source.student()
    assert student is source.model  # trained in place, no second copy
    with torch.no_grad():
        student.lin.bias.add_(1.0)
    out = source.save_student("student", student, form, prediction, {"stage": "rectified"})
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert set(load_file(out / "model.safetensors")) == {"lin.weight", "lin.bias"}
    record = json.loads((out / "model.json").read_text())
    assert record["format"] == FACTORY_FORMAT and record["convention_args"] == options
    assert record["shape"] == [2] and record["info"] == {"stage": "rectified"}
    again = open_source("student")
    assert again.kind == "factory" and again.info["stage"] == "rectified" and again.shape == (2,)
    torch.testing.assert_close(again.model.lin.bias, student.lin.bias)
    source.save_student("student", student, form, prediction, {"round": 2})  # its own kind: ok
    (folder / "plain").mkdir()
    with pytest.raises(ValueError, match="'plain' exists and is not a factory student folder"):
        source.save_student("plain", student, form, prediction, {})
    # diagnose reads a factory student folder (and the factory itself, opened)
    records = diagnose_dirs([out, source], num=64, steps=8, rtol=1e-3, atol=1e-3)
    assert [r["model"] for r in records] == ["student", "rd_lib_nets:build_plain"]
    assert all(r["one_step_gap"] >= 0 for r in records)


def test_bad_factory_inputs_name_the_value(folder):
    def opened(**changed):
        given = {"factory": "rd_lib_nets:build_plain", "weights": "w.safetensors",
                 "convention": "flow-tutorial", "shape": "2"} | changed  # fmt: skip
        return open_source(**given)

    with pytest.raises(ValueError, match="needs --convention NAME; allowed: rectdiff, flow"):
        opened(convention=None)
    with pytest.raises(ValueError, match="needs --weights FILE"):
        opened(weights=None)
    with pytest.raises(ValueError, match="bad --model-factory 'rd_lib_nets'"):
        opened(factory="rd_lib_nets")
    with pytest.raises(ValueError, match="returned a int, not a torch nn.Module"):
        opened(factory="rd_lib_nets:build_nothing")
    with pytest.raises(ValueError, match="'rd_lib_nets:build_broken': calling it failed"):
        opened(factory="rd_lib_nets:build_broken")
    with pytest.raises(ValueError, match=r"fails on samples of shape \[3\]"):
        opened(shape="3")
    with pytest.raises(ValueError, match=r"--weights 'w.txt' is not a file"):
        opened(weights="w.txt")
    (folder / "w.txt").write_text("no")
    with pytest.raises(ValueError, match=r"unknown suffix '.txt'"):
        opened(weights="w.txt")
    torch.save(torch.zeros(3), folder / "tensor.pt")
    with pytest.raises(ValueError, match="'tensor.pt' is not a state dict"):
        opened(weights="tensor.pt")
    with pytest.raises(ValueError, match="bad options .* for convention 'flow-tutorial'"):
        opened(convention_args={"sigma": 1.0})
    with pytest.raises(ValueError, match="give either --model"):
        open_source("student", factory="rd_lib_nets:build_plain")
    with pytest.raises(ValueError, match="--weights go with --model-factory"):
        open_source("student", weights="w.pt")
    with pytest.raises(ValueError, match="no model given"):
        open_source()
    with pytest.raises(ValueError, match="no model given"):
        open_sources([])
    with pytest.raises(ValueError, match="go with --model-factory"):
        open_sources([], shape="2")


def test_weights_that_do_not_fit_name_every_kind_of_mismatch():
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 2))
    state = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(4), "2.bias": torch.zeros(2)}
    with pytest.raises(ValueError) as err:
        fit_weights(net, state, "--weights 'x.safetensors'")
    message = str(err.value)
    assert "\n" not in message and message.startswith("--weights 'x.safetensors' do not fit")
    assert "missing keys: 1.weight, 1.bias" in message and "unexpected keys: 2.bias" in message
    assert "0.weight (4, 3) vs (4, 2)" in message


def tiny_pipeline(path, **scheduler):
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        norm_num_groups=8, layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(path)
    return path


def test_diffusers_folder_and_its_student(tmp_path):
    teacher = tiny_pipeline(tmp_path / "teacher", num_train_timesteps=100, clip_sample=False)
    source = open_source(teacher)
    assert source.kind == "diffusers" and source.shape == (1, 8, 8) and source.prediction == "eps"
    assert isinstance(source.form, DiscreteVP) and source.form.num_train_timesteps == 100
    assert "unet files sha256" in source.description
    with pytest.raises(ValueError, match="is the teacher's folder"):
        source.check_out(teacher)
    student, form, prediction = source.student()
    out = source.save_student(tmp_path / "student", student, form, prediction, {"pairs": "p"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["scheduler"][1] == "DDIMScheduler"
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["timestep_spacing"] == "trailing" and config["set_alpha_to_one"] is True
    assert config["clip_sample"] is False and config["num_train_timesteps"] == 100
    record = json.loads((out / "rectdiff.json").read_text())
    assert record["teacher"] == str(teacher.resolve()) and record["info"] == {"pairs": "p"}
    again = open_source(out)  # a student is itself a --model
    assert again.kind == "diffusers" and again.info == {"pairs": "p"} and again.form == source.form
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="'.*taken' exists and is not a diffusers student"):
        source.save_student(tmp_path / "taken", student, form, prediction, {})
    with pytest.raises(ValueError, match="--shape goes with --model-factory"):
        open_source(teacher, shape="1,8,8")


def test_diffusers_folders_of_other_pipelines_are_refused(tmp_path):
    folder = tmp_path / "sd"
    folder.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "PNDMScheduler"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="UNet2DConditionModel.*use `rectdiff sd`"):
        open_source(folder)
    index |= {"unet": ["diffusers", "UNet2DModel"],
              "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'FlowMatchEulerDiscreteScheduler' is not supported"):
        open_source(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'.*empty' is neither a rectdiff model folder"):
        open_source(tmp_path / "empty")
    with pytest.raises(ValueError, match="'.*nowhere' is not a folder"):
        open_source(tmp_path / "nowhere")


def test_rectdiff_folder_reparametrizes_and_keeps_its_description(tmp_path):
    net_config = {"kind": "mlp", "kwargs": {"dim": 2, "hidden": 8, "depth": 1}}
    form = forms.load("vp")
    model = build_model(net_config, form)
    save_model_dir(tmp_path / "t", model, form=form, prediction="eps", net_config=net_config)
    source = open_source(tmp_path / "t")
    assert source.kind == "rectdiff" and source.shape == (2,)
    weights = sha256(tmp_path / "t" / "model.safetensors")
    assert source.description == f"{(tmp_path / 't').resolve()} (weights sha256 {weights})"
    student, s_form, s_prediction = source.student(forms.FlowMatching(), "flow")
    assert isinstance(student, Reparametrized) and s_prediction == "flow"
    out = source.save_student(tmp_path / "s", student, s_form, s_prediction, {"stage": "r"})
    reflow = open_source(out)
    assert reflow.record["net"]["source"]["prediction"] == "eps" and reflow.prediction == "flow"
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="'.*other' exists and is not a rectdiff student"):
        source.save_student(tmp_path / "other", student, s_form, s_prediction, {})
