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
