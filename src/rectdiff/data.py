"""Data sets: 2-D toys, sklearn's 8x8 digits, and a user's own tensors or images.

``load_data(name_or_path, n, seed)`` returns a float32 tensor ``(n, ...)``, the same for the
same seed. Toys (shape ``(n, 2)``):

    8gaussians     8 Gaussians of std ``std`` centred on a circle of radius ``radius``
    moons          sklearn's two moons, centred at (0.5, 0.25) and scaled
    checkerboard   uniform on the 8 "black" unit squares of a 4x4 board over [-2, 2]^2
    mixture_pair   the rectified-flow paper's target mixture pi_1 (Liu et al. 2023, 2-D toy:
                   3 Gaussians, variance 0.3, means at distance D from the origin); its source
                   pi_0 is :func:`mixture_pair_source`
    spiral         two interleaved spirals (the FFJORD/flow-matching tutorial toy)

``digits``: sklearn's ``load_digits`` (1797 8x8 images shipped with sklearn, no download),
scaled from [0, 16] to [-1, 1], shape ``(n, 1, 8, 8)``. A path loads a ``.npy``/``.pt``
tensor ``(N, ...)`` or a folder of images (PIL) scaled to [-1, 1], shape ``(N, C, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

__all__ = [
    "TOYS",
    "check_finite",
    "DATASETS",
    "IMAGE_SUFFIXES",
    "load_data",
    "eight_gaussians",
    "moons",
    "checkerboard",
    "mixture_pair",
    "mixture_pair_source",
    "spiral",
    "digits",
    "from_file",
    "from_image_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_DEFAULT_TOY_SIZE = 10_000
Labelled = tuple[Tensor, Tensor | None]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def eight_gaussians(n: int, seed: int = 0, radius: float = 2.0, std: float = 0.1) -> Labelled:
    """8 equal Gaussians N(c_k, std^2 I), c_k = radius (cos 2 pi k/8, sin 2 pi k/8).

    Returns the points and each point's component k. E[x] = 0, E||x||^2 = radius^2 + 2 std^2.
    """
    gen = _generator(seed)
    labels = torch.randint(8, (n,), generator=gen)
    angles = labels.to(torch.float64) * (2 * math.pi / 8)
    centers = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    x = centers + std * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x.float(), labels


def moons(n: int, seed: int = 0, noise: float = 0.05, scale: float = 2.0) -> Labelled:
    """sklearn's ``make_moons``, shifted by -(0.5, 0.25) (the mean) and scaled by ``scale``."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=noise, random_state=int(seed))
    x = (x - np.array([0.5, 0.25])) * scale
    return torch.from_numpy(x).float(), torch.from_numpy(y).long()


