"""Conditional Reflow on sklearn's 8x8 digits: labelled pairs train a conditional student.

1. A class-conditional flow-matching teacher (``MLP(dim=64, num_classes=10)`` in
   ``Preconditioned``, flow prediction) is trained on the digits classifier's training split
   (1437 images, labels passed to the model as ``class_labels``).
2. Its dopri5 solve (rtol = atol = 1e-5) maps standard-normal noise to samples, labels cycling
   0..9 over the pairs; the store at ``OUT/pairs`` keeps each pair's label.
3. A copy of the teacher is rectified on that store (flow matching, flow prediction);
   ``rectify`` hands every stored conditioning tensor to the student with its pair.
4. For each class, ``samples_per_class`` samples from one noise draw are classified by the
   digits classifier (``rectdiff.metrics.digits_classifier``, trained on the same split as the
   teacher, images in [-1, 1] = pixel / 8 - 1 like the data; samples are not clipped). The
   accuracy of class c is the fraction of the samples generated for c that it labels c.

Writes ``OUT/results.json``, ``OUT/table.md``, ``OUT/teacher.safetensors``,
``OUT/rectified.safetensors`` and the pair store ``OUT/pairs`` (reused by a re-run only if it
was made by an identical teacher). Run::

    python experiments/reflow_digits_labels.py [--config PATH] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from rectdiff import samplers
from rectdiff.forms import FlowMatching
from rectdiff.io.configs import from_mapping, read_toml
from rectdiff.metrics import (
    classifier_scores,
    digits_classifier,
    digits_train_test,
    frechet_digits_distance,
)
from rectdiff.models import MLP, Preconditioned
from rectdiff.rectify import generate_pairs, rectify
from rectdiff.training import TrainConfig, train

DEFAULT_CONFIG = Path(__file__).with_suffix(".toml")
NUM_CLASSES = 10
PREDICTION = "flow"
#: (results key, table header)
COLUMNS = (
    ("teacher_dopri5", "teacher dopri5"),
    ("teacher_ddim1", "teacher 1-step"),
    ("rectified_ddim1", "rectified 1-step"),
    ("rectified_ddim2", "rectified 2-step"),
)


@dataclass
class NetworkConfig:
    """The MLP (``dim`` = 64, ``num_classes`` = 10) and its ``Preconditioned`` wrapper."""

    hidden: int = 256
    depth: int = 3
    time_embed_dim: int = 64
    sigma_data: float = 0.75
    precondition_output: bool = True


@dataclass
class PairsConfig:
    """``generate_pairs`` settings; ``steps`` = output intervals (1 for an adaptive solver)."""

    num_pairs: int = 12000
    solver: str = "dopri5"
    steps: int = 1
    rtol: float = 1e-5
    atol: float = 1e-5
    shard_size: int = 4000
    batch_size: int = 1000


@dataclass
class EvaluationConfig:
    """Samples per class and the tolerances of the teacher's dopri5 reference solve."""

    samples_per_class: int = 500
    rtol: float = 1e-5
    atol: float = 1e-5


@dataclass
class ExperimentConfig:
    seed: int = 0
    threads: int = 1
    network: NetworkConfig = field(default_factory=NetworkConfig)
    teacher: TrainConfig = field(default_factory=TrainConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    reflow: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    quick: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any], quick: bool = False) -> ExperimentConfig:
        """Build from a TOML mapping; with ``quick`` the ``[quick]`` tables replace values."""
        values = copy.deepcopy(values)
        if quick:
            for key, override in values.get("quick", {}).items():
                if isinstance(override, dict):
                    values[key] = {**values.get(key, {}), **override}
                else:
                    values[key] = override
        sections = {
            "network": NetworkConfig,
            "pairs": PairsConfig,
            "evaluation": EvaluationConfig,
        }
        for key, section in sections.items():
            values[key] = from_mapping(section, values.get(key, {}), where=f"in [{key}]")
        for key in ("teacher", "reflow"):
            values[key] = TrainConfig.from_dict(values.get(key, {}))
        return from_mapping(cls, values, what="setting")

    @classmethod
    def from_toml(cls, path: str | Path, quick: bool = False) -> ExperimentConfig:
        return cls.from_dict(read_toml(path), quick=quick)


