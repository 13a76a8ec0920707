"""The two ways to compute SOPHON's meta-gradient (first order or unrolled): ``ReferenceMode`` and ``FastMode``.

Both implement one interface used by the outer loop (sophon_fast/engine/loop.py), generic over a
:class:`~sophon_fast.tasks.base.Task`:

    begin_iteration()        remember theta and the buffers (BatchNorm statistics), zero the meta-gradient
    trajectory(...)          simulate one attacker trajectory, add sum_k w_k grad L_k(theta'_k) to the
                             meta-gradient, restore theta and the buffers; returns the L_k (no host sync)
    skip_trajectory(...)     make a trajectory's random draws without running it (another rank runs it)
    meta_backward(loss_fn)   add the gradient of loss_fn(model) at theta to the meta-gradient
    meta_tensors() / plain_tensors()   the gradient buffers a distributed run all-reduces
    meta_grad_norm(clip)     the meta-gradient's norm, clipped in place to ``clip`` (None: not clipped)
    grad_norm(grads)         the 2-norm of gradient buffers (over every rank's shard when sharded)
    step(opt, which)         one outer optimiser step on the "meta" or "plain" gradient
    plain_backward(loss)     zero the plain gradient and back-propagate ``loss`` into it (NTR)
    rewind()                 back to the weights and buffers of the iteration's start
    snapshot() / restore()   copies of the weights and buffers (rollback)
    release()                the model as an ordinary module

ReferenceMode is the reference code's computation, readably: a graph-connected clone, inner updates with
detached gradients, the K weighted query losses summed and back-propagated once (K graphs alive: memory
O(K)). FastMode computes the same numbers with the protected parameters as views into one flat arena:
the inner optimiser step (and the zeroing of the support gradient) is one fused pass over flat buffers
(``torch.ops.sophon_fast.inner_step_``), and each query loss is back-propagated at once with the
parameters' ``.grad`` pointing into the meta-gradient buffer, so autograd's own accumulation adds
``w_k * grad L_k`` in place: no per-step graph survives and memory is flat in K. Every simulated attacker kind
(sophon_fast/engine/attackers.py) runs in both; in FastMode what it trains is flat segments
(sophon_fast/engine/trained.py), and the unrolled meta-gradient is a forward sweep that keeps each step's state
and a reverse sweep that re-runs one step at a time (sophon_fast/engine/unroll.py): memory flat in K but for
the snapshots.

Low-precision weights (bf16/fp16) in FastMode keep an fp32 master copy for the outer optimisers and an fp32
meta-gradient (each query gradient lands in a staging buffer of the weights' dtype and is added in fp32).
Bytes per protected parameter of width b (4 fp32, 2 bf16), outer Adam for FTS and NTR:
``4b`` (arena, backup, gradient, meta-gradient or staging) ``+ 16`` (two Adam states in fp32)
``+ b`` (rollback snapshot) ``+ 0/b/2b`` (inner momentum/Adam state), plus ``4 + 4`` (fp32 master and
meta-gradient) for bf16/fp16. :func:`bytes_per_parameter` computes it.

ShardedMode is FastMode for a model sharded with FSDP2 (``fully_shard``): the parameters are DTensors whose
storage FSDP2 owns, so instead of one arena it keeps per-parameter buffers of this rank's shard only (backup,
support gradient, meta-gradient, inner and outer optimiser states): memory per protected parameter is
FastMode's divided by the number of ranks, plus FSDP2's transient unsharded copies of the module it runs.
Every rank runs every trajectory on its rows of each batch (each loss weighted by its rows' share), FSDP2's
reduce-scatter sums the shares into each rank's gradient shard, and the fused inner step and the outer
optimisers work on the local shards in place (element-wise optimisers only; the norm for clipping is the
global one). The same weights as FastMode on one process, up to floating-point order (each rank's loss is
weighted by its rows' share of ``Task.loss_weight``: rows, or counted tokens for language models).
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from sophon_fast.engine.streams import split
from sophon_fast.ops.inner_step import inner_step_
from sophon_fast.reference.inner_step import ADAM, KINDS, MOMENTUM
from sophon_fast.reference.inner_step import inner_step_ as inner_step_reference
from sophon_fast.engine.attackers import AsIs, Setup
from sophon_fast.engine.trained import Trained
from sophon_fast.engine.unroll import differentiable_step, unrolled_trajectory
from sophon_fast.tasks.base import lora_weight

LOW_PRECISION = (torch.bfloat16, torch.float16)


def select_params(model: nn.Module, patterns: Optional[Sequence[str]]) -> List[nn.Parameter]:
    """The trainable parameters named by ``patterns`` (fnmatch; None: every trainable one), each once.
    Raises ValueError when a pattern matches nothing or nothing is left to protect."""
    seen, out = set(), []
    named = list(model.named_parameters())
    for pat in patterns or ():
        if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
            raise ValueError(f"protect: params pattern {pat!r} matches no parameter of the model")
    for n, p in named:
        if p.requires_grad and id(p) not in seen and (patterns is None or any(fnmatch.fnmatchcase(n, q) for q in patterns)):
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError("protect: the model has no trainable parameters to protect")
    return out


class _Buffers:
    """Copies of every buffer (BatchNorm running statistics), restored in place."""

    def __init__(self, model: nn.Module):
        self.buffers = list(model.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]

    def take(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            s.copy_(b)

    def put(self) -> None:
        for s, b in zip(self.saved, self.buffers):
            b.copy_(s)

    def copies(self) -> List[Tensor]:
        return [b.detach().clone() for b in self.buffers]

    def load(self, saved: Sequence[Tensor]) -> None:
        for b, s in zip(self.buffers, saved):
            b.copy_(s)


class _Bound(nn.Module):
    """``functional_call`` target: runs ``fn(model, *args)`` with the model's parameters replaced."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def _inner_hparams(strategy):
    kind = KINDS[strategy.optimizer]
    b1 = strategy.momentum if kind == MOMENTUM else strategy.betas[0]
    return kind, b1, strategy.betas[1]


