"""The tiny pipeline, loading a pipeline folder, and reading prompt files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rectdiff.stable_diffusion import load_pipeline, pipeline_form, read_prompts
from rectdiff.stable_diffusion.load import vae_scale_factor
from rectdiff.stable_diffusion.tiny import byte_level_vocab, tiny_prompts


def test_tiny_pipeline_has_sd15_schedule_and_shapes(flow):
    pipe = load_pipeline(flow.teacher)
    form, prediction = pipeline_form(pipe)
    # SD 1.5: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, scaled_linear, eps
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    assert prediction == "eps"
    torch.testing.assert_close(form.alphas_cumprod, alphas_cumprod, rtol=1e-6, atol=0.0)
    assert float(form.alpha(1.0)) == pytest.approx(math.sqrt(float(alphas_cumprod[-1])), rel=1e-6)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    config = json.loads((flow.teacher / "scheduler" / "scheduler_config.json").read_text())
    assert "timestep_spacing" not in config and config["beta_schedule"] == "scaled_linear"
    assert vae_scale_factor(flow.teacher) == 8 == pipe.vae_scale_factor
    image = pipe("a red cube", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def test_tiny_tokenizer_is_byte_level_without_merges(flow):
    tokenizer = load_pipeline(flow.teacher, with_vae=False).tokenizer
    vocab = byte_level_vocab()
    assert len(tokenizer) == len(vocab) == 514
    ids = tokenizer("ab c").input_ids
    expected = ["<|startoftext|>", "a", "b</w>", "c</w>", "<|endoftext|>"]
    assert ids == [vocab[token] for token in expected]
    assert tokenizer.model_max_length == 77


def test_tiny_prompt_splits_share_words_not_combinations():
    train, held_out = tiny_prompts("train"), tiny_prompts("held_out")
    assert len(train) == len(held_out) == 32 and not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(tiny_prompts())
    words = lambda prompts: {w for p in prompts for w in p.split()[1:]}  # noqa: E731
    assert words(train) == words(held_out)


def test_load_refuses_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"no model_index\.json") as err:
        load_pipeline(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_pipeline(tmp_path / "missing")


def test_load_names_missing_component(flow, tmp_path):
    (tmp_path / "model_index.json").write_text((flow.teacher / "model_index.json").read_text())
    for part in ("unet", "text_encoder", "tokenizer"):
        (tmp_path / part).mkdir()
    with pytest.raises(ValueError, match="lacks the sub-folder.*scheduler"):
        load_pipeline(tmp_path, with_vae=False)


def test_read_prompts_txt_jsonl_csv(tmp_path):
    (tmp_path / "p.txt").write_text("a red cube\n\n  a blue ball  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red cube", "a blue ball"]
    lines = [{"id": 1, "text": "one"}, {"id": 2, "text": "two, with comma"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(row) for row in lines) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["one", "two, with comma"]
    (tmp_path / "p.csv").write_text('caption,prompt\n"x, y",z\nu,v\n')
    assert read_prompts(tmp_path / "p.csv") == ["x, y", "u"]  # "caption" is tried first
    assert read_prompts(tmp_path / "p.csv", caption_column="prompt") == ["z", "v"]


def test_read_prompts_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.csv").write_text("url,width\nhttp://x,3\n")
    with pytest.raises(ValueError, match="none of the columns caption, text, prompt"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(ValueError, match="no column 'label'"):
        read_prompts(tmp_path / "p.csv", caption_column="label")
    (tmp_path / "p.parquet").write_text("")
    with pytest.raises(ValueError, match=r"allowed: \.txt, \.jsonl, \.csv"):
        read_prompts(tmp_path / "p.parquet")
