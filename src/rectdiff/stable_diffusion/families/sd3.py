"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MMDiT transformer trained by
rectified flow, two CLIP text encoders and an optional T5.

SD3 is the Rectified Flow case proper (Esser et al. 2024): its network predicts the flow
``u = eps - x0 = dx/dsigma`` on ``x_sigma = (1 - sigma) x0 + sigma eps`` at ``timestep =
1000 sigma``, which :func:`rectdiff.forms.from_diffusers` reads off the checkpoint's
``FlowMatchEulerDiscreteScheduler`` as ``FlowMatching(time_scale=1000, t_max=1)`` predicting
``"flow"`` (t = sigma; the scheduler's ``shift`` 3.0 only moves the sigmas it visits). So:

* the pair solve is the stock sampler: :meth:`StableDiffusion3Family.pair_grid` is the
  scheduler's own shifted sigmas (:func:`rectdiff.samplers.scheduler_grid`; for 25 steps
  1, 0.986, ..., 0.009, then 0) and the solver ``"euler"``, ``x <- x + (sigma_next - sigma)
  u``, as ``FlowMatchEulerDiscreteScheduler.step``; it starts at ``x = sigma(1) eps = eps``,
  where the pipeline starts (the scheduler has no ``init_noise_sigma``; latents go in as
  given);
* since ``alpha(1) = 0`` the coupling needs no start correction (``start_noise`` returns
  ``eps``): the student is trained on the straight line ``(1 - t) x0_hat + t eps`` itself,
  t uniform (``rectify`` draws discrete timesteps only for a ``DiscreteVP``), with the
  default loss of ``sd rectify`` (pseudo-Huber on the x0-prediction ``x_t - t u``;
  ``loss_prediction="flow"`` gives the plain rectified-flow loss on ``u``);
* the student is saved with ``FlowMatchEulerDiscreteScheduler.from_config(teacher config)``,
  whose one step goes from sigma = 1 to 0; phased rectification's window edges are the
  sigmas the phased student's scheduler visits in K steps, so every K is exact. Stock K-step
  sampling at shift 3 visits 1, 0.858, 0.602, 0.009, then 0 (diffusers spaces the unshifted
  sigmas from 1 to the *shifted* smallest training sigma and shifts them again): its last
  window would be nearly empty, so a phased student is saved with ``shift_terminal`` =
  ``shift(1 / K)`` (:func:`phase_terminal_sigma`; K = 4: 1, 0.928, 0.799, 0.5, then 0).

