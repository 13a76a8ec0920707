"""Triton kernels, installed as ``sophon_fast.kernels`` (the backend ``sophon_fast._backend`` probes).

Backend interface (exactly the semantics of ``sophon_fast.reference``):

    row_losses_fwd(logits, target, weights, scale, ignore_index) -> (loss (N,), stats (N, 3))
    row_losses_bwd(grad_loss, logits, target, stats, weights, scale, ignore_index) -> grad (N, C)
    inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad)
    row_sq_mean(x, y) -> (B,) mean of squares per row (the diffusion DoS / negated MSE losses)

The fused linear + loss over these kernels is sophon_fast/ops/linear_loss.py's chunk loop (this package
imports nothing from sophon_fast: it is the lowest layer). Inputs are validated by the callers (the public
functions and custom ops); the launchers only refuse what their kernels cannot index.

Importing needs triton only, no GPU; on CPU tensors the kernels run under ``TRITON_INTERPRET=1``.
"""
from .inner_step import inner_step_  # noqa: F401
from .row_losses import CHUNK_C, RESIDENT_MAX_C, row_losses_bwd, row_losses_fwd  # noqa: F401
from .sq_mean import row_sq_mean  # noqa: F401
