"""Rectification: retraining on a teacher's couplings makes one DDIM step land on the pairs."""

import json

import pytest
import torch

from rectdiff import forms, samplers
from rectdiff.rectify.pairs import PairDataset, generate_pairs, load_manifest
from rectdiff.rectify.online import Diffusion
from rectdiff.models import MLP, Preconditioned
from rectdiff.oracles import GaussianOracle
from rectdiff.rectify import AtTime, RectifyConfig, Reflow, load_pairs, rectify, rectify_rounds
from rectdiff.training import TrainConfig

MEAN, STD = torch.tensor([1.0, -0.5]), 0.5


def student(form, seed=0):
    torch.manual_seed(seed)
    return Preconditioned(MLP(dim=2, hidden=64, depth=3), form, sigma_data=1.0)


def rms(a, b):
    return float(((a - b) ** 2).sum(-1).mean().sqrt())


@pytest.mark.parametrize(
    "form, prediction",
    [(forms.VP(), "x0"), (forms.FlowMatching(), "v"), (forms.VE(sigma_max=20.0), "x0")],
    ids=["vp-x0", "fm-v", "ve-x0"],
)
def test_rectified_student_one_step_beats_teacher(tmp_path, form, prediction):
    torch.set_num_threads(1)
    teacher = GaussianOracle(form, prediction, mean=MEAN, std=STD)
    pairs = generate_pairs(
        teacher, form=form, prediction=prediction, num_pairs=2048, out=tmp_path / "pairs",
        solver="dpmpp_2m", steps=32, shard_size=1024, seed=0, shape=(2,), progress=False,
    )  # fmt: skip
    config = TrainConfig(steps=600, batch_size=256, lr=3e-3, seed=0, log_every=100)
    model = rectify(student(form), pairs, form=form, prediction=prediction, config=config,
                    progress=False).model  # fmt: skip

    eps = torch.randn(1024, 2, generator=torch.Generator().manual_seed(123))
    x_start = form.sigma(form.t_max) * eps
    target = teacher.solve(x_start.double(), form.t_max, form.t_min).float()  # exact ODE endpoint
    one = dict(form=form, prediction=prediction, solver="ddim", steps=1)
    teacher_gap = rms(samplers.sample(teacher, eps, **one), target)
    with torch.no_grad():
        student_gap = rms(samplers.sample(model, eps, **one), target)
    # the teacher's single DDIM step misses the curved Gaussian flow by a wide margin; the
    # rectified student, first-order by training, lands within a fraction of it
    assert teacher_gap > 0.1
    assert student_gap < 0.35 * teacher_gap, (student_gap, teacher_gap)


def test_distillation_trains_only_at_t_max():
    form = forms.FlowMatching()
    sampler = AtTime(form)
    t = sampler.sample(5)
    assert torch.equal(t, torch.full((5,), form.t_max, dtype=torch.float64))
    with pytest.raises(ValueError, match="point mass"):
        sampler.density(0.5)


def test_rounds_keep_each_rounds_pairs_and_chain_models(tmp_path):
    torch.set_num_threads(1)
    form, prediction = forms.VP(), "eps"
    teacher = student(form, seed=1)
    config = RectifyConfig(
        rounds=2, num_pairs=256, solver="ddim", steps=4, shard_size=128, pair_batch_size=256,
        train=TrainConfig(steps=20, batch_size=64, seed=0, log_every=10),
    )  # fmt: skip
    results = rectify_rounds(teacher, form=form, prediction=prediction, config=config,
                             out=tmp_path, shape=(2,), progress=False)  # fmt: skip
    assert [r.round for r in results] == [1, 2]
    for r in results:
        assert (tmp_path / f"round_{r.round}" / "model.safetensors").is_file()
        info = json.loads((tmp_path / f"round_{r.round}" / "round.json").read_text())
        assert len(info["losses"]) == 20 and info["prediction"] == "eps"
    assert load_manifest(tmp_path / "round_2" / "pairs")["settings"]["seed"] == 1
    # round 2's pairs are exactly what the round-1 model makes from the stored noise
    eps, x0 = load_pairs(tmp_path / "round_2" / "pairs")
    with torch.no_grad():
        again = samplers.sample(results[0].model, eps, form=form, prediction=prediction,
                                solver="ddim", steps=4)  # fmt: skip
    torch.testing.assert_close(again, x0, rtol=1e-5, atol=1e-5)
    # and round 1's pairs come from the untouched teacher
    eps1, x01 = load_pairs(PairDataset(tmp_path / "round_1" / "pairs"))
    with torch.no_grad():
        first = samplers.sample(
            teacher, eps1, form=form, prediction=prediction, solver="ddim", steps=4
        )
    torch.testing.assert_close(first, x01, rtol=1e-5, atol=1e-5)


def test_reflow_pairs_are_the_teachers_solves_and_training_reduces_one_step_gap():
    torch.set_num_threads(1)
    form = forms.FlowMatching()
    teacher_net = student(form, seed=2)
    data = MEAN + STD * torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    diffusion = Diffusion(teacher_net, form=form, prediction="flow")
    opt = torch.optim.Adam(diffusion.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(data), (256,), generator=g)
        loss = diffusion(data[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    reflow = Reflow(diffusion, solver="heun", steps=16)
    eps, x0 = reflow.pairs(64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = samplers.sample(
            diffusion.net, eps, form=form, prediction="flow", solver="heun", steps=16
        )
    torch.testing.assert_close(x0, expected)

    probe = torch.randn(512, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        target = samplers.sample(
            diffusion.net, probe, form=form, prediction="flow", solver="heun", steps=16
        )

    def gap(model):
        with torch.no_grad():
            return rms(
                samplers.sample(model, probe, form=form, prediction="flow", solver="ddim", steps=1),
                target,
            )

    before = gap(reflow.student.net)
    opt = torch.optim.Adam(reflow.student.parameters(), lr=2e-3)
    for _ in range(300):
        loss = reflow(256, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = gap(reflow.student.net)
    assert after < 0.5 * before, (after, before)
    # the teacher stays frozen
    assert all(not p.requires_grad for p in reflow.teacher.parameters())


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="'round'.*allowed: rounds"):
        RectifyConfig.from_dict({"round": 2})
    with pytest.raises(ValueError, match="init = 'teachr'"):
        RectifyConfig(init="teachr")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        RectifyConfig(rounds=0)
