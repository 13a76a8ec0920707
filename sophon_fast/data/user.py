"""The user's own data, read from files: text for language models, labelled images for classifiers.

Text (:func:`read_texts`, :func:`text_blocks`): a plain text file (documents separated by blank lines), a JSON-lines
file (``.jsonl``/``.json``: one document per line, a string or an object with a ``"text"`` field), or a Hugging
Face ``datasets`` directory (``save_to_disk``; a ``"text"`` column). The documents are tokenised by the model's own
tokenizer (any ``transformers`` tokenizer), joined with its end-of-sequence token and cut into blocks of
``block_size`` tokens: ``(input_ids, labels)`` int64 (N, block_size), labels -100 on the padding of the last block.

Images (:func:`read_images`): a folder with one subfolder per class (the class names are the subfolder names, in
sorted order; every image file PIL opens), an ``.npz`` of arrays (``x``/``y``, ``images``/``labels`` or
``x_train``/``y_train``, with ``x_test``/``y_test`` as the test split when present), or a ``datasets`` directory
(``image``/``img`` and ``label`` columns). Pixels are scaled to [0, 1] and normalised as the built-in domains are,
``(x - 0.5) / 0.5``; folder images are converted to the model's channels and resized to ``size`` x ``size``.

Every problem raises :class:`UserDataError` (a ``ValueError``) whose message starts with the file it is about.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from sophon_fast.data.builtin import MEAN, STD, stratified_split
from sophon_fast.data.text import IGNORE_INDEX, pack_blocks  # noqa: F401  (IGNORE_INDEX: part of this module's API)

TEST_FRACTION = 0.1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class UserDataError(ValueError):
    """The user's file or folder cannot be used; the message names it and says why."""


def _is_datasets_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _load_datasets(path: str, split: str):
    try:
        import datasets
    except ImportError:
        raise UserDataError(f"{path}: a Hugging Face datasets directory; install the datasets package to read it "
                            f"(pip install datasets)") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserDataError(f"{path}: no {split!r} split (it has {', '.join(ds)})")
        ds = ds[split]
    return ds


# ---------------------------------------------------------------- text


