"""The one optimiser factory of sophon_fast: the engine's FTS/NTR optimisers and every attack use it."""
from __future__ import annotations

from typing import Sequence

import torch

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "adagrad", "adadelta", "rmsprop")
SIGN_OPTIMIZERS = ("sign_momentum", "signsgd")   # Lion-style sign steps; accepted, not in the "full" suite


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): ``p -= lr * (sign(b1 * m + (1 - b1) * g) + wd * p)``, then
    ``m = b2 * m + (1 - b2) * g``. Every step moves each weight by exactly ``lr`` (plus decay): the
    large, sign-like steps that ignore how small a masked gradient is. Betas (0, 0) give sign-SGD."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if not (lr > 0 and all(0.0 <= b < 1.0 for b in betas) and weight_decay >= 0):
            raise ValueError(f"Lion: invalid lr {lr}, betas {betas} or weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1.0 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1.0 - b2)
        return loss


def make_optimizer(name: str, params, lr: float, *, momentum: float = 0.9, betas: Sequence[float] = (0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``torch.optim`` optimiser ``name`` over ``params``: "sgd" (no momentum), "momentum" (SGD with
    ``momentum``, dampening 0), "adam", "adamw", "adagrad", "adadelta", "rmsprop" (their torch defaults
    otherwise), and the sign-step optimisers "sign_momentum" (Lion, betas 0.9/0.99) and "signsgd" (Lion with
    betas 0/0). Raises ValueError for an unknown name."""
    if name in SIGN_OPTIMIZERS:
        return Lion(params, lr=lr, betas=(0.9, 0.99) if name == "sign_momentum" else (0.0, 0.0),
                    weight_decay=weight_decay)
    if name in ("sgd", "momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum if name == "momentum" else 0.0,
                               weight_decay=weight_decay)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    cls = {"adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta, "rmsprop": torch.optim.RMSprop}.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; one of {OPTIMIZERS + SIGN_OPTIMIZERS}")
    return cls(params, lr=lr, weight_decay=weight_decay)
