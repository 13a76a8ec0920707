"""Helpers shared by the Triton kernels: accumulation dtypes, the output cast and the launchers' guards."""
import os

import torch
import triton
import triton.language as tl

ACC = {torch.float32: tl.float32, torch.float16: tl.float32, torch.bfloat16: tl.float32,
       torch.float64: tl.float64}


def rne_bf16(dtype: torch.dtype) -> bool:
    """True when a bf16 output must be rounded by hand: the interpreter (TRITON_INTERPRET=1) casts
    fp32 -> bf16 by truncation, the GPU by round-to-nearest-even."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def split_scalars(values):
    """Each float x as two fp32 kernel arguments (hi, lo) with hi = fp32(x), lo = fp32(x - hi): Triton passes a
    Python float as fp32, so fp64 kernels rebuild x = hi + lo (``join``) to about 2^-48 relative, while the
    32-bit kernels use hi alone. Returns the flat list [hi0, lo0, hi1, lo1, ...]."""
    out = []
    for x in values:
        hi = float(torch.tensor(float(x), dtype=torch.float32))
        out += [hi, float(x) - hi]
    return out


@triton.jit
def join(hi, lo, ACC: tl.constexpr):
    """The scalar of ``split_scalars`` in the accumulation type: hi + lo for fp64, hi for fp32."""
    if ACC == tl.float64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    return tl.cast(hi, ACC)


@triton.jit
def to_out(x, ptr, RNE_BF16: tl.constexpr):
    """Cast fp32/fp64 ``x`` to ``ptr``'s element type, rounding to nearest even (see ``rne_bf16``)."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


def check_rows(logits: torch.Tensor, target, weights, who: str) -> None:
    """What the row-loss kernels index: 2-D logits of a supported dtype, a (N,) integer target or None, four
    weights (CE and ICE need a target). The full contract is checked by the callers (sophon_fast/ops/_checks.py);
    this package imports nothing from sophon_fast, so it repeats only these memory-safety guards."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{who}: logits must be 2-D (N, C), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dtype not in ACC:
        raise ValueError(f"{who}: logits dtype must be one of fp32/fp16/bf16/fp64, got {logits.dtype}")
    if target is not None and (target.dtype.is_floating_point or target.shape != (logits.shape[0],)):
        raise ValueError(f"{who}: target must be an integer tensor of shape ({logits.shape[0]},), got "
                         f"{tuple(target.shape)} {target.dtype}")
    if len(weights) != 4:
        raise ValueError(f"{who}: weights must be [w_ce, w_ice, w_klu, w_negent], got {list(weights)}")
    if target is None and (weights[0] or weights[1]):
        raise ValueError(f"{who}: ce and ice need a target")
