"""The pair-store check the library offers (rectify.verify): what it accepts and refuses."""

from __future__ import annotations

import json

import pytest
import torch

from rectdiff import forms
from rectdiff.errors import StoreError
from rectdiff.rectify import PairStoreError, generate_pairs, load_pairs, verify_pairs
from rectdiff.rectify.store import PairDataset


class Scale(torch.nn.Module):
    """x0 = a fixed linear map of the noise under a flow model: a cheap, exact teacher."""

    sample_shape = (2,)

    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x, t):
        return self.weight * x


@pytest.fixture
def store(tmp_path):
    generate_pairs(Scale(0.5), form=forms.FlowMatching(), prediction="flow", num_pairs=20,
                   out=tmp_path / "pairs", solver="euler", steps=2, shard_size=8,
                   progress=False)  # fmt: skip
    return tmp_path / "pairs"


def test_an_intact_store_loads_as_the_dataset_reads_it(store):
    manifest = verify_pairs(store, model=Scale(0.5), form=forms.FlowMatching(), prediction="flow")
    assert manifest["num_pairs"] == 20 and all(e["bytes"] > 0 for e in manifest["shards"])
    couplings = load_pairs(store, model=Scale(0.5))
    dataset = PairDataset(store)
    assert torch.equal(couplings.x0, torch.stack([dataset[i]["x0"] for i in range(20)]))
    assert torch.equal(couplings.eps, torch.stack([dataset[i]["eps"] for i in range(20)]))


def test_another_model_form_or_prediction_is_refused_unless_allowed(store):
    with pytest.raises(PairStoreError, match="made by another model"):
        load_pairs(store, model=Scale(0.25))
    with pytest.raises(PairStoreError, match="made in form"):
        verify_pairs(store, form=forms.FlowMatching(shift=3.0))
    with pytest.raises(PairStoreError, match="made with prediction 'flow', the model predicts 'v'"):
        verify_pairs(store, prediction="v")
    assert len(load_pairs(store, model=Scale(0.25), allow_other_model=True).x0) == 20


def test_a_damaged_shard_is_named_and_the_error_is_a_store_error(store):
    path = store / "shard_00002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard_00002.safetensors: sha256 differs") as info:
        load_pairs(store)
    assert isinstance(info.value, RuntimeError) and "Rerun `rectdiff pairs`" in str(info.value)
    assert len(load_pairs(store, verify=False).x0) == 20  # --no-verify: the hash is skipped
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["shards"][2]["count"] == 4  # the last, short shard


@pytest.mark.parametrize(
    "key, value, expected",
    [("guidance", "x", "int or float or null"), ("steps", 2.5, "int"), ("store_eps", 1, "bool"),
     ("seed", True, "int")],
)  # fmt: skip
def test_a_setting_of_the_wrong_type_in_the_manifest_is_named(store, key, value, expected):
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["settings"][key] = value
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PairStoreError) as info:
        verify_pairs(store)
    assert (
        f"manifest.json settings {key} = {value!r} has type {type(value).__name__}; expected "
        f"{expected}"
    ) in str(info.value)
