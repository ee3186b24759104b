"""Stable Diffusion 3 (``StableDiffusion3Pipeline``): rectified flow in its own form.

The tiny SD3 teacher, its pairs, a rectified and a phased student are built once per session
(:mod:`_sd3_flow`). Measured on one thread of a busy 2-core machine (load 3.8): the file's
tests 81 s (44 s of it the shared flow, 19 s the stock-diffusers subprocess), 106 s with
pytest's start; 75 s of CPU time in all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _sd3_flow import (
    NUM_PAIRS,
    PAIR_GUIDANCE,
    PAIR_STEPS,
    PHASES,
    RECTIFY_STEPS,
    STOCK_SAMPLING,
    SD3Flow,
    build_flow,
)
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file

from rectdiff import samplers
from rectdiff.rectify import pairs as couplings
from rectdiff.stable_diffusion import (
    SDRectifyConfig,
    generate_sd_pairs,
    load_pipeline,
    pipeline_form,
    rectify_sd,
    tiny_prompts,
)
from rectdiff.stable_diffusion.cli import main
from rectdiff.stable_diffusion.eval import teacher_reference
from rectdiff.stable_diffusion.families import STABLE_DIFFUSION_3, family_for
from rectdiff.stable_diffusion.phased import check_pipeline_phases
from rectdiff.stable_diffusion.rectify import load_record


@pytest.fixture(scope="session")
def sd3(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> SD3Flow:
    base = tmp_path_factory.getbasetemp()
    return build_flow((base if worker_id == "master" else base.parent) / "sd3_flow")


def stock(path, **kwargs):
    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def held_out_noise(n=6, seed=99):
    return torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def first_order_steps(folder, eps, prompts, steps):
    """rectdiff's first-order (Euler) steps of a student folder on its scheduler's sigmas."""
    pipe = load_pipeline(folder, with_vae=False)
    form, prediction = pipeline_form(pipe)
    grid = samplers.scheduler_grid(STABLE_DIFFUSION_3.student_scheduler(pipe.scheduler), form,
                                   steps)  # fmt: skip
    return samplers.sample(
        STABLE_DIFFUSION_3.denoiser(pipe), eps, form=form, prediction=prediction,
        solver="euler", t_grid=grid, cond=STABLE_DIFFUSION_3.conditioning(pipe, prompts),
    ), grid  # fmt: skip


def test_denoiser_encodes_prompts_exactly_as_encode_prompt(sd3):
    """CLIP penultimate states of both encoders, padded to the joint dim, then T5 on the
    sequence axis; pooled = both projections; the unconditional is the encoded empty prompt
    (SD3 does not force zeros)."""
    pipe = stock(sd3.teacher)
    prompts = ["a red cube", "a green tree"]
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, prompts, prompts, do_classifier_free_guidance=True
    )
    model = STABLE_DIFFUSION_3.denoiser(pipe)
    ours, ours_pooled = model.encode(**STABLE_DIFFUSION_3.conditioning(pipe, prompts))
    assert ours.shape == (2, 32 + 256, 64) and ours_pooled.shape == (2, 48)
    torch.testing.assert_close(ours, embeds, rtol=0.0, atol=2e-5)
    torch.testing.assert_close(ours_pooled, pooled, rtol=0.0, atol=2e-5)
    uncond, uncond_pooled = model.encode(**STABLE_DIFFUSION_3.unconditional(pipe))
    torch.testing.assert_close(uncond.expand_as(negative), negative, rtol=0.0, atol=2e-5)
    torch.testing.assert_close(uncond_pooled.expand_as(negative_pooled), negative_pooled,
                               rtol=0.0, atol=2e-5)  # fmt: skip
    assert float(uncond.abs().max()) > 0.1  # not zeros
    form, prediction = pipeline_form(pipe)
    assert (prediction, form.time_scale, form.t_max, form.shift) == ("flow", 1000.0, 1.0, 1.0)


def test_stored_pairs_are_the_stock_pipelines_flow_match_euler_latents(sd3):
    """x0 of pair i = StableDiffusion3Pipeline's own sampler (FlowMatchEuler, shift 3) from
    latents = eps_i (sigma = 1), its prompt, 25 steps, guidance 5."""
    store = couplings.PairDataset(sd3.pairs)
    settings = store.manifest["settings"]
    assert (settings["solver"], settings["steps"], settings["guidance"]) == (
        "euler", PAIR_STEPS, PAIR_GUIDANCE)  # fmt: skip
    rows = [store[i] for i in (0, 1, 70, NUM_PAIRS - 1)]
    assert {"input_ids", "input_ids_2", "input_ids_3"} <= set(rows[0])
    assert rows[0]["input_ids_3"].shape == (256,) and rows[0]["input_ids"].shape == (32,)
    pipe = stock(sd3.teacher)
    expected = pipe([row["prompt"] for row in rows], latents=torch.stack([r["eps"] for r in rows]),
                    num_inference_steps=PAIR_STEPS, guidance_scale=PAIR_GUIDANCE,
                    output_type="latent").images  # fmt: skip
    stored = torch.stack([row["x0"] for row in rows])
    diff = float((stored - expected).abs().max())
    print(f"\npairs vs stock SD3 sampler, 25 steps, guidance 5: max |diff| {diff:.3g}")
    assert diff < 1e-4 and float(expected.abs().max()) > 1.0
    # the pair grid is the scheduler's own shifted sigmas, then 0
    form, _ = pipeline_form(pipe)
    pipe.scheduler.set_timesteps(PAIR_STEPS)
    grid = STABLE_DIFFUSION_3.pair_grid(pipe.scheduler, PAIR_STEPS, form)
    assert grid == pytest.approx(pipe.scheduler.sigmas.tolist(), abs=1e-6)
    # diffusers: unshifted sigmas linspace(1, sigma_min, 25), sigma_min = shift(1/1000),
    # then shifted: shift(s) = 3 s / (1 + 2 s)
    shift = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    second = shift(1.0 - (1.0 - shift(1e-3)) / (PAIR_STEPS - 1))
    assert grid[0] == 1.0 and grid[1] == pytest.approx(second, abs=1e-6)


def test_teacher_reference_matches_the_stock_pipeline_with_and_without_t5(sd3):
    """``eval.teacher_reference`` (the pair solve) = the stock pipeline, to 1e-4, with T5 and
    without it: a folder whose model_index has text_encoder_3/tokenizer_3 null, and the full
    folder loaded with ``text_encoder_3=None`` (the T5 embedding is then zeros)."""
    prompts = ["a white boat", "a black cube", "", "a green tree"]
    eps = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    call = dict(latents=eps, num_inference_steps=10, guidance_scale=5.0, output_type="latent")
    with_t5 = stock(sd3.teacher)
    ours = teacher_reference(with_t5, eps, prompts, steps=10, guidance=5.0)
    torch.testing.assert_close(ours, with_t5(prompts, **call).images, rtol=0.0, atol=1e-4)
    dropped = stock(sd3.teacher, text_encoder_3=None, tokenizer_3=None)
    expected = dropped(prompts, **call).images
    null_folder = load_pipeline(sd3.no_t5, with_vae=False)
    assert null_folder.text_encoder_3 is None and family_for(sd3.no_t5) is STABLE_DIFFUSION_3
    assert "input_ids_3" not in STABLE_DIFFUSION_3.conditioning(null_folder, prompts)
    for pipe in (dropped, null_folder):
        ours = teacher_reference(pipe, eps, prompts, steps=10, guidance=5.0)
        torch.testing.assert_close(ours, expected, rtol=0.0, atol=1e-4)
    assert float((expected - with_t5(prompts, **call).images).abs().max()) > 0.05  # T5 counts


def test_pairs_and_rectify_without_t5(sd3, tmp_path):
    """A no-T5 folder stores only the two CLIP id tensors, and rectifies on them."""
    pairs = generate_sd_pairs(sd3.no_t5, tiny_prompts("train")[:4], 8, tmp_path / "pairs",
                              steps=3, batch_size=8, shard_size=8, progress=False)  # fmt: skip
    assert "input_ids_3" not in pairs[0] and pairs[0]["input_ids_2"].shape == (32,)
    result = rectify_sd(sd3.no_t5, tmp_path / "pairs", tmp_path / "student",
                        SDRectifyConfig(max_steps=2, batch_size=4), progress=False)  # fmt: skip
    assert result.steps == 2 and len(result.losses) == 2
    assert json.loads((result.out_dir / "model_index.json").read_text())["text_encoder_3"] == [
        None, None]  # fmt: skip


def test_student_is_far_closer_to_the_teacher_at_one_two_and_four_steps(sd3, tmp_path):
    """``sd eval`` on held-out noise and prompts: latent MSE to the teacher's 25-step latents,
    student (guidance 1) over the teacher's own few stock steps (guidance 5). Measured:
    ratios 0.060 / 0.060 / 0.38 at 1 / 2 / 4 steps (student 0.106 / 0.104 / 0.065, teacher
    1.77 / 1.73 / 0.170; 32 samples: 0.032 / 0.032 / 0.33). With shift 3 the stock 2-step
    schedule is 1 -> 0.009 -> 0, nearly one step."""
    code = main(["sd", "eval", "--pipeline", str(sd3.student), "--teacher", str(sd3.teacher),
                 "--prompts", str(sd3.prompts), "--out", str(tmp_path), "--num", "16",
                 "--batch-size", "16"])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ratio, mse = metrics["ratio"], metrics["latent_mse"]
    print(f"\nSD3 student/teacher latent MSE ratios: {ratio}; {mse}")
    assert mse["teacher"]["1"] > 1.0
    assert ratio["1"] <= 0.5 and ratio["2"] <= 0.6 and ratio["4"] <= 1.0
    assert (tmp_path / "grid.png").is_file()


def test_record_and_scheduler_of_the_rectified_folder(sd3):
    record = load_record(sd3.student)
    assert record["steps"] == RECTIFY_STEPS and record["prediction"] == "flow"
    assert record["training"]["time_sampler"] == "uniform"
    assert record["pairs_settings"]["solver"] == "euler"
    index = json.loads((sd3.student / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    config = json.loads((sd3.student / "scheduler" / "scheduler_config.json").read_text())
    assert (config["num_train_timesteps"], config["shift"]) == (1000, 3.0)


def test_stock_diffusers_samples_both_students_as_rectdiff_steps(sd3, tmp_path):
    """Stock diffusers alone (rectdiff not importable) loads the student and the phased
    student. The student's one stock step (sigma 1 -> 0) is rectdiff's one Euler step, to
    1e-5; the phased student's 4 stock steps land on the record's window edges and equal
    rectdiff's 4 first-order steps on them, to 1e-4."""
    prompts, eps = tiny_prompts("held_out")[:6], held_out_noise()
    runs = {"one": {"folder": str(sd3.student), "steps": 1},
            "phased": {"folder": str(sd3.phased), "steps": PHASES}}  # fmt: skip
    torch.save({"prompts": prompts, "eps": eps, "runs": runs}, tmp_path / "given.pt")
    done = subprocess.run(
        [sys.executable, "-c", STOCK_SAMPLING, str(tmp_path / "given.pt"), str(tmp_path / "out.pt")],
        env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["rectdiff"] == []
    assert theirs["one"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    ours, grid = first_order_steps(sd3.student, eps, prompts, 1)
    assert grid.tolist() == [1.0, 0.0]
    one = float((theirs["one"]["latents"] - ours).abs().max())
    ours, grid = first_order_steps(sd3.phased, eps, prompts, PHASES)
    phased = float((theirs["phased"]["latents"] - ours).abs().max())
    print(f"\nstock vs rectdiff: 1 step {one:.3g}, phased {PHASES} steps {phased:.3g}")
    assert one < 1e-5 and phased < 1e-4
    record = load_record(sd3.phased)
    assert record["phase_edges"]["t"] == pytest.approx(grid.tolist(), abs=0.0)
    assert record["phase_edges"]["t"] == pytest.approx(theirs["phased"]["sigmas"], abs=1e-6)
    assert record["sample_with"] == {"num_inference_steps": PHASES, "guidance_scale": 1.0}


def test_any_number_of_phases_lands_on_the_stock_schedule(sd3):
    """SD3's edges are the K-step sigmas of the phased student's scheduler (the teacher's
    config with ``shift_terminal``), so no K is refused (SD's DDIM edges need K to divide
    1000), and they are where K stock steps go. Every window is real: the last visited sigma
    is shift(1/K) (3 u / (1 + 2 u) at shift 3: 0.6 for K = 3, 0.5 for K = 4), where the
    teacher's own scheduler visits 0.009 last; at shift 1 the edges are uniform."""
    check_pipeline_phases(sd3.teacher, 3)
    pipe = load_pipeline(sd3.teacher, with_vae=False)
    form, _ = pipeline_form(pipe)
    for phases, last in ((3, 0.6), (4, 0.5)):
        edges = STABLE_DIFFUSION_3.phase_edges(pipe.scheduler, form, phases)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                shift_terminal=last)  # fmt: skip
        scheduler.set_timesteps(phases)
        assert edges.tolist() == pytest.approx(scheduler.sigmas.tolist(), abs=1e-6)
        assert float(edges[-2]) == pytest.approx(last, abs=1e-6)
        student = STABLE_DIFFUSION_3.student_scheduler(pipe.scheduler, phases)
        assert student.config.shift_terminal == pytest.approx(last, rel=1e-12)
    stock = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    stock.set_timesteps(4)
    assert float(stock.sigmas[-2]) < 0.01  # what the teacher's own 4 steps end with
    uniform = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    edges = STABLE_DIFFUSION_3.phase_edges(uniform, form, 4)
    assert edges.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-6)


