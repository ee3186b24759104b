"""The training step's fast path gives the numbers of the plain path, bit for bit: the loss's
stacked float64 kernels against the forms' public methods, the Trainer's multi-tensor AdamW
against torch's per-parameter loop, and its directly stepped learning-rate scheduler against
a scheduler stepped as diffusers documents it; and the step's dispatched tensor operations,
counted against a hand-written step."""

import pytest
import torch
from diffusers.optimization import get_scheduler
from shared import NAMED_FORMS, dispatched
from torch import nn

from rectdiff.data import load_data
from rectdiff.forms import FlowMatching
from rectdiff.models import MLP
from rectdiff.training import DiffusionLoss, TrainConfig, Trainer

PREDICTIONS = ("eps", "x0", "v", "flow")


@pytest.mark.parametrize("name", sorted(NAMED_FORMS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficients_equal_the_public_methods(name, prediction, dtype):
    form = NAMED_FORMS[name]
    t = form.t_min + torch.rand(257, dtype=torch.float64) * (form.t_max - form.t_min)
    like = torch.zeros(257, 3, 2, dtype=dtype)
    loss = DiffusionLoss(form, prediction)
    got = loss.coefficients(t, like)
    want = [form.model_time(t), form.alpha(t), form.sigma(t)]
    if prediction == "v":
        want += [form.alpha(t), form.sigma(t)]
    elif prediction == "flow" and not loss._unit_flow:  # the straight path's: next test
        want += [form.d_alpha(t), form.d_sigma(t)]
    assert len(got) == len(want)
    assert got[0].shape == (257,)
    for row, ref in zip(got, want, strict=True):
        assert row.dtype == dtype
        assert torch.equal(row.reshape(-1), ref.to(dtype))
    assert all(row.shape == (257, 1, 1) for row in got[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", [FlowMatching(), FlowMatching(time_scale=1000.0),
                                  FlowMatching(shift=3.0), FlowMatching(sigma_min=1e-4)],
                         ids=["straight", "time-scale", "shift", "sigma-min"])  # fmt: skip
def test_flow_loss_is_the_general_formula_bit_for_bit(form, dtype):
    """On flow matching's straight path the loss writes the flow target as eps - x0; it is
    alpha' x0 + sigma' eps with alpha' = -1, sigma' = 1 to the bit (and every other flow
    matching form takes the general formula)."""
    gen = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(300, 3, generator=gen, dtype=dtype) for _ in range(2))
    t = form.t_min + torch.rand(300, generator=gen, dtype=torch.float64) * (form.t_max - form.t_min)
    net = nn.Linear(3, 3).to(dtype)

    def model(x_t, model_time):
        return net(x_t) * model_time[:, None]

    loss, per_sample = DiffusionLoss(form, "flow")(model, x0, eps=eps, t=t)
    alpha, sigma, d_alpha, d_sigma = (c.to(dtype)[:, None] for c in form.coefficients(t))
    out = model(alpha * x0 + sigma * eps, form.model_time(t).to(dtype))
    want = (out - (d_alpha * x0 + d_sigma * eps)).square().mean(dim=1)
    assert torch.equal(per_sample, want) and torch.equal(loss, want.mean())
    assert DiffusionLoss(form, "flow")._unit_flow == (form.shift == 1 and form.sigma_min == 0)


def _gradients(objective, batch, dim, per_sample, **kwargs):
    gen = torch.Generator().manual_seed(5)
    x0, eps = (torch.randn(batch, dim, generator=gen) for _ in range(2))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, dim))
    gen.manual_seed(6)
    loss, rows = objective(lambda x, t: net(x) * (1 + t[:, None]), x0, eps=eps, generator=gen,
                           per_sample=per_sample, **kwargs)  # fmt: skip
    loss.backward()
    return loss, rows, [p.grad for p in net.parameters()]


