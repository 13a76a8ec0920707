"""The two ways to compute SOPHON's first-order meta-gradient: ``ReferenceMode`` and ``FastMode``.

Both implement one interface used by the outer loop (sophon_fast/engine/loop.py):

    optim_params            parameters the FTS/NTR optimisers own
    begin_iteration()       remember theta and the BatchNorm buffers, zero the meta-gradient
    rewind()                back to the weights and buffers of the iteration's start
    trajectory(...)         simulate one attacker trajectory, add sum_k w_k grad L_k(theta'_k) to the
                            meta-gradient, restore theta and the BatchNorm buffers; returns the L_k
    meta_backward(fn)       add the gradient of fn() at theta to the meta-gradient (buffers restored)
    use_meta_grad()         expose the meta-gradient as .grad of optim_params (for clip + FTS step)
    use_plain_grad()        expose zeroed plain gradients (for NTR steps)
    snapshot() / restore()  copies of the weights and buffers (rollback, non-finite skips)
    release()               the model as an ordinary module

ReferenceMode is the reference code's computation, readably: a graph-connected clone, inner updates
with detached gradients, the K weighted query losses summed and back-propagated once (K graphs alive:
memory O(K)). FastMode computes the same numbers with the model's parameters as views into one flat
arena: the inner optimiser step (and the zeroing of the support gradient) is one fused pass over
flat buffers (``torch.ops.sophon_fast.inner_step_``), and each query loss is back-propagated at once
with the parameters' ``.grad`` pointing into the meta-gradient buffer, so autograd's own gradient
accumulation adds ``w_k * grad L_k`` in place: no per-step graph survives, memory is flat in K, and
the accumulation costs no pass of its own.
"""
from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn
from torch.func import functional_call

from sophon_fast.functional import cross_entropy, suppression_loss
from sophon_fast.ops.inner_step import inner_step_
from sophon_fast.reference.inner_step import ADAM, KINDS, MOMENTUM
from sophon_fast.reference.inner_step import inner_step_ as inner_step_reference


