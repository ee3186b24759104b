"""Rectification: retraining on a teacher's couplings makes one DDIM step land on the pairs."""

import json

import pytest
import torch

from rectdiff import forms, samplers
from rectdiff.models import MLP, Preconditioned
from rectdiff.oracles import CouplingOracle, GaussianOracle
from rectdiff.rectify import (
    AtTime,
    RectifyConfig,
    Reflow,
    load_pairs,
    rectify,
    rectify_rounds,
    start_noise,
)
from rectdiff.rectify.online import Diffusion
from rectdiff.rectify.pairs import PairDataset, generate_pairs, load_manifest
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
    assert student_gap < 0.12 * teacher_gap, (student_gap, teacher_gap)  # measured 0.034-0.048


def test_distillation_trains_only_at_t_max():
    form = forms.FlowMatching()
    sampler = AtTime(form)
    t = sampler.sample(5)
    assert torch.equal(t, torch.full((5,), form.t_max, dtype=torch.float64))
    with pytest.raises(ValueError, match="point mass"):
        sampler.density(0.5)


def test_rounds_keep_each_rounds_pairs_and_chain_models(tmp_path):
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


# --- the coupling starts where sampling starts ------------------------------------------------


def _affine_fit(eps, x0):
    """Per-dimension least squares x0 = shift + scale * eps (exact for an affine coupling)."""
    e, y = eps.double(), x0.double()
    e_mean, y_mean = e.mean(0), y.mean(0)
    scale = ((e - e_mean) * (y - y_mean)).mean(0) / (e - e_mean).square().mean(0)
    return scale, y_mean - scale * e_mean