@pytest.mark.parametrize("batch, dim", [(256, 2), (64, 3), (100, 2), (128, 3072)])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_mean_only_step_has_the_per_sample_gradients_bit_for_bit(batch, dim, prediction):
    """A training step asks for the mean alone (``per_sample=False``): an unweighted MSE is one
    global mean, as hand-written loops compute it. Its gradient (1 / (B D) per element
    against (1 / B) / D) is the per-sample path's to the bit when B or D is a power of two,
    and its value agrees to float32 rounding."""
    form = NAMED_FORMS["vp"] if prediction != "flow" else FlowMatching()
    objective = DiffusionLoss(form, prediction)
    loss, rows, fast = _gradients(objective, batch, dim, per_sample=False)
    want_loss, want_rows, slow = _gradients(objective, batch, dim, per_sample=True)
    assert rows is None and want_rows.shape == (batch,)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)


@pytest.mark.parametrize("seeded", [False, True])
def test_drawn_noise_and_times_are_torch_randn_and_the_samplers(seeded):
    """Without ``eps`` and ``t`` the loss draws ``torch.randn(x0.shape)`` and then the time
    sampler's draw, from ``generator`` or torch's global generator: the same numbers as
    passing those draws in."""
    objective = DiffusionLoss(NAMED_FORMS["vp"], "eps", time_sampler="logit_normal")
    x0 = torch.randn(64, 2, 3)

    def model(x_t, model_time):
        return x_t * model_time[:, None, None]

    gen = torch.Generator().manual_seed(7) if seeded else None
    torch.manual_seed(7)
    drawn, _ = objective(model, x0, generator=gen)
    gen = torch.Generator().manual_seed(7) if seeded else None
    torch.manual_seed(7)
    eps = torch.randn(x0.shape, generator=gen)
    t = objective.time_sampler.sample(len(x0), gen)
    given, _ = objective(model, x0, eps=eps, t=t)
    assert torch.equal(drawn, given)


def test_mean_only_step_keeps_weighted_and_huber_losses_per_sample():
    """A weighting or the pseudo-Huber distance needs the per-sample losses: asking for the
    mean alone changes nothing there, bit for bit."""
    form = NAMED_FORMS["vp"]
    for kwargs in ({"weighting": "min_snr"}, {"loss": "pseudo_huber"}):
        objective = DiffusionLoss(form, "eps", **kwargs)
        loss, _, fast = _gradients(objective, 100, 3, per_sample=False)
        want, _, slow = _gradients(objective, 100, 3, per_sample=True)
        assert torch.equal(loss, want)
        assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


KERNELS = ("model_time", "alpha", "sigma", "d_alpha", "d_sigma")


@pytest.mark.parametrize("time_scale", [1.0, 1000.0])
def test_affine_table_is_the_kernels_bit_for_bit(time_scale):
    """On flow matching's straight path the loss's coefficient table is one addcmul
    c + s t; each row equals the form's own kernel, bit for bit (for FM at 1000 t, as SD3's
    time input, too), with t at its extremes and in between."""
    form = FlowMatching(time_scale=time_scale)
    t = torch.cat([torch.tensor([form.t_min, form.t_max, 0.5], dtype=torch.float64),
                   form.t_min + torch.rand(5000, dtype=torch.float64) * (form.t_max - form.t_min)])  # fmt: skip
    c, s = form.affine_kernels(*KERNELS)
    assert c.shape == s.shape == (len(KERNELS), 1)
    table = torch.addcmul(c, s, t)
    for row, kernel in zip(table, form.kernels(*KERNELS), strict=True):
        assert torch.equal(row, kernel(t).expand_as(row))


@pytest.mark.parametrize("form", [FlowMatching(shift=3.0), FlowMatching(sigma_min=1e-4),
                                  *(NAMED_FORMS[n] for n in ("vp", "subvp", "ve", "sd15"))],
                         ids=["fm-shift3", "fm-sigma-min", "vp", "subvp", "ve", "sd15"])  # fmt: skip
def test_affine_table_only_where_it_is_exact(form):
    """sigma_min + (1 - sigma_min) t would round twice without a fused multiply-add and once
    with one; a shift or a VP/VE schedule is not affine: those keep the stacked kernels."""
    assert form.affine_kernels("model_time", "alpha", "sigma") is None
    assert FlowMatching().affine_kernels("alpha", "logsnr") is None  # logsnr is not affine


