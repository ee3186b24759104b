"""The one-object API is a thin layer: its loss and samples equal the functional API's."""

import pytest
import torch

from rectdiff import Diffusion, forms, predictions, samplers
from rectdiff.oracles import GaussianOracle


class TimeLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x, time):
        return self.linear(torch.cat([x, time[:, None]], 1))


def test_loss_is_the_prediction_mse_by_hand():
    form = forms.SubVP()
    torch.manual_seed(0)
    net = TimeLinear()
    diffusion = Diffusion(net, form=form, prediction="v")
    x0, eps = torch.randn(8, 2), torch.randn(8, 2)
    t = torch.linspace(0.1, 0.9, 8)
    loss = diffusion(x0, eps=eps, t=t)
    x_t = form.add_noise(x0, eps, t)
    target = predictions.target(x0, eps, t, prediction="v", form=form)
    expected = ((net(x_t, form.model_time(t)) - target) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_sample_is_samplers_sample_and_shape_is_remembered():
    form = forms.VE()
    oracle = GaussianOracle(form, "eps", mean=0.2, std=0.7)
    oracle.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    diffusion = Diffusion(oracle, form=form, prediction="eps", sample_shape=(3,))
    out = diffusion.sample(16, steps=8, solver="heun", generator=torch.Generator().manual_seed(1))
    eps = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = samplers.sample(oracle, eps, form=form, prediction="eps", solver="heun", steps=8)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="sample_shape"):
        Diffusion(oracle, form=form, prediction="eps").sample(4)
