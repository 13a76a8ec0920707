"""``sophon_fast::row_sq_mean``: per-row mean of squares, one read of the input (spec:
sophon_fast/reference/sq_mean.py), under the diffusion losses ``denial_of_service`` and ``negated_mse``.

    row_sq_mean(x (B, D), y (B, D) or None) -> (B,) fp32 (fp64 for fp64 x)

Forward: a backend's fused kernel (reference, C++ CPU, Triton, CUDA) reads x (and y) once and writes B
values. Backward: d/dx = (2 / D) g_i (x - y), d/dy = -d/dx, one elementwise pass in torch (fused by
torch.compile). Inputs are validated by sophon_fast/ops/_checks.py (``check_sq_mean_inputs``).
"""
from typing import Optional

import torch
from torch import Tensor

from sophon_fast import _backend
from sophon_fast.ops._checks import check_sq_mean_inputs


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("sophon_fast::row_sq_mean", mutates_args=())
def row_sq_mean(x: Tensor, y: Optional[Tensor]) -> Tensor:
    check_sq_mean_inputs(x, y, "row_sq_mean")
    return _backend.select("row_sq_mean", x.device.type, x.dtype)(x, y)


@row_sq_mean.register_fake
def _(x, y):
    return x.new_empty((x.shape[0],), dtype=_acc(x.dtype))


def _setup_context(ctx, inputs, output):
    x, y = inputs
    ctx.has_y = y is not None
    ctx.save_for_backward(x, y)


def _backward(ctx, grad):
    x, y = ctx.saved_tensors
    diff = x.to(grad.dtype) if y is None else x.to(grad.dtype) - y.to(grad.dtype)
    gx = diff * (grad * (2.0 / x.shape[1]))[:, None]
    return gx.to(x.dtype), (-gx).to(y.dtype) if ctx.has_y else None


row_sq_mean.register_autograd(_backward, setup_context=_setup_context)