def test_uniform_sample_is_its_inverse_cdf_of_the_same_draws():
    """The training step's time draw is icdf(u) of float64 uniform draws from the generator."""
    from rectdiff.training import time_sampler

    for form in (FlowMatching(), NAMED_FORMS["vp"], NAMED_FORMS["ve"]):
        sampler = time_sampler("uniform", form)
        got = sampler.sample(4096, torch.Generator().manual_seed(5))
        u = torch.rand(4096, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        assert got.dtype == torch.float64 and torch.equal(got, sampler.icdf(u))


def test_kernels_refuse_an_unknown_name():
    with pytest.raises(ValueError, match="unknown kernel 'beta'; allowed: model_time, alpha"):
        FlowMatching().kernels("alpha", "beta")


def test_fast_paths_of_flow_matching_are_the_general_formulas():
    """shift = 1, sigma_min = 0 and time_scale = 1 skip a multiplication by 1 or a
    subtraction from 0; the general formulas, taken at nearby parameters' code path by
    hand, give the same numbers."""
    t = torch.rand(1000, dtype=torch.float64)
    form = FlowMatching()
    assert torch.equal(form.model_time(t), t * 1.0)
    assert torch.equal(form.d_alpha(t), -torch.ones_like(t))
    assert torch.equal(form.d_sigma(t), (1.0 - 0.0) * torch.ones_like(t))
    scaled = FlowMatching(time_scale=1000.0)
    assert torch.equal(scaled.model_time(t), t * 1000.0)


def _train(monkeypatch, foreach: bool, schedule: str = "cosine"):
    real = torch.optim.AdamW

    def adamw(params, **kwargs):
        kwargs["foreach"] = foreach
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    torch.manual_seed(0)
    model = MLP(2, hidden=32, depth=2)
    config = TrainConfig(
        steps=40, batch_size=64, lr=1e-2, weight_decay=0.05, grad_clip=0.5,
        lr_schedule=schedule, warmup_steps=7,
    )  # fmt: skip
    trainer = Trainer(model, load_data("moons", 512, seed=0), form=FlowMatching(),
                      prediction="flow", config=config)  # fmt: skip
    rates = []
    for _ in range(config.steps):
        trainer.step()
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    return [p.detach().clone() for p in model.parameters()], rates


def test_multi_tensor_adamw_gives_the_per_parameter_loops_weights(monkeypatch):
    fast, _ = _train(monkeypatch, foreach=True)
    loop, _ = _train(monkeypatch, foreach=False)
    assert all(torch.equal(a, b) for a, b in zip(fast, loop, strict=True))


@pytest.mark.parametrize("schedule", ["cosine", "constant_with_warmup", "linear"])
def test_learning_rates_follow_the_scheduler(monkeypatch, schedule):
    """The learning rate of each step is diffusers' schedule stepped once per optimizer step
    on one process, as accelerate's wrapper steps it."""
    _, rates = _train(monkeypatch, foreach=True, schedule=schedule)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=7, num_training_steps=40)
    want = []
    for _ in range(40):
        optimizer.step()
        reference.step()
        want.append(optimizer.param_groups[0]["lr"])
    assert rates == want
    assert rates[5] < rates[6] == pytest.approx(1e-2)  # warm-up to the peak at step 7


def _two_process_rates(out: str) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # a forked worker inherits the test process's one-process state singleton
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    config = TrainConfig(steps=12, batch_size=8, lr=1e-2, lr_schedule="cosine", warmup_steps=5)
    trainer = Trainer(MLP(2, hidden=8, depth=1), load_data("moons", 64, seed=0),
                      form=FlowMatching(), prediction="flow", config=config,
                      accelerator=accelerator)  # fmt: skip
    rates = []
    for _ in range(config.steps):
        trainer.step()
        rates.append(trainer.optimizer.param_groups[0]["lr"])
    torch.save({"rates": rates, "processes": accelerator.num_processes},
               f"{out}.{accelerator.process_index}")  # fmt: skip


