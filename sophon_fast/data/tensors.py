"""Materialise user datasets and loaders into two tensors."""
from __future__ import annotations

from typing import Tuple

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate


def _pair_of_tensors(ds) -> Tuple[torch.Tensor, torch.Tensor] | None:
    """Zero-copy path for TensorDataset-like objects (``.tensors`` of length 2) and Subsets of them."""
    if isinstance(ds, Subset):
        inner = _pair_of_tensors(ds.dataset)
        if inner is None:
            return None
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        return inner[0][idx], inner[1][idx]
    tensors = getattr(ds, "tensors", None)
    if isinstance(ds, TensorDataset) or (isinstance(tensors, tuple) and len(tensors) == 2
                                         and all(isinstance(t, torch.Tensor) for t in tensors)):
        if len(tensors) != 2:
            raise ValueError(f"expected a TensorDataset of (inputs, labels), got {len(tensors)} tensors")
        return tensors[0], tensors[1]
    return None


def _loader_covers_dataset(loader: DataLoader) -> bool:
    """True when iterating ``loader`` yields every item of ``loader.dataset`` once, collated by default."""
    if loader.collate_fn is not default_collate or loader.drop_last:
        return False
    sampler = loader.sampler
    if isinstance(sampler, SequentialSampler):
        return True
    return isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == len(loader.dataset)


def _stack(items) -> torch.Tensor:
    if isinstance(items[0], torch.Tensor):
        return torch.stack(items)
    return torch.as_tensor(items)


def _as_labels(y: torch.Tensor) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool):
        y = y.long()
    return y


def as_tensors(data) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y)``: every ``(input, label)`` pair of a Dataset or DataLoader, stacked along dim 0.

    Accepts a ``TensorDataset`` / :class:`~sophon_fast.data.ImageDataset` (no copy), a ``Subset`` of one,
    a ``(X, Y)`` tuple of tensors, a map-style Dataset (items indexed 0..len-1) or any iterable of
    batches such as a DataLoader (batches concatenated in iteration order; a loader with the default
    collate and a sequential or full random sampler is read straight from its dataset, in dataset order).
    Integer labels are returned as int64; float labels are left as they are.

    Raises ``ValueError`` on empty data, on items that are not ``(input, label)`` pairs and on a
    length mismatch between inputs and labels.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        X, Y = data
    elif isinstance(data, DataLoader):
        if _loader_covers_dataset(data) and isinstance(data.dataset, Dataset):
            return as_tensors(data.dataset)
        X, Y = _from_batches(data)
    else:
        pair = _pair_of_tensors(data)
        if pair is not None:
            X, Y = pair
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            n = len(data)
            if n == 0:
                raise ValueError("as_tensors: the dataset is empty")
            items = [data[i] for i in range(n)]
            _check_pair(items[0])
            X = _stack([it[0] for it in items])
            Y = _stack([it[1] for it in items])
        else:
            X, Y = _from_batches(data)
    Y = _as_labels(Y)
    if X.shape[0] == 0:
        raise ValueError("as_tensors: the data is empty")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"as_tensors: {X.shape[0]} inputs but {Y.shape[0]} labels")
    return X, Y


def _check_pair(item) -> None:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ValueError(f"as_tensors: expected (input, label) pairs, got an item of type {type(item).__name__}"
                         + (f" with {len(item)} fields" if isinstance(item, (tuple, list)) else ""))


def _from_batches(batches) -> Tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for batch in batches:
        _check_pair(batch)
        x, y = batch
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        xs.append(x)
        ys.append(y.reshape(1) if y.dim() == 0 else y)
    if not xs:
        raise ValueError("as_tensors: the loader yielded no batches (empty data)")
    return torch.cat(xs), torch.cat(ys)