@pytest.mark.parametrize("name", ["vp", "ve", "sd15"])
def test_first_order_student_of_the_training_coupling_reproduces_its_pairs(name):
    # The teacher: Gaussian data, exact ODE endpoints, so x0_hat is affine in eps and the ideal
    # (perfectly first-order) student of any coupling (noise, x0_hat) is a CouplingOracle.
    form = forms.VE(sigma_max=20.0) if name == "ve" else forms.load(name)
    teacher = GaussianOracle(form, "eps", mean=MEAN, std=STD)
    eps = torch.randn(512, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x0_hat = teacher.solve(form.sigma(form.t_max) * eps, form.t_max, 0.0)
    assert float(form.alpha(form.t_max)) > 1e-3  # the case this test is about

    def one_ddim_step(noise):
        scale, shift = _affine_fit(noise, x0_hat)
        ideal = CouplingOracle(form, "eps", scale=scale, shift=shift)
        return samplers.sample(ideal, eps, form=form, prediction="eps", solver="ddim", steps=1)

    trained_on = start_noise(eps, x0_hat, form)  # what rectify() trains the student on
    # one step lands on the pair's line at t = 0: x0_hat itself where sigma(0) = 0 (VP, sd15),
    # x0_hat + sigma_min eps~ in VE (whose sampler never reaches sigma = 0)
    end = form.add_noise(x0_hat, trained_on, 0.0)
    if name != "ve":
        assert torch.equal(end, x0_hat)
    size = rms(x0_hat, 0 * x0_hat)
    assert rms(one_ddim_step(trained_on), end) < 1e-6 * size
    # training on the raw stored eps, the line misses the sampler's start by alpha(t_max) x0_hat
    assert rms(one_ddim_step(eps), form.add_noise(x0_hat, eps, 0.0)) > 1e-3 * size


def test_rectify_trains_on_the_line_through_the_students_start(tmp_path):
    # VE has alpha = 1 at t_max: a student trained on the raw eps cannot hit its own pairs
    form, prediction = forms.VE(sigma_max=20.0), "x0"
    teacher = GaussianOracle(form, prediction, mean=MEAN, std=STD)
    eps = torch.randn(2048, 2, generator=torch.Generator().manual_seed(0))
    x0_hat = teacher.solve(form.sigma(form.t_max) * eps.double(), form.t_max, 0.0).float()
    config = TrainConfig(steps=600, batch_size=256, lr=3e-3, seed=0, log_every=100)
    model = rectify(student(form), (eps, x0_hat), form=form, prediction=prediction,
                    config=config, progress=False).model  # fmt: skip
    with torch.no_grad():
        one = samplers.sample(model, eps, form=form, prediction=prediction, solver="ddim", steps=1)
    assert rms(one, x0_hat) < 0.05 * rms(x0_hat, 0 * x0_hat), rms(one, x0_hat)


@pytest.mark.parametrize(
    "form, prediction",
    [(forms.FlowMatching(), "v"), (forms.VE(sigma_max=20.0), "x0")],
    ids=["fm-v", "ve-x0"],
)
def test_distilled_one_step_beats_the_undistilled_student(form, prediction):
    # distill=True spends the whole budget on the one step from t_max, on the x0-MSE
    teacher = GaussianOracle(form, prediction, mean=MEAN, std=STD)
    eps = torch.randn(2048, 2, generator=torch.Generator().manual_seed(1))
    x0_hat = teacher.solve(form.sigma(form.t_max) * eps.double(), form.t_max, 0.0).float()
    probe = torch.randn(1024, 2, generator=torch.Generator().manual_seed(2))
    target = teacher.solve(form.sigma(form.t_max) * probe.double(), form.t_max, 0.0).float()
    config = TrainConfig(steps=400, batch_size=256, lr=3e-3, seed=0, log_every=100)
    gaps = {}
    for distill in (False, True):
        model = rectify(student(form), (eps, x0_hat), form=form, prediction=prediction,
                        config=config, distill=distill, progress=False).model  # fmt: skip
        with torch.no_grad():
            one = samplers.sample(model, probe, form=form, prediction=prediction, solver="ddim",
                                  steps=1)  # fmt: skip
        gaps[distill] = rms(one, target)
    assert gaps[True] < 0.5 * gaps[False], gaps


@pytest.mark.parametrize("init", ["previous", "teacher"])
def test_round_k_starts_from_the_model_the_config_names(tmp_path, init):
    form, prediction = forms.FlowMatching(), "flow"
    teacher = student(form, seed=1)
    config = RectifyConfig(
        rounds=2, num_pairs=256, solver="ddim", steps=4, shard_size=256, pair_batch_size=256,
        init=init, train=TrainConfig(steps=10, batch_size=64, lr=1e-4, seed=0, log_every=10),
    )  # fmt: skip
    results = rectify_rounds(teacher, form=form, prediction=prediction, config=config,
                             out=tmp_path, shape=(2,), progress=False)  # fmt: skip

    def distance(a, b):
        pairs = zip(a.parameters(), b.parameters(), strict=True)
        return sum(float((p - q).detach().abs().sum()) for p, q in pairs)

    one_round = distance(results[0].model, teacher)  # how far one round of training moves
    to_teacher = distance(results[1].model, teacher)
    if init == "previous":  # Liu et al. 2023's k-rectified flow: two rounds of movement
        assert to_teacher > 1.5 * one_round, (to_teacher, one_round)
    else:  # every round restarts from the teacher: one round of movement
        assert to_teacher < 1.5 * one_round, (to_teacher, one_round)


class TwoClassTeacher(torch.nn.Module):
    """Exact denoiser of class-conditional Gaussians: class c has mean (-1)^c MEAN."""

    def __init__(self, form):
        super().__init__()
        self.classes = torch.nn.ModuleList(
            [GaussianOracle(form, "eps", mean=MEAN, std=STD),
             GaussianOracle(form, "eps", mean=-MEAN, std=STD)]
        )  # fmt: skip

    def forward(self, x, model_time, class_labels):
        outs = torch.stack([oracle(x, model_time) for oracle in self.classes])
        return outs[class_labels.long(), torch.arange(len(x))]


def test_conditional_pair_store_trains_a_conditional_student(tmp_path):
    form = forms.FlowMatching()
    teacher = TwoClassTeacher(form)
    labels = torch.arange(2048) % 2
    pairs = generate_pairs(
        teacher, form=form, prediction="eps", num_pairs=2048, out=tmp_path / "pairs",
        solver="dpmpp_2m", steps=16, shard_size=1024, seed=0, shape=(2,), progress=False,
        cond_fn=lambda k, idx: {"class_labels": labels[idx]},
    )  # fmt: skip
    couplings = load_pairs(pairs)
    assert torch.equal(couplings.cond["class_labels"], labels)
    with pytest.raises(ValueError, match="class_labels"):
        eps, x0 = couplings  # conditional pairs refuse to drop their labels
    torch.manual_seed(0)
    net = Preconditioned(MLP(dim=2, hidden=64, depth=3, num_classes=2), form, sigma_data=1.0)
    config = TrainConfig(steps=500, batch_size=256, lr=3e-3, seed=0, log_every=100)
    model = rectify(net, pairs, form=form, prediction="flow", config=config, progress=False).model
    probe = torch.randn(512, 2, generator=torch.Generator().manual_seed(7))
    for c, sign in ((0, 1.0), (1, -1.0)):
        cond = {"class_labels": torch.full((512,), c)}
        with torch.no_grad():
            one = samplers.sample(model, probe, form=form, prediction="flow", solver="ddim",
                                  steps=1, cond=cond)  # fmt: skip
            ref = samplers.sample(teacher, probe, form=form, prediction="eps", solver="dopri5",
                                  cond=cond)  # fmt: skip
        # each class lands at its own mean (the null class would sit between the two)
        torch.testing.assert_close(one.mean(0), sign * MEAN, atol=0.1, rtol=0)
        assert rms(one, ref) < 0.25 * rms(ref, sign * MEAN.expand_as(ref)), c


def test_rounds_rerun_with_another_teacher_refuse_the_stale_pairs(tmp_path):
    form, prediction = forms.VP(), "eps"
    config = RectifyConfig(
        rounds=1, num_pairs=64, solver="ddim", steps=2, shard_size=64, pair_batch_size=64,
        train=TrainConfig(steps=2, batch_size=32, seed=0, log_every=1),
    )  # fmt: skip
    run = dict(form=form, prediction=prediction, config=config, out=tmp_path, shape=(2,),
               progress=False)  # fmt: skip
    rectify_rounds(student(form, seed=1), **run)
    pairs = tmp_path / "round_1" / "pairs"
    before = {p.name: p.read_bytes() for p in pairs.iterdir()}
    with pytest.raises(ValueError, match=r"round_1/pairs/manifest.json was made by another model"):
        rectify_rounds(student(form, seed=2), **run)
    assert {p.name: p.read_bytes() for p in pairs.iterdir()} == before
    rectify_rounds(student(form, seed=1), **run)  # the same teacher resumes
