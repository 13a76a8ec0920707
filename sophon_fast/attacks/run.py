"""Run fine-tuning attacks and the scratch baseline; produce accuracy curves."""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from sophon_fast import models
from sophon_fast.attacks.metrics import head_start_removed, overhead
from sophon_fast.attacks.spec import Attack, suite
from sophon_fast.data import as_tensors
from sophon_fast.models import model_device as _model_device
from sophon_fast.tasks.base import reinit_linear_
from sophon_fast.tasks.classification import accuracy  # noqa: F401  (re-exported: one accuracy function)


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


@torch.no_grad()
def _accuracy(fn, X: torch.Tensor, Y: torch.Tensor, batch_size: int) -> float:
    correct = torch.zeros((), dtype=torch.long, device=X.device)
    for i in range(0, X.shape[0], batch_size):
        correct += (fn(X[i:i + batch_size]).argmax(1) == Y[i:i + batch_size]).sum()
    return int(correct) / X.shape[0]


@torch.no_grad()
def _head_inputs(model: nn.Module, head: nn.Linear, X: torch.Tensor, batch_size: int = 1000) -> Optional[torch.Tensor]:
    """Inputs of ``head`` for every row of X (model in eval mode), or None if logits != head(input)."""
    feats, outs = [], []

    def hook(mod, inp, out):   # must return None (a returned value would replace the head's output)
        feats.append(inp[0])
        outs.append(out)

    hook = head.register_forward_hook(hook)
    try:
        logits = [model(X[i:i + batch_size]) for i in range(0, X.shape[0], batch_size)]
    finally:
        hook.remove()
    if len(feats) != len(logits) or any(o is not l for o, l in zip(outs, logits)):
        return None   # the head is not the model's last operation (or ran more than once): no shortcut
    return torch.cat(feats)