def _trainable(model: nn.Module) -> List[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError("protect: the model has no trainable parameters")
    return out


def _reinit_head(weight: torch.Tensor, bias, gen: torch.Generator) -> None:
    with torch.no_grad():
        nn.init.xavier_uniform_(weight, generator=gen)
        if bias is not None:
            bias.zero_()


class _BufferSnapshot:
    """Copies of every floating/integer buffer (BatchNorm running stats), restored in place."""

    def __init__(self, model: nn.Module):
        self.buffers = [b for b in model.buffers()]
        self.saved = [b.detach().clone() for b in self.buffers]

    def take(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            s.copy_(b)

    def put(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            b.copy_(s)


def _query_loss(forward, xq, yq, loss_name: str, query_extra=None) -> torch.Tensor:
    """The suppression loss of one query batch at the current inner weights; ``query_extra(forward, xq)``
    (optional) returns the logits and an extra loss from the same forward pass (added)."""
    if query_extra is None:
        return suppression_loss(loss_name, forward(xq), yq)
    logits, extra = query_extra(forward, xq)
    return suppression_loss(loss_name, logits, yq) + extra


class ReferenceMode:
    """The reference code's computation (learn2learn-style first-order MAML), kept readable."""

    def __init__(self, model: nn.Module, head: nn.Linear):
        self.model, self.head = model, head
        self.optim_params = _trainable(model)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.bufs = _BufferSnapshot(model)

    def begin_iteration(self) -> None:
        for p in self.optim_params:
            p.grad = None
        self.bufs.take()
        self.start = [p.detach().clone() for p in self.optim_params]

    def rewind(self) -> None:
        self.restore((self.start, self.bufs.saved))

    def trajectory(self, strategy, next_batch: Callable, loss_name: str, weights, gen,
                   query_extra=None) -> torch.Tensor:
        fast = {self.names[id(p)]: p.clone() for p in self.optim_params}   # graph-connected clone
        if strategy.reinit_head:
            hw = self.names[id(self.head.weight)]
            hb = self.names[id(self.head.bias)] if self.head.bias is not None else None
            _reinit_head(fast[hw], fast[hb] if hb else None, gen)
        kind = KINDS[strategy.optimizer]
        b1 = strategy.momentum if kind == MOMENTUM else strategy.betas[0]
        b2 = strategy.betas[1]
        state = {n: [torch.zeros_like(w), torch.zeros_like(w)] for n, w in fast.items()}
        total, losses, warm = 0.0, [], strategy.warmup_steps
        for k in range(warm + len(weights)):
            xs, ys, xq, yq = next_batch(strategy)
            support = cross_entropy(functional_call(self.model, fast, (xs,)), ys)
            grads = torch.autograd.grad(support, list(fast.values()))            # first order: detached
            new = {}
            for (n, w), g in zip(fast.items(), grads):
                with torch.no_grad():
                    upd = _inner_update(w.detach(), g, state[n], kind, strategy, b1, b2, k + 1)
                new[n] = w - upd                                                # d theta'_k / d theta = I
            fast = new
            if k < warm:
                continue
            lq = _query_loss(lambda x: functional_call(self.model, fast, (x,)), xq, yq, loss_name, query_extra)
            total = total + weights[k - warm] * lq                              # K graphs stay alive
            losses.append(lq.detach())
        total.backward()
        self.bufs.put()
        return torch.stack(losses)

    def meta_backward(self, fn) -> torch.Tensor:
        loss = fn()
        loss.backward()
        self.bufs.put()
        return loss.detach()

    def use_meta_grad(self) -> List[torch.Tensor]:
        for p in self.optim_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return self.optim_params

    def use_plain_grad(self) -> None:
        for p in self.optim_params:
            p.grad = None

    def snapshot(self):
        return [p.detach().clone() for p in self.optim_params], [b.detach().clone() for b in self.bufs.buffers]

    def restore(self, snap) -> None:
        with torch.no_grad():
            for p, s in zip(self.optim_params, snap[0]):
                p.copy_(s)
            for b, s in zip(self.bufs.buffers, snap[1]):
                b.copy_(s)

    def release(self) -> nn.Module:
        self.use_plain_grad()
        return self.model


def _inner_update(w, g, st, kind, s, b1, b2, step):
    """The detached update of one tensor; the same arithmetic as sophon_fast/reference/inner_step.py."""
    w_new = w.clone()
    inner_step_reference(w_new, g, st[0], st[1], kind, s.lr, b1, b2, s.eps, s.weight_decay, step, False)
    return w - w_new


class FastMode:
    """Flat parameter arena; fused inner steps; meta-gradient accumulated by autograd in place."""

    def __init__(self, model: nn.Module, head: nn.Linear):
        self.model, self.head = model, head
        self.params = _trainable(model)
        dtypes = {(p.dtype, p.device) for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"protect(mode='fast') needs every trainable parameter on one dtype and device, "
                             f"got {sorted(map(str, dtypes))}")
        dtype, device = next(iter(dtypes))
        numel = sum(p.numel() for p in self.params)
        self.flat = torch.empty(numel, dtype=dtype, device=device)
        self.grad = torch.zeros_like(self.flat)
        self.acc = torch.zeros_like(self.flat)
        self.backup = torch.empty_like(self.flat)
        self.exp_avg = self.exp_avg_sq = self.flat.new_empty(0)   # allocated when a strategy needs them
        self.grad_views, self.acc_views = [], []
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
                p.data = self.flat[offset:offset + n].view_as(p)                 # parameters become views
                self.grad_views.append(self.grad[offset:offset + n].view_as(p))
                self.acc_views.append(self.acc[offset:offset + n].view_as(p))
                offset += n
        self.flat_param = nn.Parameter(self.flat)                               # one tensor for the optimisers
        self.optim_params = [self.flat_param]
        self.bufs = _BufferSnapshot(model)

    def _point_grads(self, views) -> None:
        for p, v in zip(self.params, views):
            p.grad = v

    def _state_for(self, kind: int) -> None:
        if kind >= MOMENTUM and self.exp_avg.numel() == 0:
            self.exp_avg = torch.zeros_like(self.flat)
        if kind == ADAM and self.exp_avg_sq.numel() == 0:
            self.exp_avg_sq = torch.zeros_like(self.flat)

    def begin_iteration(self) -> None:
        self.backup.copy_(self.flat)
        self.bufs.take()
        self.acc.zero_()

    def rewind(self) -> None:
        self.restore((self.backup, self.bufs.saved))

    def trajectory(self, strategy, next_batch: Callable, loss_name: str, weights, gen,
                   query_extra=None) -> torch.Tensor:
        kind = KINDS[strategy.optimizer]
        self._state_for(kind)
        if kind >= MOMENTUM:
            self.exp_avg.zero_()
        if kind == ADAM:
            self.exp_avg_sq.zero_()
        b1 = strategy.momentum if kind == MOMENTUM else strategy.betas[0]
        if strategy.reinit_head:
            _reinit_head(self.head.weight, self.head.bias, gen)
        self.grad.zero_()
        losses, warm = [], strategy.warmup_steps
        for k in range(warm + len(weights)):
            xs, ys, xq, yq = next_batch(strategy)
            self._point_grads(self.grad_views)
            cross_entropy(self.model(xs), ys).backward()                         # grad = support gradient
            inner_step_(self.flat, self.grad, self.exp_avg, self.exp_avg_sq, kind, strategy.lr, b1,
                        strategy.betas[1], strategy.eps, strategy.weight_decay, k + 1, True)
            if k < warm:
                continue
            self._point_grads(self.acc_views)
            lq = _query_loss(self.model, xq, yq, loss_name, query_extra)
            (lq * weights[k - warm]).backward()                                 # acc += w_k grad L_k
            losses.append(lq.detach())
        with torch.no_grad():
            self.flat.copy_(self.backup)
        self.bufs.put()
        return torch.stack(losses)

    def meta_backward(self, fn) -> torch.Tensor:
        self._point_grads(self.acc_views)
        loss = fn()
        loss.backward()
        self.bufs.put()
        return loss.detach()

    def use_meta_grad(self) -> List[torch.Tensor]:
        self.flat_param.grad = self.acc
        return self.optim_params

    def use_plain_grad(self) -> None:
        self.grad.zero_()
        self._point_grads(self.grad_views)
        self.flat_param.grad = self.grad

    def snapshot(self):
        return self.flat.clone(), [b.detach().clone() for b in self.bufs.buffers]

    def restore(self, snap) -> None:
        with torch.no_grad():
            self.flat.copy_(snap[0])
            for b, s in zip(self.bufs.buffers, snap[1]):
                b.copy_(s)

    def release(self) -> nn.Module:
        """Give every parameter its own storage again (the arena is dropped)."""
        with torch.no_grad():
            for p in self.params:
                p.grad = None
                p.data = p.data.clone()
        return self.model


MODES = {"reference": ReferenceMode, "fast": FastMode}
