"""Fine-tuning attacks on causal language models: full fine-tuning (AdamW) and LoRA (``peft``).

Every attack trains a copy of the model on restricted text with next-token cross-entropy
(:class:`~sophon_fast.tasks.lm.LanguageModelTask`), AdamW, a linear warm-up over the first
``warmup`` fraction of the steps and a cosine decay to 0 after it, and measures the restricted
next-token loss on held-out text at ``evals + 1`` evaluation points (step 0 included). Batches are
drawn from seeded permutations of the training rows, so two models attacked with the same seed see
the same batches. :func:`evaluate_suite` runs each attack on the protected model, the unprotected
model and a freshly initialised model of the same configuration ("scratch") and returns a plain,
JSON-serialisable dict::

    {"metric": "restricted next-token loss", "higher_is_better": False,
     "attacks": [{"name", "method", "lr", ..., "train_steps", "steps": [0, ...] (evaluation steps),
                  "protected": [...], "unprotected": [...], "scratch": [...], "seconds"}]}
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from sophon_fast.attacks.spec import warmup_cosine
from sophon_fast.models.lm import fresh_like
from sophon_fast.tasks.lm import LanguageModelTask

METHODS = ("full", "lora")
METRIC = "restricted next-token loss"


@dataclass(frozen=True)
class LMAttack:
    """One fine-tuning recipe for a causal LM.

    method: "full" (every parameter, also any the model had frozen) or "lora" (``peft`` LoRA of rank ``rank`` and scale
    ``lora_alpha`` (default 2 * rank) on every linear layer of the decoder except the output head;
    the rest frozen). lr: AdamW's peak learning rate; ``steps`` optimiser steps of ``batch_size``
    rows; ``warmup``: fraction of the steps of linear warm-up, then cosine decay to 0.
    ``evals``: evaluation points after step 0, equally spaced over the steps.
    """

    name: Optional[str] = None
    method: str = "full"
    lr: float = 5e-4
    steps: int = 200
    batch_size: int = 8
    warmup: float = 0.1
    weight_decay: float = 0.01
    rank: int = 8
    lora_alpha: Optional[float] = None
    evals: int = 5

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown LM attack method {self.method!r}; one of {METHODS}")
        if not (self.lr > 0 and self.steps >= 1 and self.batch_size >= 1 and 0 <= self.warmup < 1
                and self.weight_decay >= 0 and self.rank >= 1 and 1 <= self.evals <= self.steps):
            raise ValueError(f"invalid LM attack hyper-parameters: {self}")
        if self.name is None:
            kind = f"lora-r{self.rank}" if self.method == "lora" else "full"
            object.__setattr__(self, "name", f"{kind}-adamw-lr{self.lr:g}")

    def eval_steps(self) -> List[int]:
        """The steps after which the restricted loss is measured: 0, ..., ``steps``."""
        return sorted({round(i * self.steps / self.evals) for i in range(self.evals + 1)})

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimiser step ``step`` (0-based): linear warm-up, cosine decay."""
        return warmup_cosine(step, self.steps, self.warmup)


def default_attacks(steps: int = 200, batch_size: int = 8, full_lrs: Sequence[float] = (1e-4, 5e-4, 2e-3),
                    lora_lr: float = 2e-3, ranks: Sequence[int] = (8, 16), evals: int = 5) -> List[LMAttack]:
    """Full fine-tuning at each of ``full_lrs`` and LoRA at each rank in ``ranks`` (lr ``lora_lr``)."""
    return ([LMAttack(method="full", lr=lr, steps=steps, batch_size=batch_size, evals=evals) for lr in full_lrs]
            + [LMAttack(method="lora", lr=lora_lr, rank=r, steps=steps, batch_size=batch_size, evals=evals)
               for r in ranks])


def _lora(model: nn.Module, attack: LMAttack) -> nn.Module:
    """``peft`` LoRA on every decoder linear layer (GPT-2's Conv1D included), head excluded."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    cfg = LoraConfig(r=attack.rank, lora_alpha=attack.lora_alpha or 2 * attack.rank, lora_dropout=0.0,
                     target_modules="all-linear", fan_in_fan_out=conv1d, bias="none")
    return get_peft_model(model, cfg)


def run(model: nn.Module, train, test, attack: LMAttack, seed: int = 0, task: Optional[LanguageModelTask] = None,
        return_model: bool = False):
    """Attack a copy of ``model``; the restricted next-token loss at ``attack.eval_steps()``.

    ``train``/``test``: ``(input_ids, labels[, attention_mask])`` tensors (see
    :mod:`sophon_fast.tasks.lm`), moved to the model's device. ``model`` is not modified. Returns the
    list of losses (floats, one per evaluation step); with ``return_model``, ``(losses, attacked)``
    where ``attacked`` is the trained copy (a ``peft`` model for LoRA). Deterministic given ``seed``
    (batches from a seeded generator on the data's device; the global RNG is untouched).
    """
    task = task or LanguageModelTask()
    m = copy.deepcopy(model)
    train, test = task.prepare(m, train, "attack train"), task.prepare(m, test, "attack test")
    for p in m.parameters():   # the attacker trains everything, whatever the model had frozen
        p.requires_grad_(True)
    if attack.method == "lora":    # peft draws lora_A from the global RNG: seeded here, the caller's RNG untouched
        dev = next(m.parameters()).device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            m = _lora(m, attack)
    target = m.get_base_model() if attack.method == "lora" else m
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=attack.lr, weight_decay=attack.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, attack.lr_factor)
    device, n = train[0].device, train[0].shape[0]
    gen = torch.Generator(device=device).manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen, device=device), 0
    points = set(attack.eval_steps())
    losses = [task.evaluate(target, test)]
    target.train()
    for step in range(1, attack.steps + 1):
        if pos + attack.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen, device=device), 0
        idx = perm[pos:pos + attack.batch_size]
        pos += attack.batch_size
        loss = task.attacker_loss(target, tuple(t[idx] for t in train), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step in points:
            losses.append(task.evaluate(target, test))
    return (losses, m) if return_model else losses


def evaluate_suite(protected: nn.Module, unprotected: Optional[nn.Module], train, test,
                   attacks: Sequence[LMAttack], seed: int = 0, scratch_model: Optional[nn.Module] = None,
                   task: Optional[LanguageModelTask] = None,
                   say: Optional[Callable[[str], None]] = None) -> Dict:
    """Run each attack on ``protected``, ``unprotected`` (None: skipped, its lists are None) and a
    scratch model (default :func:`~sophon_fast.models.lm.fresh_like` of ``protected`` with ``seed``).

    Returns the JSON-serialisable dict of the module docstring; all three runs of an attack share
    ``seed``. ``say`` receives one progress line per finished attack.
    """
    base = scratch_model if scratch_model is not None else fresh_like(protected, seed)
    rows = []
    for attack in attacks:
        t0 = time.perf_counter()
        curves = {who: (run(m, train, test, attack, seed, task) if m is not None else None)
                  for who, m in (("protected", protected), ("unprotected", unprotected), ("scratch", base))}
        fields = {k: v for k, v in dataclasses.asdict(attack).items() if k not in ("name", "steps")}
        row = {"name": attack.name, **fields, "train_steps": attack.steps, "steps": attack.eval_steps(), **curves,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        if say is not None:
            say(f"[lm attack] {attack.name}: " + "  ".join(
                f"{who} {curves[who][0]:.2f}->{curves[who][-1]:.2f}" for who in curves if curves[who] is not None))
    return {"metric": METRIC, "higher_is_better": False, "attacks": rows}