class _Mode:
    def __init__(self, model: nn.Module, task, params: List[nn.Parameter]):
        self.model, self.task, self.params = model, task, params
        self.bufs = _Buffers(model)
        self.bound = _Bound(model)
        self.names = {id(p): "model." + n for n, p in model.named_parameters()}

    def _call(self, weights, fn, *args):
        """``fn(model, *args)`` with the model's parameters named in ``weights`` ("model." + name) replaced."""
        return functional_call(self.bound, weights, (fn, *args))

    def _steps(self, strategy, stream, benign, weights):
        """The trajectory's steps, drawn lazily in order: [(support, lr, query or None, query weight)], first the
        ``benign_steps`` on original data (support rows only), then the K restricted (support, query) batches."""
        lrs = strategy.lrs(len(weights))
        n_support = strategy.batch_size - strategy.query_size
        for j in range(strategy.benign_steps):
            if benign is None:
                raise ValueError(f"protect: strategy {strategy.name} has benign_steps but no original stream was given")
            yield benign.next(n_support), lrs[j], None, 0.0
        for k, w in enumerate(weights):
            support, query = split(stream.next(strategy.batch_size), strategy.query_size)
            yield support, lrs[strategy.benign_steps + k], query, w

    def grad_norm(self, grads: List[Tensor]) -> Tensor:
        return _norm_and_clip(grads, None)

    def setup(self, strategy, gen) -> Setup:
        """The attacker's draws for one trajectory (sophon_fast.engine.attackers; a strategy that was not resolved
        by ``ProtectConfig.resolved``, attacker None, fine-tunes the model as it is)."""
        return (strategy.attacker or AsIs()).setup(self.task, self.model, self.params, gen)

    def skip_trajectory(self, strategy, stream, steps: int, gen, benign=None) -> None:
        """Make the random draws of ``trajectory`` (the attacker's fresh layers or factors, the benign and the K
        restricted batches) without running it: another rank runs it, and the streams and generator stay in step
        on every rank."""
        self.setup(strategy, gen)
        if strategy.benign_steps:
            for _ in range(strategy.benign_steps):
                benign.skip(strategy.batch_size - strategy.query_size)
        for _ in range(steps):
            stream.skip(strategy.batch_size)


