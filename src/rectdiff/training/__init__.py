"""Training in any form and prediction: what t to draw, how to weight, the loss, the loop.

time_samplers   p(t): uniform, logit_normal, u_shaped, uniform_logsnr, discrete, AtTime;
                the TIME_SAMPLERS registry
weightings      loss weightings (none, snr, min_snr) and the weight over logsnr any set-up
                implies (implied_weighting; Kingma & Gao 2023); effective_sample_size /
                weighting_ess of a batch's loss weights
equalization    equalize: the sampler and weighting that give any form a reference weight
                over logsnr, by importance sampling (in the network's output units with
                output_scale)
minibatch_ot    minibatch optimal-transport couplings of noise and data (coupling="ot";
                OT-CFM of Tong et al. 2023, generalised to every form and prediction)
losses          diffusion_loss (MSE or pseudo-Huber on any prediction's target) and
                DiffusionLoss, the same resolved once for a hot loop
config          TrainConfig (a dataclass loaded from TOML)
batches         resumable in-memory / DataLoader batch streams
trainer         Trainer and train(): accelerate, EMA, LR schedule, checkpoints, resume
"""

from __future__ import annotations

from .config import LR_SCHEDULES, MIXED_PRECISION, TrainConfig
from .equalization import QUANTILES, Equalized, EqualizedWeighting, equalize
from .losses import LOSSES, DiffusionLoss, default_huber_c, diffusion_loss
from .minibatch_ot import COUPLINGS, ot_assignment, ot_coupled_noise
from .time_samplers import (
    TIME_SAMPLERS,
    AtTime,
    Discrete,
    LogitNormal,
    TimeSampler,
    Uniform,
    UniformLogSNR,
    UShaped,
    dlogsnr_dt,
    time_sampler,
)
from .trainer import NonFiniteLossError, Trainer, TrainResult, train
from .weightings import (
    WEIGHTINGS,
    InverseFactorWeighting,
    MinSNRWeighting,
    NoWeighting,
    SNRWeighting,
    Weighting,
    X0Weighting,
    common_logsnr_range,
    effective_sample_size,
    implied_weighting,
    loss_weighting,
    prediction_factor,
    weighting_ess,
)

__all__ = [
    "TrainConfig", "LR_SCHEDULES", "MIXED_PRECISION", "LOSSES", "DiffusionLoss", "default_huber_c",
    "diffusion_loss", "COUPLINGS", "ot_assignment", "ot_coupled_noise", "TIME_SAMPLERS", "AtTime", "Discrete", "Equalized", "LogitNormal",
    "TimeSampler", "Uniform", "UniformLogSNR", "UShaped", "dlogsnr_dt", "time_sampler",
    "NonFiniteLossError", "Trainer", "TrainResult", "train", "WEIGHTINGS",
    "InverseFactorWeighting", "MinSNRWeighting", "NoWeighting", "SNRWeighting", "Weighting", "X0Weighting",
    "EqualizedWeighting", "QUANTILES", "common_logsnr_range", "effective_sample_size", "equalize",
    "implied_weighting", "loss_weighting", "prediction_factor", "weighting_ess",
]  # fmt: skip
