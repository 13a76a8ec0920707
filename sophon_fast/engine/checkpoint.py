"""Atomic checkpoints (sophon_fast._atomic): a killed run never leaves a half-written checkpoint."""
import os

import torch

from sophon_fast._atomic import atomic_path


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