def checkerboard(n: int, seed: int = 0, squares: int = 4) -> Labelled:
    """Uniform on the "black" unit squares (i + j even) of a ``squares`` x ``squares`` board
    centred at the origin; every point has ``floor(x + s/2) + floor(y + s/2)`` even."""
    gen = _generator(seed)
    cells = [(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0]
    cells_t = torch.tensor(cells, dtype=torch.float64)
    labels = torch.randint(len(cells), (n,), generator=gen)
    x = cells_t[labels] + torch.rand(n, 2, generator=gen, dtype=torch.float64) - squares / 2
    return x.float(), None


def _mixture(means: Tensor, var: float, n: int, seed: int) -> Labelled:
    gen = _generator(seed)
    labels = torch.randint(len(means), (n,), generator=gen)
    x = means[labels] + math.sqrt(var) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x.float(), labels


def _mixture_means(distance: float, sign: float) -> Tensor:
    half_sqrt3 = math.sqrt(3) / 2
    d = distance
    return torch.tensor(
        [
            [d * half_sqrt3, sign * d / 2],
            [-d * half_sqrt3, sign * d / 2],
            [0.0, -sign * d * half_sqrt3],
        ],
        dtype=torch.float64,
    )


def mixture_pair(n: int, seed: int = 0, distance: float = 10.0, var: float = 0.3) -> Labelled:
    """The rectified-flow paper's target pi_1: 3 equal Gaussians of variance ``var`` with means
    (D sqrt3/2, -D/2), (-D sqrt3/2, -D/2), (0, D sqrt3/2), D = ``distance`` (their D = 10)."""
    return _mixture(_mixture_means(distance, -1.0), var, n, seed)


def mixture_pair_source(n: int, seed: int = 0, distance: float = 10.0, var: float = 0.3) -> Tensor:
    """The paired source pi_0: means (D sqrt3/2, D/2), (-D sqrt3/2, D/2), (0, -D sqrt3/2)."""
    return _mixture(_mixture_means(distance, 1.0), var, n, seed)[0]


def spiral(n: int, seed: int = 0, noise: float = 0.1) -> Labelled:
    """Two interleaved spirals: angle ``phi = 3 pi sqrt(u)``, arm ``(-phi cos phi, phi sin phi)/3``
    and its mirror image, plus N(0, noise^2) jitter. Labels are the arm (0 or 1)."""
    gen = _generator(seed)
    phi = 3 * math.pi * torch.sqrt(torch.rand(n, generator=gen, dtype=torch.float64))
    labels = torch.randint(2, (n,), generator=gen)
    arm = torch.stack([-phi * torch.cos(phi), phi * torch.sin(phi)], dim=1) / 3
    sign = (1 - 2 * labels).to(torch.float64)[:, None]
    x = sign * arm + noise * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x.float(), labels


def digits() -> Labelled:
    """All 1797 sklearn digits as ``(N, 1, 8, 8)`` in [-1, 1] (pixel / 8 - 1) with labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().unsqueeze(1) / 8.0 - 1.0
    return x, torch.from_numpy(bunch.target).long()


def from_file(path: str | Path) -> Labelled:
    """A tensor ``(N, ...)`` from ``.npy`` or ``.pt``/``.pth`` (a tensor, or a dict with
    ``"x"`` and optional ``"labels"``)."""
    path = Path(path)
    labels = None
    if path.suffix not in (".npy", ".pt", ".pth"):
        raise ValueError(
            f"{path}: unknown tensor file type {path.suffix!r}; use .npy, .pt or .pth."
        )
    obj = _read_tensor_file(path)
    if isinstance(obj, np.ndarray):
        if not (np.issubdtype(obj.dtype, np.number) or obj.dtype == np.bool_):
            raise DataError(
                f"{path}: holds {obj.dtype} values of shape {obj.shape}; expected numbers "
                "(a float array of shape (N, ...) with N samples)."
            )
        x = torch.from_numpy(obj)
    elif isinstance(obj, dict):
        if "x" not in obj:
            raise DataError(f"{path}: a dict must hold the data under 'x', got {list(obj)}.")
        x, labels = obj["x"], obj.get("labels")
    else:
        x = obj
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise DataError(
            f"{path}: expected a tensor of shape (N, ...) with N samples, got "
            f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}."
        )
    x = x.float()
    check_finite(x, str(path))
    return x, None if labels is None else torch.as_tensor(labels).long()


def _read_tensor_file(path: Path) -> Any:
    """The array (``.npy``) or object (``.pt``, weights only) in ``path``."""
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # numpy and torch raise several types for a damaged file
        raise DataError(
            f"{path}: not a readable {path.suffix} file ({' '.join(str(err).split())[:200]})."
        ) from None


def check_finite(x: Tensor, what: str) -> None:
    """Refuse data ``x`` (N, ...) that is empty or holds a NaN or infinity, naming the first
    bad sample's index, so the error is found at load and not as a diverging loss.

    Raises:
        DataError: naming ``what``, the index, the value and how many samples are bad.
    """
    if x.shape[0] == 0:
        raise DataError(f"{what}: no samples (shape {tuple(x.shape)}); give at least one.")
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        value = x[index].reshape(-1)[~torch.isfinite(x[index].reshape(-1))][0].item()
        raise DataError(
            f"{what}: sample {index} holds the non-finite value {value} ({int(bad.sum())} of "
            f"{x.shape[0]} samples do); remove or fix them before training."
        )


def from_image_folder(path: str | Path, image_size: int | None = None) -> Labelled:
    """Every image in ``path`` (sorted by name) as ``(N, C, H, W)`` in [-1, 1].

    Images are read with PIL, as grayscale when all of them are, else RGB, and resized to
    ``image_size`` x ``image_size`` when given; otherwise they must share one size.
    """
    from PIL import Image

    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder.")
    images = [_open_image(f) for f in files]
    mode = "L" if all(im.mode in ("L", "1", "I;16") for im in images) else "RGB"
    arrays = []
    for f, im in zip(files, images, strict=True):
        try:
            im = im.convert(mode)
        except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for a damaged file
            raise DataError(f"{f}: not a readable image ({err}); remove or replace it.") from None
        if image_size is not None:
            im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.float32))
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(
                f"{f} has size {arrays[-1].shape[:2]} but {files[0]} has {arrays[0].shape[:2]}; "
                "pass image_size=... to resize them all."
            )
    x = torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0
    x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2)
    return x.contiguous(), None


def _open_image(path: Path) -> Any:
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: not a readable image ({err}); remove or replace it.") from None
    return image


_TOY_FUNCTIONS: dict[str, Callable[..., Labelled]] = {
    "8gaussians": eight_gaussians,
    "moons": moons,
    "checkerboard": checkerboard,
    "mixture_pair": mixture_pair,
    "spiral": spiral,
}
TOYS = tuple(_TOY_FUNCTIONS)
DATASETS = (*TOYS, "digits")


def _subset(x: Tensor, labels: Tensor | None, n: int | None, seed: int, what: str) -> Labelled:
    if n is None:
        return x, labels
    if not 0 < n <= len(x):
        raise ValueError(f"{what} has {len(x)} samples; n must be in 1..{len(x)}, got n={n}.")
    idx = torch.randperm(len(x), generator=_generator(seed))[:n]
    return x[idx], None if labels is None else labels[idx]


def load_data(
    name_or_path: str | Path,
    n: int | None = None,
    seed: int = 0,
    *,
    return_labels: bool = False,
    **params: Any,
) -> Tensor | Labelled:
    """A data set by name (see the module docstring) or from a file or image folder.

    Args:
        name_or_path: one of ``DATASETS``, or a ``.npy``/``.pt`` file or image folder.
        n: number of samples: for toys the number drawn (10000 by default); for finite sets
            a seeded random subset (all of them by default).
        seed: the seed; the same seed gives the same tensor.
        return_labels: also return labels (class of each digit, toy component, or None).
        **params: the toy's own parameters (e.g. ``radius=``, ``std=`` for 8gaussians) or
            ``image_size=`` for an image folder.

    Raises:
        ValueError: for an unknown name (the known ones are listed), a bad parameter or file.
    """
    name = str(name_or_path)
    if name in _TOY_FUNCTIONS:
        fn = _TOY_FUNCTIONS[name]
        try:
            x, labels = fn(_DEFAULT_TOY_SIZE if n is None else int(n), seed, **params)
        except TypeError as err:
            raise ValueError(f"bad parameters {params} for toy {name!r}: {err}") from None
    elif name == "digits":
        _no_params(params, name)
        x, labels = _subset(*digits(), n, seed, "digits")
    elif Path(name).is_dir():
        x, labels = _subset(*from_image_folder(name, **params), n, seed, name)
    elif Path(name).is_file():
        _no_params(params, name)
        x, labels = _subset(*from_file(name), n, seed, name)
    else:
        raise ValueError(
            f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}, or the path of an "
            ".npy/.pt tensor file or a folder of images."
        )
    return (x, labels) if return_labels else x


def _no_params(params: dict[str, Any], name: str) -> None:
    if params:
        raise ValueError(f"data set {name!r} takes no parameters, got {sorted(params)}.")
