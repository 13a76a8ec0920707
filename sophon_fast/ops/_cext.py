"""The compiled extension sophon_fast._C under the backend interface.

Importing ``sophon_fast._C`` registers the backend-level ops ``torch.ops.sophon_fast._cpp_*`` (schema
and CPU/CUDA kernels in csrc/binding.cpp, ``TORCH_LIBRARY_IMPL``); their fake kernels are registered
here, so they trace under ``torch.compile`` and pass ``opcheck``. CPU and CUDA share these entry points:
the dispatcher routes on the tensors' device.
"""
import functools
from types import SimpleNamespace

import torch

from sophon_fast import _C  # noqa: F401  (loads the library: registers the _cpp_* ops)
from sophon_fast.ops.linear_loss import chunked_linear_loss


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("sophon_fast::_cpp_row_losses_fwd")
def _(logits, target, weights, scale, ignore_index):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=_acc(logits.dtype)), logits.new_empty((n, 3), dtype=_acc(logits.dtype))


@torch.library.register_fake("sophon_fast::_cpp_row_losses_bwd")
def _(grad_loss, logits, target, stats, weights, scale, ignore_index):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("sophon_fast::_cpp_inner_step_")
def _(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad):
    return None


@torch.library.register_fake("sophon_fast::_cpp_row_sq_mean")
def _(x, y):
    return x.new_empty((x.shape[0],), dtype=_acc(x.dtype))


def _rows(x):
    # Kernels take any row stride but need unit stride along classes.
    return x if x.stride(-1) == 1 else x.contiguous()


def row_losses_fwd(logits, target, weights, scale, ignore_index):
    return torch.ops.sophon_fast._cpp_row_losses_fwd(_rows(logits), target, [float(w) for w in weights],
                                                     float(scale), int(ignore_index))


def row_losses_bwd(grad_loss, logits, target, stats, weights, scale, ignore_index):
    return torch.ops.sophon_fast._cpp_row_losses_bwd(grad_loss.contiguous(), _rows(logits), target,
                                                     stats.contiguous(), [float(w) for w in weights],
                                                     float(scale), int(ignore_index))


def inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad):
    torch.ops.sophon_fast._cpp_inner_step_(param, grad, exp_avg, exp_avg_sq, int(kind), float(lr), float(beta1),
                                           float(beta2), float(eps), float(weight_decay), int(step),
                                           bool(zero_grad))


def row_sq_mean(x, y):
    return torch.ops.sophon_fast._cpp_row_sq_mean(x.contiguous(), None if y is None else y.contiguous())


linear_loss = functools.partial(chunked_linear_loss, row_fwd=row_losses_fwd, row_bwd=row_losses_bwd)

CPU = SimpleNamespace(row_losses_fwd=row_losses_fwd, row_losses_bwd=row_losses_bwd, inner_step_=inner_step_,
                      linear_loss=linear_loss, row_sq_mean=row_sq_mean)
CUDA = SimpleNamespace(row_losses_fwd=row_losses_fwd, row_losses_bwd=row_losses_bwd, inner_step_=inner_step_,
                       linear_loss=linear_loss, row_sq_mean=row_sq_mean)
