"""Triton kernel of the fused inner optimiser step (spec: sophon_fast/reference/inner_step.py).

One pass over flat, contiguous buffers, in place, per element:

    g = grad + wd * param
    SGD:       param -= lr * g
    MOMENTUM:  buf = beta1 * buf + g;                       param -= lr * buf
    ADAM:      m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
               param -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    zero_grad: grad = 0

Traffic per element: SGD 2R+1W, MOMENTUM 3R+2W, ADAM 4R+3W, plus one write of grad with zero_grad.
Arithmetic in fp32 (fp64 for fp64 buffers); the host folds the bias corrections into two scalars. Scalars
travel as fp32 (hi, lo) pairs (``split_scalars``), rebuilt to about 2^-48 for fp64 buffers.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import ACC as _ACC
from ._common import join, rne_bf16, split_scalars, to_out

SGD, MOMENTUM, ADAM = 0, 1, 2
BLOCK = 1024


@triton.jit
def _inner_step_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, numel, lr_hi, lr_lo, beta1_hi, beta1_lo,
                       omb1_hi, omb1_lo, beta2_hi, beta2_lo, omb2_hi, omb2_lo, eps_hi, eps_lo, wd_hi, wd_lo,
                       step_size_hi, step_size_lo, sqrt_bc2_hi, sqrt_bc2_lo,
                       KIND: tl.constexpr, HAS_WD: tl.constexpr, ZERO_GRAD: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    """Grid: cdiv(numel, BLOCK); each program updates BLOCK elements of every buffer the kind uses."""
    lr, beta1, one_minus_beta1 = join(lr_hi, lr_lo, ACC), join(beta1_hi, beta1_lo, ACC), join(omb1_hi, omb1_lo, ACC)
    beta2, one_minus_beta2 = join(beta2_hi, beta2_lo, ACC), join(omb2_hi, omb2_lo, ACC)
    eps, weight_decay = join(eps_hi, eps_lo, ACC), join(wd_hi, wd_lo, ACC)
    step_size, sqrt_bc2 = join(step_size_hi, step_size_lo, ACC), join(sqrt_bc2_hi, sqrt_bc2_lo, ACC)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_WD:
        g = g + weight_decay * p
    if KIND == 0:
        p = p - lr * g
    elif KIND == 1:
        buf = beta1 * tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(ACC) + g
        tl.store(exp_avg_ptr + offs, to_out(buf, exp_avg_ptr, RNE_BF16), mask=mask)
        p = p - lr * buf
    else:
        m = beta1 * tl.load(exp_avg_ptr + offs, mask=mask, other=0.0).to(ACC) + one_minus_beta1 * g
        v = beta2 * tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0).to(ACC) + one_minus_beta2 * g * g
        tl.store(exp_avg_ptr + offs, to_out(m, exp_avg_ptr, RNE_BF16), mask=mask)
        tl.store(exp_avg_sq_ptr + offs, to_out(v, exp_avg_sq_ptr, RNE_BF16), mask=mask)
        p = p - step_size * m / (tl.sqrt(v) / sqrt_bc2 + eps)
    tl.store(param_ptr + offs, to_out(p, param_ptr, RNE_BF16), mask=mask)
    if ZERO_GRAD:
        tl.store(grad_ptr + offs, tl.zeros([BLOCK], grad_ptr.dtype.element_ty), mask=mask)


def inner_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                kind: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                zero_grad: bool) -> None:
    """In-place step over contiguous buffers of one dtype (fp32/fp16/bf16/fp64) and shape; ``exp_avg`` is
    read for MOMENTUM and ADAM, ``exp_avg_sq`` for ADAM only. Raises ValueError on an unknown kind,
    Adam with step < 1, or mismatched / non-contiguous buffers."""
    if kind not in (SGD, MOMENTUM, ADAM):
        raise ValueError(f"inner_step_: unknown inner step kind {kind}")
    if param.dtype not in _ACC:
        raise ValueError(f"inner_step_: param dtype must be fp32/fp16/bf16/fp64, got {param.dtype}")
    used = {"grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    used = {k: t for k, t in list(used.items())[: {SGD: 1, MOMENTUM: 2, ADAM: 3}[kind]]}
    for name, t in {"param": param, **used}.items():
        if t.shape != param.shape or t.dtype != param.dtype or t.device != param.device or not t.is_contiguous():
            raise ValueError(f"inner_step_: {name} must be contiguous and match param ({tuple(param.shape)}, "
                             f"{param.dtype}, {param.device}); got {tuple(t.shape)}, {t.dtype}, {t.device}")
    bc1, bc2 = 1.0, 1.0
    if kind == ADAM:
        if step < 1:
            raise ValueError(f"inner_step_: Adam needs step >= 1, got {step}")
        bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    numel = param.numel()
    if numel == 0:
        return
    _inner_step_kernel[(triton.cdiv(numel, BLOCK),)](
        param, grad, exp_avg if kind != SGD else param, exp_avg_sq if kind == ADAM else param, numel,
        *split_scalars([lr, beta1, 1.0 - float(beta1), beta2, 1.0 - float(beta2), eps, weight_decay,
                        float(lr) / bc1, math.sqrt(bc2)]),
        KIND=int(kind), HAS_WD=weight_decay != 0, ZERO_GRAD=bool(zero_grad), ACC=_ACC[param.dtype], BLOCK=BLOCK,
        RNE_BF16=rne_bf16(param.dtype), num_warps=4)