@contextlib.contextmanager
def _no_activation_checkpointing(model: nn.Module):
    """Turn off Hugging Face activation checkpointing (each module's ``gradient_checkpointing`` flag) for the
    block, and restore it. The reference mode runs the model through ``functional_call`` with the simulated
    attacker's weights and back-propagates after that call has returned; a checkpointed layer recomputes its
    forward during that backward and would read the model's own parameters, not theta'_k: a silently wrong
    meta-gradient (1e-3 relative on a tiny GPT-2). The fast mode runs the model's own parameters and needs no
    such care. A module that calls ``torch.utils.checkpoint`` itself, without that flag, is not covered."""
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in on:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in on:
            m.gradient_checkpointing = True


class ReferenceMode(_Mode):
    """The reference code's computation (learn2learn-style first-order MAML), kept readable.

    ``unrolled=True`` (``ProtectConfig.meta_gradient="unrolled"``) differentiates through the simulated
    attacker's steps instead: the inner gradients keep their graph (``create_graph``) and each update is
    :func:`differentiable_step`, so the meta-gradient is the exact d/dtheta of sum_k w_k L_k(theta'_k(theta)),
    attacker steps included (second order; memory O(K) graphs with their double-backward state). A head
    re-initialisation stays what it is in the first-order modes: the fresh head's gradient is added to the
    head's. This mode is the specification the fast mode is tested against."""

    def __init__(self, model: nn.Module, task, params: List[nn.Parameter], unrolled: bool = False):
        super().__init__(model, task, params)
        self.unrolled = unrolled

    def begin_iteration(self) -> None:
        for p in self.params:
            p.grad = None
        self.bufs.take()
        self.start = [p.detach().clone() for p in self.params]

    def rewind(self) -> None:
        self.restore((self.start, self.bufs.saved))

    @staticmethod
    def _adapted(fast, lora):
        """The weights the model runs with: ``fast``, each LoRA-adapted weight replaced by W + scale * B A."""
        if not lora:
            return fast
        out = {n: t for n, t in fast.items() if not n.startswith("lora:")}
        for t in lora:
            n = "model." + t.name
            out[n] = lora_weight(out[n], fast["lora:A:" + n], fast["lora:B:" + n], t.transposed)
        return out

    def trajectory(self, strategy, stream, loss_name: str, weights: Sequence[float], gen, benign=None) -> Tensor:
        """One simulated attacker. A probe (``eval_body``) sees the frozen body in eval mode, as ``sf.attacks``'
        last-layer attacks and probes do: BatchNorm with its running statistics, not the restricted batch's
        (docs/experiments.md a9)."""
        setup = self.setup(strategy, gen)
        was = self.model.training
        if setup.eval_body:
            self.model.eval()
        try:
            with _no_activation_checkpointing(self.model):
                return self._trajectory(strategy, setup, stream, benign, loss_name, weights, gen)
        finally:
            self.model.train(was)

    def _trajectory(self, strategy, setup, stream, benign, loss_name: str, weights: Sequence[float], gen) -> Tensor:
        fast = {self.names[id(p)]: p.clone() for p in self.params}          # graph-connected clone
        drawn = [self.names[id(p)] for p, _ in setup.drawn]
        for (p, value), n in zip(setup.drawn, drawn):
            if setup.constant:                                                # a fresh layer: a constant
                fast[n] = value.clone().requires_grad_(True)
            else:                                                             # stands in for the parameter
                with torch.no_grad():
                    fast[n].copy_(value)
        trained = {"all": list(fast), "drawn": drawn, "lora": []}[setup.trains]
        for t in setup.lora:                   # only the factors train; weights not protected stay constant
            n = "model." + t.name
            fast.setdefault(n, self.model.get_parameter(t.name).detach())
            fast["lora:A:" + n], fast["lora:B:" + n] = t.a.clone().requires_grad_(True), t.b.clone().requires_grad_(True)
            trained += ["lora:A:" + n, "lora:B:" + n]
        kind, b1, b2 = _inner_hparams(strategy)
        state = {n: [torch.zeros_like(fast[n]), torch.zeros_like(fast[n])] for n in trained}
        total, losses = 0.0, []
        for j, (support, lr, query, w) in enumerate(self._steps(strategy, stream, benign, weights)):
            loss = self._call(self._adapted(fast, setup.lora), self.task.attacker_loss, support, gen)
            grads = torch.autograd.grad(loss, [fast[n] for n in trained], create_graph=self.unrolled)
            for n, g in zip(trained, grads):
                if self.unrolled:                                              # differentiable in theta
                    fast[n], state[n] = differentiable_step(fast[n], g, state[n], kind, lr, b1, b2, strategy.eps,
                                                            strategy.weight_decay, j + 1)
                    continue
                with torch.no_grad():                                          # first order: g detached
                    w_new = fast[n].detach().clone()
                    inner_step_reference(w_new, g, *state[n], kind, lr, b1, b2, strategy.eps, strategy.weight_decay,
                                         j + 1, False)
                fast[n] = fast[n] - (fast[n].detach() - w_new)                 # d theta'_k / d theta = I
            if query is None:                                                  # a benign step: no query
                continue
            lq = self._call(self._adapted(fast, setup.lora), self.task.suppression_loss, query, loss_name, gen)
            total = total + w * lq                                             # K graphs stay alive
            losses.append(lq.detach())
        total.backward()
        self.bufs.put()
        return torch.stack(losses)

    def meta_backward(self, loss_fn: Callable) -> Tensor:
        loss = loss_fn(self.model)
        loss.backward()
        self.bufs.put()
        return loss.detach()

    def meta_tensors(self) -> List[Tensor]:
        """The meta-gradient's storage (what a distributed run all-reduces)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]

    plain_tensors = meta_tensors

    def meta_grad_norm(self, clip: Optional[float]) -> Tensor:
        return _norm_and_clip(self.meta_tensors(), clip)

    def plain_backward(self, loss: Tensor) -> None:
        for p in self.params:
            p.grad = None
        loss.backward()

    def step(self, opt: torch.optim.Optimizer, which: str) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()

    @property
    def optim_params(self) -> List[nn.Parameter]:
        return self.params

    def snapshot(self):
        return [p.detach().clone() for p in self.params], self.bufs.copies()

    def restore(self, snap) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, snap[0]):
                p.copy_(s)
            self.bufs.load(snap[1])

    def release(self) -> nn.Module:
        for p in self.params:
            p.grad = None
        return self.model


def _norm_and_clip(grads: List[Tensor], clip: Optional[float], world=None) -> Tensor:
    """The total 2-norm of ``grads`` (0-dim tensor, no host sync); scaled in place to at most ``clip``
    exactly as ``torch.nn.utils.clip_grad_norm_`` does. ``world``: the grads are this rank's shards of
    sharded tensors; the norm is taken over every rank's (one small all-reduce)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if world is not None and world.active:
        sq = norm.square().reshape(1)
        world.all_reduce_([sq], "the gradient norm")
        norm = sq.sqrt()[0]
    if clip is not None:
        coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm


