"""Conditioning dropout (classifier-free guidance training): exact replacement of the dropped
rows, the dropped fraction, and reproducibility from the loss's generator."""

import math

import pytest
import torch

from rectdiff import forms
from rectdiff.training.losses import diffusion_loss, drop_conditioning, with_cond_dropout


def test_dropped_rows_are_exactly_the_unconditional_ones():
    cond = {"ids": torch.arange(12).reshape(4, 3), "emb": torch.randn(4, 2, 5)}
    uncond = {"ids": torch.full((1, 3), -1), "emb": torch.zeros(1, 2, 5)}
    drop = torch.tensor([True, False, False, True])
    out = drop_conditioning(cond, uncond, drop)
    for key in cond:
        assert torch.equal(out[key][drop], uncond[key].expand_as(cond[key])[drop])
        assert torch.equal(out[key][~drop], cond[key][~drop])
    with pytest.raises(ValueError, match="keys in only one of them: emb"):
        drop_conditioning(cond, {"ids": uncond["ids"]}, drop)


class Recorder(torch.nn.Module):
    """Records the labels it is called with; outputs zeros."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, model_time, labels):
        self.seen.append(labels.clone())
        return torch.zeros_like(x)


def dropped_fraction(p, n=4000, seed=0):
    model = Recorder()
    loss = with_cond_dropout(diffusion_loss, p, {"labels": torch.tensor([-1])})
    gen = torch.Generator().manual_seed(seed)
    loss(model, torch.randn(n, 2), form=forms.FlowMatching(), prediction="flow",
         cond={"labels": torch.arange(n) % 7}, generator=gen)  # fmt: skip
    return model.seen[0]


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_the_dropped_fraction_is_p_within_binomial_noise(p):
    labels = dropped_fraction(p)
    frac = float((labels == -1).float().mean())
    assert abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / len(labels)) + 1e-12


def test_the_mask_follows_the_generator():
    assert torch.equal(dropped_fraction(0.3, seed=5), dropped_fraction(0.3, seed=5))
    assert not torch.equal(dropped_fraction(0.3, seed=5), dropped_fraction(0.3, seed=6))
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1.0"):
        with_cond_dropout(diffusion_loss, 1.0, {})
