"""``sophon_fast::row_losses``: the row-wise fused loss core (see sophon_fast/reference/losses.py).

    row_losses(logits (N, C), target (N,) int64 or None, weights [w_ce, w_ice, w_klu, w_negent],
               scale, ignore_index) -> (loss (N,), stats (N, 3))
    row_losses_backward(grad_loss (N,), logits, target, stats, weights, scale, ignore_index) -> (N, C)

loss and stats are fp32 (fp64 for fp64 logits); the gradient has the logits' dtype. The forward
reads the logits once; the backward reads them once more and writes the gradient once. The logits
are never written. Implementations come from the backend selected for the logits' device and dtype
(chosen once per device type and dtype, see sophon_fast/_backend.py). Inputs are validated by
sophon_fast/ops/_checks.py; a target outside [0, C) that is not ignore_index gives a NaN row.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from sophon_fast import _backend
from sophon_fast.ops._checks import check_row_inputs


def _acc_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("sophon_fast::row_losses", mutates_args=())
def row_losses(logits: Tensor, target: Optional[Tensor], weights: List[float], scale: float,
               ignore_index: int) -> Tuple[Tensor, Tensor]:
    check_row_inputs(logits, target, weights, "row_losses")
    return _backend.select("row_losses_fwd", logits.device.type, logits.dtype)(logits, target, weights, scale,
                                                                               ignore_index)


@row_losses.register_fake
def _(logits, target, weights, scale, ignore_index):
    n = logits.shape[0]
    acc = _acc_dtype(logits)
    return logits.new_empty((n,), dtype=acc), logits.new_empty((n, 3), dtype=acc)


@torch.library.custom_op("sophon_fast::row_losses_backward", mutates_args=())
def row_losses_backward(grad_loss: Tensor, logits: Tensor, target: Optional[Tensor], stats: Tensor,
                        weights: List[float], scale: float, ignore_index: int) -> Tensor:
    check_row_inputs(logits, target, weights, "row_losses_backward")
    return _backend.select("row_losses_bwd", logits.device.type, logits.dtype)(grad_loss, logits, target, stats,
                                                                               weights, scale, ignore_index)


@row_losses_backward.register_fake
def _(grad_loss, logits, target, stats, weights, scale, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, target, weights, scale, ignore_index = inputs
    _, stats = output
    ctx.save_for_backward(logits, target, stats)
    ctx.weights, ctx.scale, ctx.ignore_index = weights, scale, ignore_index
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_loss, grad_stats):
    logits, target, stats = ctx.saved_tensors
    grad = row_losses_backward(grad_loss.to(stats.dtype), logits, target, stats, ctx.weights, ctx.scale,
                               ctx.ignore_index)
    return grad, None, None, None, None


row_losses.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad_loss, logits, target, _, weights, scale, ignore_index = inputs
    ctx.save_for_backward(grad_loss, logits, target)
    ctx.weights, ctx.scale, ctx.ignore_index = weights, scale, ignore_index


def _double_backward(ctx, grad_grad):
    """Second order (meta_gradient="unrolled" differentiates through an inner attacker step): the vector-Hessian
    product of the composite reference loss (sophon_fast/reference/losses.py), by autograd; not differentiable
    again (third order raises)."""
    from sophon_fast.reference.losses import row_losses_forward as reference_forward
    grad_loss, logits, target = ctx.saved_tensors
    with torch.enable_grad():
        gl = grad_loss.detach().requires_grad_(True)
        z = logits.detach().requires_grad_(True)
        loss, _ = reference_forward(z, target, ctx.weights, ctx.scale, ctx.ignore_index)
        (g,) = torch.autograd.grad((loss * gl).sum(), z, create_graph=True)
        d_gl, d_z = torch.autograd.grad(g, (gl, z), grad_grad.to(g.dtype), allow_unused=True)
    d_gl = torch.zeros_like(grad_loss) if d_gl is None else d_gl.to(grad_loss.dtype)
    d_z = torch.zeros_like(logits) if d_z is None else d_z.to(logits.dtype)
    return d_gl, d_z, None, None, None, None, None


row_losses_backward.register_autograd(_double_backward, setup_context=_setup_backward_context)