def build_teacher(config: NetworkConfig, form: FlowMatching, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = MLP(
        dim=64, hidden=config.hidden, depth=config.depth,
        time_embed_dim=config.time_embed_dim, num_classes=NUM_CLASSES,
    )  # fmt: skip
    net.sample_shape = (1, 8, 8)
    return Preconditioned(
        net, form, sigma_data=config.sigma_data,
        output_prediction=PREDICTION if config.precondition_output else None,
    )  # fmt: skip


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def make_pairs(
    teacher: nn.Module, form: FlowMatching, config: ExperimentConfig, out: Path
) -> tuple[Path, Tensor]:
    """Labelled pairs from the teacher's solve in ``out``; returns the folder and the labels."""
    pairs = config.pairs
    labels = torch.arange(pairs.num_pairs) % NUM_CLASSES
    description = f"conditional digits teacher, weights sha256 {weights_digest(teacher)}"
    expected = {
        "model_description": description, "num_pairs": pairs.num_pairs, "solver": pairs.solver,
        "steps": pairs.steps, "shard_size": pairs.shard_size, "seed": config.seed,
        "solver_options": {"rtol": pairs.rtol, "atol": pairs.atol},
    }  # fmt: skip
    manifest = out / "manifest.json"
    if manifest.is_file():  # a store from another teacher or settings: made afresh
        stored = json.loads(manifest.read_text())["settings"]
        if any(stored.get(key) != value for key, value in expected.items()):
            shutil.rmtree(out)
    generate_pairs(
        teacher, form=form, prediction=PREDICTION, num_pairs=pairs.num_pairs, out=out,
        solver=pairs.solver, steps=pairs.steps, shard_size=pairs.shard_size, seed=config.seed,
        batch_size=pairs.batch_size, solver_options={"rtol": pairs.rtol, "atol": pairs.atol},
        cond_fn=lambda shard, indices: {"class_labels": labels[indices]},
        model_description=description,
    )  # fmt: skip
    return out, labels


def per_class_accuracy(samples: Tensor, labels: Tensor) -> list[float]:
    """Fraction of the samples of each class c that the digits classifier labels c."""
    classifier = digits_classifier()
    with torch.no_grad():
        predicted = torch.cat([classifier(b.float()).argmax(1) for b in samples.split(1024)])
    hits = (predicted == labels).double()
    return [float(hits[labels == c].mean()) for c in range(NUM_CLASSES)]


def evaluate(
    teacher: nn.Module,
    rectified: nn.Module,
    form: FlowMatching,
    config: ExperimentConfig,
    held_out: Tensor,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Every column's scores from one noise draw, and the teacher's dopri5 NFE.

    Per column: per-class accuracy; over all classes: the Frechet digits distance to the
    held-out digits, the classifier's confidence and the RMS distance (per pixel) to the
    teacher's dopri5 sample from the same noise and label.
    """
    evaluation = config.evaluation
    labels = torch.arange(NUM_CLASSES).repeat_interleave(evaluation.samples_per_class)
    generator = torch.Generator().manual_seed(config.seed + 1)  # not the pairs' noise
    eps = torch.randn(len(labels), 1, 8, 8, generator=generator)
    common = {"form": form, "prediction": PREDICTION, "cond": {"class_labels": labels}}
    reference = samplers.sample(
        teacher, eps, solver="dopri5", steps=1, rtol=evaluation.rtol, atol=evaluation.atol,
        return_trajectory=True, **common,
    )  # fmt: skip
    samples = {
        "teacher_dopri5": reference.sample,
        "teacher_ddim1": samplers.sample(teacher, eps, solver="ddim", steps=1, **common),
        "rectified_ddim1": samplers.sample(rectified, eps, solver="ddim", steps=1, **common),
        "rectified_ddim2": samplers.sample(rectified, eps, solver="ddim", steps=2, **common),
    }
    classifier = digits_classifier()
    scores = {
        key: {
            "accuracy": per_class_accuracy(x, labels),
            "frechet": frechet_digits_distance(x, held_out, classifier),
            "confidence": classifier_scores(x, classifier)["confidence"],
            "rms_to_dopri5": float((x - reference.sample).square().mean().sqrt()),
        }
        for key, x in samples.items()
    }
    return scores, reference.nfe


#: the rows below the accuracy table: (label, score key, format)
SUMMARY_ROWS = (
    ("Frechet digits distance to 360 held-out digits", "frechet", ".1f"),
    ("classifier confidence", "confidence", ".3f"),
    ("RMS distance to teacher dopri5 sample (same noise)", "rms_to_dopri5", ".3f"),
)


def table(scores: dict[str, dict[str, Any]], nfe: int) -> str:
    """The Markdown table: a row per class and the mean (accuracy in percent), then the
    :data:`SUMMARY_ROWS` over all classes together."""
    headers = [
        f"{title} ({nfe} NFE)" if key == "teacher_dopri5" else title for key, title in COLUMNS
    ]
    accuracy = {key: scores[key]["accuracy"] for key, _ in COLUMNS}
    lines = [
        "| class | " + " | ".join(headers) + " | rectified 1-step - teacher dopri5 |",
        "|---" + "|---:" * (len(COLUMNS) + 1) + "|",
    ]
    rows = [(str(c), c) for c in range(NUM_CLASSES)] + [("**mean**", None)]
    for name, c in rows:
        values = [_at(accuracy[key], c) for key, _ in COLUMNS]
        gap = _at(accuracy["rectified_ddim1"], c) - _at(accuracy["teacher_dopri5"], c)
        cells = [f"{100 * v:.1f}" for v in values] + [f"{100 * gap:+.1f}"]
        if c is None:
            cells = [f"**{cell}**" for cell in cells]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, metric, spec in SUMMARY_ROWS:
        cells = [format(scores[key][metric], spec) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " | |")
    return "\n".join(lines) + "\n"


def _at(values: list[float], c: int | None) -> float:
    return sum(values) / len(values) if c is None else values[c]


def run(config: ExperimentConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """The whole workflow into ``out``; returns what ``results.json`` holds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    form = FlowMatching()
    times: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = round(now - clock, 2)
        clock = now

    digits_classifier()  # trained once and cached; not part of any timed stage
    lap("classifier")
    # the classifier's split: train the teacher on its training part, compare with the rest
    x_train, labels_train, x_test, _ = digits_train_test(seed=0)
    teacher = build_teacher(config.network, form, config.seed)
    trained = train(
        teacher, (x_train, labels_train), form=form, prediction=PREDICTION,
        config=config.teacher, progress=progress,
    )  # fmt: skip
    teacher = trained.model
    lap("teacher")
    pairs_dir, pair_labels = make_pairs(teacher, form, config, out / "pairs")
    lap("pairs")
    student = copy.deepcopy(teacher)
    reflowed = rectify(
        student, pairs_dir, form=form, prediction=PREDICTION, config=config.reflow,
        progress=progress,
    )  # fmt: skip
    rectified = reflowed.model
    lap("reflow")
    scores, nfe = evaluate(teacher, rectified, form, config, x_test)
    lap("evaluation")
    times["total"] = round(time.perf_counter() - start, 2)

    save_model(teacher, str(out / "teacher.safetensors"))
    save_model(rectified, str(out / "rectified.safetensors"))
    markdown = table(scores, nfe)
    accuracy = {key: value["accuracy"] for key, value in scores.items()}
    mean = {key: _at(values, None) for key, values in accuracy.items()}
    gaps = [
        r - t for r, t in zip(accuracy["rectified_ddim1"], accuracy["teacher_dopri5"], strict=True)
    ]
    results = {
        "accuracy": accuracy,
        "mean_accuracy": mean,
        "rectified_1step_minus_teacher_dopri5": {
            "mean": mean["rectified_ddim1"] - mean["teacher_dopri5"],
            "worst_class": min(gaps),
        },
        **{
            metric: {key: value[metric] for key, value in scores.items()}
            for _, metric, _ in SUMMARY_ROWS
        },
        "teacher_dopri5_nfe": nfe,
        "classifier_heldout_accuracy": digits_classifier().heldout_accuracy,
        "final_loss": {"teacher": trained.losses[-1], "reflow": reflowed.losses[-1]},
        "pair_labels_per_class": torch.bincount(pair_labels, minlength=NUM_CLASSES).tolist(),
        "seconds": times,
        "threads": torch.get_num_threads(),
        "config": _jsonable(config),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(markdown)
    return results


def _jsonable(config: ExperimentConfig) -> dict[str, Any]:
    values = asdict(config)
    for key in ("teacher", "reflow"):
        values[key] = getattr(config, key).to_dict()
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the experiment's TOML")
    parser.add_argument("--out", default="out/reflow_digits_labels", help="output folder")
    parser.add_argument("--quick", action="store_true", help="apply the [quick] overrides")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (else config)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    config = ExperimentConfig.from_toml(args.config, quick=args.quick)
    torch.set_num_threads(args.threads or config.threads)
    results = run(config, args.out, progress=not args.no_progress)
    print(Path(args.out, "table.md").read_text(), end="")
    gap = results["rectified_1step_minus_teacher_dopri5"]
    print(
        f"rectified 1-step - teacher dopri5: mean {100 * gap['mean']:+.1f} points, worst class "
        f"{100 * gap['worst_class']:+.1f}; {results['seconds']['total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items() if k != 'total')})"
    )
    return results


if __name__ == "__main__":
    main()
