"""Triton kernels, installed as ``sophon_fast.kernels`` (the backend ``sophon_fast._backend`` probes).

Backend interface (exactly the semantics of ``sophon_fast.reference``):

    row_losses_fwd(logits, target, weights, scale, ignore_index) -> (loss (N,), stats (N, 3))
    row_losses_bwd(grad_loss, logits, target, stats, weights, scale, ignore_index) -> grad (N, C)
    inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad)
    linear_loss(hidden, weight, target, bias, weights, ignore_index, reduction, chunk_size, compute_grad)
        -> (loss, grad_hidden, grad_weight, grad_bias): the chunk loop of sophon_fast/ops/linear_loss.py
        over these row-loss kernels
    row_sq_mean(x, y) -> (B,) mean of squares per row (the diffusion DoS / negated MSE losses)

Importing needs triton only, no GPU; on CPU tensors the kernels run under ``TRITON_INTERPRET=1``.
"""
import functools

from sophon_fast.ops.linear_loss import chunked_linear_loss

from .inner_step import inner_step_  # noqa: F401
from .row_losses import CHUNK_C, RESIDENT_MAX_C, row_losses_bwd, row_losses_fwd  # noqa: F401
from .sq_mean import row_sq_mean  # noqa: F401

linear_loss = functools.partial(chunked_linear_loss, row_fwd=row_losses_fwd, row_bwd=row_losses_bwd)
