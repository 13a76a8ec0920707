"""A probe adversary (RepNoise-like): make every block's features of restricted inputs carry no label
information that a freshly fitted linear probe can read.

Each call, for every block b (:func:`sophon_fast.attacks.probes.feature_blocks`: each pooling output,
each residual stage, the head's input):

    z_b   = standardise(features_b(x)) / sqrt(D_b)       per feature over the batch, rows ~ unit norm
    W, c  = ``probe_steps`` steps of gradient descent (lr ``probe_lr``, L2 ``probe_l2``, from zero) of
            softmax regression on the detached z_b of the *fit* rows (a random ``1 - holdout`` share)
    loss  = objective(z_b[held-out rows] @ W.T + c, y[held-out rows])

with objective ``uniform`` = KL(uniform || softmax(logits)) (zero when the probe cannot tell the classes
apart) or ``neg_ce`` = -cross-entropy (RepNoise's "maximise the probe's loss"; unbounded). The probe is
fitted without autograd and held fixed; the gradient reaches the model through the held-out features
only, so the body learns to remove what the probe found. Standardising with the batch's own statistics
(not detached) means shrinking the features does not help. The returned loss is ``weight`` x the mean
over blocks; ``last_accuracy`` keeps each block's held-out probe accuracy of the latest call (0-d
tensors, no host synchronisation), for diagnostics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sophon_fast import models
from sophon_fast.attacks.probes import capture, feature_blocks

OBJECTIVES = ("uniform", "neg_ce")


@dataclass
class ProbeAdversaryConfig:
    """Settings of :class:`ProbeAdversary` (see the module docstring); ``blocks`` None = every block."""
    kind = "probe_adversary"
    weight: float = 1.0
    blocks: Optional[List[str]] = None
    probe_steps: int = 20
    probe_lr: float = 2.0
    probe_l2: float = 1e-3
    holdout: float = 0.5
    objective: str = "uniform"

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"ProbeAdversaryConfig.weight must be > 0, got {self.weight}")
        if self.probe_steps < 1 or not self.probe_lr > 0 or not self.probe_l2 >= 0:
            raise ValueError("ProbeAdversaryConfig needs probe_steps >= 1, probe_lr > 0 and probe_l2 >= 0")
        if not 0 < self.holdout < 1:
            raise ValueError(f"ProbeAdversaryConfig.holdout must be in (0, 1), got {self.holdout}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"ProbeAdversaryConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.blocks is not None:
            self.blocks = list(self.blocks)
            if not self.blocks:
                raise ValueError("ProbeAdversaryConfig.blocks is empty (None means every block)")

    def build(self) -> "ProbeAdversary":
        return ProbeAdversary(self)


@torch.no_grad()
def fit_linear_probe(z: Tensor, y: Tensor, num_classes: int, steps: int, lr: float, l2: float) -> Tuple[Tensor, Tensor]:
    """Softmax regression by full-batch gradient descent from zero: ``z`` (N, D) float, ``y`` (N,) int64
    in [0, num_classes). Returns ``W`` (num_classes, D) and ``c`` (num_classes,), on z's device and dtype."""
    W = torch.zeros(num_classes, z.shape[1], device=z.device, dtype=z.dtype)
    c = torch.zeros(num_classes, device=z.device, dtype=z.dtype)
    target = F.one_hot(y, num_classes).to(z.dtype)
    for _ in range(steps):
        g = (torch.softmax(z @ W.T + c, dim=1) - target) / z.shape[0]
        W -= lr * (g.T @ z + l2 * W)
        c -= lr * g.sum(0)
    return W, c


class ProbeAdversary:
    """The defence component: ``attach(model, task)`` once, then ``loss(model, restricted, original, gen)``.

    ``restricted`` is a batch tuple whose first tensor is the inputs (N, ...) and last the integer class
    labels (N,) of a classification model whose head is an ``nn.Linear`` (its ``out_features`` = the
    number of classes). ``original`` is not used. ``gen`` (a ``torch.Generator`` on the model's device)
    draws the fit / held-out split. The model runs one extra forward in its current mode (with
    BatchNorm in train mode that forward also updates the running statistics).
    """
    needs_original = False

    def __init__(self, cfg: Optional[ProbeAdversaryConfig] = None, **kw):
        if cfg is not None and kw:
            raise ValueError("ProbeAdversary: pass a config or keyword settings, not both")
        self.cfg = cfg if cfg is not None else ProbeAdversaryConfig(**kw)
        self.task = None
        self.blocks: Optional[List[str]] = None
        self.num_classes = 0
        self.last_accuracy: Dict[str, Tensor] = {}

    def _head(self, model: nn.Module) -> nn.Module:
        head = self.task.head(model) if self.task is not None else None
        return head if head is not None else models.head_of(model)

    def attach(self, model: nn.Module, task) -> None:
        """Resolve the blocks (validated against ``model``) and the number of classes from the head."""
        self.task = task
        head = self._head(model)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"probe_adversary: needs an nn.Linear head, got {type(head).__name__}")
        self.num_classes = head.out_features
        self.blocks = list(self.cfg.blocks) if self.cfg.blocks is not None else feature_blocks(model, head)
        with capture(model, self.blocks, head):   # raises ValueError for an unknown block name
            pass

    def loss(self, model: nn.Module, restricted, original, gen: torch.Generator) -> Tensor:
        if self.blocks is None:
            raise ValueError("probe_adversary: call attach(model, task) before loss()")
        x, y = restricted[0], restricted[-1]
        if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype.is_floating_point:
            raise ValueError(f"probe_adversary: the batch's last tensor must be (N,) integer labels, got "
                             f"{tuple(y.shape)} {y.dtype} for {x.shape[0]} inputs")
        n = x.shape[0]
        n_fit = n - max(1, int(round(n * self.cfg.holdout)))
        if n_fit < 2:
            raise ValueError(f"probe_adversary: a batch of {n} leaves {n_fit} rows to fit the probe (need >= 2)")
        perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
        head = self._head(model)
        with capture(model, self.blocks, head) as got:
            model(x)
        y = y[perm]
        total = x.new_zeros((), dtype=torch.float32)
        for b in self.blocks:
            f = got[b][-1].flatten(1).float()[perm]
            z = (f - f.mean(0)) / (f.std(0) + 1e-5) / math.sqrt(f.shape[1])
            W, c = fit_linear_probe(z[:n_fit].detach(), y[:n_fit], self.num_classes, self.cfg.probe_steps,
                                    self.cfg.probe_lr, self.cfg.probe_l2)
            logits = z[n_fit:] @ W.T + c
            if self.cfg.objective == "uniform":
                total = total + (-math.log(self.num_classes) - F.log_softmax(logits, 1).mean(1)).mean()
            else:
                total = total - F.cross_entropy(logits, y[n_fit:])
            self.last_accuracy[b] = (logits.argmax(1) == y[n_fit:]).float().mean().detach()
        return self.cfg.weight * total / len(self.blocks)
