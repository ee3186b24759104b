"""`rectdiff sd rectify --phases K`: phased rectification of the tiny pipeline, a student that
stock diffusers samples in exactly K DDIM-trailing steps on the window edges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rectdiff import samplers
from rectdiff.rectify import phase_edges
from rectdiff.stable_diffusion import (
    TextConditionedUNet,
    evaluate,
    pipeline_form,
    tiny_prompts,
    tokenize,
)
from rectdiff.stable_diffusion.cli import main
from rectdiff.stable_diffusion.rectify import load_record

PHASES = 4
#: the phased student's training (its window couplings: every pair of the shared store in
#: every window, solved by the teacher at the pairs' guidance)
STEPS, LR, BATCH = 200, 2e-3, 32


@pytest.fixture(scope="module")
def phased(flow, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd_phased") / "student"
    code = main(["sd", "rectify", "--pipeline", str(flow.teacher), "--pairs", str(flow.pairs),
                 "--out", str(out), "--phases", str(PHASES), "--max-steps", str(STEPS),
                 "--lr", str(LR), "--batch-size", str(BATCH), "--loss", "mse", "--ema",
                 "--ema-decay", "0.98", "--time-sampler", "u_shaped"])  # fmt: skip
    assert code == 0
    return out


#: loads a student folder with stock diffusers where importing rectdiff fails, samples K steps
STOCK_K_STEPS = r"""
import sys
sys.modules["rectdiff"] = None  # before anything: `import rectdiff` now raises ImportError
import torch
from diffusers import StableDiffusionPipeline

folder, given, out = sys.argv[1:4]
inputs = torch.load(given)
pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
latents = pipe(inputs["prompts"], latents=inputs["latents"], num_inference_steps=inputs["steps"],
               guidance_scale=1.0, output_type="latent").images
loaded = sorted(name for name, module in sys.modules.items()
                if name.startswith("rectdiff") and module is not None)
torch.save({"latents": latents, "timesteps": pipe.scheduler.timesteps.tolist(),
            "rectdiff": loaded}, out)
"""


def test_stock_k_steps_are_rectdiffs_ddim_steps_on_the_window_edges(flow, phased, tmp_path):
    """Stock diffusers alone (rectdiff not importable) samples the student in 4 steps at
    timesteps 999, 749, 499, 249 and then to sigma = 0: rectdiff's 4 DDIM steps on
    ``phase_edges(form, 4, "timesteps")`` from the same start, to 1e-4."""
    record = load_record(phased)
    assert record["phases"] == PHASES and record["steps"] == STEPS
    assert record["phase_edges"]["timesteps"] == [999, 749, 499, 249]
    assert record["sample_with"] == {"num_inference_steps": PHASES, "guidance_scale": 1.0}
    assert record["window_solver"]["guidance"] == flow.pair_guidance
    assert record["window_solver"]["starts"] == "trajectory"
    assert record["training"]["loss"] == "mse" and record["training"]["time_sampler"] == "u_shaped"
    pipe = StableDiffusionPipeline.from_pretrained(phased, local_files_only=True)
    form, prediction = pipeline_form(pipe)
    edges = phase_edges(form, PHASES, "timesteps")
    assert edges.tolist() == pytest.approx(record["phase_edges"]["t"], abs=0.0)
    prompts = tiny_prompts("held_out")[:6]
    eps = torch.randn((6, 4, 8, 8), generator=torch.Generator().manual_seed(99))
    start = float(form.sigma(edges[0])) * eps  # diffusers' init_noise_sigma is 1
    torch.save({"prompts": prompts, "latents": start, "steps": PHASES}, tmp_path / "given.pt")
    done = subprocess.run(
        [sys.executable, "-c", STOCK_K_STEPS, str(phased), str(tmp_path / "given.pt"),
         str(tmp_path / "out.pt")],
        env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["rectdiff"] == [] and theirs["timesteps"] == [999, 749, 499, 249]
    ours = samplers.sample(
        TextConditionedUNet(pipe.unet, pipe.text_encoder), eps, form=form,
        prediction=prediction, solver="ddim", t_grid=edges,
        cond={"input_ids": tokenize(pipe.tokenizer, prompts)},
    )  # fmt: skip
    diff = float((theirs["latents"] - ours).abs().max())
    print(f"\nstock 4 steps vs rectdiff's 4 DDIM steps on the edges: max |diff| {diff:.3g}")
    assert diff < 1e-4


def test_phased_student_beats_the_teachers_own_k_steps(flow, phased, tmp_path):
    """Held-out noise and prompts, latent MSE to the teacher's 25-step latents (``sd eval``)
    at 4 steps. Measured (``experiments/sd/phased_families.py``, these settings): phased
    student 0.0622, the teacher's own 4 DDIM-trailing steps 0.128: ratio 0.485, under the
    issue's 0.5x (0.487 with windows starting on the pairs' lines; with
    ``phase_start_mass`` = 0: 0.54; the plain student of the shared flow reaches 0.87 at 4
    steps). The test budget is 200 steps with the EMA and the u-shaped time sampler; the
    assertion keeps a margin (0.6) for BLAS differences across machines over 0.485."""
    metrics = evaluate(phased, flow.teacher, tiny_prompts("held_out"), tmp_path, steps=(PHASES,),
                       num=32, batch_size=32)  # fmt: skip
    mse, ratio = metrics["latent_mse"], metrics["ratio"][str(PHASES)]
    print(f"\n4-step latent MSE: phased student {mse['student']['4']:.4g}, teacher "
          f"{mse['teacher']['4']:.4g} (ratio {ratio:.3f})")  # fmt: skip
    assert ratio < 0.6


def test_phases_that_do_not_divide_the_timesteps_are_refused(flow, tmp_path, capsys):
    out = tmp_path / "student"
    code = main(["sd", "rectify", "--pipeline", str(flow.teacher), "--pairs", str(flow.pairs),
                 "--out", str(out), "--phases", "3", "--max-steps", "2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("rectdiff sd rectify: error: phases=3 does not divide the 1000")
    assert not out.exists() and not (tmp_path / "student.train").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert json.loads((flow.pairs / "manifest.json").read_text())["settings"]["num_pairs"] == 256
