"""The tiny SD3 flow the SD3 tests share: built once per test session (a file lock lets the
pytest-xdist workers share it), and the stock-diffusers script they run in a subprocess.

teacher (tiny SD3, fitted ``FIT_STEPS``) -> ``NUM_PAIRS`` pairs (``PAIR_STEPS`` stock Euler
steps on the scheduler's shifted sigmas, guidance ``PAIR_GUIDANCE``, the 'train' prompts) ->
a student rectified ``RECTIFY_STEPS`` steps (``sd rectify``) and a phased student
(``sd rectify --phases 4``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from rectdiff.stable_diffusion import build_tiny_pipeline, tiny_prompts
from rectdiff.stable_diffusion.cli import main

FIT_STEPS = 100
NUM_PAIRS = 128
PAIR_STEPS = 25
PAIR_GUIDANCE = 5.0
RECTIFY_STEPS, RECTIFY_LR = 100, 1e-3
PHASES, PHASED_STEPS, PHASED_LR = 4, 60, 2e-3


@dataclass(frozen=True)
class SD3Flow:
    root: Path
    teacher: Path
    no_t5: Path
    pairs: Path
    student: Path
    phased: Path
    prompts: Path  # the held-out prompts, one per line


def without_t5(teacher: Path, out: Path) -> Path:
    """A copy of ``teacher`` without T5: no text_encoder_3/, tokenizer_3/ and both null in
    model_index.json, as SD3 checkpoints are shipped to run without T5."""
    shutil.copytree(teacher, out, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((out / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def _run(args: list[str]) -> None:
    code = main(args)
    assert code == 0, f"rectdiff {' '.join(args)} exited with {code}"


def build_flow(root: Path) -> SD3Flow:
    """The flow under ``root``, built unless ``root/done.json`` says it is there."""
    flow = SD3Flow(root, root / "teacher", root / "no_t5", root / "pairs", root / "student",
                   root / "phased", root / "held_out.txt")  # fmt: skip
    with FileLock(str(root) + ".lock"):
        if (root / "done.json").is_file():
            return flow
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            root.mkdir(parents=True, exist_ok=True)
            build_tiny_pipeline(flow.teacher, seed=0, fit_steps=FIT_STEPS, family="sd3")
            without_t5(flow.teacher, flow.no_t5)
            (root / "train.txt").write_text("\n".join(tiny_prompts("train")) + "\n")
            flow.prompts.write_text("\n".join(tiny_prompts("held_out")) + "\n")
            common = ["--pipeline", str(flow.teacher), "--pairs", str(flow.pairs),
                      "--batch-size", "32"]  # fmt: skip
            _run(["sd", "pairs", "--pipeline", str(flow.teacher), "--prompts",
                  str(root / "train.txt"), "--num", str(NUM_PAIRS), "--out", str(flow.pairs),
                  "--steps", str(PAIR_STEPS), "--guidance", str(PAIR_GUIDANCE),
                  "--batch-size", "32"])  # fmt: skip
            _run(["sd", "rectify", *common, "--out", str(flow.student),
                  "--max-steps", str(RECTIFY_STEPS), "--lr", str(RECTIFY_LR)])  # fmt: skip
            _run(["sd", "rectify", *common, "--out", str(flow.phased), "--phases", str(PHASES),
                  "--max-steps", str(PHASED_STEPS), "--lr", str(PHASED_LR)])  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        (root / "done.json").write_text(json.dumps({"done": True}))
    return flow


#: loads student folders with stock diffusers where importing rectdiff fails and samples each
#: from the given latents in its given number of steps at guidance 1
STOCK_SAMPLING = r"""
import sys
sys.modules["rectdiff"] = None  # before anything: `import rectdiff` now raises ImportError
import torch
from diffusers import StableDiffusion3Pipeline

given, out = sys.argv[1:3]
inputs = torch.load(given)
results = {}
for name, run in inputs["runs"].items():
    pipe = StableDiffusion3Pipeline.from_pretrained(run["folder"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(inputs["prompts"], latents=inputs["eps"], num_inference_steps=run["steps"],
                   guidance_scale=1.0, output_type="latent").images
    results[name] = {"latents": latents, "sigmas": pipe.scheduler.sigmas.tolist(),
                     "scheduler": type(pipe.scheduler).__name__}
results["rectdiff"] = sorted(name for name, module in sys.modules.items()
                             if name.startswith("rectdiff") and module is not None)
torch.save(results, out)
"""
