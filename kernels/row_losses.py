"""Triton kernels of the row-wise loss core (spec: sophon_fast/reference/losses.py).

Per row of logits z (length C, target y or none), with z' = scale * z:

    m_x, S_x, T_x = max, sum exp(z'_c - m_x), sum exp(z'_c - m_x) (z'_c - m_x)   over c != y
    lse_x = m_x + log S_x;   lse = logaddexp(z'_y, lse_x)   (lse_x without a target)
    NEGENT = T / S - log S   with (m, S, T) the same sums over all c (y folded in analytically)
    CE = lse - z'_y;   ICE = softplus(z'_y - lse_x);   KLU = lse - mean(z') - log C
    loss = w_ce CE + w_ice ICE + w_klu KLU + w_negent NEGENT   (0 on ignored rows)

Backward, with p_c = exp(z'_c - lse), q_c = exp(z'_c - lse_x), p_y = exp(z'_y - lse):

    dL/dz_c = scale * grad_loss * (w_ce (p_c - [c=y]) + w_ice ([c=y] p_y - [c!=y] p_y q_c)
                                   + w_klu (p_c - 1/C) + w_negent p_c (z'_c - lse - NEGENT))

Traffic: forward reads the logits once (plus one target logit per row) and writes 4 values per row;
backward reads the logits once and writes the gradient once. Accumulation is fp32 (fp64 for fp64
logits); scalars (weights, scale) travel as fp32 (hi, lo) pairs (``split_scalars``), rebuilt to about 2^-48
for fp64 logits (the CUDA launchers take them as double).

Two forward strategies share one kernel: row-resident (a [ROWS, BLOCK_C] tile holds whole rows,
C <= ``resident_max_c``; exact two-pass max/sum in registers) and chunked (one row per program,
BLOCK_C-wide chunks with an online max and rescaled S_x, T_x) for longer rows. The backward needs
no reduction (stats are known): one chunk loop streams rows in chunks of at most CHUNK_C.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import ACC as _ACC
from ._common import check_rows, join, rne_bf16, split_scalars, to_out

# Longest row the forward holds whole in one program. Rows up to 65536 work; on sm_90 ptxas keeps
# 16384 (32 warps, 16 values per thread) in registers and spills from 32768 on, so longer rows default
# to the chunked path.
RESIDENT_MAX_C = 16384
CHUNK_C = 4096           # chunk width of the chunked forward and of the backward on long rows
TILE = 4096              # elements per program for short rows (ROWS = TILE // BLOCK_C rows)
MAX_ROWS = 64


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), stable for any x; log1p via Goldberg's log(v) * u / (v - 1), v = 1 + u."""
    u = tl.exp(-tl.abs(x))
    v = 1.0 + u
    tiny = v == 1.0
    log1p = tl.where(tiny, u, tl.log(v) * (u / tl.where(tiny, 1.0, v - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _row_targets(target_ptr, rows, row_ok, n_cols, ignore_index, HAS_TARGET: tl.constexpr):
    """(valid, has_y, bad, y) per row: valid rows count in the loss; has_y rows have a target class in
    [0, n_cols); bad rows have a target outside it (never used as an index: NaN loss and gradient)."""
    if HAS_TARGET:
        y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
        valid = row_ok & (y != ignore_index)
        bad = valid & ((y < 0) | (y >= n_cols))
        has_y = valid & ~bad
        y = tl.where(has_y, y, 0).to(tl.int32)   # a column (< n_cols < 2^31): 32-bit compares per element
    else:
        valid = row_ok
        has_y = rows < 0
        bad = has_y
        y = (rows * 0).to(tl.int32)
    return valid, has_y, bad, y


@triton.jit
def _row_losses_fwd_kernel(logits_ptr, target_ptr, loss_ptr, stats_ptr, n_rows, n_cols, row_stride,
                           w_ce_hi, w_ce_lo, w_ice_hi, w_ice_lo, w_klu_hi, w_klu_lo, w_ne_hi, w_ne_lo, scale_hi,
                           scale_lo, ignore_index,
                           HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, HAS_ICE: tl.constexpr,
                           HAS_KLU: tl.constexpr, HAS_NEGENT: tl.constexpr, ACC: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """Forward: reads each logit once, writes loss[r] and stats[r, 0:3]. Grid: cdiv(n_rows, ROWS)."""
    w_ce, w_ice = join(w_ce_hi, w_ce_lo, ACC), join(w_ice_hi, w_ice_lo, ACC)
    w_klu, w_ne = join(w_klu_hi, w_klu_lo, ACC), join(w_ne_hi, w_ne_lo, ACC)
    scale = join(scale_hi, scale_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < n_rows
    valid, has_y, bad, y = _row_targets(target_ptr, rows, row_ok, n_cols, ignore_index, HAS_TARGET)
    row_ptr = logits_ptr + rows * row_stride
    cols = tl.arange(0, BLOCK_C)
    if ONE_CHUNK:
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        z = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC) * scale
        keep = mask & ((cols[None, :] != y[:, None]) | ~has_y[:, None])
        m_x = tl.max(tl.where(keep, z, float("-inf")), 1)
        m_safe = tl.where(m_x == float("-inf"), 0.0, m_x)
        d = tl.where(keep, z - m_safe[:, None], 0.0)
        e = tl.where(keep, tl.exp(d), 0.0)
        s_x = tl.sum(e, 1)
        t_x = tl.sum(e * d, 1)
        if HAS_KLU:
            sum_z = tl.sum(z, 1)
    else:
        m_x = tl.full([ROWS], float("-inf"), ACC)
        s_x = tl.zeros([ROWS], ACC)
        t_x = tl.zeros([ROWS], ACC)
        sum_z = tl.zeros([ROWS], ACC)
        for start in range(0, n_cols, BLOCK_C):
            c = start + cols
            mask = row_ok[:, None] & (c < n_cols)[None, :]
            z = tl.load(row_ptr[:, None] + c[None, :], mask=mask, other=0.0).to(ACC) * scale
            keep = mask & ((c[None, :] != y[:, None]) | ~has_y[:, None])
            m_new = tl.maximum(m_x, tl.max(tl.where(keep, z, float("-inf")), 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            # Rescale the running sums from m_x to m_new: sum e^(z-m_new)(z-m_new) = a (T + (m_x-m_new) S).
            seen = s_x > 0.0
            a = tl.where(seen, tl.exp(tl.where(seen, m_x - m_safe, 0.0)), 0.0)
            t_x = a * (t_x + tl.where(seen, m_x - m_safe, 0.0) * s_x)
            s_x = a * s_x
            d = tl.where(keep, z - m_safe[:, None], 0.0)
            e = tl.where(keep, tl.exp(d), 0.0)
            s_x += tl.sum(e, 1)
            t_x += tl.sum(e * d, 1)
            m_x = m_new
            if HAS_KLU:
                sum_z += tl.sum(z, 1)
    m_x = tl.where(row_ok, m_x, 0.0)   # padding rows of the last tile stay finite
    s_x = tl.where(row_ok, s_x, 1.0)
    # Fold the target logit into (m, S, T): the all-class sums behind lse and NEGENT.
    z_y = tl.load(row_ptr + y, mask=has_y, other=0.0).to(ACC) * scale
    lse_x = m_x + tl.log(s_x)
    m = tl.where(has_y, tl.maximum(m_x, z_y), m_x)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    seen = s_x > 0.0
    a = tl.where(seen, tl.exp(tl.where(seen, m_x - m_safe, 0.0)), 0.0)
    b = tl.where(has_y, tl.exp(tl.where(has_y, z_y - m_safe, 0.0)), 0.0)
    s_all = a * s_x + b
    t_all = a * (t_x + tl.where(seen, m_x - m_safe, 0.0) * s_x) + b * tl.where(has_y, z_y - m_safe, 0.0)
    log_s = tl.log(s_all)
    lse = m + log_s
    negent = t_all / s_all - log_s

    loss = tl.zeros([ROWS], ACC)
    if HAS_CE:
        loss += w_ce * (lse - z_y)
    if HAS_ICE:
        loss += w_ice * _softplus(z_y - lse_x)
    if HAS_KLU:
        n_c = tl.cast(n_cols, ACC)
        loss += w_klu * (lse - sum_z / n_c - tl.log(n_c))
    if HAS_NEGENT:
        loss += w_ne * negent
    nan = float("nan")
    tl.store(loss_ptr + rows, tl.where(bad, nan, tl.where(valid, loss, 0.0)), mask=row_ok)
    tl.store(stats_ptr + rows * 3, tl.where(bad, nan, lse), mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, tl.where(bad, nan, lse_x), mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, tl.where(bad, nan, negent), mask=row_ok)


@triton.jit
def _row_losses_bwd_kernel(grad_loss_ptr, logits_ptr, target_ptr, stats_ptr, grad_ptr, n_rows, n_cols,
                           row_stride, w_ce_hi, w_ce_lo, w_ice_hi, w_ice_lo, w_klu_hi, w_klu_lo, w_ne_hi, w_ne_lo,
                           scale_hi, scale_lo, ignore_index,
                           HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, HAS_ICE: tl.constexpr,
                           HAS_KLU: tl.constexpr, HAS_NEGENT: tl.constexpr, ACC: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_C: tl.constexpr, RNE_BF16: tl.constexpr):
    """Backward: reads each logit once and writes each gradient once (contiguous rows of n_cols). With ICE and
    another term, one exponential per element: p = q e^(lse_x - lse) (the factor is <= 1)."""
    w_ce, w_ice = join(w_ce_hi, w_ce_lo, ACC), join(w_ice_hi, w_ice_lo, ACC)
    w_klu, w_ne = join(w_klu_hi, w_klu_lo, ACC), join(w_ne_hi, w_ne_lo, ACC)
    scale = join(scale_hi, scale_lo, ACC)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < n_rows
    valid, has_y, bad, y = _row_targets(target_ptr, rows, row_ok, n_cols, ignore_index, HAS_TARGET)
    row_ptr = logits_ptr + rows * row_stride
    out_ptr = grad_ptr + rows * n_cols
    lse = tl.load(stats_ptr + rows * 3, mask=row_ok, other=0.0).to(ACC)
    gl = tl.load(grad_loss_ptr + rows, mask=valid, other=0.0).to(ACC) * scale
    if HAS_ICE:
        lse_x = tl.load(stats_ptr + rows * 3 + 1, mask=row_ok, other=0.0).to(ACC)
        z_y = tl.load(row_ptr + y, mask=has_y, other=0.0).to(ACC) * scale
        p_y = tl.exp(tl.where(has_y, z_y - lse, 0.0))
        k_x = tl.exp(tl.where(row_ok, lse_x - lse, 0.0))   # <= 1
    if HAS_NEGENT:
        negent = tl.load(stats_ptr + rows * 3 + 2, mask=row_ok, other=0.0).to(ACC)
    if HAS_KLU:
        inv_c = 1.0 / tl.cast(n_cols, ACC)
    cols = tl.arange(0, BLOCK_C)
    for start in range(0, n_cols, BLOCK_C):
        c = start + cols
        mask = row_ok[:, None] & (c < n_cols)[None, :]
        z = tl.load(row_ptr[:, None] + c[None, :], mask=mask, other=0.0).to(ACC) * scale
        is_y = has_y[:, None] & (c[None, :] == y[:, None])
        g = tl.zeros([ROWS, BLOCK_C], ACC)
        if HAS_ICE:
            q = tl.exp(tl.where(mask & ~is_y, z - lse_x[:, None], 0.0))   # <= 1 off the target
        if HAS_CE or HAS_KLU or HAS_NEGENT:
            if HAS_ICE:   # the one exponential: p = q e^(lse_x - lse), and p_y itself on the target
                p = tl.where(is_y, p_y[:, None], q * k_x[:, None])
            else:
                p = tl.exp(tl.where(mask, z - lse[:, None], 0.0))   # masked lanes stay finite
            if HAS_CE:
                g += w_ce * (p - tl.where(is_y, 1.0, 0.0))
            if HAS_KLU:
                g += w_klu * (p - inv_c)
            if HAS_NEGENT:
                g += w_ne * p * (z - lse[:, None] - negent[:, None])
        if HAS_ICE:
            g += w_ice * tl.where(is_y, p_y[:, None], -p_y[:, None] * q)
        g = tl.where(valid[:, None], g * gl[:, None], 0.0)
        g = tl.where(bad[:, None], float("nan"), g)
        tl.store(out_ptr[:, None] + c[None, :], to_out(g, grad_ptr, RNE_BF16), mask=mask)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _blocking(n: int, c: int, resident_max_c: int, backward: bool = False) -> Tuple[int, int, bool]:
    """(ROWS, BLOCK_C, one_chunk): the forward holds whole rows in a tile when c <= resident_max_c and
    chunks longer rows; the backward (no reduction) streams chunks of at most CHUNK_C."""
    chunk = min(CHUNK_C, 1 << (max(2, int(resident_max_c)).bit_length() - 1))   # a power of two
    if c <= (chunk if backward else resident_max_c):
        block_c = _pow2(c)
        return max(1, min(MAX_ROWS, TILE // block_c, _pow2(n))), block_c, True
    return 1, chunk, False


def _num_warps(tile: int) -> int:
    return min(32, max(4, tile // 512))


def _check(logits: torch.Tensor, target: Optional[torch.Tensor], weights: Sequence[float], who: str):
    """What the kernels index (``check_rows``); returns the target as contiguous int64."""
    check_rows(logits, target, weights, who)
    return None if target is None else target.to(torch.int64).contiguous()


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """Any row stride is read in place; a non-unit class stride is copied to contiguous rows."""
    return logits if logits.stride(1) == 1 or logits.shape[1] == 1 else logits.contiguous()


def _flags(weights: Sequence[float], target) -> dict:
    return dict(HAS_TARGET=target is not None, HAS_CE=bool(weights[0]), HAS_ICE=bool(weights[1]),
                HAS_KLU=bool(weights[2]), HAS_NEGENT=bool(weights[3]))


def row_losses_fwd(logits: torch.Tensor, target: Optional[torch.Tensor], weights: Sequence[float],
                   scale: float = 1.0, ignore_index: int = -100, *,
                   resident_max_c: int = RESIDENT_MAX_C) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits (fp32/fp16/bf16/fp64, unit class stride or copied) and (N,) int targets or None
    -> (loss (N,), stats (N, 3) = [lse, lse_x, negent]), fp32 (fp64 for fp64 logits).
    ``resident_max_c``: rows up to this length are held whole in one program, longer ones are chunked.
    Raises ValueError on a non-2-D or non-float input, or CE/ICE weights without a target."""
    target = _check(logits, target, weights, "row_losses_fwd")
    logits = _rows(logits)
    n, c = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty((n,), dtype=acc, device=logits.device)
    stats = torch.empty((n, 3), dtype=acc, device=logits.device)
    if n == 0:
        return loss, stats
    rows, block_c, one_chunk = _blocking(n, c, resident_max_c)
    w = [float(x) for x in weights]
    _row_losses_fwd_kernel[(triton.cdiv(n, rows),)](
        logits, logits if target is None else target, loss, stats, n, c, logits.stride(0),
        *split_scalars(w + [scale]), int(ignore_index), **_flags(w, target), ACC=_ACC[logits.dtype],
        ROWS=rows, BLOCK_C=block_c, ONE_CHUNK=one_chunk, num_warps=_num_warps(rows * block_c))
    return loss, stats


def row_losses_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, target: Optional[torch.Tensor],
                   stats: torch.Tensor, weights: Sequence[float], scale: float = 1.0, ignore_index: int = -100,
                   *, resident_max_c: int = RESIDENT_MAX_C) -> torch.Tensor:
    """d(sum_r grad_loss[r] * loss[r]) / d logits as a contiguous (N, C) tensor of the logits' dtype,
    from the ``stats`` of ``row_losses_fwd``. Same arguments and errors as the forward."""
    target = _check(logits, target, weights, "row_losses_bwd")
    logits = _rows(logits)
    n, c = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    grad_loss = grad_loss.to(acc).contiguous()
    stats = stats.to(acc).contiguous()
    rows, block_c, _ = _blocking(n, c, resident_max_c, backward=True)
    w = [float(x) for x in weights]
    _row_losses_bwd_kernel[(triton.cdiv(n, rows),)](
        grad_loss, logits, logits if target is None else target, stats, grad, n, c, logits.stride(0),
        *split_scalars(w + [scale]), int(ignore_index), **_flags(w, target), ACC=_ACC[logits.dtype],
        ROWS=rows, BLOCK_C=block_c, RNE_BF16=rne_bf16(logits.dtype), num_warps=_num_warps(rows * block_c))
    return grad
