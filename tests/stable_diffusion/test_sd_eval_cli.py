"""Evaluation (latent MSE, CLIP score, grid, JSON) and the `rectdiff sd` command line."""

from __future__ import annotations

import argparse
import json
import shutil

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
from rectdiff.stable_diffusion.eval import decode


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
    # sigma(1) eps at t = 1 to the clean endpoint t = 0 (sigma = 0, where the reference
    # ends: like with like), guidance 5; the reference: the pairs' solve
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
    one_step = samplers.sample(model, eps, solver="ddim", t_grid=[1.0, 0.0], **common)
    expected = float((one_step - reference).square().mean())
    assert metrics["latent_mse"]["teacher"]["1"] == pytest.approx(expected, rel=1e-4)
    assert metrics["reference_variance"] == pytest.approx(float(reference.var()), rel=1e-4)
    # the student's 1 step likewise, unguided, to t = 0
    student = load_pipeline(flow.student)
    student_one_step = samplers.sample(
        TextConditionedUNet(student.unet, student.text_encoder), eps, form=form,
        prediction=prediction, solver="ddim", t_grid=[1.0, 0.0], cond=common["cond"],
    )  # fmt: skip
    expected_student = float((student_one_step - reference).square().mean())
    assert metrics["latent_mse"]["student"]["1"] == pytest.approx(expected_student, rel=1e-4)
    # a student folder saved with SD's set_alpha_to_one=False (stopping at sigma = 0.029) is
    # scored like with like all the same
    legacy = tmp_path / "legacy"
    shutil.copytree(flow.student, legacy)
    config_path = legacy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    assert config["set_alpha_to_one"] is True
    config_path.write_text(json.dumps(config | {"set_alpha_to_one": False}))
    legacy_metrics = evaluate(legacy, flow.teacher, prompts, tmp_path / "legacy_eval", steps=(1,),
                              num=6, seed=7, batch_size=6)  # fmt: skip
    assert legacy_metrics["latent_mse"]["student"]["1"] == pytest.approx(expected_student, rel=1e-4)
    # decoded images have the evaluated resolution; the grid: rows reference, teacher 1, 2,
    # student 1, 2; 6 columns of 1.2 inches (+ 1.4 for the labels), 1.2 inches a row, 100 dpi
    assert metrics["resolution"] == [64, 64]
    decoded = decode(student.vae, student_one_step[:2])
    assert tuple(decoded.shape) == (2, 3, *metrics["resolution"])
    image = Image.open(metrics["grid"])
    assert image.format == "PNG" and image.size == (860, 600)
    assert list(metrics["clip_score"]) == [
        "teacher 25",
        "teacher 1",
        "teacher 2",
        "student 1",
        "student 2",
    ]
    assert all(0.0 <= score <= 100.0 for score in metrics["clip_score"].values())
    assert metrics["student"]["guidance"] == 1.0


