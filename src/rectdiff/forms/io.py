"""Building forms from TOML presets, config dicts and diffusers schedulers."""

from __future__ import annotations

import inspect
import math
import tomllib
from pathlib import Path
from typing import Any

import torch

from ..io.configs import check_argument_types
from ..io.resources import data_dir
from .base import Form
from .custom import Custom
from .ve_fm import VE, FlowMatching
from .vp import VP, DiscreteVP, SubVP, VPCosine

__all__ = [
    "FORMS",
    "load",
    "from_config",
    "from_diffusers",
    "presets",
    "schedules_dir",
    "ddpm_betas",
]

_META_KEYS = ("name", "description")
_DIFFUSERS_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: diffusers' prediction_type -> rectdiff's prediction name
DIFFUSERS_PREDICTIONS = {
    "epsilon": "eps",
    "sample": "x0",
    "v_prediction": "v",
    "flow_prediction": "flow",
}
#: diffusers schedulers that share the DDPM discrete VP schedule
DDPM_FAMILY = (
    "DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
    "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler", "TCDScheduler",
)  # fmt: skip

#: the registry of form families: ``family = "..."`` in a schedule file -> class.
#: A new form is one class plus one line here.
FORMS: dict[str, type[Form]] = {
    "vp": VP,
    "vp-cosine": VPCosine,
    "subvp": SubVP,
    "ve": VE,
    "fm": FlowMatching,
    "discrete-vp": DiscreteVP,
    "custom": Custom,
}


def schedules_dir() -> Path:
    """The folder of preset TOML files (``schedules/`` at the repository root, or in the wheel)."""
    return data_dir("schedules")


def presets() -> list[str]:
    """Names of the preset schedules, e.g. ``['ddpm-linear', 'fm', 'sd15', ...]``."""
    return sorted(p.stem for p in schedules_dir().glob("*.toml"))


