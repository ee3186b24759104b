"""Render the diagnostics demo figures (docs/figures/) from closed-form teachers.

Teacher: the exact denoiser of a 2-D Gaussian mixture (6 modes on a ring), sampled with dopri5.
Rectified: the ideal first-order model on the teacher's own (noise, sample) pairs, whose
trajectories are x_t = alpha_t x0_hat + sigma_t eps (Rectified Diffusion, Theorem 1).
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from rectdiff import diagnostics, forms, plots, samplers
from rectdiff import training as timesteps
from rectdiff.forms import broadcast
from rectdiff.oracles import CouplingOracle, GaussianOracle
from rectdiff.samplers import Trajectory

F64 = torch.float64
OUT = Path(sys.argv[1])
DOCS = Path(sys.argv[2]) if len(sys.argv) > 2 else None


class MixtureOracle(nn.Module):
    """Exact x0-prediction of an equal-weight mixture of N(mu_k, std^2 I)."""

    def __init__(self, form, means, std):
        super().__init__()
        self.form, self.means, self.std = form, means, std

    def forward(self, x_t, model_time, **cond):
        t = self.form.t_from_model_time(model_time)
        alpha = broadcast(self.form._alpha(t), x_t)
        sigma = broadcast(self.form._sigma(t), x_t)
        var = alpha**2 * self.std**2 + sigma**2
        diff = x_t[:, None, :] - alpha[:, None, :] * self.means[None]
        weights = torch.softmax(-diff.square().sum(-1) / (2 * var[:, :1]), dim=1)
        posterior = self.means[None] + (alpha * self.std**2 / var)[:, None, :] * diff
        return (weights[..., None] * posterior).sum(1)


def rectified_trajectory(teacher: Trajectory, eps: torch.Tensor) -> Trajectory:
    form, t = teacher.form, teacher.t
    x0_hat = teacher.sample
    alpha, sigma = form.alpha(t)[:, None, None], form.sigma(t)[:, None, None]
    x = alpha * x0_hat + sigma * eps
    x0_pred = x0_hat.expand(len(t) - 1, *x0_hat.shape)
    eps_pred = eps.expand(len(t) - 1, *eps.shape)
    return Trajectory(t, x, x0_pred, eps_pred, 1, form, "x0", "ideal-rectified")


angles = torch.arange(6, dtype=F64) * (2 * math.pi / 6)
means = 2.5 * torch.stack([torch.cos(angles), torch.sin(angles)], -1)
eps = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
FORMS = {"VP": forms.VP(), "sub-VP": forms.SubVP(), "VE": forms.VE(), "FM": forms.FlowMatching()}

teachers, students = {}, {}
for name, form in FORMS.items():
    oracle = MixtureOracle(form, means, 0.2)
    traj = samplers.sample(
        oracle,
        eps,
        form=form,
        prediction="x0",
        solver="dopri5",
        steps=200,
        t_grid="logsnr",
        rtol=1e-7,
        atol=1e-7,
        return_trajectory=True,
    )
    teachers[name] = traj
    students[name] = rectified_trajectory(traj, eps)
    s_t = diagnostics.straightness(traj, relative=True)
    s_y = diagnostics.straightness(traj, coords="y", relative=True)
    dev = diagnostics.first_order_deviation(traj)
    r_t = diagnostics.straightness(students[name], relative=True)
    r_y = diagnostics.straightness(students[name], coords="y", relative=True)
    r_dev = diagnostics.first_order_deviation(students[name])
    print(
        f"{name} teacher S_t {s_t:.4f} S_y {s_y:.4f} dev {dev:.4f} | "
        f"rectified S_t {r_t:.4f} S_y {r_y:.2e} dev {r_dev:.1e}"
    )

written = []
xy = {}
for name in ("VP", "FM"):
    xy[f"{name} teacher"] = teachers[name]
    xy[f"{name} rectified"] = students[name]
written += plots.plot_trajectories_xy(xy, OUT / "trajectories_xy", max_paths=24)

for coords in ("t", "y"):
    profiles = {}
    for name in FORMS:
        profiles[f"{name} teacher"] = diagnostics.curvature_profile(
            teachers[name], coords=coords, relative=True
        )
        profiles[f"{name} rectified"] = diagnostics.curvature_profile(
            students[name], coords=coords, relative=True
        )
    rect = {f"{name} rectified": f"{name} teacher" for name in FORMS}
    written += plots.plot_curvature(
        profiles,
        OUT / f"curvature_{coords}",
        rect,
        coords=coords,
        logy=True,
        ylabel=r"$E\,\|(Z_1 - Z_0) - dZ/du\|^2 \,/\, E\,\|Z_1 - Z_0\|^2$",
    )

drift = {}
for name in FORMS:
    drift[f"{name} teacher"] = diagnostics.first_order_deviation(teachers[name], per_step=True)
    drift[f"{name} rectified"] = diagnostics.first_order_deviation(students[name], per_step=True)
written += plots.plot_x0_drift(
    drift, OUT / "x0_drift", {f"{n} rectified": f"{n} teacher" for n in FORMS}
)

# quality vs NFE: Gaussian teacher (VP) vs its exact rectified model (a CouplingOracle)
from rectdiff import metrics  # noqa: E402

form, c, m = forms.VP(), 0.5, torch.tensor([1.0, -0.5], dtype=F64)
teacher = GaussianOracle(form, "eps", mean=m, std=c)
s_T = float(teacher.marginal_std(form.t_max))
scale = c * float(form.sigma(form.t_max)) / s_T
shift = m * (1 - c * float(form.alpha(form.t_max)) / s_T)
student = CouplingOracle(form, "eps", scale=torch.full((2,), scale), shift=shift)
noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
data = m + c * torch.randn(2000, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
nfes = [1, 2, 4, 8, 16, 32, 64]
results = {}
for label, model in (("VP ddim", teacher), ("VP ddim rectified", student)):
    w2 = [
        metrics.wasserstein2(
            samplers.sample(model, noise, form=form, prediction="eps", steps=k), data
        )
        for k in nfes
    ]
    results[label] = (nfes, w2)
written += plots.plot_quality_vs_nfe(
    results,
    OUT / "quality_vs_nfe",
    "exact W2 to data (lower is better)",
    ["VP ddim rectified"],
    logy=True,
)

lam = torch.linspace(-12, 12, 400, dtype=F64)
curves = {
    "VP eps, uniform t": (
        lam,
        timesteps.implied_weighting(forms.VP(), "eps", "uniform", "none", lam),
    ),
    "VP v, uniform t": (lam, timesteps.implied_weighting(forms.VP(), "v", "uniform", "none", lam)),
    "FM flow, uniform t": (
        lam,
        timesteps.implied_weighting(forms.FlowMatching(), "flow", "uniform", "none", lam),
    ),
    "FM flow, logit-normal": (
        lam,
        timesteps.implied_weighting(forms.FlowMatching(), "flow", "logit_normal", "none", lam),
    ),
    "VE eps, uniform t": (
        lam,
        timesteps.implied_weighting(forms.VE(), "eps", "uniform", "none", lam),
    ),
}
written += plots.plot_implied_weighting(curves, OUT / "implied_weighting")

mixture_data = means[
    torch.randint(6, (1000,), generator=torch.Generator().manual_seed(3))
] + 0.2 * torch.randn(1000, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
written += plots.plot_samples(
    {"VP teacher (dopri5)": teachers["VP"].sample, "FM teacher (dopri5)": teachers["FM"].sample},
    OUT / "samples_2d",
    reference=mixture_data,
)
from sklearn.datasets import load_digits  # noqa: E402

digits = torch.as_tensor(load_digits().images[:36], dtype=F64)[:, None] / 16.0
written += plots.plot_samples(
    {"digits": digits, "digits + noise": digits + 0.3 * torch.randn_like(digits)},
    OUT / "samples_images",
)
for p in written:
    print(p)
if DOCS is not None:
    DOCS.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for stem in ("trajectories_xy", "curvature_t", "curvature_y", "x0_drift"):
        # a 128-colour palette PNG: a third of the size, indistinguishable for line art
        image = Image.open(OUT / f"{stem}.png").convert("RGB")
        image = image.quantize(
            colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
        image.save(DOCS / f".{stem}.tmp.png", optimize=True)
        shutil.move(DOCS / f".{stem}.tmp.png", DOCS / f"{stem}.png")
