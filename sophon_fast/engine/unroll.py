"""The unrolled meta-gradient on the fast path, with activation memory independent of K.

The attacker's state after step j is s_j = (T_j, m_j, v_j): its trained tensors and inner optimiser state,
s_j = U_j(s_{j-1}, X) with U_j one inner step (support gradient at T_{j-1}, then the optimiser update), X the
protected parameters the attacker does not train. The meta-objective is J = sum_j w_j L_j(T_j, X) over the
restricted steps. Reverse-mode through the trajectory:

    forward sweep   the ordinary fast trajectory (support backward, fused inner step in place), keeping s_{j-1}
                    before every step (every c-th with ``Unroll.snapshot_every = c``), the step's batches and the
                    random-number state before its support and query losses; the query losses are evaluated
                    without a graph (their values and their random draws, in the reference mode's order)
    reverse sweep   for j = n .. 1: rebuild step j alone from s_{j-1} with a graph (support gradient with
                    create_graph, ``differentiable_step``, the query loss at the rebuilt T_j), then one backward
                    of  w_j L_j + <a_T, T_j> + <a_m, m_j> + <a_v, v_j>  gives the adjoints of s_{j-1} and X's
                    share, added to the meta-gradient; with c > 1, a segment's states are first re-run
                    forward from its snapshot by the forward sweep's own code (the same numbers, bit for bit)

One step's double-backward graph is alive at a time; what grows with K is the snapshots (K/c states of 1-3
flat vectors of |T|, plus c recomputed ones) and the batches. The derivative is the reference mode's
(``ReferenceMode(unrolled=True)``), computed in another order.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from sophon_fast.reference.inner_step import ADAM, MOMENTUM


def differentiable_step(w: Tensor, g: Tensor, state: List[Tensor], kind: int, lr: float, beta1: float, beta2: float,
                        eps: float, weight_decay: float, step: int):
    """``inner_step_``'s update, out of place and differentiable in ``w``, ``g`` and ``state`` ([exp_avg,
    exp_avg_sq]): returns (new w, new state). The same numbers as the in-place step; Adam's square root is
    taken of v clamped at 1e-30 (v = 0 exactly where every gradient so far was 0) so that its derivative stays
    finite there."""
    if weight_decay:
        g = g + weight_decay * w
    m, v = state
    if kind == MOMENTUM:
        m = beta1 * m + g
        return w - lr * m, [m, v]
    if kind == ADAM:
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        denom = v.clamp_min(1e-30).sqrt() / math.sqrt(1 - beta2 ** step) + eps
        return w - (lr / (1 - beta1 ** step)) * m / denom, [m, v]
    return w - lr * g, state


def rng_state(gen: torch.Generator) -> tuple:
    """The task generator's and the global generators' states (dropout draws from the global one)."""
    cuda = torch.cuda.get_rng_state(gen.device) if gen.device.type == "cuda" else None
    return gen.get_state(), torch.get_rng_state(), cuda


def set_rng_state(gen: torch.Generator, state: tuple) -> None:
    gen.set_state(state[0])
    torch.set_rng_state(state[1])
    if state[2] is not None:
        torch.cuda.set_rng_state(state[2], gen.device)


class Snapshots:
    """States s_j for j = 0, c, 2c, ... in one preallocated block (pinned host memory with ``offload`` on a GPU)."""

    def __init__(self, tr, n_steps: int, every: int, offload: bool):
        flat = tr.mode.flat
        self.every, self.parts = every, 1 + len(tr.opt_states())
        host = offload and flat.device.type == "cuda"
        count = (n_steps + every - 1) // every
        self.block = torch.empty((count, self.parts, tr.size), dtype=flat.dtype,
                                 device="cpu" if host else flat.device, pin_memory=host)
        self.device = flat.device

    @property
    def nbytes(self) -> int:
        return self.block.numel() * self.block.element_size()

    def store(self, j: int, tr) -> None:
        tr.read_state(list(self.block[j // self.every]))

    def load(self, j: int) -> List[Tensor]:
        return [t.to(self.device, non_blocking=True) for t in self.block[j // self.every]]


class _Step:
    __slots__ = ("support", "lr", "query", "weight", "rng_support", "rng_query")

    def __init__(self, support, lr, query, weight, rng_support, rng_query):
        self.support, self.lr, self.query, self.weight = support, lr, query, weight
        self.rng_support, self.rng_query = rng_support, rng_query


def unrolled_trajectory(mode, tr, steps, n_steps: int, strategy, b1: float, b2: float, loss_name: str, gen,
                        opts) -> List[Tensor]:
    """One trajectory of ``n_steps`` steps: its exact meta-gradient into ``mode.meta``; returns the query losses
    (detached). ``opts``: the config's ``Unroll``."""
    task, losses, rec = mode.task, [], []
    snaps = Snapshots(tr, n_steps, opts.snapshot_every, opts.offload)
    mode.last_snapshot_bytes = snaps.nbytes
    for j, (support, lr, query, w) in enumerate(steps):
        if j % opts.snapshot_every == 0:
            snaps.store(j, tr)
        rs = rng_state(gen)
        tr.support_step(support, lr, j + 1, strategy, b1, b2, gen)
        rq = None
        if query is not None:
            rq = rng_state(gen)
            with torch.no_grad():
                losses.append(task.suppression_loss(mode.model, query, loss_name, gen).detach())
        rec.append(_Step(support, lr, query, w, rs, rq))
    end = rng_state(gen)
    a = None
    c = opts.snapshot_every
    for s in reversed(range(0, len(rec), c)):
        e = min(s + c, len(rec))
        states = [snaps.load(s)]
        tr.forward_reads()
        for j in range(s, e - 1):                        # re-run the segment forward, as the forward sweep did
            tr.write_state(states[-1])
            set_rng_state(gen, rec[j].rng_support)
            tr.support_step(rec[j].support, rec[j].lr, j + 1, strategy, b1, b2, gen)
            states.append(tr.read_state())
        for j in reversed(range(s, e)):
            a = _vjp_step(mode, tr, states[j - s], rec[j], j + 1, a, strategy, b1, b2, loss_name, gen)
    tr.forward_reads()
    set_rng_state(gen, end)
    tr.add_initial_adjoint(a[0])
    return losses