def load(name_or_path: str | Path) -> Form:
    """A form from a preset name (``"vp"``, ``"sd15"``, ...) or a path to a TOML file.

    Raises:
        ValueError: for an unknown preset (the known ones are listed) or a bad file.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.is_file():
        path = schedules_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ValueError(
                f"unknown schedule preset {str(name_or_path)!r}; known presets: "
                f"{', '.join(presets())}. Or pass the path to your own .toml file."
            )
    if not path.is_file():
        raise ValueError(f"schedule file {str(path)!r} does not exist.")
    with path.open("rb") as fh:
        try:
            config = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"schedule file {str(path)!r} is not valid TOML: {err}") from None
    return from_config(config, source=str(path))


def ddpm_betas(
    beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int
) -> torch.Tensor:
    """DDPM betas in float64, by the formulas diffusers' schedulers use.

    ``linear``: Ho et al. (2020); ``scaled_linear``: Stable Diffusion (linear in sqrt(beta));
    ``squaredcos_cap_v2``: Nichol & Dhariwal (2021) eq. 17 with beta capped at 0.999.
    """
    n = int(num_train_timesteps)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(
        f"unknown beta_schedule {beta_schedule!r}; allowed: {', '.join(_BETA_SCHEDULES)}."
    )


def _allowed_keys(cls: type) -> list[str]:
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self",)]
    params = [p for p in params if p not in ("check_points", "label")]
    if cls is DiscreteVP:
        params += list(_DIFFUSERS_KEYS)
    return params + list(_META_KEYS)


def from_config(config: dict[str, Any], source: str = "config") -> Form:
    """A form from a dict with ``family`` and that family's parameters (as in ``schedules/``).

    Raises:
        ValueError: for a missing or unknown family, or a key the family does not take.
    """
    config = dict(config)
    family = config.pop("family", None)
    if family not in FORMS:
        raise ValueError(
            f"{source}: family = {family!r} is not a known form; allowed: {', '.join(FORMS)}."
        )
    cls = FORMS[family]
    allowed = _allowed_keys(cls)
    unknown = [k for k in config if k not in allowed]
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {', '.join(map(repr, unknown))} for family {family!r}; "
            f"allowed: {', '.join(allowed)}."
        )
    name = config.pop("name", None)
    config.pop("description", None)
    if cls is DiscreteVP and any(k in config for k in _DIFFUSERS_KEYS):
        schedule = {k: config.pop(k) for k in _DIFFUSERS_KEYS if k in config}
        missing = [k for k in _DIFFUSERS_KEYS if k not in schedule]
        if missing:
            raise ValueError(f"{source}: discrete-vp schedule is missing {', '.join(missing)}.")
        check_argument_types(ddpm_betas, schedule, "schedule key", f"in {source}")
        config["betas"] = ddpm_betas(**schedule)
        config["label"] = name or (
            f"{schedule['beta_schedule']} {schedule['beta_start']}-{schedule['beta_end']}, "
            f"{schedule['num_train_timesteps']} steps"
        )
    check_argument_types(cls.__init__, config, "schedule key", f"in {source}")
    return cls(**config)


def _scheduler_parts(scheduler_or_config: Any) -> tuple[str, dict[str, Any], Any]:
    if hasattr(scheduler_or_config, "config"):
        config = dict(scheduler_or_config.config)
        return type(scheduler_or_config).__name__, config, scheduler_or_config
    if isinstance(scheduler_or_config, dict):
        config = dict(scheduler_or_config)
        return str(config.get("_class_name", "")), config, None
    raise TypeError(
        "from_diffusers expects a diffusers scheduler or its config dict, got "
        f"{type(scheduler_or_config).__name__}."
    )


def from_diffusers(scheduler_or_config: Any) -> tuple[Form, str]:
    """The form and prediction type of a diffusers scheduler (or its config dict).

    DDPM, DDIM, PNDM, DPM-Solver, Euler and the other DDPM-table schedulers give a
    :class:`~rectdiff.forms.DiscreteVP` on the scheduler's own ``alphas_cumprod`` (exactly the
    table diffusers computes); ``FlowMatchEulerDiscreteScheduler`` (SD3) gives
    ``FlowMatching(time_scale=num_train_timesteps, t_max=1)`` predicting ``"flow"``: its network
    outputs ``eps - x0 = dx/dsigma`` at ``timestep = N sigma``, which is rectdiff's flow in the
    unshifted form with t = sigma. The scheduler's ``shift`` moves the sampling grid, not the
    form: sample on ``samplers.scheduler_grid(scheduler, form, steps)`` to visit its sigmas.

    Returns:
        ``(form, prediction)`` with prediction one of ``"eps"``, ``"x0"``, ``"v"``, ``"flow"``.
    """
    cls_name, config, scheduler = _scheduler_parts(scheduler_or_config)
    n = int(config.get("num_train_timesteps", 1000))
    if "FlowMatch" in cls_name:
        if config.get("use_dynamic_shifting"):
            raise ValueError(
                f"{cls_name} with use_dynamic_shifting=True has a resolution-dependent shift; "
                "build FlowMatching(shift=...) yourself with the shift of your resolution."
            )
        # The network predicts eps - x0 = dx/dsigma at timestep = N sigma: the *unshifted* form
        # in sigma. SD3's shift only chooses which sigmas the sampler visits (its grid; see
        # samplers.scheduler_grid) and which are trained on; it is not part of the form.
        return FlowMatching(time_scale=float(n), t_max=1.0), "flow"
    if cls_name not in DDPM_FAMILY and "beta_schedule" not in config:
        raise ValueError(
            f"unsupported scheduler {cls_name or 'config'!r}; supported: "
            f"{', '.join(DDPM_FAMILY)} and FlowMatchEulerDiscreteScheduler."
        )
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in DIFFUSERS_PREDICTIONS:
        raise ValueError(
            f"scheduler prediction_type {prediction_type!r} is not supported; allowed: "
            f"{', '.join(DIFFUSERS_PREDICTIONS)}."
        )
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")  # fmt: skip
        acp = DDPMScheduler(**{k: config[k] for k in keys if k in config}).alphas_cumprod
    acp = torch.as_tensor(acp, dtype=torch.float64).clone()
    if acp[-1] <= 0:  # zero terminal SNR: clip as diffusers' DDIM/Euler do
        acp[-1] = 2.0**-24
    label = (
        f"{cls_name or 'scheduler'} {config.get('beta_schedule', 'custom')} "
        f"{config.get('beta_start', '')}-{config.get('beta_end', '')}, {n} steps"
    )
    return DiscreteVP(alphas_cumprod=acp, label=label), DIFFUSERS_PREDICTIONS[prediction_type]


def preset_table(
    ts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> list[dict[str, Any]]:
    """alpha, sigma and logsnr of every preset at the times ``ts``, clipped to its safe range.

    Returns:
        One row per (preset, t): ``{"preset", "form", "t", "alpha", "sigma", "logsnr"}``.
    """
    rows = []
    for name in presets():
        form = load(name)
        for t in ts:
            t_c = min(max(t, form.t_min), form.t_max)
            rows.append({
                "preset": name,
                "form": repr(form),
                "t": t_c,
                "alpha": float(form.alpha(t_c)),
                "sigma": float(form.sigma(t_c)),
                "logsnr": float(form.logsnr(t_c)),
            })  # fmt: skip
    return rows