def read_texts(path: str) -> List[str]:
    """The documents of ``path`` (see the module docstring); ``UserDataError`` when it holds no text."""
    if _is_datasets_dir(path):
        ds = _load_datasets(path, "train")
        if "text" not in ds.column_names:
            raise UserDataError(f"{path}: no 'text' column (columns: {', '.join(ds.column_names)})")
        docs = [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    elif os.path.isdir(path):
        raise UserDataError(f"{path}: a folder, not a text file, JSON-lines file or datasets directory")
    elif not os.path.exists(path):
        raise UserDataError(f"{path}: no such file")
    elif path.endswith((".jsonl", ".json")):
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserDataError(f"{path} line {n}: not JSON ({e.msg})") from None
                text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
                if not isinstance(text, str):
                    raise UserDataError(f"{path} line {n}: neither a string nor an object with a 'text' string")
                if text.strip():
                    docs.append(text)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                content = f.read()
        except UnicodeDecodeError:
            raise UserDataError(f"{path}: not UTF-8 text") from None
        docs = [d.strip() for d in content.split("\n\n") if d.strip()]
    if not docs:
        raise UserDataError(f"{path}: no text")
    return docs


def encode_documents(docs: Sequence[str], tokenizer, block_size: int, source: str = "text") -> Tuple[Tensor, Tensor]:
    """``docs`` tokenised by the ``transformers`` ``tokenizer`` (no special tokens added), each followed by its
    end-of-sequence token, cut into (N, block_size) blocks: ``(input_ids, labels)``, the last block padded
    (``pad_token_id``, else the end-of-sequence id) with labels ``IGNORE_INDEX``."""
    if block_size < 2:
        raise UserDataError(f"{source}: block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserDataError(f"{source}: the tokenizer has no end-of-sequence token to separate documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids: List[int] = []
    for enc in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids += list(enc) + [eos]
    return pack_blocks(ids, block_size, pad)


def _held_out(identifier: str) -> bool:
    return zlib.crc32(identifier.encode()) % 1000 < TEST_FRACTION * 1000


def text_blocks(path: str, tokenizer, block_size: int = 128) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """``(train, test)`` blocks of the documents of ``path``: about ``TEST_FRACTION`` of the documents (chosen by a
    CRC32 of their text, the same on every machine) are held out as the test split; with fewer than 10 documents,
    or when none is chosen, the last document is. Each split is ``(input_ids, labels)``."""
    docs = read_texts(path)
    test_idx = [i for i, d in enumerate(docs) if _held_out(d)] if len(docs) >= 10 else []
    test_idx = test_idx or [len(docs) - 1]
    train = [d for i, d in enumerate(docs) if i not in set(test_idx)] or docs
    test = [docs[i] for i in test_idx]
    return encode_documents(train, tokenizer, block_size, path), encode_documents(test, tokenizer, block_size, path)


# ---------------------------------------------------------------- images


@dataclass
class Images:
    """Labelled images read by :func:`read_images`: (N, C, H, W) float32 in [-1, 1] and (N,) int64 labels."""

    train: Tuple[Tensor, Tensor]
    test: Tuple[Tensor, Tensor]
    classes: List[str]


def _normalise(x: np.ndarray, source: str) -> Tensor:
    """uint8 (0..255) or float (0..1) arrays (N, H, W), (N, H, W, C) or (N, C, H, W) -> (N, C, H, W) normalised."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise UserDataError(f"{source}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W); got {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if x.dtype == np.uint8:
        t = t / 255.0
    return (t - MEAN) / STD


def _split(x: Tensor, y: Tensor, seed: int) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    train, test = stratified_split(y.numpy(), TEST_FRACTION, seed)
    if test.size == 0:       # too few images per class for a test split: evaluate on the training images
        test = train
    return (x[train], y[train]), (x[test], y[test])


def _labels(y: np.ndarray, source: str) -> Tensor:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise UserDataError(f"{source}: labels must be one non-negative integer per image; got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _from_npz(path: str, seed: int) -> Images:
    try:
        arrays = np.load(path)
    except (OSError, ValueError) as e:
        raise UserDataError(f"{path}: not a readable .npz file ({e})") from None
    for xk, yk in (("x", "y"), ("images", "labels"), ("x_train", "y_train")):
        if xk in arrays and yk in arrays:
            break
    else:
        raise UserDataError(f"{path}: no image and label arrays (expected x/y, images/labels or x_train/y_train; "
                            f"found {', '.join(arrays.files)})")
    x, y = _normalise(arrays[xk], path), _labels(arrays[yk], path)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise UserDataError(f"{path}: {x.shape[0]} images but {y.shape[0]} labels")
    if "x_test" in arrays and "y_test" in arrays:
        train, test = (x, y), (_normalise(arrays["x_test"], path), _labels(arrays["y_test"], path))
    else:
        train, test = _split(x, y, seed)
    return Images(train, test, _present(y))


def _present(y: Tensor) -> List[str]:
    """The classes of integer labels: the labels that occur, as strings."""
    return [str(int(c)) for c in torch.unique(y)]


def _open_image(path: str, channels: int, size: int) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise UserDataError(f"{path}: not an image PIL can read ({e})") from None
    return a if channels == 1 else a.transpose(2, 0, 1)


def _from_folder(path: str, channels: int, size: int, seed: int) -> Images:
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise UserDataError(f"{path}: no class subfolders (an image folder holds one subfolder per class)")
    xs, ys = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(path, name)) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise UserDataError(f"{os.path.join(path, name)}: no image files")
        xs += [_open_image(os.path.join(path, name, f), channels, size) for f in files]
        ys += [label] * len(files)
    x = _normalise(np.stack(xs)[:, None] if channels == 1 else np.stack(xs), path)
    train, test = _split(x, torch.tensor(ys, dtype=torch.int64), seed)
    return Images(train, test, classes)


def _from_datasets(path: str, channels: int, size: int) -> Images:
    splits = []
    for split in ("train", "test"):
        try:
            ds = _load_datasets(path, split)
        except UserDataError:
            if split == "train":
                raise
            splits.append(None)
            continue
        col = next((c for c in ("image", "img") if c in ds.column_names), None)
        if col is None or "label" not in ds.column_names:
            raise UserDataError(f"{path}: needs an 'image' (or 'img') and a 'label' column "
                                f"(columns: {', '.join(ds.column_names)})")
        mode = "L" if channels == 1 else "RGB"
        arr = np.stack([np.asarray(im.convert(mode).resize((size, size))) for im in ds[col]])
        splits.append((_normalise(arr if channels == 1 else arr.transpose(0, 3, 1, 2), path),
                       _labels(np.asarray(ds["label"]), path)))
    train = splits[0]
    if splits[1] is None:
        train, test = _split(*train, seed=0)
    else:
        test = splits[1]
    return Images(train, test, _present(train[1]))


def read_images(path: str, channels: int = 1, size: int = 28, seed: int = 0) -> Images:
    """Labelled images from ``path`` (see the module docstring). Without a test split of its own, about
    ``TEST_FRACTION`` of each class (stratified, seeded) is held out; a class with too few images keeps all of
    them in training, and the test split is then the training images."""
    if not os.path.exists(path):
        raise UserDataError(f"{path}: no such file or folder")
    if _is_datasets_dir(path):
        return _from_datasets(path, channels, size)
    if os.path.isdir(path):
        return _from_folder(path, channels, size, seed)
    if path.endswith(".npz"):
        return _from_npz(path, seed)
    raise UserDataError(f"{path}: not an image folder, an .npz of arrays or a datasets directory")


def check_classes(original: Sequence[str], restricted: Sequence[str], original_path: str, restricted_path: str) -> None:
    """The restricted data must use the original's classes: every class of the original present and none unknown
    (``UserDataError`` naming the restricted file and the class)."""
    missing = [c for c in original if c not in restricted]
    if missing:
        more = f" (and {len(missing) - 1} more)" if missing[1:] else ""
        raise UserDataError(f"{restricted_path}: class {missing[0]!r} of the original data ({original_path}) is "
                            f"missing from the restricted data{more}")
    extra = [c for c in restricted if c not in original]
    if extra:
        raise UserDataError(f"{restricted_path}: class {extra[0]!r} is not a class of the original data "
                            f"({original_path})")


__all__ = ["Images", "UserDataError", "check_classes", "encode_documents", "read_images", "read_texts",
           "text_blocks"]
