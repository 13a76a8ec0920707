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

Schedules (``Attack.schedule``): ``constant`` (the default) or ``warmup_cosine``: a linear warm-up over the
first ``warmup`` fraction of the steps, then a cosine decay to 0 (:func:`warmup_cosine`; the language-model
attacks' schedule), over the run's steps (the last of ``eval_steps`` when :func:`sophon_fast.attacks.run` gets
them, else ``epochs`` x batches per epoch).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from sophon_fast.optim import OPTIMIZERS, SIGN_OPTIMIZERS, Lion, make_optimizer  # noqa: F401  (Lion re-exported)

METHODS = ("full", "reinit_head", "last_layer")
SCHEDULES = ("constant", "warmup_cosine")


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    """Multiplier of the peak rate at optimiser step ``step`` (0-based) of ``total``: linear warm-up over the first
    ``int(warmup * total)`` steps (``(step + 1) / (warm + 1)``), then a cosine decay from 1 to 0."""
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@dataclass(frozen=True)
class Attack:
    """One fine-tuning recipe. ``name`` defaults to ``method-optimizer-lr..-bs..-ep..`` (``-wc<warmup>`` appended
    for the ``warmup_cosine`` schedule)."""

    name: Optional[str] = None
    method: str = "full"
    optimizer: str = "momentum"
    lr: float = 1e-4
    batch_size: int = 200
    epochs: int = 20
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "constant"
    warmup: float = 0.1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown attack method {self.method!r}; one of {METHODS}")
        if self.optimizer not in OPTIMIZERS + SIGN_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; one of {OPTIMIZERS + SIGN_OPTIMIZERS}")
        if not (self.lr > 0 and self.batch_size >= 1 and self.epochs >= 0 and self.weight_decay >= 0):
            raise ValueError(f"invalid attack hyper-parameters: {self}")
        if self.schedule not in SCHEDULES or not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"unknown attack schedule {self.schedule!r} (one of {SCHEDULES}) or warm-up fraction "
                             f"{self.warmup!r} outside [0, 1)")
        if self.name is None:
            object.__setattr__(self, "name", f"{self.method}-{self.optimizer}-lr{self.lr:g}"
                                             f"-bs{self.batch_size}-ep{self.epochs}"
                                             + (f"-wc{self.warmup:g}" if self.schedule == "warmup_cosine" else ""))

    def scaled(self, epochs_scale: float) -> "Attack":
        """The same attack with ``max(1, round(epochs * epochs_scale))`` epochs (name kept)."""
        return dataclasses.replace(self, epochs=max(1, int(round(self.epochs * epochs_scale))))

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer, params, self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def make_scheduler(self, opt: torch.optim.Optimizer, total_steps: int):
        """None for ``constant``; else a ``LambdaLR`` stepping :func:`warmup_cosine` over ``total_steps``."""
        if self.schedule == "constant":
            return None
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: warmup_cosine(k, total_steps, self.warmup))


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
