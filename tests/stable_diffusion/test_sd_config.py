"""SDRectifyConfig (defaults, mappings, TOML, the `sd rectify` flags) and the pipeline families."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rectdiff.stable_diffusion import (
    FAMILIES,
    PipelineFamily,
    SDRectifyConfig,
    TextConditionedUNet,
    family_for,
    load_pipeline,
    tokenize,
)
from rectdiff.stable_diffusion import rectify as rectify_module
from rectdiff.stable_diffusion.cli import TINY_FAMILIES, add_sd_parser, main
from rectdiff.stable_diffusion.families import STABLE_DIFFUSION
from rectdiff.stable_diffusion.tiny import TINY

RECTIFY = ["sd", "rectify", "--pipeline", "p", "--pairs", "q", "--out", "o"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rectdiff")
    add_sd_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_config_defaults_are_the_papers_settings():
    config = SDRectifyConfig()
    assert (config.max_steps, config.lr, config.batch_size, config.grad_accum) == (
        1000,
        5e-6,
        16,
        1,
    )
    assert (config.loss, config.weight_decay, config.grad_clip) == ("pseudo_huber", 1e-3, 1.0)
    assert (config.ema, config.ema_decay, config.lora_rank, config.target_form) == (
        False,
        0.9999,
        None,
        None,
    )
    assert (config.seed, config.checkpoint_every, config.resume, config.num_workers) == (
        0,
        250,  # a resumable run by default (rectdiff's choice, not the paper's)
        True,
        0,
    )
    assert (config.keep_checkpoints, config.log_with) == (2, None)


def test_cli_flag_defaults_are_the_config_defaults():
    args, defaults = parse(RECTIFY), SDRectifyConfig()
    flagged = [f.name for f in dataclasses.fields(SDRectifyConfig) if hasattr(args, f.name)]
    assert set(flagged) == {f.name for f in dataclasses.fields(SDRectifyConfig)} - {
        "grad_clip",
        "resume",  # --fresh / --no-resume
        "verify",  # --no-verify
    }
    for name in flagged:
        assert getattr(args, name) == getattr(defaults, name), name
    assert args.no_resume is False and defaults.resume is True


def test_cli_builds_the_config_from_its_flags(monkeypatch, capsys):
    seen = {}

    def fake_rectify_sd(pipeline, pairs, out, config):
        seen.update(pipeline=pipeline, pairs=pairs, out=out, config=config)
        return rectify_module.RectifyResult(Path(out), [0.5], 3)

    monkeypatch.setattr(rectify_module, "rectify_sd", fake_rectify_sd)
    flags = ["--lora-rank", "8", "--ema", "--no-resume", "--max-steps", "7", "--lr", "1e-4",
             "--target-form", "fm", "--work-dir", "w"]  # fmt: skip
    assert main([*RECTIFY, *flags]) == 0
    assert (seen["pipeline"], seen["pairs"], seen["out"]) == ("p", "q", "o")
    assert seen["config"] == SDRectifyConfig(
        max_steps=7, lr=1e-4, lora_rank=8, ema=True, resume=False, target_form="fm", work_dir="w"
    )
    assert "wrote the rectified pipeline to o (3 steps, last loss 0.5)" in capsys.readouterr().out


def test_every_rectify_flag_sets_its_config_field(monkeypatch):
    """Every field with a flag, given a value other than its default on the command line,
    arrives in the config with that value and type."""
    given = dict(max_steps=7, lr=1e-4, batch_size=3, grad_accum=2, loss="mse", huber_c=0.25,
                 loss_prediction="v", target_form="fm", time_sampler="logit_normal",
                 mixed_precision="bf16", gradient_checkpointing=True, ema=True, ema_decay=0.99,
                 lora_rank=8, lora_alpha=16.0, weight_decay=0.5, warmup_steps=5, seed=9,
                 checkpoint_every=4, work_dir="w", num_workers=2, phases=4,
                 phase_start_mass=0.5, phase_starts="line", cond_dropout=0.25,
                 keep_checkpoints=3,
                 log_with="tensorboard")  # fmt: skip
    fields = {f.name for f in dataclasses.fields(SDRectifyConfig)}
    assert set(given) == fields - {"grad_clip", "resume", "verify"}  # --no-resume, --no-verify
    defaults = SDRectifyConfig()
    assert all(value != getattr(defaults, name) for name, value in given.items())
    flags = []
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    seen = {}

    def fake_rectify_sd(pipeline, pairs, out, config):
        seen["config"] = config
        return rectify_module.RectifyResult(Path(out), [], 0)

    monkeypatch.setattr(rectify_module, "rectify_sd", fake_rectify_sd)
    assert main([*RECTIFY, *flags, "--no-resume", "--no-verify"]) == 0
    config = seen["config"]
    assert config == SDRectifyConfig(**given, resume=False, verify=False)
    assert main([*RECTIFY, *flags, "--fresh", "--no-verify"]) == 0  # rectify's name for it
    assert seen["config"] == config
    for name, value in given.items():
        assert type(getattr(config, name)) is type(value), name


def test_config_from_a_mapping_or_toml_rejects_unknown_keys(tmp_path):
    assert SDRectifyConfig.from_dict({"max_steps": 5, "lora_rank": 4}) == SDRectifyConfig(
        max_steps=5, lora_rank=4
    )
    with pytest.raises(ValueError, match="unknown rectify option 'max_step'.*allowed: max_steps"):
        SDRectifyConfig.from_dict({"max_step": 5})
    path = tmp_path / "sd.toml"
    path.write_text('[rectify]\nmax_steps = 5\nloss = "mse"\nwork_dir = "runs/w"\n')
    config = SDRectifyConfig.from_toml(path, "rectify")
    assert config == SDRectifyConfig(max_steps=5, loss="mse", work_dir="runs/w")
    assert config.to_dict()["work_dir"] == "runs/w" and config.to_dict()["max_steps"] == 5
    path.write_text("[rectify]\nlearning_rate = 1e-4\n")
    with pytest.raises(ValueError, match=r"unknown rectify option 'learning_rate' in .*sd\.toml"):
        SDRectifyConfig.from_toml(path, "rectify")
    with pytest.raises(ValueError, match=r"no \[training\] table"):
        SDRectifyConfig.from_toml(path, "training")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"max_steps": True}, "max_steps must be a positive integer"),
        ({"lora_rank": 0}, "lora_rank must be a positive integer or None"),
        ({"target_form": "ve"}, "target_form must be None"),
        ({"loss_prediction": "score"}, "unknown prediction type 'score'"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"phases": 0}, "phases must be a positive integer, got phases=0"),
        ({"phase_start_mass": 1.0}, r"phase_start_mass must be a number in \[0, 1\), got"),
        ({"phase_starts": "path"}, "phase_starts must be 'trajectory'.*or 'line'.*got"),
        ({"cond_dropout": 1.0}, r"cond_dropout must be a fraction in \[0, 1\), got 1.0"),
        ({"cond_dropout": -0.1}, "cond_dropout must be a fraction"),
    ],
)
def test_config_refuses_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        SDRectifyConfig(**values)


def test_rectify_sd_takes_only_a_config(flow, tmp_path):
    with pytest.raises(TypeError, match="SDRectifyConfig.from_dict"):
        rectify_module.rectify_sd(flow.teacher, flow.pairs, tmp_path / "s", {"max_steps": 2})
    assert not (tmp_path / "s").exists()


def test_registry_holds_the_stable_diffusion_family(flow):
    assert set(FAMILIES) == {
        "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"
    }  # fmt: skip
    assert FAMILIES["StableDiffusionPipeline"] is STABLE_DIFFUSION
    assert all(name == family.pipeline_class for name, family in FAMILIES.items())
    assert TINY_FAMILIES == tuple(TINY)  # the parser's choices, listed without importing torch
    assert {FAMILIES[recipe.pipeline_class] for recipe in TINY.values()} == set(FAMILIES.values())
    assert isinstance(STABLE_DIFFUSION, PipelineFamily)
    assert family_for(flow.teacher) is STABLE_DIFFUSION
    assert family_for(str(flow.student)) is STABLE_DIFFUSION
    pipe = load_pipeline(flow.teacher, with_vae=False)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.vae is None
    assert pipe.safety_checker is None
    assert family_for(pipe) is STABLE_DIFFUSION
    assert STABLE_DIFFUSION.trained_network(pipe) is pipe.unet
    assert STABLE_DIFFUSION.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")


def test_stable_diffusion_conditioning_and_denoiser(flow):
    pipe = load_pipeline(flow.teacher, with_vae=False)
    prompts = ["a red cube", ""]
    cond = STABLE_DIFFUSION.conditioning(pipe, prompts)
    assert list(cond) == list(STABLE_DIFFUSION.cond_keys) == ["input_ids"]
    assert torch.equal(cond["input_ids"], tokenize(pipe.tokenizer, prompts))
    uncond = STABLE_DIFFUSION.unconditional(pipe)
    assert torch.equal(uncond["input_ids"], tokenize(pipe.tokenizer, [""]))
    model = STABLE_DIFFUSION.denoiser(pipe)
    assert isinstance(model, TextConditionedUNet) and model.unet is pipe.unet
    form, prediction = STABLE_DIFFUSION.form(pipe)
    assert prediction == "eps" and type(form).__name__ == "DiscreteVP"
    student = STABLE_DIFFUSION.student_scheduler(pipe.scheduler)
    assert type(student).__name__ == "DDIMScheduler"
    assert (student.config.timestep_spacing, student.config.clip_sample) == ("trailing", False)


def test_unknown_pipeline_class_is_refused_naming_the_supported_ones(flow, tmp_path):
    index = json.loads((flow.teacher / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index | {"_class_name": "FluxPipeline"}))
    for part in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
        (tmp_path / part).mkdir()
    pattern = (
        r"is a FluxPipeline.*supported pipeline classes.*StableDiffusionPipeline, "
        r"StableDiffusionXLPipeline, StableDiffusion3Pipeline"
    )
    with pytest.raises(ValueError, match=pattern) as err:
        load_pipeline(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match=pattern):
        family_for(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="names no pipeline class"):
        family_for(tmp_path)