A pair stores one token-id tensor per tokenizer: ``input_ids`` and ``input_ids_2`` (the two
CLIP tokenizers, padded to the first's ``model_max_length``, 77 in SD3) and, when the
pipeline has its T5 encoder, ``input_ids_3`` (padded to ``max_sequence_length`` 256, the
pipeline's default). :class:`SD3TextConditionedTransformer` encodes them exactly as
``StableDiffusion3Pipeline.encode_prompt`` does with its defaults: the CLIP penultimate
hidden states concatenated on the feature axis and zero-padded to the transformer's
``joint_attention_dim``, then the T5 states (zeros of shape ``(256, joint_attention_dim)``
without T5, as the pipeline) on the sequence axis; pooled = the two CLIP projections
concatenated. The unconditional is the encoding of the empty negative prompt: SD3 has no
``force_zeros_for_empty_prompt``. A folder whose ``model_index.json`` names no
``text_encoder_3``/``tokenizer_3`` (or lacks their sub-folders) loads with both None and
runs without T5, as ``StableDiffusion3Pipeline.from_pretrained(..., text_encoder_3=None,
tokenizer_3=None)``.

SD 3.5 is the same pipeline class (its transformer adds ``dual_attention_layers`` and
``qk_norm``, its scheduler config the same shift 3.0); a config with
``use_dynamic_shifting`` is refused by :func:`rectdiff.forms.from_diffusers`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import forms, samplers
from .base import PipelineFamily

__all__ = [
    "SD3TextConditionedTransformer",
    "phase_terminal_sigma",
    "STABLE_DIFFUSION_3",
    "StableDiffusion3Family",
    "T5_LENGTH",
]

#: the T5 sequence length ``StableDiffusion3Pipeline`` pads to (its ``max_sequence_length``)
T5_LENGTH = 256


def _token_ids(tokenizer: Any, prompts: Sequence[str], length: int) -> Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids


class SD3TextConditionedTransformer(nn.Module):
    """``model(x_t, model_time, input_ids, input_ids_2, input_ids_3=None)`` ->
    ``transformer(x_t, timestep=model_time, encoder_hidden_states, pooled_projections)``.

    Only the transformer is a registered submodule; the text encoders are frozen, kept
    outside the parameter list and follow the transformer's device in ``.to()``. Id batches of
    size 1 (the empty prompt of classifier-free guidance) are broadcast over ``x_t``'s batch.

    The frozen encoders' output depends on a prompt's ids alone, so encodings are cached per
    prompt (per row of ids), the ``cache_rows`` most recently used: training on a store's
    prompts then encodes each distinct prompt once, and guidance encodes the empty prompt
    once. (One real SD3 prompt encoding is 333 x 4096 numbers, 2.7 MB in float16.)

    Args:
        transformer: a diffusers ``SD3Transformer2DModel``.
        text_encoder, text_encoder_2: ``CLIPTextModelWithProjection`` s.
        text_encoder_3: a ``T5EncoderModel``, or None (its embedding is then zeros).
        cache_rows: how many prompt encodings to keep (0: none).
    """

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        text_encoder_3: nn.Module | None = None,
        cache_rows: int = 128,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        encoders = [text_encoder, text_encoder_2, text_encoder_3]
        for encoder in encoders:
            if encoder is not None:
                encoder.requires_grad_(False).eval()
        self.__dict__["encoders"] = encoders  # not submodules: frozen, not saved
        self.cache_rows = int(cache_rows)
        self._cache: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()

    @property
    def config(self) -> Any:
        """The transformer's config (in_channels, sample_size, ...)."""
        return self.transformer.config

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> nn.Module:
        for encoder in self.encoders:
            if encoder is not None:
                encoder._apply(fn, *args, **kwargs)
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _clip(self, index: int, ids: Tensor) -> tuple[Tensor, Tensor]:
        encoder = self.encoders[index]
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _encode(
        self, input_ids: Tensor, input_ids_2: Tensor, input_ids_3: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """``encode_prompt``'s ``(prompt_embeds, pooled_prompt_embeds)`` of a batch."""
        hidden, pooled = self._clip(0, input_ids)
        hidden_2, pooled_2 = self._clip(1, input_ids_2)
        clip = torch.cat([hidden, hidden_2], dim=-1)
        t5 = self.encoders[2]
        joint_dim = int(self.transformer.config.joint_attention_dim)
        if t5 is None:
            t5_embeds = clip.new_zeros((len(clip), T5_LENGTH, joint_dim))
        elif input_ids_3 is None:
            raise ValueError(
                "this SD3 pipeline has a T5 text encoder (text_encoder_3): its conditioning "
                "needs input_ids_3, the tokenizer_3 ids of the prompt."
            )
        else:
            t5_embeds = t5(input_ids_3.to(t5.device))[0].to(clip.dtype)
        clip = nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5_embeds], dim=-2), torch.cat([pooled, pooled_2], dim=-1)

    @torch.no_grad()
    def encode(
        self, input_ids: Tensor, input_ids_2: Tensor, input_ids_3: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds, pooled_prompt_embeds)`` as ``encode_prompt`` makes them, each
        distinct prompt encoded once (see the class docstring)."""
        ids = [i for i in (input_ids, input_ids_2, input_ids_3) if i is not None]
        joined = torch.cat([i.reshape(len(i), -1).cpu() for i in ids], dim=1).numpy()
        keys = [row.tobytes() for row in joined]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if missing:
            rows = torch.tensor([keys.index(k) for k in missing])
            picked = [None if i is None else i[rows.to(i.device)] for i in
                      (input_ids, input_ids_2, input_ids_3)]  # fmt: skip
            hidden, pooled = self._encode(*picked)
            for n, key in enumerate(missing):
                self._cache[key] = (hidden[n], pooled[n])
        embeds = [self._cache[k] for k in keys]
        for key in keys:
            self._cache.move_to_end(key)
        while len(self._cache) > self.cache_rows:
            self._cache.popitem(last=False)
        return torch.stack([e[0] for e in embeds]), torch.stack([e[1] for e in embeds])

    def forward(
        self,
        x_t: Tensor,
        model_time: Tensor,
        input_ids: Tensor,
        input_ids_2: Tensor,
        input_ids_3: Tensor | None = None,
    ) -> Tensor:
        dtype = self.transformer.dtype
        hidden, pooled = (e.to(dtype) for e in self.encode(input_ids, input_ids_2, input_ids_3))
        if hidden.shape[0] == 1 and x_t.shape[0] > 1:
            hidden = hidden.expand(x_t.shape[0], *hidden.shape[1:])
            pooled = pooled.expand(x_t.shape[0], *pooled.shape[1:])
        time = torch.as_tensor(model_time, device=x_t.device, dtype=dtype)
        if time.ndim == 0:
            time = time.expand(x_t.shape[0])
        out = self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=time,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return out.to(x_t.dtype)


class StableDiffusion3Family(PipelineFamily):
    """``StableDiffusion3Pipeline``: SD3 transformer, two CLIP encoders and an optional T5;
    conditioning ``input_ids``, ``input_ids_2`` and (with T5) ``input_ids_3``."""

    pipeline_class = "StableDiffusion3Pipeline"
    title = "Stable Diffusion 3"
    network = "transformer"
    required_parts = ("transformer", "text_encoder", "text_encoder_2", "tokenizer",
                      "tokenizer_2", "scheduler")  # fmt: skip
    optional_parts = ("text_encoder_3", "tokenizer_3")
    identity_parts = required_parts + optional_parts
    cond_keys = ("input_ids", "input_ids_2", "input_ids_3")
    optional_cond_keys = ("input_ids_3",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    pair_solver = "euler"

    def pair_grid(self, scheduler: Any, steps: int, form: forms.Form) -> list[float]:
        """The sigmas ``FlowMatchEulerDiscreteScheduler`` visits in ``steps`` steps (shifted),
        then 0: ``samplers.scheduler_grid`` on a copy of the checkpoint's scheduler."""
        copy = type(scheduler).from_config(scheduler.config)
        return [float(t) for t in samplers.scheduler_grid(copy, form, steps)]

    def conditioning(self, pipe: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
        length = int(pipe.tokenizer_max_length)
        cond = {
            "input_ids": _token_ids(pipe.tokenizer, prompts, length),
            "input_ids_2": _token_ids(pipe.tokenizer_2, prompts, length),
        }
        if pipe.text_encoder_3 is not None:
            if pipe.tokenizer_3 is None:
                raise ValueError(
                    "the SD3 pipeline has a T5 text encoder (text_encoder_3) but no tokenizer_3; "
                    "load it with both, or with text_encoder_3=None to run without T5."
                )
            cond["input_ids_3"] = _token_ids(pipe.tokenizer_3, prompts, T5_LENGTH)
        return cond

    def denoiser(self, pipe: Any) -> nn.Module:
        return SD3TextConditionedTransformer(
            pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3
        )

    def student_scheduler(self, teacher_scheduler: Any, phases: int = 1) -> Any:
        """``FlowMatchEulerDiscreteScheduler.from_config(teacher config)``: one step goes
        from sigma = 1 to 0, K steps visit the teacher's own shifted sigmas.

        For a phased student (``phases`` = K > 1) the config gets ``shift_terminal`` =
        :func:`phase_terminal_sigma`: stock K-step sampling otherwise ends with a step from
        the smallest training sigma (0.009 at shift 3) to 0, leaving K - 1 real windows;
        with it the K visited sigmas are the shifted ones stretched affinely so that the
        last is ``shift(1 / K)``, and all K windows are real (shift 3, K = 4: 1, 0.928,
        0.799, 0.5, then 0; shift 1: 1, 0.75, 0.5, 0.25, 0).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = teacher_scheduler.config
        extra = {"shift_terminal": phase_terminal_sigma(config, phases)} if phases > 1 else {}
        return FlowMatchEulerDiscreteScheduler.from_config(config, **extra)

    def phase_edges(self, scheduler: Any, form: forms.Form, phases: int) -> Tensor:
        """The sigmas the phased student's scheduler visits in ``phases`` steps, then 0: any
        K (:meth:`student_scheduler` with ``phases``)."""
        return samplers.scheduler_grid(self.student_scheduler(scheduler, phases), form, phases)

    def check_phases(self, scheduler_config: dict[str, Any], phases: int) -> None:
        """Every K >= 1 lands on its own edges (they are the scheduler's K-step sigmas)."""

    def save_lora_weights(self, pipe: Any, folder: Path, state: dict[str, Tensor]) -> None:
        type(pipe).save_lora_weights(folder, transformer_lora_layers=state, safe_serialization=True)


def phase_terminal_sigma(scheduler_config: Any, phases: int) -> float:
    """The last sigma K stock steps of a phased SD3 student visit: ``shift(1 / K)``, the
    scheduler's time shift ``s u / (1 + (s - 1) u)`` (Esser et al. 2024, eq. 23) of the
    unshifted uniform grid's last point u = 1 / K; saved as the scheduler's
    ``shift_terminal``, which stretches the K shifted sigmas affinely to end there."""
    shift = float(scheduler_config.get("shift", 1.0))
    u = 1.0 / phases
    return shift * u / (1.0 + (shift - 1.0) * u)


#: the one instance, registered in :data:`rectdiff.stable_diffusion.families.FAMILIES`
STABLE_DIFFUSION_3 = StableDiffusion3Family()
