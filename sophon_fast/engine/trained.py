"""What one fast-mode trajectory trains, as flat buffers: :class:`Trained`.

FastMode's protected parameters are views into one flat arena. A simulated attacker (sophon_fast/engine/
attackers.py) trains all of them, only some (a probe's fresh layers: a few ranges of the arena), or fresh
LoRA factors that are not the model's (a flat buffer of their own, the factors leaves whose ``.data`` and
``.grad`` are views into it and its gradient). Either way the trained tensors T are a few contiguous
segments, each with its gradient and optimiser state, so the inner step is one fused pass per segment
(``torch.ops.sophon_fast.inner_step_``) and never a loop over parameters.

For the unrolled meta-gradient (sophon_fast/engine/unroll.py) the same object gathers T into one flat
vector and back, and names the tensors the model reads when it runs with a differentiable T and a
differentiable copy X of the arena (``weights``): the trained parameters read T, the others X, and the
LoRA layers add ``LORA_SCALE * (x A^T) B^T`` to their output with A, B views of T (forward hooks, as peft
computes an adapter; the same numbers as the reference mode's ``W + LORA_SCALE * B A`` up to rounding).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from sophon_fast.engine.attackers import Setup
from sophon_fast.ops.inner_step import inner_step_
from sophon_fast.reference.inner_step import ADAM, MOMENTUM
from sophon_fast.tasks.base import LORA_SCALE


def _merge(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out: List[Tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


class Trained:
    """The trained tensors of one trajectory of FastMode ``mode`` under ``setup``, with inner optimiser ``kind``."""

    def __init__(self, mode, setup: Setup, kind: int):
        self.mode, self.setup, self.kind = mode, setup, kind
        flat = mode.flat
        offsets = mode.offsets                                   # id(param) -> arena offset
        self.drawn_ranges = _merge([(offsets[id(p)], offsets[id(p)] + p.numel()) for p, _ in setup.drawn])
        self.lora_leaves: List[Tensor] = []
        if setup.trains == "lora":
            sizes = [t.numel() for x in setup.lora for t in (x.a, x.b)]
            self.w = flat.new_empty(sum(sizes))
            self.g = torch.zeros_like(self.w)
            off = 0
            for x in setup.lora:
                pair = []
                for t in (x.a, x.b):
                    leaf = torch.empty(0, dtype=flat.dtype, device=flat.device).requires_grad_(True)
                    leaf.data = self.w[off:off + t.numel()].view_as(t)
                    leaf.data.copy_(t)
                    leaf.grad = self.g[off:off + t.numel()].view_as(t)
                    pair.append(leaf)
                    off += t.numel()
                self.lora_leaves.append(tuple(pair))
            self.ranges = None
            segments = [(self.w, self.g)]
        else:
            self.ranges = [(0, flat.numel())] if setup.trains == "all" else self.drawn_ranges
            segments = [(flat[lo:hi], mode.grad[lo:hi]) for lo, hi in self.ranges]
        self.size = sum(w.numel() for w, _ in segments)
        self.m = mode.state_buffer("m", self.size) if kind >= MOMENTUM else flat.new_empty(0)
        self.v = mode.state_buffer("v", self.size) if kind == ADAM else flat.new_empty(0)
        self.segments, off = [], 0
        for w, g in segments:
            n = w.numel()
            self.segments.append((w, g, self.m[off:off + n] if kind >= MOMENTUM else self.m,
                                  self.v[off:off + n] if kind == ADAM else self.v))
            off += n
        self.trained_params = [p for p, _ in setup.drawn] if setup.trains == "drawn" else []
        self.lora_now: List[Tuple[Tensor, Tensor]] = list(self.lora_leaves)
        self._reads = self._read_map()

    # -- the trajectory's context -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self):
        """The drawn values in the arena, the body in eval mode for a probe, the LoRA hooks; all undone after
        (arena and buffers back to the iteration's start, the drawn constants' meta-gradient slots as before)."""
        mode, setup = self.mode, self.setup
        keep = [mode.meta[lo:hi].clone() for lo, hi in self.drawn_ranges] if setup.constant else []
        with torch.no_grad():
            for p, value in setup.drawn:
                p.data.copy_(value)
        for t in (self.m, self.v, mode.grad):         # mode.grad may hold the last NTR step's gradient
            t.zero_()
        was = mode.model.training
        if setup.eval_body:
            mode.model.eval()
        hooks = [x.module.register_forward_hook(self._hook(i)) for i, x in enumerate(setup.lora)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
            mode.model.train(was)
            with torch.no_grad():
                mode.flat.copy_(mode.backup)
                for (lo, hi), saved in zip(self.drawn_ranges, keep):
                    mode.meta[lo:hi].copy_(saved)
            mode.bufs.put()

    def _hook(self, i: int):
        def hook(module, inputs, out):
            a, b = self.lora_now[i]
            return out + LORA_SCALE * F.linear(F.linear(inputs[0], a), b)
        return hook

    # -- one inner step -----------------------------------------------------------------------------------------
    def support_step(self, support, lr: float, step: int, strategy, b1: float, b2: float, gen) -> None:
        """The attacker's support gradient into the trained segments' gradients, then the fused inner step."""
        mode = self.mode
        loss = mode.task.attacker_loss(mode.model, support, gen)
        if self.setup.trains == "all":
            mode._point_grads(mode.grad_views)
            loss.backward()
        elif self.setup.trains == "drawn":
            for p in self.trained_params:
                p.grad = mode.grad_view_of[id(p)]
            loss.backward(inputs=self.trained_params)
        else:
            loss.backward(inputs=[t for pair in self.lora_leaves for t in pair])
        for w, g, m, v in self.segments:
            inner_step_(w, g, m, v, self.kind, lr, b1, b2, strategy.eps, strategy.weight_decay, step, True)

    # -- the unrolled meta-gradient's access to the state -------------------------------------------------------
    def read_state(self, out: Optional[List[Tensor]] = None) -> List[Tensor]:
        """[T, m, v] (the optimiser states the kind uses) copied into ``out`` (new tensors when None)."""
        parts = self.opt_states()
        if out is None:
            out = [torch.empty(self.size, dtype=self.mode.flat.dtype, device=self.mode.flat.device)
                   for _ in range(1 + len(parts))]
        with torch.no_grad():
            off = 0
            for w, *_ in self.segments:
                out[0][off:off + w.numel()].copy_(w.reshape(-1), non_blocking=True)
                off += w.numel()
            for o, t in zip(out[1:], parts):
                o.copy_(t, non_blocking=True)
        return out

    def write_state(self, state: List[Tensor]) -> None:
        with torch.no_grad():
            off = 0
            for w, *_ in self.segments:
                w.reshape(-1).copy_(state[0][off:off + w.numel()], non_blocking=True)
                off += w.numel()
            for t, s in zip(self.opt_states(), state[1:]):
                t.copy_(s, non_blocking=True)

    def opt_states(self) -> List[Tensor]:
        """The inner optimiser's state: [m] for momentum, [m, v] for Adam, [] for SGD."""
        return ([self.m] if self.kind >= MOMENTUM else []) + ([self.v] if self.kind == ADAM else [])

    @property
    def reads_arena(self) -> bool:
        """Whether the model reads protected parameters that do not train (X in the reverse sweep)."""
        return self.setup.trains != "all"

    def _read_map(self) -> List[Tuple[str, str, int, torch.Size]]:
        """[(name, "T" or "X", offset, shape)] for every protected parameter."""
        mode, out = self.mode, []
        t_off = {}
        if self.setup.trains == "drawn":
            off = 0
            for lo, hi in self.ranges:
                for p in mode.params:
                    o = mode.offsets[id(p)]
                    if lo <= o < hi:
                        t_off[id(p)] = off + o - lo
                off += hi - lo
        for p in mode.params:
            name = mode.names[id(p)]
            if self.setup.trains == "all":
                out.append((name, "T", mode.offsets[id(p)], p.shape))
            elif id(p) in t_off:
                out.append((name, "T", t_off[id(p)], p.shape))
            else:
                out.append((name, "X", mode.offsets[id(p)], p.shape))
        return out

    def weights(self, t: Tensor, x: Optional[Tensor]) -> Dict[str, Tensor]:
        """The ``functional_call`` weights for a differentiable T (``t``) and arena copy ``x``; LoRA layers read
        their factors from ``t``."""
        src = {"T": t, "X": x}
        out = {name: src[s][off:off + shape.numel()].view(shape) for name, s, off, shape in self._reads}
        if self.setup.lora:
            now, off = [], 0
            for x_ in self.setup.lora:
                na, nb = x_.a.numel(), x_.b.numel()
                now.append((t[off:off + na].view_as(x_.a), t[off + na:off + na + nb].view_as(x_.b)))
                off += na + nb
            self.lora_now = now
        return out

    def forward_reads(self) -> None:
        """The model reads its own parameters and the factor leaves again (after ``weights``)."""
        self.lora_now = list(self.lora_leaves)

    def add_initial_adjoint(self, a_t: Tensor) -> None:
        """The adjoint at T_0 into the meta-gradient: T_0 is the protected parameters (trains="all"), except drawn
        constants (their slots are restored by ``active``); a probe's or LoRA's T_0 is drawn: a constant."""
        if self.setup.trains == "all":
            self.mode.meta.add_(a_t)
