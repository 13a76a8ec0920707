"""A composed fine-tuning attack for a fixed step budget: what one attack-search trial runs.

Stages, each optional, in this order, all through the existing attack code (one training loop,
:func:`sophon_fast.attacks.run`; the preparations of :func:`sophon_fast.attacks.adaptive.prepare`):

1. ``benign_steps`` Adam steps (rate ``benign_lr``) on original-domain data (``benign_first``);
2. the classifier block's input: with ``fresh_block`` = N, the last N parameterised leaf modules are
   re-initialised (a fresh classifier block at depth N; ``reinit_block`` with ``reinit_last=N``) and, with
   ``block_input_rms``, fed through a constant factor that gives their input that RMS on the restricted training
   inputs (docs/experiments.md a7); without ``fresh_block``, ``block_input_rms`` rescales the kept block's input
   without changing the function (a6): the factor ``c`` in front of the block's first module and that module's
   weight divided by ``c``, which the block's first (linear or convolutional) module makes exact;
3. fine-tuning with ``finetune`` (method, optimiser, rate, batch, weight decay, schedule) for exactly ``steps``
   optimiser steps (its ``epochs`` are derived from ``steps``), evaluated after each of ``eval_steps``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from sophon_fast.attacks.adaptive import AdaptiveAttack, _block_input_rms, _InputScale, prepare
from sophon_fast.attacks.run import run
from sophon_fast.attacks.spec import Attack
from sophon_fast.data import as_tensors
from sophon_fast.models import classifier_block, model_device


def eval_grid(steps: int, points: int = 12) -> List[int]:
    """About ``points`` evaluation steps in [1, ``steps``], geometrically spaced (dense early), ``steps`` last."""
    if steps < 1:
        raise ValueError(f"eval_grid: steps must be >= 1, got {steps}")
    grid = {max(1, round(steps ** (i / (points - 1)))) for i in range(points)} if points > 1 else set()
    return sorted(grid | {steps})


@dataclass(frozen=True)
class ComposedAttack:
    """Benign-first steps, a fresh or rescaled classifier block, then ``finetune`` for ``steps`` steps (see the
    module docstring). ``fresh_block`` needs ``finetune.method == "full"``; ``block_input_rms`` needs method
    ``full`` (with or without ``fresh_block``)."""

    finetune: Attack
    steps: int
    fresh_block: Optional[int] = None
    block_input_rms: Optional[float] = None
    benign_steps: int = 0
    benign_lr: float = 1e-3

    def __post_init__(self):
        if self.steps < 1 or self.benign_steps < 0 or not self.benign_lr > 0:
            raise ValueError(f"invalid composed attack: steps {self.steps}, benign_steps {self.benign_steps}, "
                             f"benign_lr {self.benign_lr}")
        if self.fresh_block is not None and (self.fresh_block < 1 or self.finetune.method != "full"):
            raise ValueError(f"fresh_block must be >= 1 and needs method 'full', got {self.fresh_block} with "
                             f"{self.finetune.method!r}")
        if self.block_input_rms is not None and (not self.block_input_rms > 0 or self.finetune.method != "full"):
            raise ValueError(f"block_input_rms must be positive and needs method 'full', got {self.block_input_rms} "
                             f"with {self.finetune.method!r}")

    def describe(self) -> str:
        a = self.finetune
        parts = [f"fresh block (last {self.fresh_block})" if self.fresh_block else a.method,
                 f"{a.optimizer} lr {a.lr:.3g}", f"batch {a.batch_size}", f"wd {a.weight_decay:g}"]
        if a.schedule != "constant":
            parts.append(f"warm-up {a.warmup:g} + cosine")
        if self.block_input_rms is not None:
            parts.append(f"block input RMS {self.block_input_rms:g}")
        if self.benign_steps:
            parts.append(f"{self.benign_steps} benign steps first")
        return ", ".join(parts) + f", {self.steps} steps"


def rescale_block_input(model: nn.Module, rms: float, inputs: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` computing the same function, whose classifier block (:func:`classifier_block`)
    receives its input multiplied by ``c`` = ``rms`` / (its RMS on ``inputs``), the block's first module's weight
    divided by ``c`` (a6). ``ValueError`` unless that module is an ``nn.Linear`` or a convolution."""
    m = copy.deepcopy(model)
    first = classifier_block(m)[0]
    if not isinstance(first, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise ValueError(f"rescale_block_input: the classifier block starts with {type(first).__name__}, "
                         "not a Linear or convolution, so the rescale would change the function")
    now = _block_input_rms(m, first, inputs[:1000].to(model_device(m)))
    c = rms / now if now > 0 else 1.0
    first.register_forward_pre_hook(_InputScale(c))
    with torch.no_grad():
        first.weight.div_(c)
    return m


def run_composed(model: nn.Module, train, test, attack: ComposedAttack, seed: int = 0, original=None,
                 eval_steps: Optional[Sequence[int]] = None, stop_if: Optional[Callable[[nn.Module], bool]] = None,
                 loss_log: Optional[list] = None) -> List[float]:
    """Run ``attack`` on a copy of ``model`` (untouched); restricted ``test`` accuracy at step 0 and after each of
    ``eval_steps`` (default :func:`eval_grid` of ``attack.steps``; the last must be ``attack.steps``).
    ``original``: original-domain training data, needed when ``attack.benign_steps`` > 0. Randomness (fresh
    modules, batches) is seeded by ``seed``; ``stop_if`` and ``loss_log`` go to :func:`sophon_fast.attacks.run`."""
    device = model_device(model)
    train = tuple(t.to(device) for t in as_tensors(train))
    eval_steps = list(eval_steps) if eval_steps is not None else eval_grid(attack.steps)
    if eval_steps[-1] != attack.steps:
        raise ValueError(f"run_composed: the last evaluation step must be the budget {attack.steps}, got {eval_steps}")
    m = model
    if attack.benign_steps:
        if original is None:
            raise ValueError("run_composed: benign-first steps need original-domain data (original=...)")
        orig = tuple(t.to(device) for t in as_tensors(original))
        m = prepare(m, AdaptiveAttack("benign", "benign_first", benign_steps=attack.benign_steps,
                                      benign_lr=attack.benign_lr, batch_size=attack.finetune.batch_size), seed,
                    original=orig)
    if attack.fresh_block is not None:
        m = prepare(m, AdaptiveAttack("fresh", "reinit_block", reinit_last=attack.fresh_block,
                                      block_input_rms=attack.block_input_rms), seed, restricted=train)
    elif attack.block_input_rms is not None:
        m = rescale_block_input(m, attack.block_input_rms, train[0])
    per_epoch = -(-train[0].shape[0] // attack.finetune.batch_size)
    ft = dataclasses.replace(attack.finetune, epochs=-(-attack.steps // per_epoch))
    return run(m, train, test, ft, seed, device, eval_steps=eval_steps, stop_if=stop_if, loss_log=loss_log)
