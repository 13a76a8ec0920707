"""Helpers shared by the Triton kernels: accumulation dtypes and the output cast."""
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


@triton.jit
def to_out(x, ptr, RNE_BF16: tl.constexpr):
    """Cast fp32/fp64 ``x`` to ``ptr``'s element type, rounding to nearest even (see ``rne_bf16``)."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)
