"""Evaluation (latent MSE, CLIP score, grid, JSON) and the `rectdiff sd` command line."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from rectdiff import samplers
from rectdiff.stable_diffusion import (
    TextConditionedUNet,
    evaluate,
    load_pipeline,
    pipeline_form,
    sd_time_grid,
    tiny_prompts,
    tokenize,
)
from rectdiff.stable_diffusion.cli import add_sd_parser, main
from rectdiff.stable_diffusion.clip_score import clip_score, preprocess


@pytest.fixture(scope="module")
def tiny_clip(flow, tmp_path_factory):
    """A random tiny CLIPModel with the tiny pipeline's tokenizer, saved like a real one."""
    folder = tmp_path_factory.mktemp("clip")
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
                eos_token_id=513, pad_token_id=513)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(folder)
    load_pipeline(flow.teacher, with_vae=False).tokenizer.save_pretrained(folder)
    return folder


def test_clip_score_is_100_times_clips_own_cosine(tiny_clip):
    images = torch.rand((3, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    prompts = ["a red cube", "a dog", "x"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = (images - mean) / std  # already at the model's 32 x 32: only normalised
    torch.testing.assert_close(preprocess(images, 32, mean.flatten(), std.flatten()), pixels)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip)
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    expected = float((100.0 * cosine.clamp(min=0.0)).mean().detach())
    assert clip_score(images, prompts, tiny_clip) == pytest.approx(expected, rel=1e-5)


def test_evaluate_numbers_grid_and_json(flow, tiny_clip, tmp_path):
    prompts = tiny_prompts("held_out")[:4]
    metrics = evaluate(flow.student, flow.teacher, prompts, tmp_path, steps=(1, 2), num=6,
                       seed=7, batch_size=4, clip_dir=tiny_clip)  # fmt: skip
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    # the teacher's 1-step baseline, recomputed with rectdiff's samplers: DDIM from
    # sigma(1) eps at t = 1 to timestep 0, guidance 5; the reference: the pairs' solve
    teacher = load_pipeline(flow.teacher, with_vae=False)
    form, prediction = pipeline_form(teacher)
    eps = torch.randn((6, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    chosen = [prompts[i % 4] for i in range(6)]
    common = dict(
        form=form, prediction=prediction, guidance=5.0,
        cond={"input_ids": tokenize(teacher.tokenizer, chosen)},
        uncond={"input_ids": tokenize(teacher.tokenizer, [""] * 6)},
    )  # fmt: skip
    model = TextConditionedUNet(teacher.unet, teacher.text_encoder)
    reference = samplers.sample(model, eps, solver="dpmpp_2m",
                                t_grid=sd_time_grid(teacher.scheduler, 25, form), **common)  # fmt: skip
    one_step = samplers.sample(model, eps, solver="ddim", t_grid=[1.0, 0.001], **common)
    expected = float((one_step - reference).square().mean())
    assert metrics["latent_mse"]["teacher"]["1"] == pytest.approx(expected, rel=1e-4)
    assert metrics["reference_variance"] == pytest.approx(float(reference.var()), rel=1e-4)
    # grid: rows reference, teacher 1, 2, student 1, 2; 6 columns
    image = Image.open(metrics["grid"])
    assert image.format == "PNG" and image.size[1] > image.size[0] / 6 * 5 * 0.6
    assert list(metrics["clip_score"]) == [
        "teacher 25",
        "teacher 1",
        "teacher 2",
        "student 1",
        "student 2",
    ]
    assert all(0.0 <= score <= 100.0 for score in metrics["clip_score"].values())
    assert metrics["student"]["guidance"] == 1.0


def test_cli_parses_every_subcommand():
    parser = argparse.ArgumentParser(prog="rectdiff")
    add_sd_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o",
                              "--lora-rank", "8", "--ema", "--target-form", "fm",
                              "--mixed-precision", "bf16"])  # fmt: skip
    assert (args.lora_rank, args.ema, args.target_form, args.lr) == (8, True, "fm", 5e-6)
    assert args.loss == "pseudo_huber" and args.mixed_precision == "bf16"
    args = parser.parse_args(["sd", "eval", "--pipeline", "s", "--teacher", "t", "--prompts",
                              "f.txt", "--steps", "1,2,8"])  # fmt: skip
    assert args.steps == [1, 2, 8] and args.guidance == 1.0
    args = parser.parse_args(["sd", "pairs", "--pipeline", "p", "--prompts", "f", "--num", "9",
                              "--out", "o"])  # fmt: skip
    assert (args.steps, args.guidance, args.solver) == (25, 5.0, "dpmpp_2m")
    with pytest.raises(SystemExit):
        parser.parse_args(["sd", "eval", "--pipeline", "s", "--teacher", "t", "--prompts", "f",
                           "--steps", "0,1"])  # fmt: skip


def test_cli_tiny_then_a_clear_error(tmp_path, capsys):
    assert main(["sd", "tiny", str(tmp_path / "tiny"), "--fit-steps", "0"]) == 0
    assert load_pipeline(tmp_path / "tiny").unet.config.sample_size == 8
    code = main(["sd", "pairs", "--pipeline", str(tmp_path), "--prompts", "p.txt", "--num", "4",
                 "--out", str(tmp_path / "pairs")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "rectdiff sd pairs: error:" in err and "model_index.json" in err
    assert not (tmp_path / "pairs").exists()
