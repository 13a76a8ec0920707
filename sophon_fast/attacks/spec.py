"""Fine-tuning attack descriptions and the named attack suites.

Methods:
- ``full``: every parameter trained, the pre-trained head kept (the paper's evaluation, section 5).
- ``reinit_head``: every parameter trained, the head re-initialised first: ``xavier_uniform_`` weight,
  zero bias (the initialisation of the reference ICE script's simulated attacker).
- ``last_layer``: only the head trained; the frozen body also runs in eval mode, so its BatchNorm
  running statistics stay as they are (a linear probe).

Optimisers (``torch.optim``, constant learning rate, ``weight_decay`` passed to each):
``sgd`` (SGD, no momentum), ``momentum`` (SGD with ``momentum``, default 0.9), ``adam``, ``adamw``,
``adagrad``, ``adadelta``, ``rmsprop`` (their torch defaults otherwise); ``sign_momentum`` (Lion's
update: :class:`Lion`, betas (0.9, 0.99)) and ``signsgd`` (:class:`Lion`, betas (0, 0): ``p -= lr * sign(grad)``),
both with decoupled weight decay.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from sophon_fast.optim import OPTIMIZERS, SIGN_OPTIMIZERS, Lion, make_optimizer  # noqa: F401  (Lion re-exported)

METHODS = ("full", "reinit_head", "last_layer")


@dataclass(frozen=True)
class Attack:
    """One fine-tuning recipe. ``name`` defaults to ``method-optimizer-lr..-bs..-ep..``."""

    name: Optional[str] = None
    method: str = "full"
    optimizer: str = "momentum"
    lr: float = 1e-4
    batch_size: int = 200
    epochs: int = 20
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown attack method {self.method!r}; one of {METHODS}")
        if self.optimizer not in OPTIMIZERS + SIGN_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; one of {OPTIMIZERS + SIGN_OPTIMIZERS}")
        if not (self.lr > 0 and self.batch_size >= 1 and self.epochs >= 0 and self.weight_decay >= 0):
            raise ValueError(f"invalid attack hyper-parameters: {self}")
        if self.name is None:
            object.__setattr__(self, "name", f"{self.method}-{self.optimizer}-lr{self.lr:g}"
                                             f"-bs{self.batch_size}-ep{self.epochs}")

    def scaled(self, epochs_scale: float) -> "Attack":
        """The same attack with ``max(1, round(epochs * epochs_scale))`` epochs (name kept)."""
        return dataclasses.replace(self, epochs=max(1, int(round(self.epochs * epochs_scale))))

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer, params, self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


PAPER = Attack("paper", "full", "momentum", lr=1e-4, batch_size=200, epochs=20, momentum=0.9, weight_decay=1e-4)

# Learning-rate grids per optimiser for the "full" suite: low / typical / high for that optimiser.
FULL_LRS: Dict[str, tuple] = {
    "sgd": (1e-3, 1e-2, 1e-1),
    "momentum": (1e-4, 1e-3, 1e-2),
    "adam": (1e-5, 1e-4, 1e-3),
    "adamw": (1e-5, 1e-4, 1e-3),
    "adagrad": (1e-3, 1e-2, 1e-1),
    "adadelta": (1e-2, 1e-1, 1.0),
    "rmsprop": (1e-5, 1e-4, 1e-3),
}
FULL_BATCH_SIZES = (64, 200)
DEFAULT_GRID = {"momentum": (1e-3, 1e-2), "adam": (1e-4, 1e-3)}


def suite(name: str) -> List[Attack]:
    """A named list of attacks, all with weight decay 1e-4 and (momentum) 0.9.

    - ``paper``: the paper's evaluation attack alone: full fine-tuning, SGD lr 1e-4 momentum 0.9,
      weight decay 1e-4, batch 200, 20 epochs.
    - ``default`` (12 attacks): the 3 methods x {momentum SGD lr 1e-3, 1e-2; Adam lr 1e-4, 1e-3},
      batch 200, 20 epochs.
    - ``full`` (126 attacks): the 3 methods x 7 optimisers x 3 learning rates (``FULL_LRS``) x batch
      sizes {64, 200}, 20 epochs.
    """
    if name == "paper":
        return [PAPER]
    if name == "default":
        return [Attack(method=m, optimizer=o, lr=lr, batch_size=200, epochs=20)
                for m in METHODS for o, lrs in DEFAULT_GRID.items() for lr in lrs]
    if name == "full":
        return [Attack(method=m, optimizer=o, lr=lr, batch_size=bs, epochs=20)
                for m, o in itertools.product(METHODS, OPTIMIZERS) for lr in FULL_LRS[o] for bs in FULL_BATCH_SIZES]
    raise KeyError(f"unknown attack suite {name!r}; one of {SUITES}")


SUITES = ("paper", "default", "full")
