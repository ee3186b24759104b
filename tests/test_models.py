"""Networks: EDM's input scaling in every form (exact and on samples), the output scaling,
the time embedding, and the UNet wrapper against diffusers' UNet2DModel called directly."""

import math

import pytest
import torch
from shared import F64, pick
from torch import nn

from rectdiff import forms, predictions
from rectdiff.models import MLP, Preconditioned, UNet, embedding_frequencies, sinusoidal_embedding

FORMS = pick("vp", "subvp", "ve", "fm", "sd15")


class Recorder(nn.Module):
    """Returns its input and remembers the time it was given."""

    def forward(self, x, model_time, **cond):
        self.model_time, self.cond = model_time, cond
        return x


def formula_alpha_sigma(name, t):
    """alpha, sigma from the papers' formulas (score-SDE eqs. 31, 33, 34; rectified flow)."""
    if name in ("vp", "subvp"):
        log_a = -0.25 * t**2 * 19.9 - 0.05 * t
        alpha = math.exp(log_a)
        sigma = math.sqrt(1 - alpha**2) if name == "vp" else 1 - alpha**2
        return alpha, sigma
    if name == "ve":
        return 1.0, 0.01 * 5000.0**t
    return 1 - t, t


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "fm"])
def test_c_in_formula(name):
    form, sigma_data = FORMS[name], 0.5
    wrapper = Preconditioned(Recorder(), form, sigma_data=sigma_data)
    for t in (0.01, 0.3, 0.8):
        alpha, sigma = formula_alpha_sigma(name, t)
        expected = 1 / math.sqrt(alpha**2 * sigma_data**2 + sigma**2)
        assert float(wrapper.c_in(t)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", FORMS)
def test_c_in_gives_unit_variance_input(name):
    form, sigma_data = FORMS[name], 2.5
    recorder = Recorder()
    wrapper = Preconditioned(recorder, form, sigma_data=sigma_data)
    gen = torch.Generator().manual_seed(0)
    n = 50_000
    for t in (form.t_min, 0.1, 0.5, form.t_max):
        x0 = sigma_data * torch.randn(n, 1, generator=gen, dtype=F64)
        eps = torch.randn(n, 1, generator=gen, dtype=F64)
        tt = torch.full((n,), t, dtype=F64)
        model_time = form.model_time(tt)
        seen = wrapper(form.add_noise(x0, eps, tt), model_time)
        assert float(seen.std()) == pytest.approx(1.0, abs=4 / math.sqrt(n))
        assert recorder.model_time is model_time  # the time input passes through unchanged


@pytest.mark.parametrize("name", ["vp", "ve", "fm", "sd15"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_c_out_is_the_target_std(name, prediction):
    form, sigma_data = FORMS[name], 0.7
    wrapper = Preconditioned(Recorder(), form, sigma_data=sigma_data, output_prediction=prediction)
    gen = torch.Generator().manual_seed(1)
    n = 50_000
    for t in (0.05, 0.5, 0.95):
        x0 = sigma_data * torch.randn(n, 1, generator=gen, dtype=F64)
        eps = torch.randn(n, 1, generator=gen, dtype=F64)
        target = predictions.target(x0, eps, t, prediction=prediction, form=form)
        assert float(target.std() / wrapper.c_out(t)) == pytest.approx(1.0, abs=5 / math.sqrt(n))


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_fm_time_input_makes_every_form_the_same_problem_for_the_net(name):
    """``time_input="fm"``: at one logsnr, a form's network sees exactly what flow matching's
    sees (time sigma / (alpha + sigma), the FM t with that logsnr, and c_in x_t for the same
    x0 and eps), and its v target divided by c_out is FM's v / c_out, to float64 rounding."""
    form, fm, sigma_data = FORMS[name], FORMS["fm"], 0.8
    seen = {}
    for key, f in (("form", form), ("fm", fm)):
        recorder = Recorder()
        seen[key] = (recorder, Preconditioned(recorder, f, sigma_data=sigma_data,
                                              output_prediction="v", time_input="fm"))  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    x0 = sigma_data * torch.randn(64, 2, generator=gen, dtype=F64)
    eps = torch.randn(64, 2, generator=gen, dtype=F64)
    t = torch.linspace(form.t_min, form.t_max, 64, dtype=F64)
    s = 1 / (1 + torch.exp(form.logsnr(t) / 2))  # FM: logsnr = 2 log((1 - s) / s)
    assert torch.allclose(fm.logsnr(s), form.logsnr(t), rtol=0, atol=1e-9)
    for (recorder, wrapper), f, time in ((seen["form"], form, t), (seen["fm"], fm, s)):
        out = wrapper(f.add_noise(x0, eps, time), f.model_time(time))
        recorder.x = out / wrapper.c_out(time)[:, None]  # c_in x_t (the recorder returns x)
        recorder.target = predictions.target(x0, eps, time, prediction="v", form=f)
        recorder.target = recorder.target / wrapper.c_out(time)[:, None]
    a, b = seen["form"][0], seen["fm"][0]
    torch.testing.assert_close(a.model_time, s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.model_time, s, rtol=0, atol=0)
    torch.testing.assert_close(a.x, b.x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.target, b.target, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "fm"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_fm_scaling_shows_the_net_flow_matchings_raw_problem(name, prediction):
    """``scaling="fm"``, ``time_input="fm"``: at one logsnr a form's network sees flow
    matching's own x_t (r_t = alpha_t + sigma_t times smaller) and FM's t, and regresses FM's
    unscaled target (v: r_t times smaller), to float64 rounding; in flow matching itself the
    wrapper changes nothing."""
    form, fm = FORMS[name], FORMS["fm"]
    recorder = Recorder()
    wrapper = Preconditioned(recorder, form, output_prediction=prediction, time_input="fm",
                             scaling="fm")  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(64, 2, generator=gen, dtype=F64) for _ in range(2))
    t = torch.linspace(form.t_min, form.t_max, 64, dtype=F64)
    s = 1 / (1 + torch.exp(form.logsnr(t) / 2))  # FM's t at the same logsnr
    out = wrapper(form.add_noise(x0, eps, t), form.model_time(t))
    c_out = wrapper.c_out(t)[:, None]
    torch.testing.assert_close(recorder.model_time, s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out / c_out, fm.add_noise(x0, eps, s), rtol=1e-9, atol=1e-9)
    target = predictions.target(x0, eps, t, prediction=prediction, form=form) / c_out
    fm_target = predictions.target(x0, eps, s, prediction=prediction, form=fm)
    torch.testing.assert_close(target, fm_target, rtol=1e-9, atol=1e-9)
    if name == "fm":
        assert torch.equal(wrapper.c_in(t), torch.ones_like(t)) and torch.equal(
            c_out[:, 0], torch.ones_like(t)
        )


class FlowVelocity(nn.Module):
    """Returns flow matching's velocity eps - x0 of a fixed batch, checking that it was
    given flow matching's x_t (x_t / r_t) and time at the same logsnr."""

    def __init__(self, x0, eps, fm_time):
        super().__init__()
        self.x0, self.eps, self.fm_time = x0, eps, fm_time

    def forward(self, x, model_time, **cond):
        fm = forms.FlowMatching()
        torch.testing.assert_close(model_time, self.fm_time, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x, fm.add_noise(self.x0, self.eps, self.fm_time), rtol=1e-9,
                                   atol=1e-9)  # fmt: skip
        return self.eps - self.x0


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "fm", "sd15"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_velocity_scaling_turns_the_flow_matching_velocity_into_any_prediction(name, prediction):
    """``scaling="velocity"``: a network that outputs flow matching's exact velocity
    ``eps - x0`` at FM's x_t and t of the same logsnr gives, through ``c_skip x_t + c_out
    net``, the exact target of every prediction in every form (float64 rounding)."""
    form = FORMS[name]
    gen = torch.Generator().manual_seed(5)
    x0, eps = (torch.randn(64, 2, generator=gen, dtype=F64) for _ in range(2))
    t = torch.linspace(form.t_min, form.t_max, 64, dtype=F64)
    fm_time = form.sigma(t) / (form.alpha(t) + form.sigma(t))
    wrapper = Preconditioned(FlowVelocity(x0, eps, fm_time), form, output_prediction=prediction,
                             time_input="fm", scaling="velocity")  # fmt: skip
    out = wrapper(form.add_noise(x0, eps, t), form.model_time(t))
    target = predictions.target(x0, eps, t, prediction=prediction, form=form)
    torch.testing.assert_close(out, target, rtol=1e-9, atol=1e-9)
    if name == "fm" and prediction == "flow":  # flow matching's own velocity: no wrapper
        assert torch.equal(wrapper.c_skip(t), torch.zeros_like(t))
        assert torch.equal(wrapper.c_out(t), torch.ones_like(t))


def test_velocity_scaling_needs_an_output_prediction():
    with pytest.raises(ValueError, match="scaling='velocity' needs output_prediction"):
        Preconditioned(Recorder(), FORMS["vp"], scaling="velocity")


def test_fm_scaling_refuses_a_flow_output_outside_flow_matching():
    Preconditioned(Recorder(), FORMS["fm"], output_prediction="flow", scaling="fm")
    with pytest.raises(
        ValueError, match="scaling='fm' with output_prediction='flow' needs a flow-matching form"
    ):
        Preconditioned(Recorder(), FORMS["vp"], output_prediction="flow", scaling="fm")
    with pytest.raises(ValueError, match="unknown scaling 'karras'; allowed: edm, fm, velocity"):
        Preconditioned(Recorder(), FORMS["vp"], scaling="karras")


def test_wrapper_off_is_identity_and_scaling_reaches_the_net():
    form = forms.VE()
    net = MLP(dim=2, hidden=16, depth=2)
    x = torch.randn(5, 2)
    time = torch.rand(5)
    off = Preconditioned(net, form, scale_input=False)
    torch.testing.assert_close(off(x, time), net(x, time), rtol=0, atol=0)
    on = Preconditioned(net, form, sigma_data=1.3, output_prediction="x0")
    t = form.t_from_model_time(time.double())
    c_in = on.c_in(t).float()[:, None]
    c_out = on.c_out(t).float()[:, None]
    torch.testing.assert_close(on(x, time), c_out * net(c_in * x, time), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(on.c_out(t), torch.full_like(t, 1.3))  # x0 target std = sigma_data


def test_sinusoidal_embedding_formula():
    time = torch.tensor([0.0, 3.0, 250.0])
    emb = sinusoidal_embedding(time, embedding_frequencies(8))
    freqs = [10000 ** (-k / 4) for k in range(4)]  # Vaswani et al. 2017, sec. 3.5
    expected = [
        [math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0, 3, 250)
    ]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_mlp_time_scale_and_classes():
    torch.manual_seed(0)
    net = MLP(dim=3, hidden=8, depth=2, time_embed_dim=6, time_scale=1000.0, num_classes=4)
    x = torch.randn(2, 3)
    same_as_discrete = MLP(
        dim=3, hidden=8, depth=2, time_embed_dim=6, time_scale=1.0, num_classes=4
    )
    same_as_discrete.load_state_dict(net.state_dict())
    # t = 0.25 with scale 1000 embeds like timestep 250 with scale 1
    torch.testing.assert_close(
        net(x, torch.tensor([0.25, 0.5])), same_as_discrete(x, torch.tensor([250.0, 500.0]))
    )
    null = net(x, torch.tensor([0.2, 0.2]))
    torch.testing.assert_close(
        null, net(x, torch.tensor([0.2, 0.2]), class_labels=torch.tensor([4, 4]))
    )
    assert not torch.allclose(
        null, net(x, torch.tensor([0.2, 0.2]), class_labels=torch.tensor([1, 1]))
    )
    with pytest.raises(ValueError, match="dim=2"):
        net(torch.randn(2, 2), torch.tensor([0.1, 0.1]))


def test_unet_wrapper_matches_diffusers():
    torch.manual_seed(0)
    unet = UNet(
        sample_size=8, in_channels=1, block_out_channels=(16, 32), norm_num_groups=8, num_classes=10
    )
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    labels = torch.tensor([1, 2, 3])
    out = unet(x, t, class_labels=labels)
    direct = unet.unet(x, t * 1000, class_labels=labels).sample
    assert out.shape == (3, 1, 8, 8)
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    null = unet.unet(x, t * 1000, class_labels=torch.full((3,), 10)).sample
    torch.testing.assert_close(unet(x, t), null, rtol=0, atol=0)  # no labels = the null class
    wrapped = UNet(unet=unet.unet, time_scale=1.0, num_classes=10)
    torch.testing.assert_close(wrapped(x, t * 1000, class_labels=labels), direct, rtol=0, atol=0)


def test_sample_shape_is_what_pair_generation_infers():
    from rectdiff.rectify.pairs import infer_shape

    form = forms.VP()
    assert infer_shape(Preconditioned(MLP(dim=3, hidden=8), form), None) == [3]
    unet = UNet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    assert infer_shape(Preconditioned(unet, form), None) == [1, 8, 8]


@pytest.mark.parametrize("scaling", ["edm", "fm", "velocity"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("time_input", ["model", "t", "fm"])
def test_forward_is_the_public_scales_composed_bit_for_bit(scaling, prediction, time_input):
    """The forward pass computes alpha_t and sigma_t once for all its scales; it gives exactly
    ``c_skip x + c_out net(c_in x, time)`` of the public ``c_skip``, ``c_in``, ``c_out`` and
    ``fm_time`` (float64, every form where the scaling is defined)."""
    for name, form in FORMS.items():
        if scaling == "fm" and prediction == "flow" and name != "fm":
            continue
        recorder = Recorder()
        wrapper = Preconditioned(recorder, form, sigma_data=0.7, output_prediction=prediction,
                                 time_input=time_input, scaling=scaling)  # fmt: skip
        t = torch.linspace(form.t_min, form.t_max, 17, dtype=F64)
        x = torch.randn(17, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
        model_time = form.model_time(t)
        out = wrapper(x, model_time)
        t_back = form.t_from_model_time(model_time)
        time = {"model": model_time, "t": t_back, "fm": wrapper.fm_time(t_back)}[time_input]
        want = wrapper.c_out(t_back)[:, None] * (wrapper.c_in(t_back)[:, None] * x)
        if scaling == "velocity":
            want = wrapper.c_skip(t_back)[:, None] * x + want
        assert torch.equal(out, want), name
        assert torch.equal(recorder.model_time, time), name


@pytest.mark.parametrize("scaling", ["edm", "fm", "velocity"])
@pytest.mark.parametrize("time_input", ["model", "t", "fm"])
def test_one_time_for_the_batch_gives_the_per_sample_result_bit_for_bit(scaling, time_input):
    """A sampler passes one time expanded over the batch (stride 0): the wrapper's scales and
    the MLP's embedding are then computed once and expanded, which must equal computing them
    for every sample (the same time given as a contiguous copy) to the bit, in float32."""
    for name, form in FORMS.items():
        prediction = "v"
        torch.manual_seed(0)
        net = MLP(dim=2, hidden=16, depth=2, time_scale=1.0 if name == "sd15" else 1000.0)
        wrapper = Preconditioned(net, form, sigma_data=0.7, output_prediction=prediction,
                                 time_input=time_input, scaling=scaling)  # fmt: skip
        x = torch.randn(33, 2, generator=torch.Generator().manual_seed(3))
        for t in (form.t_min, 0.37 * form.t_max, form.t_max):
            shared = form.model_time(torch.tensor(t, dtype=F64)).float().expand(33)
            assert shared.stride(0) == 0
            with torch.no_grad():
                out = wrapper(x, shared)
                per_sample = wrapper(x, shared.clone())
                plain = net(x, shared)
                plain_per_sample = net(x, shared.clone())
            assert torch.equal(out, per_sample), (name, t)
            assert torch.equal(plain, plain_per_sample), (name, t)