def run(model: nn.Module, train, test, attack: Attack, seed: int = 0, device: Union[str, torch.device] = "cpu",
        progress: bool = False, return_model: bool = False, eval_steps: Optional[Sequence[int]] = None,
        loss_log: Optional[list] = None, stop_if: Optional[Callable[[nn.Module], bool]] = None):
    """Fine-tune a copy of ``model`` on ``train`` with ``attack``; restricted ``test`` accuracy per epoch.

    Returns ``attack.epochs + 1`` accuracies in [0, 1]; index 0 is before any training (after the head
    re-initialisation for ``reinit_head``); with ``return_model``, ``(curve, attacked_model)``.
    ``model`` is not modified (a deep copy is trained). ``train``/``test`` are Datasets,
    DataLoaders or ``(X, Y)`` tensors (materialised once with :func:`sophon_fast.data.as_tensors`, then
    batched by hand: a fresh seeded permutation each epoch, the last batch possibly smaller).
    Cross-entropy loss; train mode while training (except the frozen body of ``last_layer``), eval mode
    for evaluation. Deterministic given ``seed`` (shuffling uses its own generator; head
    initialisation and any dropout run under ``torch.manual_seed(seed)`` inside ``fork_rng``, so the
    caller's global RNG state is untouched).

    ``last_layer`` attacks compute the frozen body's features once and train the head on them when the
    head is the model's last operation (checked on the data), which is the same computation, faster.

    ``eval_steps`` (strictly increasing optimiser-step counts >= 1, within ``attack.epochs`` epochs):
    evaluate after each of those steps instead of after each epoch, and stop after the last one; the
    curve then has ``len(eval_steps) + 1`` entries (index 0 before training). ``loss_log``: a list that
    receives every step's training loss as a detached 0-d tensor (no host synchronisation).

    The attack's schedule (:meth:`Attack.make_scheduler`) runs over the last of ``eval_steps`` when given, else
    over ``attack.epochs`` x batches per epoch. ``stop_if``: called with the model being trained after each
    evaluation but the last; when it returns True the run stops there and the curve is that much shorter (for a
    run whose later accuracies are already determined, such as one whose weights went NaN).
    """
    device = torch.device(device)
    Xtr, Ytr = (t.to(device) for t in as_tensors(train))
    Xte, Yte = (t.to(device) for t in as_tensors(test))
    m = copy.deepcopy(model).to(device)
    head = models.head_of(m)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        if attack.method == "reinit_head":
            reinit_linear_(head.weight, head.bias, None)          # the global RNG, seeded above
        for p in m.parameters():
            p.requires_grad_(attack.method != "last_layer")
        for p in head.parameters():
            p.requires_grad_(True)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = attack.make_optimizer(params)
        forward, set_mode = m, (lambda: m.train())
        if attack.method == "last_layer":
            m.eval()
            ftr, fte = _head_inputs(m, head, Xtr), _head_inputs(m, head, Xte)
            if ftr is not None and fte is not None:
                Xtr, Xte, forward = ftr, fte, head
            set_mode = lambda: None   # noqa: E731  (body stays in eval mode; Linear has no mode)
        gen = torch.Generator().manual_seed(seed)
        evaluate = lambda: (m.eval(), _accuracy(forward, Xte, Yte, 1000))[1]   # noqa: E731
        curve = [evaluate()]
        n, bs = Xtr.shape[0], attack.batch_size
        pending = _check_eval_steps(eval_steps, attack.epochs * -(-n // bs))
        sched = attack.make_scheduler(opt, pending[-1] if pending else attack.epochs * -(-n // bs))
        epochs = range(attack.epochs)
        if progress:
            from tqdm.auto import tqdm
            epochs = tqdm(epochs, desc=attack.name, leave=False)
        step = 0
        for _ in epochs:
            set_mode()
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                loss = F.cross_entropy(forward(Xtr[idx]), Ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                if loss_log is not None:
                    loss_log.append(loss.detach())
                if pending and step == pending[0]:
                    pending.pop(0)
                    curve.append(evaluate())
                    set_mode()
                    if pending and stop_if is not None and stop_if(m):
                        pending.clear()
                    if not pending:
                        break
            if eval_steps is None:
                curve.append(evaluate())
                if stop_if is not None and len(curve) <= attack.epochs and stop_if(m):
                    break
            elif not pending:
                break
    for p in m.parameters():
        p.requires_grad_(True)
    return (curve, m) if return_model else curve


def _check_eval_steps(eval_steps: Optional[Sequence[int]], total_steps: int) -> list:
    """``eval_steps`` as a list (empty for None); ValueError unless strictly increasing in [1, total_steps]."""
    if eval_steps is None:
        return []
    steps = [int(s) for s in eval_steps]
    if not steps or steps[0] < 1 or steps[-1] > total_steps or any(a >= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"eval_steps must be strictly increasing in [1, {total_steps}] "
                         f"(the attack's epochs x batches per epoch), got {list(eval_steps)}")
    return steps


def scratch(model_or_arch: Union[nn.Module, Dict, str], seed: int = 0, **kw) -> nn.Module:
    """The same architecture, freshly initialised with ``seed``, on the original model's device.

    Accepts a model carrying ``sophon_arch`` (rebuilt with :func:`sophon_fast.models.build`), an arch
    dict ``{"name", "kwargs"}``, a builder name (``kw`` go to the builder), or any other module: then a
    deep copy has ``reset_parameters()`` called on every submodule that has one (BatchNorm running
    statistics are reset too). The global RNG state is untouched.
    """
    if isinstance(model_or_arch, str):
        return models.build(model_or_arch, seed=seed, **kw)
    if isinstance(model_or_arch, dict):
        return models.build(model_or_arch["name"], seed=seed, **model_or_arch.get("kwargs", {}))
    arch = getattr(model_or_arch, "sophon_arch", None)
    device = _model_device(model_or_arch)
    if isinstance(arch, dict) and "name" in arch:
        return models.build(arch["name"], seed=seed, **arch.get("kwargs", {})).to(device)
    m = copy.deepcopy(model_or_arch)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        for mod in m.modules():
            if callable(getattr(mod, "reset_parameters", None)):
                mod.reset_parameters()
    return m


def evaluate_suite(protected: nn.Module, unprotected: Optional[nn.Module], train, test,
                   attacks: Union[str, Sequence[Attack]], seed: int = 0, epochs_scale: float = 1.0,
                   progress: bool = True, device: Union[str, torch.device] = "cpu",
                   scratch_model: Optional[nn.Module] = None) -> List[dict]:
    """Run every attack on ``protected``, ``unprotected`` (skipped when None) and a scratch model.

    ``attacks`` is a list of :class:`Attack` or a suite name (:func:`suite`); each attack's epochs are
    multiplied by ``epochs_scale`` (:meth:`Attack.scaled`). The scratch model is ``scratch(protected,
    seed)`` unless given. All three runs of an attack share ``seed`` (same batches). One dict per attack:
    the attack's fields, ``protected``/``unprotected``/``scratch`` curves (None when not run),
    ``overhead`` and ``never_reached`` (:func:`overhead` of protected vs scratch),
    ``head_start_removed`` (None without an unprotected model or head start) and ``seconds``.
    """
    if isinstance(attacks, str):
        attacks = suite(attacks)
    data_train, data_test = as_tensors(train), as_tensors(test)
    base = scratch_model if scratch_model is not None else scratch(protected, seed)
    rows = []
    it = attacks
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(attacks, desc="attacks")
    for attack in it:
        attack = attack.scaled(epochs_scale) if epochs_scale != 1.0 else attack
        t0 = time.perf_counter()
        curves = {k: (run(m, data_train, data_test, attack, seed, device) if m is not None else None)
                  for k, m in (("protected", protected), ("unprotected", unprotected), ("scratch", base))}
        ov = overhead(curves["protected"], curves["scratch"])
        hsr = (head_start_removed(curves["protected"], curves["unprotected"], curves["scratch"])
               if curves["unprotected"] is not None else None)
        rows.append({"attack": attack.name, **dataclasses.asdict(attack), **curves, "overhead": ov.value,
                     "never_reached": ov.never_reached, "head_start_removed": hsr,
                     "seconds": time.perf_counter() - t0})
        if progress:
            it.set_postfix(protected=f"{curves['protected'][-1]:.3f}", scratch=f"{curves['scratch'][-1]:.3f}")
    return rows
