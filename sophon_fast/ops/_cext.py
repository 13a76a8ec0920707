"""The compiled extension sophon_fast._C under the backend interface (CPU and CUDA share entry points;
the C++ side dispatches on the tensors' device)."""
from types import SimpleNamespace

from sophon_fast import _C


def _rows(x):
    # Kernels take any row stride but need unit stride along classes.
    return x if x.stride(-1) == 1 else x.contiguous()


def row_losses_fwd(logits, target, weights, scale, ignore_index):
    return _C.row_losses_fwd(_rows(logits), target, [float(w) for w in weights], float(scale), int(ignore_index))


def row_losses_bwd(grad_loss, logits, target, stats, weights, scale, ignore_index):
    return _C.row_losses_bwd(grad_loss.contiguous(), _rows(logits), target, stats.contiguous(),
                             [float(w) for w in weights], float(scale), int(ignore_index))


def inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad):
    _C.inner_step_(param, grad, exp_avg, exp_avg_sq, int(kind), float(lr), float(beta1), float(beta2),
                   float(eps), float(weight_decay), int(step), bool(zero_grad))


CPU = SimpleNamespace(row_losses_fwd=row_losses_fwd, row_losses_bwd=row_losses_bwd, inner_step_=inner_step_)
CUDA = SimpleNamespace(row_losses_fwd=row_losses_fwd, row_losses_bwd=row_losses_bwd, inner_step_=inner_step_)
