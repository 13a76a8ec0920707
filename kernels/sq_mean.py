"""Triton kernel of the per-row mean of squares (spec: sophon_fast/reference/sq_mean.py):

    out[r] = mean_j (x[r, j] - y[r, j])^2      (no y: mean_j x[r, j]^2)

Traffic: one read of x (and y), one write per row. One program per row, BLOCK-wide masked chunks,
int64 offsets, fp32 accumulation (fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import ACC as _ACC

BLOCK = 1024


@triton.jit
def _row_sq_mean_kernel(x_ptr, y_ptr, out_ptr, d, HAS_Y: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Reads row program_id(0) of x (and y) once, writes one value. Grid: (n_rows,)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * d
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, d, BLOCK):
        c = start + cols
        mask = c < d
        v = tl.load(x_ptr + base + c, mask=mask, other=0.0).to(ACC)
        if HAS_Y:
            v -= tl.load(y_ptr + base + c, mask=mask, other=0.0).to(ACC)
        acc += v * v
    tl.store(out_ptr + row, tl.sum(acc, 0) / tl.cast(d, ACC))


def row_sq_mean(x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, D) x, optional (B, D) y of the same dtype -> (B,) fp32 (fp64 for fp64) mean of squares."""
    if x.dim() != 2 or x.dtype not in _ACC or (y is not None and (y.shape != x.shape or y.dtype != x.dtype)):
        raise ValueError(f"row_sq_mean: x must be a 2-D fp32/fp16/bf16/fp64 tensor and y None or x's shape and dtype, "
                         f"got {tuple(x.shape)} {x.dtype}")
    x = x.contiguous()
    y = None if y is None else y.contiguous()
    n, d = x.shape
    out = torch.empty((n,), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    if n == 0:
        return out
    block = min(BLOCK, triton.next_power_of_2(d))
    _row_sq_mean_kernel[(n,)](x, x if y is None else y, out, d, HAS_Y=y is not None, ACC=_ACC[x.dtype],
                              BLOCK=block, num_warps=4 if block >= 512 else 1)
    return out
