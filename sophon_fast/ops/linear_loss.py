"""``sophon_fast::linear_loss``: a suppression loss of ``hidden @ weight.T (+ bias)`` and its gradients,
never holding the full (N, V) logits (spec: sophon_fast/reference/linear_loss.py).

    linear_loss(hidden (N, H), weight (V, H), target (N,) int64, bias (V,) or None,
                weights [w_ce, w_ice, w_klu, w_negent], ignore_index, reduction "mean"|"sum",
                chunk_size (0: automatic), compute_grad)
        -> (loss (), grad_hidden (N, H), grad_weight (V, H), grad_bias (V,))   all in the inputs' dtype

The loss is a scalar, so its gradients are computed during the forward (Liger / Cut-Cross-Entropy
style) and the logits are never recomputed: per chunk of T tokens

    logits_c = hidden_c @ weight.T + bias                    (T, V), one GEMM, into a reused buffer
    loss_c, stats_c = row_losses_fwd(logits_c, target_c)     the row-loss kernels of the backend
    g_c = row_losses_bwd(1 or 1/count, logits_c, ...)        (T, V) d loss / d logits_c
    grad_hidden_c = g_c @ weight;  grad_weight += g_c.T @ hidden_c;  grad_bias += sum_rows g_c

so the extra memory is two (T, V) buffers plus the fp32 accumulators of grad_weight and grad_bias, and
the traffic per chunk is three GEMMs plus one read (forward), one read and one write (backward) of the
chunk's logits. With the automatic chunk size, a vocabulary so large that MIN_ROWS tokens' logits exceed
CHUNK_BYTES is split into blocks with an online log-sum-exp (sophon_fast/ops/_vocab_blocks.py; it
recomputes each block's logits once for the gradient).

Gradients are empty (0,) tensors when ``compute_grad`` is False (no input needs them) or, for the bias,
when there is none. The op's backward scales the saved gradients by the incoming cotangent, out of place
(AOT autograd refuses a backward that mutates saved outputs), so the backward briefly holds (V, H) twice;
autograd does not materialise zeros for the gradient outputs' own cotangents. Backends: "reference"
materialises the logits; "cpp", "triton" and "cuda" run the chunk loop above on their own row-loss
kernels and torch's GEMMs.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from sophon_fast import _backend
from sophon_fast.ops._vocab_blocks import vocab_blocked_chunk

CHUNK_BYTES = 64 << 20   # automatic chunk: one (T, V) logits buffer of at most this many bytes
MIN_ROWS = 16            # fewer tokens per chunk than this: split the vocabulary instead (online lse)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def auto_chunk(n: int, v: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that one (T, V) buffer of ``dtype`` stays within CHUNK_BYTES; at least
    MIN_ROWS (the vocabulary is then split into blocks, see ``vocab_block``)."""
    return max(1, min(n, max(MIN_ROWS, CHUNK_BYTES // (v * _itemsize(dtype)))))


def vocab_block(t: int, v: int, dtype: torch.dtype) -> int:
    """Vocabulary block width for chunks of ``t`` tokens: V itself while a (t, V) buffer fits in
    CHUNK_BYTES, else the widest block that does (the online log-sum-exp path)."""
    fit = CHUNK_BYTES // (t * _itemsize(dtype))
    return v if fit >= v else max(1, fit)


def _empty(like: Tensor) -> Tensor:
    """A fresh (0,) tensor: outputs of a custom op may not alias each other."""
    return like.new_empty((0,))


def chunked_linear_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], weights: List[float],
                        ignore_index: int, reduction: str, chunk_size: int, compute_grad: bool, *,
                        row_fwd: Callable, row_bwd: Callable) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunk loop of the module docstring over a backend's ``row_fwd``/``row_bwd`` kernels."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    t = chunk_size if chunk_size > 0 else auto_chunk(n, v, hidden.dtype)
    count = (target != ignore_index).sum().to(acc)
    per_row = (1.0 / count if reduction == "mean" else torch.ones((), dtype=acc, device=hidden.device)).expand(t)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty_like(hidden) if compute_grad else _empty(hidden)
    # fp32 accumulators (the output itself when the inputs are fp32/fp64)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if compute_grad else _empty(hidden)
    grad_b = (torch.zeros((v,), dtype=acc, device=weight.device) if compute_grad and bias is not None
              else _empty(hidden))
    block = vocab_block(t, v, hidden.dtype) if chunk_size == 0 else v
    buf = hidden.new_empty((min(t, n), v)) if block == v else None
    w_t = weight.t()
    for start in range(0, n, t):
        h_c, y_c = hidden[start:start + t], target[start:start + t]
        if buf is None:
            total += vocab_blocked_chunk(h_c, weight, bias, y_c, weights, ignore_index, block,
                                         per_row[:h_c.shape[0]], compute_grad, grad_h[start:start + t], grad_w,
                                         grad_b)
            continue
        logits = buf[:h_c.shape[0]]
        if bias is None:
            torch.mm(h_c, w_t, out=logits)
        else:
            torch.addmm(bias, h_c, w_t, out=logits)
        rows, stats = row_fwd(logits, y_c, weights, 1.0, ignore_index)
        total += rows.sum()
        if not compute_grad:
            continue
        g = row_bwd(per_row[:h_c.shape[0]].contiguous(), logits, y_c, stats, weights, 1.0, ignore_index)
        torch.mm(g, weight, out=grad_h[start:start + t])
        if acc == hidden.dtype:
            grad_w.addmm_(g.t(), h_c)
        else:
            grad_w += torch.mm(g.t(), h_c)
        if bias is not None:
            grad_b += g.sum(0, dtype=acc)
        del g
    loss = total / count if reduction == "mean" else total
    return loss.to(hidden.dtype), grad_h, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


@torch.library.custom_op("sophon_fast::linear_loss", mutates_args=())
def linear_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], weights: List[float],
                ignore_index: int, reduction: str, chunk_size: int,
                compute_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.select("linear_loss", hidden.device.type, hidden.dtype)
    return impl(hidden, weight, target, bias, weights, ignore_index, reduction, chunk_size, compute_grad)


@linear_loss.register_fake
def _(hidden, weight, target, bias, weights, ignore_index, reduction, chunk_size, compute_grad):
    loss = hidden.new_empty(())
    if not compute_grad:
        return loss, hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,))
    grad_b = weight.new_empty((weight.shape[0],)) if bias is not None else hidden.new_empty((0,))
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_b


def _setup_context(ctx, inputs, output):
    _, grad_h, grad_w, grad_b = output
    ctx.has_bias = inputs[3] is not None
    ctx.compute_grad = inputs[8]
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.set_materialize_grads(False)   # no (V, H) zeros for the gradient outputs' own (unused) cotangents


def _backward(ctx, grad_loss, *_):
    if not ctx.compute_grad:
        raise RuntimeError("sophon_fast::linear_loss was called with compute_grad=False; call it through "
                           "sophon_fast.functional.linear_suppression_loss, which sets it from requires_grad")
    if grad_loss is None:   # the loss itself did not reach the output (grads are not materialised)
        return (None,) * 9
    grad_h, grad_w, grad_b = ctx.saved_tensors
    return (grad_h * grad_loss, grad_w * grad_loss, None, grad_b * grad_loss if ctx.has_bias else None,
            None, None, None, None, None)


linear_loss.register_autograd(_backward, setup_context=_setup_context)
