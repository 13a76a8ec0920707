"""Datasets: built-in 28x28 domains (:func:`load`), :func:`as_tensors`, and the user's own files (:mod:`.user`).

See :mod:`sophon_fast.data.builtin` for sources, splits and the normalisation (``(x - 0.5) / 0.5``).
"""
from sophon_fast.data.builtin import (MEAN, STD, DatasetUnavailable, ImageDataset, available, clear_cache, load,
                                      stratified_split)
from sophon_fast.data import user  # noqa: F401  (text, image folders, .npz, datasets directories)
from sophon_fast.data.tensors import as_tensors

__all__ = ["MEAN", "STD", "DatasetUnavailable", "ImageDataset", "as_tensors", "available", "clear_cache", "load",
           "stratified_split"]
