"""The one optimiser factory of sophon_fast: the engine's FTS/NTR optimisers and every attack use it."""
from __future__ import annotations

from typing import Sequence

import torch

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "adagrad", "adadelta", "rmsprop")


def make_optimizer(name: str, params, lr: float, *, momentum: float = 0.9, betas: Sequence[float] = (0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``torch.optim`` optimiser ``name`` over ``params``: "sgd" (no momentum), "momentum" (SGD with
    ``momentum``, dampening 0), "adam", "adamw", "adagrad", "adadelta", "rmsprop" (their torch defaults
    otherwise). Raises ValueError for an unknown name."""
    if name in ("sgd", "momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum if name == "momentum" else 0.0,
                               weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    cls = {"adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta, "rmsprop": torch.optim.RMSprop}.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; one of {OPTIMIZERS}")
    return cls(params, lr=lr, weight_decay=weight_decay)
