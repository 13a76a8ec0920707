"""Save and load models as ``.safetensors`` weights plus a JSON architecture record, no pickle.

``save_model(model, "dir/name.safetensors")`` writes the state dict (every tensor made contiguous and
unshared) to that path and ``dir/name.json`` beside it::

    {"format": "sophon_fast.model", "version": 1,
     "arch": {"name": "cnn_bn", "kwargs": {"num_classes": 10, "in_channels": 1}},
     "weights": "name.safetensors", "sha256": "<hex digest of the weights file>",
     "metadata": {...free-form, JSON-serialisable...}}

Both files are written to temporary names in the same folder and moved into place with
``os.replace`` once both are written (sophon_fast._atomic), so a crash never leaves a half-written file under
either name. :func:`load_model` rebuilds the architecture with :func:`sophon_fast.models.build` and
loads the state dict strictly (parameters and buffers, BatchNorm statistics included).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sophon_fast import models
from sophon_fast._atomic import atomic_path

FORMAT = "sophon_fast.model"
VERSION = 1
PathLike = Union[str, os.PathLike]


def _paths(path: PathLike):
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    return p, p.with_suffix(".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: nn.Module, path: PathLike, metadata: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``path`` (weights, safetensors) and ``path`` with suffix ``.json`` (architecture + metadata).

    Requires ``model.sophon_arch`` (set by :func:`sophon_fast.models.build`); raises ``ValueError``
    without it and ``TypeError`` when ``metadata`` is not JSON-serialisable. Returns the weights path.
    """
    arch = getattr(model, "sophon_arch", None)
    if not (isinstance(arch, dict) and "name" in arch):
        raise ValueError(f"{type(model).__name__} has no sophon_arch record; build it with sophon_fast.models.build "
                         "(or set model.sophon_arch = {'name': ..., 'kwargs': {...}}) so load_model can rebuild it")
    weights, record = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    record_obj = {"format": FORMAT, "version": VERSION,
                  "arch": {"name": arch["name"], "kwargs": dict(arch.get("kwargs", {}))},
                  "weights": weights.name, "sha256": None, "metadata": dict(metadata or {})}
    json.dumps(record_obj)   # fail before touching the disk when metadata/kwargs are not JSON-serialisable
    with atomic_path(weights) as tmp_w, atomic_path(record) as tmp_j:   # both written before either lands
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        record_obj["sha256"] = _sha256(tmp_w)
        with open(tmp_j, "w") as f:
            json.dump(record_obj, f, indent=2, sort_keys=True)
            f.write("\n")
    return weights


def read_record(path: PathLike) -> Dict[str, Any]:
    """The JSON record saved beside the weights (``arch``, ``metadata``, ``sha256``...)."""
    _, record = _paths(path)
    if not record.exists():
        raise FileNotFoundError(f"{record} not found: save_model writes it beside the weights")
    with open(record) as f:
        rec = json.load(f)
    if rec.get("format") != FORMAT:
        raise ValueError(f"{record} is not a {FORMAT} record (format={rec.get('format')!r})")
    return rec


def load_model(path: PathLike, map_location: Union[str, torch.device] = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild the model saved at ``path`` (the .safetensors or the .json), in eval mode, on ``map_location``.

    The weights are checked against the recorded SHA-256 when ``verify`` and loaded with
    ``strict=True``; a mismatch raises ``ValueError`` / ``RuntimeError``. No pickle is involved.
    """
    weights, _ = _paths(path)
    rec = read_record(path)
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found (named by {weights.with_suffix('.json')})")
    if verify and rec.get("sha256") and _sha256(weights) != rec["sha256"]:
        raise ValueError(f"{weights} does not match the SHA-256 recorded in its JSON (file replaced or corrupted)")
    model = models.build(rec["arch"]["name"], **rec["arch"]["kwargs"])
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return model.to(map_location).eval()


__all__ = ["load_model", "read_record", "save_model"]
