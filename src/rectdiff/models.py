"""Small time-conditioned networks and the input-scaling wrapper.

Every network here is called as ``net(x_t, model_time, **cond)`` (the rectdiff model
contract). ``MLP`` is the vector network of the flow-matching tutorials with a sinusoidal
time embedding; ``UNet`` wraps diffusers' ``UNet2DModel`` for small images;
``Preconditioned`` scales the input to unit variance in any form (EDM's c_in):

    c_in(t) = 1 / sqrt(alpha_t^2 sigma_data^2 + sigma_t^2)

Karras et al. 2022 (EDM), Table 1, c_in = 1 / sqrt(sigma^2 + sigma_data^2), written for the
general ``x_t = alpha_t x0 + sigma_t eps``: Var[x_t] = alpha_t^2 sigma_data^2 + sigma_t^2
for data of standard deviation sigma_data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .forms import Form, as_time, broadcast
from .predictions import check_prediction

if TYPE_CHECKING:  # imported on use: diffusers adds seconds to every MLP process's start
    from diffusers import UNet2DModel

__all__ = [
    "embedding_frequencies", "sinusoidal_embedding", "MLP", "UNet", "Preconditioned", "TIME_INPUTS",
    "SCALINGS", "check_scaling",
]  # fmt: skip

#: what a :class:`Preconditioned` network can receive as its time input
TIME_INPUTS = ("model", "t", "fm")
#: how a :class:`Preconditioned` network's input and output are scaled
SCALINGS = ("edm", "fm", "velocity")
#: predictions whose scale in flow-matching units is known in every form (``scaling="fm"``)
_FM_UNIT_PREDICTIONS = ("eps", "x0", "v")


def embedding_frequencies(dim: int, max_period: float = 10000.0) -> Tensor:
    """``f_k = max_period^(-k / (dim/2))``, k = 0..dim/2-1 (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def sinusoidal_embedding(time: Tensor, freqs: Tensor) -> Tensor:
    """Transformer positional embedding of a ``(B,)`` time: ``[cos(time f_k), sin(time f_k)]``.

    ``freqs`` from :func:`embedding_frequencies` (Ho et al. 2020's time embedding).
    Returns ``(B, 2 len(freqs))``.
    """
    angles = time[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _time_vector(model_time: Any, x: Tensor) -> Tensor:
    """``model_time`` as a ``(B,)`` tensor in x's dtype and device."""
    time = torch.as_tensor(model_time, dtype=x.dtype, device=x.device)
    return time.expand(x.shape[0]) if time.ndim == 0 else time


def one_time(model_time: Any) -> Tensor | None:
    """The single time of a batch that shares one (a ``(B,)`` tensor expanded from one value,
    stride 0, as the samplers pass it) as a 0-d tensor; None for anything else.

    Per-sample functions of it computed once and expanded are the per-sample results to the
    bit (the same operations on the same number), at a B-th of the cost."""
    if isinstance(model_time, Tensor) and model_time.ndim == 1 and model_time.shape[0] > 1:
        if model_time.stride(0) == 0:
            return model_time[0]
    return None


class MLP(nn.Module):
    """A time-conditioned MLP for vectors (flattens any trailing shape).

    ``h = W_in [x, emb(time_scale * model_time)] (+ class embedding)``, then ``depth - 1``
    SiLU + Linear layers of width ``hidden``, then SiLU + Linear back to the input size.

    Args:
        dim: the number of input features per sample (2 for 2-D toys).
        hidden: width.
        depth: number of hidden layers.
        time_embed_dim: size of the sinusoidal time embedding.
        time_scale: multiplies ``model_time`` before the embedding, so that the embedded time
            spans about [0, 1000]: 1000 for continuous forms (model_time = t in [0, 1]), 1 for
            ``DiscreteVP`` and ``FlowMatching(time_scale=1000)``.
        num_classes: > 0 for a class-conditional net called with ``class_labels``; the label
            ``num_classes`` (or no labels) means unconditional, for classifier-free guidance.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 3,
        time_embed_dim: int = 64,
        time_scale: float = 1000.0,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if depth < 1 or hidden < 1 or dim < 1 or time_embed_dim < 2:
            raise ValueError(
                f"MLP needs dim >= 1, hidden >= 1, depth >= 1, time_embed_dim >= 2; got "
                f"dim={dim}, hidden={hidden}, depth={depth}, time_embed_dim={time_embed_dim}."
            )
        self.dim, self.time_embed_dim, self.time_scale = dim, time_embed_dim, float(time_scale)
        #: one sample's shape, read by pair generation; set it for flattened images, e.g. (1, 8, 8)
        self.sample_shape: tuple[int, ...] = (dim,)
        self.num_classes = num_classes
        self.register_buffer("freqs", embedding_frequencies(time_embed_dim), persistent=False)
        self.inp = nn.Linear(dim + 2 * (time_embed_dim // 2), hidden)
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        layers += [nn.SiLU(), nn.Linear(hidden, dim)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor, model_time: Any, class_labels: Tensor | None = None) -> Tensor:
        flat = x.flatten(1)
        if flat.shape[1] != self.dim:
            raise ValueError(
                f"MLP was built for {self.dim} features per sample, got input of shape "
                f"{tuple(x.shape)}; build it with dim={flat.shape[1]}."
            )
        time = _time_vector(model_time, x)
        shared = one_time(time)
        if shared is not None:  # a sampler's step: one embedding row for the whole batch
            emb = sinusoidal_embedding(shared[None] * self.time_scale, self.freqs)
            emb = emb.expand(x.shape[0], -1)
        else:
            emb = sinusoidal_embedding(time * self.time_scale, self.freqs)
        h = self.inp(torch.cat([flat, emb], dim=1))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device)
            h = h + self.class_embed(class_labels)
        return self.body(h).view_as(x)


class UNet(nn.Module):
    """diffusers' ``UNet2DModel`` called as ``unet(x, model_time, class_labels=None)``.

    The default configuration is tiny (for 8x8 digits): two resolution levels with
    ``block_out_channels`` channels and optional attention at the coarsest level.

    Args:
        sample_size: image side length.
        in_channels: image channels; ``out_channels`` defaults to the same.
        block_out_channels: channels per resolution level.
        layers_per_block: ResNet layers per level.
        attention: use ``AttnDownBlock2D``/``AttnUpBlock2D`` at the coarsest level.
        norm_num_groups: GroupNorm groups (must divide every channel count).
        num_classes: class-conditional with this many classes (plus a null class at index
            ``num_classes`` for classifier-free guidance); None for unconditional.
        time_scale: multiplies ``model_time`` (see :class:`MLP`).
        unet: an existing ``UNet2DModel`` (e.g. ``from_pretrained``) to wrap instead.
    """

    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        out_channels: int | None = None,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        attention: bool = False,
        norm_num_groups: int = 8,
        num_classes: int | None = None,
        time_scale: float = 1000.0,
        unet: UNet2DModel | None = None,
    ) -> None:
        super().__init__()
        self.time_scale = float(time_scale)
        self.num_classes = num_classes
        if unet is None:
            levels = len(block_out_channels)
            down = ["DownBlock2D"] * levels
            up = ["UpBlock2D"] * levels
            if attention:
                down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
            from diffusers import UNet2DModel

            unet = UNet2DModel(
                sample_size=sample_size,
                in_channels=in_channels,
                out_channels=out_channels or in_channels,
                block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block,
                down_block_types=tuple(down),
                up_block_types=tuple(up),
                norm_num_groups=norm_num_groups,
                attention_head_dim=8,
                add_attention=attention,
                num_class_embeds=None if num_classes is None else num_classes + 1,
            )
        self.unet = unet

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape ``(C, H, W)``, read by pair generation."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), *map(int, size))

    def forward(self, x: Tensor, model_time: Any, class_labels: Tensor | None = None) -> Tensor:
        time = _time_vector(model_time, x) * self.time_scale
        if self.num_classes is not None and class_labels is None:
            class_labels = torch.full((x.shape[0],), self.num_classes, device=x.device)
        return self.unet(x, time, class_labels=class_labels, return_dict=False)[0]


def check_scaling(scaling: str, form: Form, output_prediction: str | None) -> None:
    """Refuse a :class:`Preconditioned` ``scaling`` that is unknown, or ``"fm"`` on an output
    whose scale in flow-matching units is not known in ``form`` (flow outside flow matching).

    Raises:
        ValueError: naming the value and what is allowed.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; allowed: {', '.join(SCALINGS)}.")
    if scaling == "velocity" and output_prediction is None:
        raise ValueError(
            "scaling='velocity' needs output_prediction (eps, x0, v or flow): the wrapper "
            "turns flow matching's velocity into that prediction."
        )
    if (
        scaling == "fm"
        and output_prediction not in (None, *_FM_UNIT_PREDICTIONS)
        and form.config().get("family") != "fm"
    ):
        raise ValueError(
            f"scaling='fm' with output_prediction={output_prediction!r} needs a "
            f"flow-matching form, got {form!r}: a form's flow dx/dt is not a multiple "
            f"of flow matching's; use output_prediction in {_FM_UNIT_PREDICTIONS} or "
            "scaling='edm'."
        )


class Preconditioned(nn.Module):
    """Wraps a network so that it sees x_t at unit variance: ``net(c_in(t) x_t, model_time)``.

    ``c_in(t) = 1 / sqrt(alpha_t^2 sigma_data^2 + sigma_t^2)`` (EDM's c_in for any form, see
    the module docstring). The time input passes through unchanged; t is recovered with
    ``form.t_from_model_time``. With ``scale_input=False`` (and no ``output_prediction``) the
    wrapper is the identity, for networks that bring their own scaling (e.g. pretrained
    diffusers UNets).

    Optionally the output is scaled too: with ``output_prediction`` set, the network's output
    is multiplied by ``c_out(t)``, the standard deviation of that prediction's target
    ``a_t x0 + b_t eps`` for data of std sigma_data, ``c_out = sqrt(a_t^2 sigma_data^2 + b_t^2)``
    (eps: a=0, b=1; x0: a=1, b=0; v: a=-sigma, b=alpha; flow: a=alpha', b=sigma'), so the
    network regresses unit-variance targets in every form. This is EDM's c_out without the
    skip connection; it keeps e.g. VE's v target (up to sigma_max sigma_data) in range.

    Args:
        net: the network, called as ``net(x, model_time, **cond)``.
        form: the diffusion form the model is trained/sampled in.
        sigma_data: the standard deviation of the data.
        scale_input: apply c_in.
        output_prediction: the prediction type the model outputs, to apply c_out; None = off.
        time_input: what the network receives as time: ``"model"`` (``form.model_time(t)``,
            e.g. SD's integer timesteps 0..999), ``"t"`` (the continuous t in [0, 1], in the
            dtype of the incoming time), so networks in different forms see time on one
            scale (what ``rectdiff compare`` uses for equal hyperparameters), or ``"fm"``:
            the flow-matching time with the same logsnr, ``sigma_t / (alpha_t + sigma_t)``
            (= t in flow matching), so networks in different forms see the *same* time at
            the same noise level. With ``scale_input`` and ``output_prediction="v"`` the
            network then gets identical inputs and unit-variance targets in every form: c_in
            x_t is the same at one logsnr, and v / c_out is too (VP's v is FM's v divided by
            sqrt(alpha^2 + sigma^2) of FM at that logsnr, and so is its c_out).
        scaling: ``"edm"`` (default): c_in and c_out as above; ``"fm"``: the network works in
            flow-matching units. Every form's ``x_t`` is ``r_t`` times flow matching's at the
            same logsnr, with ``r_t = alpha_t + sigma_t`` (FM's alpha + sigma is 1), and so is
            its v; so ``c_in = 1 / r_t`` and, for v-prediction, ``c_out = r_t`` (eps and x0
            are the same in every form: ``c_out = 1``). With ``time_input="fm"`` a network in
            any form then sees and predicts exactly what an unscaled flow-matching network
            sees and predicts (in flow matching itself the wrapper is the identity): the
            form changes nothing but the loss weighting and time sampling, which
            ``training.equalize`` can match. ``sigma_data`` is not used; ``"flow"`` is
            refused outside flow matching (a form's dx/dt is not a multiple of FM's).
            ``"velocity"``: as ``"fm"``, and the network predicts flow matching's velocity
            ``u = eps - x0`` whatever ``output_prediction`` is; the wrapper turns it into
            the prediction with a skip connection, ``out = c_skip x_t + c_out net(...)``.
            For a prediction ``a_t x0 + b_t eps``, with ``x0 = (x_t - sigma_t u) / r_t`` and
            ``eps = (x_t + alpha_t u) / r_t``: ``c_skip = (a_t + b_t) / r_t`` and ``c_out =
            (b_t alpha_t - a_t sigma_t) / r_t`` (v: ``(alpha - sigma) / r`` and ``(alpha^2 +
            sigma^2) / r``; flow in any form: ``(alpha' + sigma') / r`` and ``(alpha
            sigma' - sigma alpha') / r``). With ``time_input="fm"`` and
            ``training.equalize(output_scale=c_out)`` towards flow matching's objective, the
            network then trains on exactly the regression of a flow-matching velocity
            network: the form and the prediction type change only the units of the loss.
    """

    def __init__(
        self,
        net: nn.Module,
        form: Form,
        sigma_data: float = 1.0,
        scale_input: bool = True,
        output_prediction: str | None = None,
        time_input: str = "model",
        scaling: str = "edm",
    ) -> None:
        super().__init__()
        check_scaling(scaling, form, output_prediction)
        if time_input not in TIME_INPUTS:
            raise ValueError(
                f"unknown time_input {time_input!r}; allowed: {', '.join(TIME_INPUTS)}."
            )
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data} (the data's std).")
        if output_prediction is not None:
            check_prediction(output_prediction)
        self.net, self.form = net, form
        self.sigma_data, self.scale_input = float(sigma_data), bool(scale_input)
        self.output_prediction = output_prediction
        self.time_input, self.scaling = time_input, scaling

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The wrapped network's ``sample_shape`` (AttributeError when it has none)."""
        return tuple(self.net.sample_shape)

    def _alpha_sigma(self, t: Any) -> tuple[Tensor, Tensor, Tensor]:
        t64 = as_time(t)
        return t64, self.form.alpha(t64), self.form.sigma(t64)

    def c_in(self, t: Any) -> Tensor:
        """1 / sqrt(alpha_t^2 sigma_data^2 + sigma_t^2) (``scaling="fm"`` or ``"velocity"``:
        1 / (alpha_t + sigma_t)), float64."""
        return self._c_in(*self._alpha_sigma(t)[1:])

    def _c_in(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        if self.scaling != "edm":
            return 1 / (alpha + sigma)
        return torch.rsqrt(alpha**2 * self.sigma_data**2 + sigma**2)

    def fm_time(self, t: Any) -> Tensor:
        """sigma_t / (alpha_t + sigma_t), float64: the flow-matching time whose logsnr,
        2 log((1 - s) / s), is this form's at t (``time_input="fm"``)."""
        return self._fm_time(*self._alpha_sigma(t)[1:])

    @staticmethod
    def _fm_time(alpha: Tensor, sigma: Tensor) -> Tensor:
        return sigma / (alpha + sigma)

    def _target_coefficients(
        self, t64: Tensor, alpha: Tensor, sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(a_t, b_t)`` of the output prediction ``a_t x0 + b_t eps``
        (``predictions.from_x0_eps`` of (1, 0) and (0, 1), written out)."""
        prediction = self.output_prediction
        if prediction == "v":  # v = alpha eps - sigma x0
            return -sigma, alpha
        if prediction == "flow":  # alpha' x0 + sigma' eps
            return self.form.d_alpha(t64), self.form.d_sigma(t64)
        one, zero = torch.ones_like(t64), torch.zeros_like(t64)
        return (one, zero) if prediction == "x0" else (zero, one)

    def c_skip(self, t: Any) -> Tensor:
        """(a_t + b_t) / (alpha_t + sigma_t) for ``scaling="velocity"`` (the output
        prediction ``a_t x0 + b_t eps``), else 0; float64."""
        return self._c_skip(*self._alpha_sigma(t))

    def _c_skip(self, t64: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        if self.scaling != "velocity":
            return torch.zeros_like(t64)
        a, b = self._target_coefficients(t64, alpha, sigma)
        return (a + b) / (alpha + sigma)

    def c_out(self, t: Any) -> Tensor:
        """sqrt(a_t^2 sigma_data^2 + b_t^2) for target a_t x0 + b_t eps, float64 (1 when off;
        ``scaling="fm"``: alpha_t + sigma_t for v, else 1; ``"velocity"``: (b_t alpha_t -
        a_t sigma_t) / (alpha_t + sigma_t))."""
        return self._c_out(*self._alpha_sigma(t))

    def _c_out(self, t64: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        if self.output_prediction is None:
            return torch.ones_like(t64)
        if self.scaling == "fm":
            if self.output_prediction != "v":  # eps and x0 are form-free; FM's own flow
                return torch.ones_like(t64)
            return alpha + sigma
        a, b = self._target_coefficients(t64, alpha, sigma)
        if self.scaling == "velocity":
            return (b * alpha - a * sigma) / (alpha + sigma)
        return torch.sqrt(a**2 * self.sigma_data**2 + b**2)

    def forward(self, x_t: Tensor, model_time: Any, **cond: Any) -> Tensor:
        plain_time = self.time_input == "model"
        if not self.scale_input and self.output_prediction is None and plain_time:
            return self.net(x_t, model_time, **cond)
        shared = one_time(model_time)  # a sampler's step: every scale once, not per sample
        if shared is not None:
            model_time = shared
        # alpha_t and sigma_t once, for every scale below
        t, alpha, sigma = self._alpha_sigma(self.form.t_from_model_time(
            as_time(model_time).to(x_t.device)))  # fmt: skip
        skip = None
        if self.scaling == "velocity":
            skip = broadcast(self._c_skip(t, alpha, sigma), x_t) * x_t
        if self.scale_input:
            x_t = broadcast(self._c_in(alpha, sigma), x_t) * x_t
        if not plain_time:
            dtype = model_time.dtype if isinstance(model_time, Tensor) else x_t.dtype
            model_time = (self._fm_time(alpha, sigma) if self.time_input == "fm" else t).to(dtype)
        if shared is not None:
            model_time = model_time.expand(x_t.shape[0])
        out = self.net(x_t, model_time, **cond)
        if self.output_prediction is not None:
            out = broadcast(self._c_out(t, alpha, sigma), out) * out
        return out if skip is None else skip + out