def test_two_processes_follow_the_one_process_schedule(tmp_path):
    """accelerate steps the scheduler once per process (its lengths are scaled by the
    process count); the Trainer's direct stepping does the same, so two processes see the
    one-process learning rates."""
    from accelerate import debug_launcher

    out = str(tmp_path / "rates")
    debug_launcher(_two_process_rates, args=(out,), num_processes=2)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2)
    reference = get_scheduler("cosine", optimizer, num_warmup_steps=5, num_training_steps=12)
    want = []
    for _ in range(12):
        optimizer.step()
        reference.step()
        want.append(optimizer.param_groups[0]["lr"])
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        assert got["processes"] == 2
        assert got["rates"] == pytest.approx(want, rel=1e-12)


def test_direct_gradient_clipping_is_accelerates():
    """Without a grad scaler or a sharded model the Trainer clips with torch's
    ``clip_grad_norm_`` itself; through accelerate's ``clip_grad_norm_`` the weights and the
    logged gradient norms are the same, bit for bit."""

    def run(through_accelerate: bool):
        torch.manual_seed(0)
        config = TrainConfig(steps=30, batch_size=64, lr=1e-2, grad_clip=0.05, log_every=3)
        trainer = Trainer(MLP(2, hidden=32, depth=2), load_data("moons", 512, seed=0),
                          form=FlowMatching(), prediction="flow", config=config)  # fmt: skip
        if through_accelerate:
            trainer._clip_grad_norm = trainer.accelerator.clip_grad_norm_
        trainer._logging = True
        norms = []
        for _ in range(config.steps):
            trainer.step()
            norms.append(trainer._grad_norm)
        return [p.detach().clone() for p in trainer.model.parameters()], norms

    (direct, direct_norms), (wrapped, wrapped_norms) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(direct, wrapped, strict=True))
    assert direct_norms == wrapped_norms and direct_norms[2] > 0.05  # clipped


def test_a_training_step_dispatches_what_a_hand_written_one_does():
    """The step path's tensor operations, counted (not timed): flow matching's loss forward and
    backward dispatches the hand-written loop's aten operations plus 4 (the float64 draw's
    coefficient table, cast and split: addcmul, one cast, unbind, and 2 views, less the
    hand-written ``1 - t`` and 2 of its ``t[:, None]``; and the draw itself, ``empty``,
    ``uniform_`` and an in-place add against one ``rand``: its affine map onto
    [t_min, t_max]), and a ``Trainer`` step one more than
    that loss and the same optimizer step by hand: the detached loss it returns."""
    torch.manual_seed(0)
    net, x0 = MLP(dim=2, hidden=16, depth=2), torch.randn(256, 2)

    def hand_written():
        noise, t = torch.randn_like(x0), torch.rand(len(x0))
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        (net(x_t, t) - (noise - x0)).square().mean().backward()

    loss = DiffusionLoss(FlowMatching(), "flow")
    plain, ours = (
        dispatched(hand_written),
        dispatched(lambda: loss(net, x0, per_sample=False)[0].backward()),
    )
    assert sum(ours.values()) - sum(plain.values()) == 4, (plain, ours)
    assert ours["aten._to_copy.default"] == 1  # one cast: of the whole table

    data = torch.randn(4096, 2)  # the counted step takes a slice of the current permutation
    trainer = Trainer(MLP(dim=2, hidden=16, depth=2), data, form=FlowMatching(), prediction="flow",
                      config=TrainConfig(steps=100, batch_size=256, grad_clip=0.0))  # fmt: skip
    optimizer = torch.optim.AdamW(net.parameters(), weight_decay=0.0, foreach=True)

    def loss_and_adamw():
        batch = data[torch.randint(len(data), (256,))]
        loss(net, batch, per_sample=False)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = dispatched(trainer.step)
    by_hand = dispatched(loss_and_adamw)
    extra = step - by_hand
    # the batch: a slice of the permutation instead of randint; the noise: seeded randn
    # instead of randn_like; and the detached loss the step returns
    assert extra == {"aten.slice.Tensor": 1, "aten.randn.generator": 1, "aten.detach.default": 1}
    assert by_hand - step == {"aten.randint.default": 1, "aten.randn_like.default": 1}