def _one_dtype_device(params: List[nn.Parameter]):
    """(dtype, device) shared by every protected parameter (the fast modes' buffers need one of each)."""
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) != 1:
        raise ValueError(f"protect(mode='fast') needs every protected parameter on one dtype and device, "
                         f"got {sorted(map(str, kinds))}")
    return next(iter(kinds))


class FastMode(_Mode):
    """Flat parameter arena; fused inner steps; meta-gradient accumulated by autograd in place. Every attacker kind
    trains flat segments (sophon_fast/engine/trained.py); ``unrolled=True`` takes the exact meta-gradient through
    the attacker's steps with one step's graph alive at a time (sophon_fast/engine/unroll.py)."""

    def __init__(self, model: nn.Module, task, params: List[nn.Parameter], unrolled: bool = False, unroll=None):
        super().__init__(model, task, params)
        dtype, device = _one_dtype_device(params)
        self.lowp = dtype in LOW_PRECISION
        self.unrolled, self.unroll = unrolled, unroll
        numel = sum(p.numel() for p in params)
        self.flat = torch.empty(numel, dtype=dtype, device=device)
        self.backup = torch.empty_like(self.flat)
        self.grad = torch.zeros_like(self.flat)               # support and NTR gradients
        self.qgrad = torch.zeros_like(self.flat)              # query gradients (meta-gradient when not lowp)
        self._states = {}                                     # inner optimiser states, allocated when needed
        self.grad_views, self.qgrad_views, self.offsets, self.grad_view_of = [], [], {}, {}
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
                p.data = self.flat[offset:offset + n].view_as(p)              # parameters become views
                self.grad_views.append(self.grad[offset:offset + n].view_as(p))
                self.qgrad_views.append(self.qgrad[offset:offset + n].view_as(p))
                self.offsets[id(p)], self.grad_view_of[id(p)] = offset, self.grad_views[-1]
                offset += n
        # The outer optimisers' parameter: the arena itself, or an fp32 master copy for bf16/fp16 weights.
        self.master = nn.Parameter(self.flat.float() if self.lowp else self.flat)
        self.meta = torch.zeros_like(self.master) if self.lowp else self.qgrad   # fp32 meta-gradient
        self.optim_params = [self.master]
        self.last_snapshot_bytes = 0

    def _point_grads(self, views) -> None:
        for p, v in zip(self.params, views):
            p.grad = v

    def state_buffer(self, name: str, size: int) -> Tensor:
        """A reusable flat buffer of ``size`` elements for the inner optimiser's state ``name``."""
        key = (name, size)
        if key not in self._states:
            self._states[key] = torch.zeros(size, dtype=self.flat.dtype, device=self.flat.device)
        return self._states[key]

    def begin_iteration(self) -> None:
        self.backup.copy_(self.flat)
        self.bufs.take()
        self.meta.zero_()

    def rewind(self) -> None:
        with torch.no_grad():
            self.flat.copy_(self.backup)
            if self.lowp:
                self.master.copy_(self.backup)
        self.bufs.put()

    def trajectory(self, strategy, stream, loss_name: str, weights: Sequence[float], gen, benign=None) -> Tensor:
        setup = self.setup(strategy, gen)
        kind, b1, b2 = _inner_hparams(strategy)
        tr = Trained(self, setup, kind)
        steps = self._steps(strategy, stream, benign, weights)
        inputs = self.params if setup.lora else None
        with tr.active():
            if self.unrolled:
                with _no_activation_checkpointing(self.model):
                    losses = unrolled_trajectory(self, tr, steps, strategy.benign_steps + len(weights), strategy, b1,
                                                 b2, loss_name, gen, self.unroll)
            else:
                losses = []
                for j, (support, lr, query, w) in enumerate(steps):
                    tr.support_step(support, lr, j + 1, strategy, b1, b2, gen)
                    if query is not None:
                        losses.append(self._query_backward(
                            lambda m: self.task.suppression_loss(m, query, loss_name, gen), w, inputs))
        return torch.stack(losses)

    def _query_backward(self, loss_fn: Callable, weight: float, inputs=None) -> Tensor:
        """meta += weight * grad loss_fn(model) at the current weights (into ``inputs``' gradients only, when given:
        not into LoRA factors); returns the detached loss."""
        self._point_grads(self.qgrad_views)
        loss = loss_fn(self.model)
        (loss * weight).backward(inputs=inputs)
        if self.lowp:                                                            # fp32 accumulation
            self.meta.add_(self.qgrad)
            self.qgrad.zero_()
        return loss.detach()

    def meta_backward(self, loss_fn: Callable) -> Tensor:
        loss = self._query_backward(loss_fn, 1.0)
        self.bufs.put()
        return loss

    def meta_tensors(self) -> List[Tensor]:
        return [self.meta]

    def plain_tensors(self) -> List[Tensor]:
        return [self.grad]

    def meta_grad_norm(self, clip: Optional[float]) -> Tensor:
        return _norm_and_clip([self.meta], clip)

    def plain_backward(self, loss: Tensor) -> None:
        self.grad.zero_()
        self._point_grads(self.grad_views)
        loss.backward()

    def step(self, opt: torch.optim.Optimizer, which: str) -> None:
        if which == "meta":
            self.master.grad = self.meta
        elif self.lowp:
            self.meta.copy_(self.grad)             # the meta-gradient is spent: reuse it as the fp32 gradient
            self.master.grad = self.meta
        else:
            self.master.grad = self.grad
        opt.step()
        if self.lowp:
            with torch.no_grad():
                self.flat.copy_(self.master)

    def snapshot(self):
        return self.master.detach().clone(), self.bufs.copies()

    def restore(self, snap) -> None:
        with torch.no_grad():
            self.master.copy_(snap[0])
            if self.lowp:
                self.flat.copy_(self.master)
            self.bufs.load(snap[1])

    def release(self) -> nn.Module:
        """Give every parameter its own storage again (the arena is dropped)."""
        with torch.no_grad():
            for p in self.params:
                p.grad = None
                p.data = p.data.clone()
        return self.model


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter of ``model`` is a DTensor (FSDP2's ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:          # a torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


class ShardedMode(_Mode):
    """FastMode's computation on an FSDP2-sharded model: this rank's shards, every trajectory on its rows."""

    def __init__(self, model: nn.Module, task, params: List[nn.Parameter], world):
        super().__init__(model, task, params)
        from torch.distributed.tensor import DTensor
        plain = [p for p in params if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(f"protect: the model is sharded with FSDP2, but {len(plain)} protected parameters are "
                             f"not (shard every module that holds protected parameters, or freeze them)")
        if _one_dtype_device(params)[0] in LOW_PRECISION:
            raise ValueError("protect: FSDP2-sharded protected parameters must be fp32/fp64; for bf16 compute, keep "
                             "fp32 shards and pass fully_shard(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                             "reduce_dtype=torch.float32))")
        self.world = world
        with torch.no_grad():
            self.local = [p.to_local() for p in params]                 # views of FSDP2's sharded storage
        self.backup = [t.clone() for t in self.local]
        self.grad = [torch.zeros_like(t) for t in self.local]           # support and NTR gradients
        self.meta = [torch.zeros_like(t) for t in self.local]
        self.exp_avg = self.exp_avg_sq = None
        # The outer optimisers step on the local shards in place (an nn.Parameter shares its tensor's storage).
        self.optim_params = [nn.Parameter(t) for t in self.local]

    def _rows(self, batch):
        """This rank's rows of ``batch`` and their share of its loss weight."""
        return self.world.my_rows(batch, self.task.loss_weight)

    def _backward(self, loss: Tensor, into: List[Tensor], add: bool) -> None:
        """Back-propagate ``loss``; this rank's shard of the (rank-summed) gradient goes into ``into``."""
        for p in self.params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p, buf in zip(self.params, into):
                if p.grad is None:                                       # not on the loss's path
                    if not add:
                        buf.zero_()
                    continue
                g = p.grad.to_local()
                buf.add_(g) if add else buf.copy_(g)
                p.grad = None

    def begin_iteration(self) -> None:
        with torch.no_grad():
            for b, t, m in zip(self.backup, self.local, self.meta):
                b.copy_(t)
                m.zero_()
        self.bufs.take()

    def rewind(self) -> None:
        self.restore((self.backup, self.bufs.saved))

    def _draw(self, setup) -> None:
        """The attacker's drawn values into this rank's shards, as on one process: the full tensor drawn from
        ``gen`` on every rank, each rank keeping its shard (no communication)."""
        from torch.distributed.tensor import DTensor, distribute_tensor
        with torch.no_grad():
            for p, v in setup.drawn:
                local = v.to_local() if isinstance(v, DTensor) else \
                    distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)

    def trajectory(self, strategy, stream, loss_name: str, weights: Sequence[float], gen, benign=None) -> Tensor:
        setup = self.setup(strategy, gen)         # no LoRA here: protect() refuses it for a sharded model
        kind, b1, b2 = _inner_hparams(strategy)
        if kind >= MOMENTUM and self.exp_avg is None:
            self.exp_avg = [torch.zeros_like(t) for t in self.local]
        if kind == ADAM and self.exp_avg_sq is None:
            self.exp_avg_sq = [torch.zeros_like(t) for t in self.local]
        with torch.no_grad():
            for buf in (self.exp_avg if kind >= MOMENTUM else []) + (self.exp_avg_sq if kind == ADAM else []):
                buf.zero_()
        self._draw(setup)
        drawn = {id(p) for p, _ in setup.drawn}
        idx = {id(p): i for i, p in enumerate(self.params)}
        trained = range(len(self.local)) if setup.trains == "all" else sorted(idx[i] for i in drawn)
        kept = [(i, self.meta[i].clone()) for i in sorted(idx[d] for d in drawn)] if setup.constant else []
        was = self.model.training
        if setup.eval_body:
            self.model.eval()
        empty = self.local[0].new_empty(0)
        losses = []
        try:
            for j, (support, lr, query, w) in enumerate(self._steps(strategy, stream, benign, weights)):
                support, s_share = self._rows(support)
                self._backward(self.task.attacker_loss(self.model, support, gen) * s_share, self.grad, add=False)
                for i in trained:
                    t = self.local[i]
                    if t.numel():
                        inner_step_(t, self.grad[i], self.exp_avg[i] if kind >= MOMENTUM else empty,
                                    self.exp_avg_sq[i] if kind == ADAM else empty, kind, lr, b1, b2,
                                    strategy.eps, strategy.weight_decay, j + 1, True)
                if query is None:
                    continue
                query, q_share = self._rows(query)
                lq = self.task.suppression_loss(self.model, query, loss_name, gen) * q_share
                self._backward(lq * w, self.meta, add=True)
                losses.append(lq.detach())
        finally:
            self.model.train(was)
            with torch.no_grad():
                for t, b in zip(self.local, self.backup):
                    t.copy_(b)
                for i, saved in kept:
                    self.meta[i].copy_(saved)
            self.bufs.put()
        return torch.stack(losses)

    def meta_backward(self, loss_fn: Callable) -> Tensor:
        loss = loss_fn(self.model)
        self._backward(loss, self.meta, add=True)
        self.bufs.put()
        return loss.detach()

    def meta_tensors(self) -> List[Tensor]:
        return self.meta

    def plain_tensors(self) -> List[Tensor]:
        return self.grad

    def grad_norm(self, grads: List[Tensor]) -> Tensor:
        return _norm_and_clip(grads, None, self.world)

    def meta_grad_norm(self, clip: Optional[float]) -> Tensor:
        return _norm_and_clip(self.meta, clip, self.world)

    def plain_backward(self, loss: Tensor) -> None:
        self._backward(loss, self.grad, add=False)

    def step(self, opt: torch.optim.Optimizer, which: str) -> None:
        for op, g in zip(self.optim_params, self.meta if which == "meta" else self.grad):
            op.grad = g
        opt.step()

    def snapshot(self):
        return [t.clone() for t in self.local], self.bufs.copies()

    def restore(self, snap) -> None:
        with torch.no_grad():
            for t, s in zip(self.local, snap[0]):
                t.copy_(s)
            self.bufs.load(snap[1])

    def release(self) -> nn.Module:
        for p in self.params:
            p.grad = None
        for op in self.optim_params:
            op.grad = None
        return self.model


def bytes_per_parameter(dtype: torch.dtype, inner: str = "adam", outer_adam: int = 2) -> int:
    """FastMode's memory per protected parameter (see the module docstring): arena, backup, gradient and
    query/meta-gradient buffers, ``outer_adam`` fp32 Adam states of two tensors each, the rollback
    snapshot, the inner optimiser's state, and for bf16/fp16 the fp32 master and meta-gradient."""
    b = torch.empty((), dtype=dtype).element_size()
    master = 4 if dtype in LOW_PRECISION else b
    inner_state = {"sgd": 0, "momentum": 1, "adam": 2}[inner] * b
    lowp_extra = 8 if dtype in LOW_PRECISION else 0
    return 4 * b + outer_adam * 2 * master + master + inner_state + lowp_extra

