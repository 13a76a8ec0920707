"""One token chunk of the fused linear + loss with the vocabulary split into blocks (online
log-sum-exp), for vocabularies so large that even a short chunk's (T, V) logits would be big.

Pass 1 streams the blocks z_b = hidden_c @ weight_b.T + bias_b (T, B) once and keeps per row the
online state of the row-loss core (sophon_fast/reference/losses.py) over c != y:

    m_x, S_x = sum e^(z-m_x), T_x = sum e^(z-m_x)(z-m_x)   rescaled when m_x grows:
    S <- a S, T <- a (T + (m - m') S), a = e^(m - m');  plus sum z and z_y

then folds z_y in: lse_x, lse, NEGENT and the row loss, exactly as the kernels do. Pass 2 recomputes
each block (one extra GEMM per block: the price of never holding a chunk's logits), forms its gradient
from the stats (the reference backward's formulas, with C = V) and accumulates grad_hidden, grad_weight
and grad_bias. Plain torch ops in fp32 (fp64 for fp64 inputs); the block's logits and gradient are
rounded to the inputs' dtype like the row kernels' input and output.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _block(h_c: Tensor, weight: Tensor, bias: Optional[Tensor], b0: int, b1: int, acc) -> Tensor:
    return F.linear(h_c, weight[b0:b1], None if bias is None else bias[b0:b1]).to(acc)


def vocab_blocked_chunk(h_c: Tensor, weight: Tensor, bias: Optional[Tensor], y_c: Tensor, weights: List[float],
                        ignore_index: int, block: int, per_row: Tensor, compute_grad: bool,
                        grad_h_c: Tensor, grad_w: Tensor, grad_b: Tensor) -> Tensor:
    """Sum of the chunk's row losses (0-d, accumulation dtype); when ``compute_grad``, writes
    grad_h_c (T, H) and adds into the fp32 accumulators grad_w (V, H) and grad_b (V,) (empty: no bias),
    with ``per_row`` (T,) the loss's derivative with respect to each row loss."""
    w_ce, w_ice, w_klu, w_ne = weights
    acc = grad_w.dtype if compute_grad else (torch.float64 if h_c.dtype == torch.float64 else torch.float32)
    t, v = h_c.shape[0], weight.shape[0]
    valid = y_c != ignore_index
    has_y = valid & (y_c >= 0) & (y_c < v)
    bad = valid & ~has_y
    y = torch.where(has_y, y_c, torch.zeros_like(y_c))
    m = torch.full((t,), -math.inf, dtype=acc, device=h_c.device)
    s, tt, sum_z, z_y = (torch.zeros((t,), dtype=acc, device=h_c.device) for _ in range(4))
    for b0 in range(0, v, block):
        b1 = min(v, b0 + block)
        z = _block(h_c, weight, bias, b0, b1, h_c.dtype).to(acc)
        in_blk = has_y & (y >= b0) & (y < b1)
        col = (y - b0).clamp(0, b1 - b0 - 1)[:, None]
        z_y = torch.where(in_blk, z.gather(1, col).squeeze(1), z_y)
        sum_z += z.sum(1)
        keep = ~torch.zeros_like(z, dtype=torch.bool).scatter_(1, col, in_blk[:, None])
        m_new = torch.maximum(m, torch.where(keep, z, -math.inf).amax(1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        seen = s > 0
        shift = torch.where(seen, m - m_safe, torch.zeros_like(m))
        a = torch.where(seen, shift.exp(), torch.zeros_like(m))
        tt = a * (tt + shift * s)
        s = a * s
        d = torch.where(keep, z - m_safe[:, None], torch.zeros_like(z))
        e = torch.where(keep, d.exp(), torch.zeros_like(z))
        s += e.sum(1)
        tt += (e * d).sum(1)
        m = m_new
    lse_x = m + s.log()
    top = torch.where(has_y, torch.maximum(m, z_y), m)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    seen = s > 0
    shift = torch.where(seen, m - top, torch.zeros_like(m))
    a = torch.where(seen, shift.exp(), torch.zeros_like(m))
    b = torch.where(has_y, (z_y - top).exp(), torch.zeros_like(m))
    s_all = a * s + b
    log_s = s_all.log()
    lse = top + log_s
    negent = (a * (tt + shift * s) + b * torch.where(has_y, z_y - top, torch.zeros_like(m))) / s_all - log_s
    loss = (w_ce * (lse - z_y) + w_ice * F.softplus(z_y - lse_x)
            + w_klu * (lse - sum_z / v - math.log(v)) + w_ne * negent)
    loss = torch.where(bad, torch.full_like(loss, math.nan), torch.where(valid, loss, torch.zeros_like(loss)))
    if not compute_grad:
        return loss.sum()
    gl = torch.where(valid, per_row.to(acc), torch.zeros_like(m))
    gl = torch.where(bad, torch.full_like(gl, math.nan), gl)[:, None]
    p_y = (z_y - lse).exp()[:, None]
    grad_h_acc = torch.zeros(grad_h_c.shape, dtype=acc, device=h_c.device)
    for b0 in range(0, v, block):
        b1 = min(v, b0 + block)
        z = _block(h_c, weight, bias, b0, b1, h_c.dtype).to(acc)
        is_y = torch.zeros_like(z, dtype=torch.bool).scatter_(1, (y - b0).clamp(0, b1 - b0 - 1)[:, None],
                                                                (has_y & (y >= b0) & (y < b1))[:, None])
        p = (z - lse[:, None]).exp()
        g = (w_ce + w_klu) * p - w_klu / v + w_ne * p * (z - lse[:, None] - negent[:, None]) - w_ce * is_y
        if w_ice:
            g = g + w_ice * torch.where(is_y, p_y.expand_as(z), -p_y * (z - lse_x[:, None]).exp())
        g = (g * gl).to(h_c.dtype)
        grad_h_acc += (g @ weight[b0:b1]).to(acc)
        grad_w[b0:b1] += (g.t() @ h_c).to(acc)
        if grad_b.numel():
            grad_b[b0:b1] += g.sum(0, dtype=acc)
    grad_h_c.copy_(grad_h_acc)
    return loss.sum()
