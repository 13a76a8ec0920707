"""``sophon_fast::linear_loss``: a suppression loss of ``hidden @ weight.T (+ bias)`` and its gradients,
never holding the full (N, V) logits (spec: sophon_fast/reference/linear_loss.py).

    linear_loss(hidden (N, H), weight (V, H), target (N,) int64, bias (V,) or None,
                weights [w_ce, w_ice, w_klu, w_negent], ignore_index, reduction "mean"|"sum",
                chunk_size (0: automatic), compute_grad, low_memory=False)
        -> (loss (), grad_hidden (N, H), grad_weight (V, H), grad_bias (V,))   all in the inputs' dtype

The loss is a scalar, so its gradients are computed during the forward (Liger / Cut-Cross-Entropy
style) and the logits are never recomputed: per chunk of T tokens

    logits_c = hidden_c @ weight.T + bias                    (T, V), one GEMM, into a reused buffer
    loss_c, stats_c = row_losses_fwd(logits_c, target_c)     the row-loss kernels of the backend
    g_c = row_losses_bwd(1 or 1/count, logits_c, ...)        (T, V) d loss / d logits_c, written over
                                                             logits_c where the backend has row_losses_bwd_
    grad_hidden_c = g_c @ weight;  grad_weight += g_c.T @ hidden_c;  grad_bias += sum_rows g_c

so the extra memory is one (T, V) buffer (two on backends without the in-place backward) plus the fp32
accumulators of grad_weight and grad_bias, and the traffic per chunk is three GEMMs plus one read (forward),
one read and one write (backward) of the chunk's logits. The grad_weight accumulation never makes a (V, H)
temporary: one GEMM into it for fp32/fp64 inputs; for 16-bit inputs torch's mixed-dtype GEMM into the fp32
accumulator (``addmm(out_dtype=float32)``: CUDA), else (CPU) blocks of vocabulary rows; the first chunk writes
it outright (no zero fill). ``low_memory=True`` keeps the accumulator in the inputs' dtype instead (Liger's
default: no fp32 (V, H) buffer, one rounding of the running sum per chunk; bound in tests/tolerances.py), with
64 MiB chunks on every device and no second (V, H) in the backward.
Automatic chunks are whole GEMM tiles (multiples of TILE_ROWS): 64 MiB of logits on CPU, 256 MiB on CUDA
(1024 tokens at V = 128256 in bf16: 8 chunks of M = 1024). With the automatic chunk size, a vocabulary so
large that MIN_ROWS tokens' logits exceed the budget is split into blocks with an online log-sum-exp
(sophon_fast/ops/_vocab_blocks.py; it recomputes each block's logits once for the gradient).

Gradients are empty (0,) tensors when ``compute_grad`` is False (no input needs them) or, for the bias,
when there is none. The op's backward scales the saved gradients by the incoming cotangent, out of place
(AOT autograd refuses a backward that mutates saved outputs), so the backward briefly holds (V, H) twice;
on CPU tensors, and in low-memory mode on any device (one host sync there), a cotangent of exactly 1
(``loss.backward()``) returns the saved gradients as they are.
Autograd does not materialise zeros for the gradient outputs' own cotangents. Backends: "reference"
materialises the logits; "cpp", "triton" and "cuda" run the chunk loop above on their own row-loss
kernels and torch's GEMMs.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from sophon_fast import _backend
from sophon_fast.ops._vocab_blocks import vocab_blocked_chunk

CHUNK_BYTES = 64 << 20         # automatic chunk on CPU: one (T, V) logits buffer of at most this many bytes
CUDA_CHUNK_BYTES = 256 << 20   # on CUDA: 8 chunks at the 8192 x 128256 bf16 head (GEMMs of M = 1024)
MIN_ROWS = 16                  # fewer tokens per chunk than this: split the vocabulary instead (online lse)
TILE_ROWS = 256                # chunks of at least this many tokens are a multiple of it (whole GEMM tiles)
W_BLOCK_BYTES = 16 << 20       # CPU fallback of the mixed-dtype accumulation: (rows, H) temporaries this big


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def auto_chunk(n: int, v: int, dtype: torch.dtype, device_type: str = "cpu", low_memory: bool = False) -> int:
    """Tokens per chunk so that one (T, V) buffer of ``dtype`` stays within the device's budget (CHUNK_BYTES,
    CUDA_CHUNK_BYTES; CHUNK_BYTES everywhere in low-memory mode), rounded down to whole GEMM tiles (a multiple
    of TILE_ROWS, or of 64 below it); at least MIN_ROWS (the vocabulary is then split into blocks, see
    ``vocab_block``)."""
    budget = CUDA_CHUNK_BYTES if device_type == "cuda" and not low_memory else CHUNK_BYTES
    t = budget // (v * _itemsize(dtype))
    tile = TILE_ROWS if t >= TILE_ROWS else (64 if t >= 64 else 1)
    return max(1, min(n, max(MIN_ROWS, t // tile * tile)))


def vocab_block(t: int, v: int, dtype: torch.dtype, device_type: str = "cpu") -> int:
    """Vocabulary block width for chunks of ``t`` tokens: V itself while a (t, V) buffer fits in the budget,
    else the widest block that does (the online log-sum-exp path)."""
    fit = (CUDA_CHUNK_BYTES if device_type == "cuda" else CHUNK_BYTES) // (t * _itemsize(dtype))
    return v if fit >= v else max(1, fit)


def _empty(like: Tensor) -> Tensor:
    """A fresh (0,) tensor: outputs of a custom op may not alias each other."""
    return like.new_empty((0,))


@functools.lru_cache(maxsize=None)
def mixed_mm_available(device_type: str) -> bool:
    """Whether torch accumulates a 16-bit GEMM straight into an fp32 output here (``addmm(out_dtype=fp32)``,
    cuBLAS on CUDA with torch >= 2.8; CPU builds lack the kernel)."""
    try:
        a = torch.zeros((2, 2), dtype=torch.bfloat16, device=device_type)
        c = torch.zeros((2, 2), dtype=torch.float32, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32, out=c)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _accumulate_grad_w(grad_w: Tensor, g: Tensor, h_c: Tensor, first: bool) -> None:
    """grad_w (V, H) (+)= g.T @ h_c. Same dtypes: one GEMM into grad_w (the first chunk writes it outright, so
    it is never zero-filled). fp32 grad_w with 16-bit g, h_c: torch's mixed-dtype GEMM where it exists, else
    blocks of vocabulary rows, so the 16-bit temporary is (rows, H), never (V, H)."""
    if grad_w.dtype == g.dtype:
        if first:
            torch.mm(g.t(), h_c, out=grad_w)
        else:
            grad_w.addmm_(g.t(), h_c)
    elif mixed_mm_available(g.device.type):
        if first:
            torch.mm(g.t(), h_c, out_dtype=grad_w.dtype, out=grad_w)
        else:
            torch.addmm(grad_w, g.t(), h_c, out_dtype=grad_w.dtype, out=grad_w)
    else:
        v, h = grad_w.shape
        rows = max(1, W_BLOCK_BYTES // max(1, h * g.element_size()))
        for v0 in range(0, v, rows):
            part = torch.mm(g[:, v0:v0 + rows].t(), h_c)
            if first:
                grad_w[v0:v0 + rows].copy_(part)
            else:
                grad_w[v0:v0 + rows] += part


def chunked_linear_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], weights: List[float],
                        ignore_index: int, reduction: str, chunk_size: int, compute_grad: bool,
                        low_memory: bool = False, *, row_fwd: Callable, row_bwd: Callable,
                        row_bwd_: Optional[Callable] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The chunk loop of the module docstring over a backend's ``row_fwd``/``row_bwd`` kernels; with
    ``row_bwd_`` (the backward written over its logits argument) the gradient of each chunk goes into the
    chunk's own logits buffer. ``low_memory``: grad_weight accumulates in the inputs' dtype (no fp32 (V, H)
    accumulator; each chunk rounds the running sum once: tests/tolerances.py states the bound)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device.type
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    t = chunk_size if chunk_size > 0 else auto_chunk(n, v, hidden.dtype, dev, low_memory)
    count = (target != ignore_index).sum().to(acc)
    per_row = (1.0 / count if reduction == "mean" else torch.ones((), dtype=acc, device=hidden.device)).expand(t)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    block = vocab_block(t, v, hidden.dtype, dev) if chunk_size == 0 else v
    w_acc = weight.dtype if low_memory else acc
    grad_h = torch.empty_like(hidden) if compute_grad else _empty(hidden)
    # the fp32 accumulator (the output itself for fp32/fp64 inputs, or in low-memory mode); written outright by
    # the first chunk, zero-filled only for the vocabulary-blocked path, which adds into it block by block
    new_w = torch.zeros if block != v else torch.empty
    grad_w = new_w(weight.shape, dtype=w_acc, device=weight.device) if compute_grad else _empty(hidden)
    grad_b = (torch.zeros((v,), dtype=acc, device=weight.device) if compute_grad and bias is not None
              else _empty(hidden))
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
        gl = per_row[:h_c.shape[0]].contiguous()
        if row_bwd_ is not None:
            row_bwd_(gl, logits, y_c, stats, weights, 1.0, ignore_index)
            g = logits
        else:
            g = row_bwd(gl, logits, y_c, stats, weights, 1.0, ignore_index)
        torch.mm(g, weight, out=grad_h[start:start + t])
        _accumulate_grad_w(grad_w, g, h_c, first=start == 0)
        if bias is not None:
            grad_b += g.sum(0, dtype=acc)
        del g
    loss = total / count if reduction == "mean" else total
    return loss.to(hidden.dtype), grad_h, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


def _implementation(device_type: str, dtype: torch.dtype) -> Callable:
    """The backend's own ``linear_loss`` (the reference materialises the logits), else the chunk loop over its
    row-loss kernels."""
    module = _backend.select_backend("row_losses_fwd", device_type, dtype)[1]
    own = getattr(module, "linear_loss", None)
    if own is not None:
        return own
    return functools.partial(chunked_linear_loss, row_fwd=module.row_losses_fwd, row_bwd=module.row_losses_bwd,
                             row_bwd_=getattr(module, "row_losses_bwd_", None))


@torch.library.custom_op("sophon_fast::linear_loss", mutates_args=())
def linear_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], weights: List[float],
                ignore_index: int, reduction: str, chunk_size: int, compute_grad: bool,
                low_memory: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _implementation(hidden.device.type, hidden.dtype)
    return impl(hidden, weight, target, bias, weights, ignore_index, reduction, chunk_size, compute_grad,
                low_memory)


@linear_loss.register_fake
def _(hidden, weight, target, bias, weights, ignore_index, reduction, chunk_size, compute_grad, low_memory=False):
    loss = hidden.new_empty(())
    if not compute_grad:
        return loss, hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,))
    grad_b = weight.new_empty((weight.shape[0],)) if bias is not None else hidden.new_empty((0,))
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_b


def _setup_context(ctx, inputs, output):
    _, grad_h, grad_w, grad_b = output
    ctx.has_bias = inputs[3] is not None
    ctx.compute_grad = inputs[8]
    ctx.low_memory = len(inputs) > 9 and bool(inputs[9])
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.set_materialize_grads(False)   # no (V, H) zeros for the gradient outputs' own (unused) cotangents


def _backward(ctx, grad_loss, *_):
    if not ctx.compute_grad:
        raise RuntimeError("sophon_fast::linear_loss was called with compute_grad=False; call it through "
                           "sophon_fast.functional.linear_suppression_loss, which sets it from requires_grad")
    if grad_loss is None:   # the loss itself did not reach the output (grads are not materialised)
        return (None,) * 10
    grad_h, grad_w, grad_b = ctx.saved_tensors
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()   # not traced (fake, functional)
    if eager and (grad_loss.device.type == "cpu" or ctx.low_memory) and bool(grad_loss == 1):
        # the common cotangent 1 (loss.backward()): the saved gradients as they are, no second (V, H) in the
        # backward. Reading a CPU scalar is no device sync; on CUDA it is one, taken in low-memory mode only
        # (as Liger-Kernel does); otherwise the gradients are scaled out of place
        return grad_h, grad_w, None, grad_b if ctx.has_bias else None, None, None, None, None, None, None
    return (grad_h * grad_loss, grad_w * grad_loss, None, grad_b * grad_loss if ctx.has_bias else None,
            None, None, None, None, None, None)


linear_loss.register_autograd(_backward, setup_context=_setup_context)
