"""Model folders: a saved model comes back bit-identical, with its form and prediction."""

import json

import pytest
import torch

from rectdiff import forms
from rectdiff.io.model_dir import (
    build_model,
    is_model_dir,
    load_model_dir,
    read_model_info,
    save_model_dir,
)
from rectdiff.models import Preconditioned
from rectdiff.reparametrize import Reparametrized

MLP_CONFIG = {
    "kind": "mlp",
    "kwargs": {"dim": 2, "hidden": 16, "depth": 2},
    "preconditioning": {"sigma_data": 1.7, "scale_input": True, "output_prediction": "v"},
}


def _perturbed(model, seed=1):
    """Move every weight off its initial value so that a wrong load cannot pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize(
    "form", [forms.VP(), forms.VE(sigma_max=50.0), forms.FlowMatching(t_max=0.99)],
    ids=["vp", "ve", "fm"],
)  # fmt: skip
def test_mlp_round_trip_gives_identical_outputs(tmp_path, form):
    torch.manual_seed(0)
    model = _perturbed(build_model(MLP_CONFIG, form))
    save_model_dir(tmp_path / "m", model, form=form, prediction="v", net_config=MLP_CONFIG)
    loaded, loaded_form, prediction = load_model_dir(tmp_path / "m")

    assert prediction == "v" and loaded_form == form and loaded_form.t_max == form.t_max
    assert isinstance(loaded, Preconditioned) and loaded.sigma_data == 1.7
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    t = torch.rand(64, generator=torch.Generator().manual_seed(3)) * (form.t_max - form.t_min)
    with torch.no_grad():
        expected = model.eval()(x, form.model_time(t + form.t_min))
        got = loaded(x, form.model_time(t + form.t_min))
    assert torch.equal(got, expected)
    assert not loaded.training


def test_unet_round_trip_gives_identical_outputs(tmp_path):
    form = forms.VP()
    config = {
        "kind": "unet",
        "kwargs": {"sample_size": 8, "in_channels": 1, "block_out_channels": [8, 16],
                   "norm_num_groups": 4},
        "preconditioning": {"sigma_data": 0.5, "scale_input": True, "output_prediction": "eps"},
    }  # fmt: skip
    torch.manual_seed(0)
    model = _perturbed(build_model(config, form)).eval()
    save_model_dir(tmp_path / "u", model, form=form, prediction="eps", net_config=config)
    loaded, _, _ = load_model_dir(tmp_path / "u")
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))


def test_reparametrized_source_round_trip(tmp_path):
    """A VP/eps network answering as flow matching/flow (classic Reflow's student)."""
    vp, fm = forms.VP(), forms.FlowMatching()
    config = {**MLP_CONFIG, "preconditioning": {"sigma_data": 1.0, "scale_input": True,
                                                "output_prediction": "eps"}}  # fmt: skip
    torch.manual_seed(0)
    inner = _perturbed(build_model(config, vp))
    student = Reparametrized(inner, vp, "eps", fm, "flow")
    record = {**config, "source": {"form": vp.config(), "prediction": "eps"}}
    save_model_dir(tmp_path / "r", student, form=fm, prediction="flow", net_config=record)
    loaded, form, prediction = load_model_dir(tmp_path / "r")
    assert (form, prediction) == (fm, "flow") and isinstance(loaded, Reparametrized)
    x, t = torch.randn(16, 2), torch.full((16,), 0.4)
    with torch.no_grad():
        assert torch.equal(loaded(x, fm.model_time(t)), student(x, fm.model_time(t)))


def test_model_json_records_everything_and_save_replaces_atomically(tmp_path):
    form = forms.SubVP()
    torch.manual_seed(0)
    first = build_model(MLP_CONFIG, form)
    path = save_model_dir(tmp_path / "m", first, form=form, prediction="x0",
                          net_config=MLP_CONFIG, info={"stage": "teacher"})  # fmt: skip
    record = json.loads((path / "model.json").read_text())
    assert record["form"] == form.config() and record["prediction"] == "x0"
    assert record["net"] == MLP_CONFIG and record["info"] == {"stage": "teacher"}
    assert record["format"] == "rectdiff-model" and record["rectdiff_version"]

    second = _perturbed(build_model(MLP_CONFIG, form), seed=5)
    save_model_dir(path, second, form=form, prediction="x0", net_config=MLP_CONFIG)
    loaded, _, _ = load_model_dir(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 second.state_dict().values(), strict=True))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model.json"):
        load_model_dir(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a rectdiff model record"):
        read_model_info(tmp_path / "other")
    assert not is_model_dir(tmp_path / "other")
    # an existing folder that is not a model folder is never overwritten
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    model = build_model(MLP_CONFIG, forms.VP())
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_model_dir(tmp_path / "data", model, form=forms.VP(), prediction="v",
                       net_config=MLP_CONFIG)  # fmt: skip
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"


def test_weights_that_do_not_fit_are_refused(tmp_path):
    form = forms.VP()
    model = build_model(MLP_CONFIG, form)
    save_model_dir(tmp_path / "m", model, form=form, prediction="v", net_config=MLP_CONFIG)
    record = json.loads((tmp_path / "m" / "model.json").read_text())
    record["net"]["kwargs"]["hidden"] = 32
    (tmp_path / "m" / "model.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not fit the network"):
        load_model_dir(tmp_path / "m")


def test_bad_network_config_names_the_allowed_kinds():
    with pytest.raises(ValueError, match=r"unknown network kind 'resnet'; allowed: mlp, unet"):
        build_model({"kind": "resnet"}, forms.VP())
