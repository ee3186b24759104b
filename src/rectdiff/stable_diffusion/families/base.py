"""What rectdiff needs to know about one kind of diffusers text-to-image pipeline.

A :class:`PipelineFamily` answers every question pair generation, rectification and
evaluation ask of a pipeline: which sub-folders it has, how it loads, what conditioning a
pair stores for a prompt (and for the empty prompt of classifier-free guidance), the
denoiser rectdiff calls as ``model(x_t, model_time, **cond)``, the form and prediction of
the checkpoint's own scheduler, the few-step scheduler a rectified student is saved with,
the LoRA target modules and how LoRA weights are saved. The base class holds what every
diffusers pipeline shares; a family subclasses it for the rest (see :mod:`.sd`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ... import forms

__all__ = ["PipelineFamily", "dpm_solver_grid"]


def dpm_solver_grid(scheduler: Any, steps: int, form: forms.Form) -> list[float]:
    """The checkpoint's DPM-Solver time steps for ``steps`` steps as rectdiff times, then 0.

    ``DPMSolverMultistepScheduler.from_config(scheduler.config).set_timesteps(steps)`` gives
    the integer timesteps n (999, 959, ..., 40 for SD 1.5 at 25 steps); each maps to
    ``t = form.t_from_model_time(n) = (n + 1) / N``, and the solve ends at t = 0.

    The grid always starts at the last training timestep (t = 1), where the student's
    sampling starts (DDIM trailing, timestep 999): a ``"leading"``-spaced config (SDXL base's
    Euler config, ``steps_offset`` 1) would start 25 steps at timestep 951 (t = 0.952) and
    fewer steps lower still (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", sec. 3.3), and pairs, phased windows and the evaluation reference
    would then follow another flow than the one the student samples. Such a config is solved
    with ``timestep_spacing="trailing"`` (999, 959, ..., 39 at 25 steps); the other spacings
    already start at 999 (a config without the key, SD 1.5's and SD 2.x's, takes
    DPM-Solver's default ``"linspace"``: 999, 959, ..., 40).
    """
    from diffusers import DPMSolverMultistepScheduler

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    limit = int(scheduler.config.get("num_train_timesteps", 1000))
    if steps > limit:  # the grid picks integer timesteps: there are no more than this many
        raise ValueError(
            f"steps = {steps}: more than the checkpoint's {limit} training timesteps, from "
            f"which the DPM-Solver grid picks its steps; allowed: 1 to {limit}."
        )
    dpm = DPMSolverMultistepScheduler.from_config(scheduler.config)
    if dpm.config.timestep_spacing == "leading":  # set in the file (a default is not passed on)
        dpm = DPMSolverMultistepScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    dpm.set_timesteps(steps)
    times = form.t_from_model_time(dpm.timesteps.to(torch.float64))
    return [float(t) for t in times] + [0.0]


def _clipped_zero_snr_betas(scheduler: Any) -> list[float]:
    """The betas of the table :func:`rectdiff.forms.from_diffusers` reads off ``scheduler``:
    for a zero-terminal-SNR config, ``alphas_cumprod[-1]`` clipped to ``2**-24`` as
    diffusers' Euler and DPM-Solver schedulers clip it."""
    acp = forms.from_diffusers(scheduler)[0].alphas_cumprod
    previous = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    return (1.0 - acp / previous).tolist()


class PipelineFamily:
    """One kind of pipeline, named by its ``model_index.json`` ``_class_name``.

    Attributes:
        pipeline_class: the diffusers pipeline class name (the registry key).
        title: how messages name it, e.g. ``"Stable Diffusion"``.
        network: the pipeline attribute holding the trained network (``"unet"``).
        required_parts: the sub-folders besides ``vae/`` that pair generation needs.
        optional_parts: components the pipeline runs without (SD3's T5 ``text_encoder_3``,
            ``tokenizer_3``): loaded as None where the folder lacks them or its
            ``model_index.json`` names none; none by default.
        identity_parts: the parts whose files determine the generated latents (their sha256
            is the pipeline's fingerprint in a pair store).
        cond_keys: the tensors a pair stores as its conditioning (the denoiser's keywords).
        optional_cond_keys: those of ``cond_keys`` that only some pipelines of the family
            store (SD3's T5 ids ``input_ids_3``, absent without a T5 encoder); none by default.
        lora_targets: the module names a LoRA adapts.
        pair_solver: the rectdiff solver pairs and references are made with by default (the
            pipeline's own sampler: ``dpmpp_2m`` for the DDPM families).
    """

    pipeline_class: str = ""
    title: str = ""
    network: str = "unet"
    required_parts: tuple[str, ...] = ()
    optional_parts: tuple[str, ...] = ()
    identity_parts: tuple[str, ...] = ()
    cond_keys: tuple[str, ...] = ()
    optional_cond_keys: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ()
    pair_solver: str = "dpmpp_2m"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline_class})"

    def load_options(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` keywords of this family (none by default)."""
        return {}

    def load(self, root: Path, dtype: torch.dtype, with_vae: bool = True) -> Any:
        """``DiffusionPipeline.from_pretrained(root, torch_dtype=dtype, local_files_only=True)``
        with :meth:`load_options`, no VAE unless ``with_vae``, progress bars off.

        ``root`` is a checked pipeline folder of this family (see
        :func:`rectdiff.stable_diffusion.load.check_pipeline_dir`).
        """
        from diffusers import DiffusionPipeline

        extra: dict[str, Any] = {} if with_vae else {"vae": None}
        if self.optional_parts:
            index = json.loads((Path(root) / "model_index.json").read_text())
            extra |= {part: None for part in self.optional_parts
                      if index.get(part) in (None, [None, None]) or not (root / part).is_dir()}  # fmt: skip
        with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(
                root, torch_dtype=dtype, local_files_only=True, **self.load_options(), **extra
            )
        if type(pipe).__name__ != self.pipeline_class:
            raise ValueError(
                f"{str(root)!r} loaded as a {type(pipe).__name__}, not a {self.pipeline_class}."
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def trained_network(self, pipe: Any) -> nn.Module:
        """The network rectification retrains (``pipe.unet`` for a UNet pipeline)."""
        return getattr(pipe, self.network)

    def form(self, pipe: Any) -> tuple[forms.Form, str]:
        """The form and prediction type of the checkpoint's own scheduler config."""
        return forms.from_diffusers(pipe.scheduler)

    def pair_grid(self, scheduler: Any, steps: int, form: forms.Form) -> list[float]:
        """The times the pair solve visits in ``steps`` steps, ending at t = 0: by default the
        checkpoint's DPM-Solver timesteps (:func:`dpm_solver_grid`)."""
        return dpm_solver_grid(scheduler, steps, form)

    def conditioning(self, pipe: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
        """What a pair stores for each prompt: the denoiser's keyword tensors, batch first."""
        raise NotImplementedError

    def unconditional(self, pipe: Any) -> dict[str, Tensor]:
        """The conditioning of classifier-free guidance's empty prompt, a batch of one."""
        return self.conditioning(pipe, [""])

    def denoiser(self, pipe: Any) -> nn.Module:
        """``model(x_t, model_time, **conditioning) -> prediction`` around the pipeline's
        network and its frozen encoders."""
        raise NotImplementedError

    def student_scheduler(self, teacher_scheduler: Any, phases: int = 1) -> Any:
        """``DDIMScheduler`` on the teacher's schedule with trailing spacing (first step at
        the last training timestep, as one-step sampling needs), ``set_alpha_to_one=True``
        (the last step lands on the clean endpoint, sigma = 0, where the pairs' latents are;
        SD's own ``False`` would stop at timestep 0, sigma = 0.029) and no x0 clipping
        (latents are unbounded).

        A zero-terminal-SNR schedule (``rescale_betas_zero_snr``) is saved as the
        ``trained_betas`` of its table with ``alphas_cumprod[999]`` clipped to ``2**-24``:
        stock DDIM would keep it exactly 0 (its step from timestep 999 is then ``x0 = -v``),
        where diffusers' Euler and DPM-Solver, rectdiff's form and so the rectified student's
        training all use ``2**-24``; the saved DDIM then steps on the same table as they do.

        ``phases`` (a phased student's K) does not change it: K trailing steps land on the
        window edges."""
        from diffusers import DDIMScheduler

        config = teacher_scheduler.config
        zero_snr = {}
        if config.get("rescale_betas_zero_snr", False):
            zero_snr = {
                "trained_betas": _clipped_zero_snr_betas(teacher_scheduler),
                "rescale_betas_zero_snr": False,
            }
        return DDIMScheduler.from_config(
            config,
            timestep_spacing="trailing",
            clip_sample=False,
            set_alpha_to_one=True,
            **zero_snr,
        )

    def phase_edges(self, scheduler: Any, form: forms.Form, phases: int) -> Tensor:
        """The K + 1 window edges of phased rectification, from the sampling start to t = 0:
        where K stock steps of :meth:`student_scheduler` land. By default SD's DDIM-trailing
        timesteps (:func:`rectdiff.stable_diffusion.phased.sd_phase_edges`)."""
        from ..phased import sd_phase_edges

        return sd_phase_edges(form, phases)

    def check_phases(self, scheduler_config: dict[str, Any], phases: int) -> None:
        """Refuse, before anything is loaded, a K whose K stock steps miss the window edges:
        by default one that does not divide ``num_train_timesteps`` (a config without it is
        left to :meth:`phase_edges`).

        Raises:
            ValueError: naming K.
        """
        from ..phased import check_phases

        try:
            n = int(scheduler_config["num_train_timesteps"])
        except (KeyError, TypeError, ValueError):
            return
        check_phases(phases, n)

    def save_lora_weights(self, pipe: Any, folder: Path, state: dict[str, Tensor]) -> None:
        """Write the network's LoRA ``state`` (diffusers naming) so that
        ``pipe.load_lora_weights(folder)`` loads it."""
        raise NotImplementedError