def test_lora_student_loads_into_the_teacher_and_equals_the_fused_student(sd3, tmp_path):
    config = SDRectifyConfig(max_steps=20, lr=1e-2, batch_size=32, lora_rank=4)
    result = rectify_sd(sd3.teacher, sd3.pairs, tmp_path / "lora_student", config, progress=False)
    keys = load_file(result.lora_dir / "pytorch_lora_weights.safetensors")
    assert keys and all(key.startswith("transformer.") and "lora" in key for key in keys)
    teacher = stock(sd3.teacher)
    prompts, eps = tiny_prompts("held_out")[:6], held_out_noise()
    call = dict(latents=eps, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    before = teacher(prompts, **call).images
    teacher.load_lora_weights(result.lora_dir)
    with_lora = teacher(prompts, **call).images
    fused = stock(result.out_dir)(prompts, **call).images
    assert float((with_lora - before).abs().mean()) > 0.05 * float(before.abs().mean())
    torch.testing.assert_close(with_lora, fused, rtol=0.0, atol=1e-4)


def test_an_sd3_folder_without_its_transformer_is_refused_before_anything_is_written(sd3, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sd3.teacher, broken, ignore=shutil.ignore_patterns("transformer"))
    for call in (
        lambda: generate_sd_pairs(broken, ["a red cube"], 4, tmp_path / "pairs", progress=False),
        lambda: rectify_sd(broken, sd3.pairs, tmp_path / "student", progress=False),
    ):
        with pytest.raises(ValueError, match="lacks the sub-folder\\(s\\) transformer") as err:
            call()
        assert "Stable Diffusion 3" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_sd_diagnose_on_sd3_shows_a_more_first_order_student(sd3, tmp_path):
    """``sd diagnose`` on SD3 latent trajectories (the stock Euler on its shifted sigmas):
    the student's x0-prediction drifts less than the teacher's; y = x/alpha leaves out the
    start, where alpha = 0."""
    from rectdiff.stable_diffusion.diagnose import diagnose_pipelines

    result = diagnose_pipelines(sd3.student, sd3.teacher, tiny_prompts("held_out"), tmp_path,
                                num=8, steps=10)  # fmt: skip
    teacher, student = result["numbers"]["teacher"], result["numbers"]["student"]
    assert student["first_order_deviation"] < 0.8 * teacher["first_order_deviation"], result
    assert result["solver"] == "euler"
    assert (tmp_path / "curvature_t.svg").stat().st_size > 0