class Typed:
    """A value that equals another only when their types agree too."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return type(self.value) is type(other) and self.value == other

    def __repr__(self):
        return f"{self.value!r} ({type(self.value).__name__})"


def test_cli_parses_every_subcommand():
    """Each subcommand's arguments parse to the values given (types included), or to the
    documented defaults when left out."""
    parser = argparse.ArgumentParser(prog="rectdiff")
    add_sd_parser(parser.add_subparsers(dest="command", required=True))

    def parsed(argv: list[str], names: list[str]) -> tuple:
        """The named values with their types: 5 and 5.0 differ."""
        args = parser.parse_args(argv)
        assert (args.command, args.sd_command) == ("sd", argv[1])
        assert args.func.__name__ == f"_cmd_{argv[1]}"
        return tuple(Typed(getattr(args, name)) for name in names)

    tiny = ["dir", "seed", "sample_size", "fit_steps", "family"]
    assert parsed(["sd", "tiny", "d", "--seed", "3", "--sample-size", "16", "--fit-steps", "7",
                   "--family", "sd2"], tiny) == ("d", 3, 16, 7, "sd2")  # fmt: skip
    assert parsed(["sd", "tiny", "d"], tiny) == ("d", 0, 8, 150, "sd15")
    pairs = ["pipeline", "prompts", "num", "out", "steps", "guidance", "solver", "height",
             "width", "batch_size", "shard_size", "seed", "dtype", "caption_column",
             "no_store_eps"]  # fmt: skip
    given = ["sd", "pairs", "--pipeline", "p", "--prompts", "f.jsonl", "--num", "9", "--out",
             "o", "--steps", "7", "--guidance", "2.5", "--solver", "euler", "--height", "32",
             "--width", "48", "--batch-size", "3", "--shard-size", "5", "--seed", "4", "--dtype",
             "float16", "--caption-column", "TEXT", "--no-store-eps"]  # fmt: skip
    assert parsed(given, pairs) == ("p", "f.jsonl", 9, "o", 7, 2.5, "euler", 32, 48, 3, 5, 4,
                                    "float16", "TEXT", True)  # fmt: skip
    assert parsed(given[:10], pairs) == ("p", "f.jsonl", 9, "o", 25, 5.0, None, None,
                                         None, 16, 256, 0, "float32", None, False)  # fmt: skip
    rectify = ["pipeline", "pairs", "out", "lora_rank", "ema", "target_form", "mixed_precision",
               "lr", "loss"]  # fmt: skip
    assert parsed(["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o",
                   "--lora-rank", "8", "--ema", "--target-form", "fm", "--mixed-precision",
                   "bf16"], rectify) == ("p", "q", "o", 8, True, "fm", "bf16", 5e-6,
                                         "pseudo_huber")  # fmt: skip
    evals = ["pipeline", "teacher", "prompts", "out", "steps", "guidance", "teacher_steps",
             "teacher_guidance", "num", "seed", "height", "width", "batch_size", "clip",
             "caption_column", "dtype", "device"]  # fmt: skip
    given = ["sd", "eval", "--pipeline", "s", "--teacher", "t", "--prompts", "f.txt", "--out",
             "e", "--steps", "1,2,8", "--guidance", "1.5", "--teacher-steps", "10",
             "--teacher-guidance", "3.0", "--num", "5", "--seed", "6", "--height", "32",
             "--width", "40", "--batch-size", "2", "--clip", "c", "--caption-column", "TEXT",
             "--dtype", "bfloat16", "--device", "cuda"]  # fmt: skip
    assert parsed(given, evals) == ("s", "t", "f.txt", "e", [1, 2, 8], 1.5, 10, 3.0, 5, 6, 32,
                                    40, 2, "c", "TEXT", "bfloat16", "cuda")  # fmt: skip
    assert parsed(given[:8], evals) == ("s", "t", "f.txt", "out/sd-eval", [1, 2, 4], 1.0, 25,
                                        5.0, 16, 1234, None, None, 8, None, None, "float32",
                                        None)  # fmt: skip
    assert parsed(["sd", "demo", "--out", "d"], ["out"]) == ("d",)
    assert parsed(["sd", "demo"], ["out"]) == ("out/sd-demo",)
    for bad in (["--steps", "0,1"], ["--steps", "1,x"], ["--num", "two"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["sd", "eval", "--pipeline", "s", "--teacher", "t", "--prompts",
                               "f", *bad])  # fmt: skip


def test_cli_tiny_then_a_clear_error(tmp_path, capsys):
    assert main(["sd", "tiny", str(tmp_path / "tiny"), "--fit-steps", "0"]) == 0
    assert load_pipeline(tmp_path / "tiny").unet.config.sample_size == 8
    code = main(["sd", "pairs", "--pipeline", str(tmp_path), "--prompts", "p.txt", "--num", "4",
                 "--out", str(tmp_path / "pairs")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "rectdiff sd pairs: error:" in err and "model_index.json" in err
    assert not (tmp_path / "pairs").exists()
