"""Flow models trained elsewhere: the tutorials, torchcfm, flow_matching, rectified-flow-pytorch.

All of them write the path with **noise at s = 0 and data at s = 1**,
``x_s = a(s) x1 + b(s) x0`` (x1 data, x0 noise), and train the network on the velocity
``dx/ds = a'(s) x1 + b'(s) x0`` (or on x1 or x0 themselves). In rectdiff's time
``t = 1 - s`` (t = 0 data) that is the form ``alpha_t = a(1 - t)``, ``sigma_t = b(1 - t)``, and
the velocity is ``dx/ds = -dx/dt = -flow``. Passing such a network to rectdiff as it is
samples the wrong ODE (time runs backwards and the sign is flipped, with no error); each
adapter here returns the network wrapped so that it sees its own time and answers rectdiff's
prediction, plus the form of its path:

=========================  ====================================  ==============================
convention                 path (noise at s = 0)                 rectdiff form (t = 1 - s)
=========================  ====================================  ==============================
flow-matching tutorials    ``s x1 + (1 - (1 - sigma_min) s) x0``  ``FlowMatching(sigma_min)``
(Lipman et al. 2023 eq. 20; Liu et al. 2023 with sigma_min = 0)
torchcfm ``cfm``/``ot``    ``s x1 + (1 - s) x0 + c z``            ``alpha = 1 - t``,
                                                                 ``sigma = sqrt(t^2 + c^2)``
torchcfm ``target``        ``s x1 + (1 - (1 - c) s) x0``          ``FlowMatching(sigma_min=c)``
torchcfm ``vp``            ``sin(pi s/2) x1 + cos(pi s/2) x0 + c z``  ``cos(pi t/2)``,
                                                                 ``sqrt(sin(pi t/2)^2 + c^2)``
flow_matching ``CondOT``   ``s x1 + (1 - s) x0``                  ``FlowMatching()``
flow_matching ``VP``       ``exp(-T/2) x1 + sqrt(1 - e^-T) x0``   ``VP(beta_min, beta_max)``
flow_matching ``Cosine``,  ``LinearVP``, ``PolynomialConvex(n)``    ``Custom`` expressions
rectified-flow-pytorch     ``s x1 + (1 - s) x0``                  ``FlowMatching()``
=========================  ====================================  ==============================

(torchcfm's independent blur ``c z`` makes the marginal std ``sqrt((1-s)^2 + c^2)``; its
regression target ``E[x1 - x0 | x_s]`` is exactly the probability-flow velocity of that
affine path.) ``target`` names what the network outputs, in the outside code's words:
``"velocity"`` (``dx/ds``, rectdiff's ``flow`` with the sign flipped), ``"data"`` (x1, rectdiff's
``x0``) or ``"noise"`` (x0 of the outside code, rectdiff's ``eps``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..forms import VP, Custom, FlowMatching, Form
from ..io.configs import check_choice
from .base import Adapted, OutsideModel

__all__ = [
    "TARGETS", "T_MIN", "flow_tutorial", "torchcfm", "flow_matching", "rectified_flow_pytorch",
    "TORCHCFM_MATCHERS", "FLOW_MATCHING_SCHEDULERS",
]  # fmt: skip

#: what an outside flow network outputs -> rectdiff's prediction type
TARGETS = {"velocity": "flow", "data": "x0", "noise": "eps"}
#: the data end of the adapted forms: sigma = 0 at t = 0 for most paths, so the network is
#: evaluated down to t = 1e-4 and a last first-order step (error O(1e-8)) lands on t = 0
T_MIN = 1e-4
#: the noise end for paths whose alpha reaches 0 at s = 0 and need alpha > 0 (Custom forms,
#: or a noise-predicting network, whose conversion to x0 divides by alpha)
_T_MAX_OPEN = 1.0 - 1e-6


def _check_target(target: str) -> str:
    return TARGETS[check_choice(target, list(TARGETS), "target (what the network outputs)")]


def _reversed(
    net: nn.Module, form: Form, target: str, **call: Any
) -> Adapted:  # noise at s = 0: the network sees s = 1 - t, a velocity changes sign
    prediction = _check_target(target)
    sign = -1.0 if prediction == "flow" else 1.0
    return Adapted(OutsideModel(net, time_map=(1.0, -1.0), sign=sign, **call), form, prediction)


def flow_tutorial(
    net: nn.Module,
    *,
    sigma_min: float = 0.0,
    noise_at: int = 0,
    target: str = "velocity",
    call: str = "x_t",
    time_kwarg: str | None = None,
    cond_args: Sequence[str] = (),
) -> Adapted:
    """A network from the flow-matching tutorials (Lipman et al. 2023; Liu et al. 2023).

    The tutorials train ``net(x_s, s)`` on ``x1 - (1 - sigma_min) x0`` along
    ``x_s = s x1 + (1 - (1 - sigma_min) s) x0`` (x0 noise, x1 data) and sample
    ``odeint(net, noise, [0, 1])``. That is ``FlowMatching(sigma_min)`` in rectdiff's time
    t = 1 - s with the velocity's sign flipped.

    Args:
        net: the network.
        sigma_min: the path's smallest noise level (0: rectified flow).
        noise_at: where the network's time puts the noise: 0 (the tutorials) or 1 (a vector
            field integrated backwards from t = 1, rectdiff's own direction: no flip).
        target: ``"velocity"``, ``"data"`` or ``"noise"`` (what ``net`` outputs).
        call: ``"x_t"`` for ``net(x, t)``, ``"t_x"`` for ``net(t, x)`` (torchdiffeq's
            ``func(t, y)``), ``"keywords"``, or ``"concat"`` (see :class:`OutsideModel`).
        time_kwarg: pass the time as this keyword (``net(x, times=t)``).
        cond_args: conditioning passed positionally after the time (``net(x, t, labels)``).
    """
    check_choice(noise_at, (0, 1), "noise_at (the network time of the noise end)")
    prediction = _check_target(target)
    form = FlowMatching(sigma_min=sigma_min, t_min=T_MIN if sigma_min == 0 else 0.0,
                        t_max=_T_MAX_OPEN if prediction == "eps" else 1.0)  # fmt: skip
    options = {"call": call, "time_kwarg": time_kwarg, "cond_args": cond_args}
    if noise_at == 0:
        return _reversed(net, form, target, **options)
    return Adapted(OutsideModel(net, **options), form, prediction)


#: torchcfm's matchers (class name or short name) -> short name
TORCHCFM_MATCHERS = {
    "ConditionalFlowMatcher": "cfm",
    "ExactOptimalTransportConditionalFlowMatcher": "ot",
    "TargetConditionalFlowMatcher": "target",
    "VariancePreservingConditionalFlowMatcher": "vp",
}


def torchcfm(
    model: nn.Module,
    *,
    matcher: Any = "cfm",
    sigma: float | None = None,
    target: str = "velocity",
    call: str = "concat",
) -> Adapted:
    """A network trained with torchcfm (Tong et al. 2024).

    Args:
        model: the network: ``torchcfm.models.MLP(dim, time_varying=True)`` takes
            ``cat([x, t])`` (``call="concat"``); its ``UNetModelWrapper`` is ``model(t, x)``
            (``call="t_x"``).
        matcher: the torchcfm matcher it was trained with (an instance, its class name, or
            ``"cfm"``, ``"ot"``, ``"target"``, ``"vp"``); ``SchrodingerBridgeConditionalFlowMatcher``
            is not a deterministic path and is refused.
        sigma: the matcher's ``sigma`` (read from an instance; default 0).
        target: what the network outputs (torchcfm trains ``"velocity"``).
        call: how it is called (above).
    """
    if not isinstance(matcher, str):
        sigma = float(matcher.sigma) if sigma is None else sigma
        matcher = type(matcher).__name__
    kind = TORCHCFM_MATCHERS.get(matcher, matcher)
    check_choice(kind, sorted(set(TORCHCFM_MATCHERS.values())) + list(TORCHCFM_MATCHERS),
                 "torchcfm matcher")  # fmt: skip
    c = 0.0 if sigma is None else float(sigma)
    if c < 0:
        raise ValueError(f"torchcfm sigma must be >= 0, got {c}.")
    t_max = _T_MAX_OPEN if _check_target(target) == "eps" else 1.0
    if kind in ("cfm", "ot") and c == 0:
        form: Form = FlowMatching(t_min=T_MIN, t_max=t_max)
    elif kind in ("cfm", "ot"):
        form = Custom("1 - t", f"sqrt(t**2 + {c!r}**2)", t_min=0.0, t_max=_T_MAX_OPEN)
    elif kind == "target":
        form = FlowMatching(sigma_min=c, t_min=T_MIN if c == 0 else 0.0, t_max=t_max)
    else:
        form = Custom("cos(pi * t / 2)", f"sqrt(sin(pi * t / 2)**2 + {c!r}**2)",
                      t_min=T_MIN if c == 0 else 0.0, t_max=_T_MAX_OPEN)  # fmt: skip
    return _reversed(model, form, target, call=call)


def _flow_matching_form(scheduler: Any) -> Form:
    name = type(scheduler).__name__
    if name == "CondOTScheduler":
        return FlowMatching(t_min=T_MIN, t_max=1.0)
    if name == "VPScheduler":
        return VP(beta_min=scheduler.beta_min, beta_max=scheduler.beta_max, t_min=T_MIN)
    if name == "PolynomialConvexScheduler":
        n = float(scheduler.n)
        return Custom(f"(1 - t)**{n!r}", f"1 - (1 - t)**{n!r}", t_min=T_MIN, t_max=_T_MAX_OPEN)
    if name == "LinearVPScheduler":
        return Custom("1 - t", "sqrt(1 - (1 - t)**2)", t_min=T_MIN, t_max=_T_MAX_OPEN)
    if name == "CosineScheduler":
        return Custom("cos(pi * t / 2)", "sin(pi * t / 2)", t_min=T_MIN, t_max=_T_MAX_OPEN)
    raise ValueError(
        f"unsupported flow_matching scheduler {name!r}; supported: "
        f"{', '.join(FLOW_MATCHING_SCHEDULERS)}. For another affine path write its alpha and "
        "sigma in rectdiff's time t = 1 - s as forms.Custom(alpha, sigma) and wrap the network "
        "with adapters.OutsideModel(net, time_map=(1, -1), call='keywords', sign=-1)."
    )


#: facebookresearch/flow_matching schedulers this adapter maps to a rectdiff form
FLOW_MATCHING_SCHEDULERS = ("CondOTScheduler", "VPScheduler", "PolynomialConvexScheduler",
                            "LinearVPScheduler", "CosineScheduler")  # fmt: skip


def flow_matching(model: nn.Module, path: Any, *, target: str = "velocity") -> Adapted:
    """A network trained with facebookresearch/flow_matching (Lipman et al. 2024).

    ``flow_matching`` calls its ``ModelWrapper`` as ``model(x=x, t=t, **extras)`` with noise
    at t = 0, along an ``AffineProbPath(scheduler)``: ``x_t = alpha_t x1 + sigma_t x0``.

    Args:
        model: the velocity model (a ``ModelWrapper`` or any module called with ``x=, t=``).
        path: the ``AffineProbPath`` it was trained on, or its scheduler.
        target: ``"velocity"`` (flow_matching's default), ``"data"`` (x1-prediction) or
            ``"noise"`` (x0-prediction, flow_matching's "epsilon").
    """
    scheduler = getattr(path, "scheduler", path)
    form = _flow_matching_form(scheduler)
    if _check_target(target) == "eps" and float(form.alpha(form.t_max)) == 0.0:
        form = FlowMatching(t_min=T_MIN, t_max=_T_MAX_OPEN)
    return _reversed(model, form, target, call="keywords")


#: rectified-flow-pytorch's ``predict`` -> the target it names
_RFP_PREDICT = {"flow": "velocity", "noise": "noise", "clean": "data"}


def rectified_flow_pytorch(
    rectified_flow: nn.Module, *, predict: str | None = None, time_kwarg: str | None = None
) -> Adapted:
    """A ``RectifiedFlow`` of rectified-flow-pytorch (lucidrains), or its bare network.

    It trains ``model(noised, times=s)`` on ``noised = s data + (1 - s) noise`` (its
    ``noise_schedule`` only warps the training times) and samples ``odeint`` from s = 0 to 1.
    Its data are normalized to [-1, 1] first (``data_normalize_fn``): the adapted model
    samples in that space; apply ``rectified_flow.data_unnormalize_fn`` to compare with its
    ``sample()``.

    Args:
        rectified_flow: a ``RectifiedFlow`` (``predict`` and ``time_cond_kwarg`` are read from
            it) or its network.
        predict: ``"flow"``, ``"noise"`` or ``"clean"`` (default: the object's, else flow).
        time_kwarg: the time keyword (default: the object's ``time_cond_kwarg``, else "times").
    """
    net = rectified_flow
    if hasattr(rectified_flow, "predict_flow") and hasattr(rectified_flow, "model"):
        if getattr(rectified_flow, "mean_variance_net", False):
            raise ValueError("a mean-variance RectifiedFlow samples a random flow; not an ODE.")
        net = rectified_flow.model
        predict = predict or rectified_flow.predict
        time_kwarg = time_kwarg or rectified_flow.time_cond_kwarg
    predict = check_choice(predict or "flow", list(_RFP_PREDICT), "rectified-flow-pytorch predict")
    if time_kwarg is None:
        time_kwarg = "times"
    target = _RFP_PREDICT[predict]
    t_max = _T_MAX_OPEN if target == "noise" else 1.0
    form = FlowMatching(t_min=T_MIN, t_max=t_max)
    return _reversed(net, form, target, call="x_t", time_kwarg=time_kwarg)
