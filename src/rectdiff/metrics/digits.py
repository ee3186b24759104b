"""A small classifier for sklearn's 8x8 digits, trained once and cached: the feature space
of the digits Frechet distance and the judge of generated digits.

:class:`DigitsClassifier` (two 3x3 convolutions, a 64-d feature layer, a linear head) is
trained deterministically on a seeded 80% split of ``sklearn.datasets.load_digits`` (about
99% held-out accuracy in a few seconds on CPU) and cached as a safetensors file. Its
penultimate features stand in for Inception's in the FID formula
(:func:`rectdiff.metrics.frechet_digits_distance`); its softmax gives confidence and class
coverage of samples (:func:`classifier_scores`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..io.files import atomic_path

__all__ = [
    "DigitsClassifier",
    "digits_train_test",
    "train_digits_classifier",
    "digits_classifier",
    "digits_features",
    "classifier_scores",
]

ArrayLike = Tensor | np.ndarray

_CLASSIFIER_VERSION = 1
_LOADED_CLASSIFIERS: dict[Path, DigitsClassifier] = {}


class DigitsClassifier(nn.Module):
    """CNN for 8x8 digits in [-1, 1] of shape (N, 1, 8, 8) or (N, 64).

    Two 3x3 convolutions and a max-pool, then a 64-d ReLU feature layer (``features``, the
    space of the Frechet distance) and a linear head to 10 logits (``forward``).
    """

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)
        self.heldout_accuracy = float("nan")

    def features(self, x: Tensor) -> Tensor:
        if x.shape[1:] not in ((1, 8, 8), (64,), (8, 8)):
            raise ValueError(
                f"digits must have shape (N, 1, 8, 8) or (N, 64), got {tuple(x.shape)}."
            )
        return self.body(x.reshape(-1, 1, 8, 8))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def save(self, path: str | Path) -> None:
        """Write weights and metadata as safetensors, via a temporary file then a rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "version": str(_CLASSIFIER_VERSION),
            "heldout_accuracy": repr(self.heldout_accuracy),
        }
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp, metadata)

    @classmethod
    def load(cls, path: str | Path) -> DigitsClassifier:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("version") != str(_CLASSIFIER_VERSION):
            raise ValueError(
                f"{path} holds digits-classifier version {metadata.get('version')}, this code "
                f"expects {_CLASSIFIER_VERSION}; delete the file and it will be retrained."
            )
        model = cls()
        model.load_state_dict(load_file(str(path)))
        model.heldout_accuracy = float(metadata["heldout_accuracy"])
        return model.eval()


def digits_train_test(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's ``load_digits`` as (x_train, labels_train, x_test, labels_test).

    Images are (N, 1, 8, 8) float32 scaled from 0..16 to [-1, 1] (x / 8 - 1); a seeded
    permutation holds out 20% (360 of 1797) as the test split.
    """
    from sklearn.datasets import load_digits  # on use: sklearn takes 2 s to import

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return images[train], labels[train], images[test], labels[test]


def train_digits_classifier(
    seed: int = 0, epochs: int = 20, batch_size: int = 128
) -> DigitsClassifier:
    """Train :class:`DigitsClassifier` on the train split (Adam, lr 2e-3), deterministically.

    The held-out accuracy is stored on the model (``heldout_accuracy``) and in its file.
    """
    x_train, labels_train, x_test, labels_test = digits_train_test(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster and machine-independent
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(x_train), generator=generator).split(batch_size):
                loss = nn.functional.cross_entropy(model(x_train[batch]), labels_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(num_threads)
    model.eval()
    with torch.no_grad():
        predicted = model(x_test).argmax(1)
    model.heldout_accuracy = float((predicted == labels_test).float().mean())
    return model


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rectdiff"


def digits_classifier(cache_dir: str | Path | None = None, seed: int = 0) -> DigitsClassifier:
    """The trained digits classifier: from memory, else from its cache file, else trained
    (a few seconds on CPU) and saved as ``digits_classifier_v<V>_seed<seed>.safetensors`` in
    ``cache_dir`` (default ``$XDG_CACHE_HOME/rectdiff``, else ``~/.cache/rectdiff``).
    """
    path = (
        _cache_dir(cache_dir) / f"digits_classifier_v{_CLASSIFIER_VERSION}_seed{seed}.safetensors"
    )
    path = path.expanduser().resolve()
    if path not in _LOADED_CLASSIFIERS:
        if path.exists():
            model = DigitsClassifier.load(path)
        else:
            model = train_digits_classifier(seed)
            model.save(path)
        _LOADED_CLASSIFIERS[path] = model
    return _LOADED_CLASSIFIERS[path]


def _evaluate(samples: ArrayLike, classifier: DigitsClassifier | None, probs: bool) -> Tensor:
    """Features, or softmax probabilities if ``probs``, in CPU batches of 1024."""
    model = classifier if classifier is not None else digits_classifier()
    x = torch.as_tensor(samples).detach().to("cpu", torch.float32)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"need a batch of digits (N, 1, 8, 8) with N >= 1, got {tuple(x.shape)}.")
    with torch.no_grad():
        if probs:
            return torch.cat([model(batch).softmax(1) for batch in x.split(1024)])
        return torch.cat([model.features(batch) for batch in x.split(1024)])


def digits_features(samples: ArrayLike, classifier: DigitsClassifier | None = None) -> Tensor:
    """(N, 64) penultimate features of ``classifier`` (default: :func:`digits_classifier`)."""
    return _evaluate(samples, classifier, probs=False)


def classifier_scores(
    samples: ArrayLike, classifier: DigitsClassifier | None = None
) -> dict[str, float]:
    """What the digits classifier thinks of samples.

    ``confidence``: mean over samples of the max softmax probability (1 = every sample is a
    confident digit). ``class_entropy``: entropy in nats of the histogram of predicted classes
    (log 10 = 2.303 for perfectly balanced classes, 0 when all samples are one digit).
    ``class_coverage``: fraction of the 10 classes predicted at least once.
    """
    probs = _evaluate(samples, classifier, probs=True).double()
    histogram = torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)
    nonzero = histogram[histogram > 0]
    return {
        "confidence": float(probs.max(1).values.mean()),
        "class_entropy": float(-(nonzero * nonzero.log()).sum()),
        "class_coverage": float((histogram > 0).double().mean()),
    }