def _vjp_step(mode, tr, state: List[Tensor], st: _Step, step: int, a: Optional[List[Tensor]], strategy, b1, b2,
              loss_name, gen) -> List[Tensor]:
    """Rebuild step ``step`` from ``state`` = s_{step-1} with a graph and pull the adjoints of s_step (``a``, None
    at the last step) and the step's query loss back to s_{step-1}; X's share goes into the meta-gradient."""
    kind, task = tr.kind, mode.task
    t = state[0].detach().requires_grad_(True)
    m = state[1].detach().requires_grad_(True) if kind >= MOMENTUM else state[0].new_zeros(0)
    v = state[2].detach().requires_grad_(True) if kind == ADAM else state[0].new_zeros(0)
    x = mode.flat.detach().requires_grad_(True) if tr.reads_arena else None
    set_rng_state(gen, st.rng_support)
    loss = mode._call(tr.weights(t, x), task.attacker_loss, st.support, gen)
    g, = torch.autograd.grad(loss, t, create_graph=True)
    t2, (m2, v2) = differentiable_step(t, g, [m, v], kind, st.lr, b1, b2, strategy.eps, strategy.weight_decay, step)
    outputs, seeds = [], []
    if st.query is not None:
        set_rng_state(gen, st.rng_query)
        lq = mode._call(tr.weights(t2, x), task.suppression_loss, st.query, loss_name, gen)
        outputs.append(lq * st.weight)
        seeds.append(torch.ones_like(lq))
    if a is not None:
        outputs += [t2] + ([m2] if kind >= MOMENTUM else []) + ([v2] if kind == ADAM else [])
        seeds += a
    inputs = [t] + ([m] if kind >= MOMENTUM else []) + ([v] if kind == ADAM else []) + ([x] if x is not None else [])
    grads = torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)
    grads = [torch.zeros_like(i) if gr is None else gr for i, gr in zip(inputs, grads)]
    if x is not None:
        mode.meta.add_(grads.pop())
    return grads
