"""Stable Diffusion pair generation: agreement with the real pipeline, processes, bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from rectdiff import samplers
from rectdiff.rectify import pairs as couplings
from rectdiff.stable_diffusion import (
    TextConditionedUNet,
    generate_sd_pairs,
    pipeline_form,
    sd_time_grid,
    tiny_prompts,
    tokenize,
)

SMALL = dict(num=24, steps=3, guidance=5.0, batch_size=4, shard_size=8, progress=False)


def folder_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("spacing", [None, "linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 4, 16, 25, 333])
def test_the_pair_grid_starts_at_the_last_training_timestep_for_every_spacing(spacing, steps):
    """Pairs start where the student's DDIM-trailing sampling starts (timestep 999, t = 1):
    a leading-spaced config (SDXL base's Euler, steps_offset 1), whose stock DPM-Solver
    would start 25 steps at timestep 951, is solved on DPM-Solver's trailing timesteps; the
    other spacings keep their own (each already starts at 999)."""
    from diffusers import EulerDiscreteScheduler

    from rectdiff import forms

    extra = {} if spacing is None else {"timestep_spacing": spacing}
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  steps_offset=1, **extra)  # fmt: skip
    scheduler = EulerDiscreteScheduler(**config)
    form = forms.from_diffusers(scheduler)[0]
    grid = sd_time_grid(scheduler, steps, form)
    want_spacing = "trailing" if spacing == "leading" else (spacing or "linspace")
    stock = DPMSolverMultistepScheduler.from_config(scheduler.config, timestep_spacing=want_spacing)
    stock.set_timesteps(steps)
    assert grid[:-1] == [(int(n) + 1) / 1000 for n in stock.timesteps]
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == steps + 1
    if spacing == "leading" and steps == 25:
        as_configured = DPMSolverMultistepScheduler.from_config(scheduler.config)
        as_configured.set_timesteps(steps)
        assert int(as_configured.timesteps[0]) == 951  # what the fix avoids


def test_stored_pairs_are_the_pipelines_own_dpm_solver_latents(flow):
    """x0 of pair i = StableDiffusionPipeline with DPMSolverMultistepScheduler from
    latents = sigma(t_0) eps_i, its prompt, 25 steps, guidance 5 (diffusers' own loop)."""
    store = couplings.PairDataset(flow.pairs)
    rows = [store[i] for i in (0, 1, 70, 255)]
    pipe = StableDiffusionPipeline.from_pretrained(flow.teacher, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    form, _ = pipeline_form(pipe)
    grid = sd_time_grid(pipe.scheduler, flow.pair_steps, form)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == flow.pair_steps + 1
    eps = torch.stack([row["eps"] for row in rows])
    prompts = [row["prompt"] for row in rows]
    assert prompts == [tiny_prompts("train")[i % 32] for i in (0, 1, 70, 255)]
    expected = pipe(
        prompts,
        latents=float(form.sigma(grid[0])) * eps,
        num_inference_steps=flow.pair_steps,
        guidance_scale=flow.pair_guidance,
        output_type="latent",
    ).images
    stored = torch.stack([row["x0"] for row in rows])
    scale = float(expected.abs().max())
    torch.testing.assert_close(stored, expected, rtol=0.0, atol=2e-5 * scale)
    assert store.manifest["settings"]["solver"] == "dpmpp_2m"


def test_rectdiff_solve_from_eps_matches_the_pipeline_from_eps(flow):
    """The same check at the pipeline's own start x = eps: samplers.sample from eps / sigma(t_0)."""
    pipe = StableDiffusionPipeline.from_pretrained(flow.teacher, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    form, prediction = pipeline_form(pipe)
    prompts = ["a white boat", "a black cube", "", "a green tree"]
    eps = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    grid = sd_time_grid(pipe.scheduler, 10, form)
    ours = samplers.sample(
        TextConditionedUNet(pipe.unet, pipe.text_encoder),
        eps / float(form.sigma(grid[0])),
        form=form,
        prediction=prediction,
        solver="dpmpp_2m",
        t_grid=grid,
        cond={"input_ids": tokenize(pipe.tokenizer, prompts)},
        guidance=3.0,
        uncond={"input_ids": tokenize(pipe.tokenizer, [""])},
    )
    theirs = pipe(prompts, latents=eps, num_inference_steps=10, guidance_scale=3.0,
                  output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=2e-5 * float(theirs.abs().max()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_make_the_same_pairs_as_one(flow, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny_prompts("train")[:5]) + "\n")
    one = generate_sd_pairs(flow.teacher, prompts, out=tmp_path / "one", **SMALL)
    args = ["--pipeline", str(flow.teacher), "--prompts", str(prompts), "--out",
            str(tmp_path / "two"), "--num", "24", "--steps", "3", "--guidance", "5.0",
            "--batch-size", "4", "--shard-size", "8"]  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "rectdiff.stable_diffusion.cli", "sd", "pairs", *args]  # fmt: skip
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0's bar counts its own shards 0 and 2 (16 pairs): there really were two processes
    assert "16/16 [" in done.stderr and "24/24 [" not in done.stderr
    two = couplings.load_manifest(tmp_path / "two")
    assert two["complete"] and one.num_shards == 3
    assert two["shards"] == one.manifest["shards"]  # same sha256 per shard, same texts
    assert folder_digest(tmp_path / "two") == folder_digest(one.root)


@pytest.fixture(scope="module")
def small_store(flow, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "pairs"
    generate_sd_pairs(flow.teacher, tiny_prompts("train")[:5], out=out, **SMALL)
    return out


def test_store_of_another_pipeline_is_refused_untouched(flow, small_store):
    before = folder_digest(small_store)
    with pytest.raises(ValueError, match="made by another pipeline") as err:
        generate_sd_pairs(flow.other, tiny_prompts("train")[:5], out=small_store, **SMALL)
    assert "unet files sha256" in str(err.value) and str(flow.other) in str(err.value)
    assert folder_digest(small_store) == before


def test_store_of_another_resolution_is_refused_untouched(flow, small_store):
    before = folder_digest(small_store)
    with pytest.raises(ValueError, match="resolution 64x64 in the store, 32x32 now"):
        generate_sd_pairs(flow.teacher, tiny_prompts("train")[:5], out=small_store,
                          height=32, width=32, **SMALL)  # fmt: skip
    with pytest.raises(ValueError, match="prompts differ"):
        generate_sd_pairs(flow.teacher, tiny_prompts("train")[:6], out=small_store, **SMALL)
    with pytest.raises(ValueError, match="guidance: 5.0 in the manifest, 2.0 now"):
        generate_sd_pairs(flow.teacher, tiny_prompts("train")[:5], out=small_store,
                          **(SMALL | {"guidance": 2.0}))  # fmt: skip
    assert folder_digest(small_store) == before
    # the same settings resume the finished store: nothing regenerated, nothing changed
    generate_sd_pairs(flow.teacher, tiny_prompts("train")[:5], out=small_store, **SMALL)
    assert folder_digest(small_store) == before


def test_bad_inputs_write_nothing(flow, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no prompts"):
        generate_sd_pairs(flow.teacher, tmp_path / "empty.txt", out=tmp_path / "a", **SMALL)
    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(ValueError, match=r"not a diffusers pipeline folder.*model_index\.json"):
        generate_sd_pairs(tmp_path / "not_a_pipeline", ["a red cube"], out=tmp_path / "b", **SMALL)
    with pytest.raises(ValueError, match="height = 60 must be a positive multiple of 8"):
        generate_sd_pairs(flow.teacher, ["a red cube"], out=tmp_path / "c", height=60, **SMALL)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_manifest_records_the_pipeline_identity_and_settings(flow):
    manifest = couplings.load_manifest(flow.pairs)
    settings = manifest["settings"]
    description = json.loads(settings["model_description"])
    assert description["resolution"] == [64, 64] and description["weights_dtype"] == "float32"
    assert set(description["pipeline"]) == {"unet", "text_encoder", "tokenizer", "scheduler"}
    unet_files = sorted(p for p in (flow.teacher / "unet").rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in unet_files:
        digest.update(path.relative_to(flow.teacher / "unet").as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    assert description["pipeline"]["unet"] == digest.hexdigest()
    assert (settings["steps"], settings["guidance"], settings["shape"]) == (25, 5.0, [4, 8, 8])
    assert settings["form"]["family"] == "discrete-vp" and settings["prediction"] == "eps"
