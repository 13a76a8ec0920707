"""Probes on frozen features: which blocks of a body still carry the restricted-domain labels.

A *block* is a module whose output is one stage of the body's representation: every pooling layer
(``nn.MaxPool2d``/``AvgPool2d``/adaptive pools) in module order, each child of a ``stages``
``nn.Sequential`` (the residual networks of :mod:`sophon_fast.models`), and always the head's input,
named :data:`HEAD_INPUT`. :func:`capture` records block outputs during any forward pass (with or
without autograd, so a defence can use it too); :func:`block_features` materialises them for a
dataset; :func:`probe_curve` trains a fresh linear or small-MLP probe on them with the attack runner
(:func:`sophon_fast.attacks.run`), so probes and fine-tuning attacks share one training loop.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from sophon_fast import models
from sophon_fast.attacks.run import run
from sophon_fast.attacks.spec import Attack

HEAD_INPUT = "head_input"
PROBE_KINDS = ("linear", "mlp")
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def feature_blocks(model: nn.Module, head: Optional[nn.Module] = None) -> List[str]:
    """Block names of ``model`` in forward order: module paths (``named_modules`` names) of its pooling
    layers and of the children of a ``stages`` ``nn.Sequential``, then :data:`HEAD_INPUT`.

    ``head`` defaults to :func:`sophon_fast.models.head_of`; pooling layers inside the head are skipped.
    """
    head = head if head is not None else models.head_of(model)
    in_head = {id(m) for m in head.modules()}
    names = [n for n, m in model.named_modules() if isinstance(m, _POOLS) and id(m) not in in_head]
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential):
        names += [f"stages.{i}" for i in range(len(stages))]
    return names + [HEAD_INPUT]


@contextlib.contextmanager
def capture(model: nn.Module, blocks: Sequence[str], head: Optional[nn.Module] = None) -> Iterator[Dict[str, list]]:
    """Record block outputs while the context is open: yields ``{name: [Tensor, ...]}``, one tensor per
    forward call of that block (its output; for :data:`HEAD_INPUT`, the head's first input), not
    detached, so gradients flow through them. Hooks are removed on exit. Raises ``ValueError`` for a
    name that is not a module of ``model``.
    """
    mods = dict(model.named_modules())
    missing = [b for b in blocks if b != HEAD_INPUT and b not in mods]
    if missing:
        raise ValueError(f"capture: {missing} are not modules of {type(model).__name__}")
    out: Dict[str, list] = {b: [] for b in blocks}
    handles = []
    try:
        for b in blocks:
            if b == HEAD_INPUT:
                h = head if head is not None else models.head_of(model)
                handles.append(h.register_forward_pre_hook(lambda mod, inp, b=b: out[b].append(inp[0])))
            else:
                handles.append(mods[b].register_forward_hook(lambda mod, inp, o, b=b: out[b].append(o)))
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_features(model: nn.Module, X: Tensor, blocks: Sequence[str], batch_size: int = 1000) -> Dict[str, Tensor]:
    """Each block's output for every row of ``X``, flattened: ``{name: (N, D_block) float tensor}`` on
    X's device, computed in eval mode (the model's mode is restored)."""
    was = model.training
    model.eval()
    feats: Dict[str, list] = {b: [] for b in blocks}
    try:
        with capture(model, blocks) as got:
            for i in range(0, X.shape[0], batch_size):
                model(X[i:i + batch_size])
                for b in blocks:
                    feats[b].append(got[b].pop().flatten(1))
    finally:
        model.train(was)
    return {b: torch.cat(v) for b, v in feats.items()}


def make_probe(kind: str, in_dim: int, num_classes: int, hidden: int = 256, seed: int = 0,
               device: Optional[torch.device] = None) -> nn.Module:
    """A fresh probe (N, in_dim) -> (N, num_classes): ``linear`` = one Linear; ``mlp`` = Linear(hidden),
    ReLU, Linear. Initialised (torch defaults) under ``torch.manual_seed(seed)`` without touching the
    caller's RNG state; placed on ``device``."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe kind must be one of {PROBE_KINDS}, got {kind!r}")
    if in_dim < 1 or num_classes < 2 or hidden < 1:
        raise ValueError(f"make_probe: need in_dim >= 1, num_classes >= 2, hidden >= 1; got {in_dim}, "
                         f"{num_classes}, {hidden}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Linear(in_dim, num_classes)] if kind == "linear" else \
            [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        probe = nn.Sequential(*layers)
    return probe.to(device) if device is not None else probe


def standardize(train: Tensor, test: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """Z-score every feature with the training rows' mean and std (so a probe's learning rate does not
    depend on the feature scale a protection chose). Shapes (N, D) and (M, D) are kept."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True)
    return (train - mean) / (std + eps), (test - mean) / (std + eps)


def probe_curve(train: Tuple[Tensor, Tensor], test: Tuple[Tensor, Tensor], kind: str, attack: Attack,
                seed: int = 0, hidden: int = 256, eval_steps: Optional[Sequence[int]] = None) -> List[float]:
    """Test-accuracy curve of a fresh ``kind`` probe trained on ``train = (features (N, D), labels (N,))``
    with ``attack``'s optimiser, learning rate, batch size and epochs (its method is ignored: every probe
    parameter trains). Curve semantics as :func:`sophon_fast.attacks.run` (per epoch, or at
    ``eval_steps``)."""
    (Ftr, Ytr), (Fte, Yte) = train, test
    if Ftr.dim() != 2 or Fte.dim() != 2 or Ftr.shape[1] != Fte.shape[1]:
        raise ValueError(f"probe_curve: features must be (N, D) with the same D, got {tuple(Ftr.shape)} "
                         f"and {tuple(Fte.shape)}")
    classes = int(torch.cat([Ytr, Yte]).max()) + 1
    probe = make_probe(kind, Ftr.shape[1], max(classes, 2), hidden, seed, Ftr.device)
    spec = Attack(name=f"probe-{kind}", method="full", optimizer=attack.optimizer, lr=attack.lr,
                  batch_size=attack.batch_size, epochs=attack.epochs, momentum=attack.momentum,
                  weight_decay=attack.weight_decay)
    return run(probe, (Ftr, Ytr), (Fte, Yte), spec, seed, Ftr.device, eval_steps=eval_steps)
