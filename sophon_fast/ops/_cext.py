"""The compiled extension sophon_fast._C as the "cpp" and "cuda" backends.

Importing ``sophon_fast._C`` registers the backend-level ops ``torch.ops.sophon_fast._cpp_*`` (schema and
CPU/CUDA kernels in csrc/binding.cpp, ``TORCH_LIBRARY_IMPL``). This module registers the two probes with
sophon_fast/_backend.py; the first probe loads the library and registers the ops' fake kernels, so they
trace under ``torch.compile`` and pass ``opcheck``. CPU and CUDA share these entry points: the dispatcher
routes on the tensors' device.

``fused_loss`` is the lean eager path of the public logits losses: ``_cpp_fused_loss`` is one dispatcher
op whose autograd kernel is C++ (csrc/binding.cpp), with the reduction ("none", "mean", "sum") and the
target-range check inside the kernels; its backward is one more kernel, or, when a graph of the gradient is
being built (``create_graph=True``, the unrolled meta-gradient), the custom op ``row_losses_backward``,
which has a double backward.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from sophon_fast import _backend

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    @torch.library.register_fake("sophon_fast::_cpp_row_losses_fwd")
    def _(logits, target, weights, scale, ignore_index):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits.dtype)), logits.new_empty((n, 3), dtype=_acc(logits.dtype))

    @torch.library.register_fake("sophon_fast::_cpp_row_losses_bwd")
    def _(grad_loss, logits, target, stats, weights, scale, ignore_index):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("sophon_fast::_cpp_row_losses_bwd_")
    def _(grad_loss, logits, target, stats, weights, scale, ignore_index):
        return None

    @torch.library.register_fake("sophon_fast::_cpp_fused_loss_fwd")
    def _(logits, target, weights, scale, ignore_index, reduction, check_targets):
        n, acc = logits.shape[0], _acc(logits.dtype)
        out = logits.new_empty((n,) if reduction == 0 else ())
        return out, logits.new_empty((n, 3), dtype=acc), logits.new_empty((), dtype=acc)

    @torch.library.register_fake("sophon_fast::_cpp_fused_loss_bwd")
    def _(grad_out, logits, target, stats, rscale, weights, scale, ignore_index):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("sophon_fast::_cpp_fused_loss")
    def _(logits, target, weights, scale, ignore_index, reduction, check_targets):
        return logits.new_empty((logits.shape[0],) if reduction == 0 else ())

    @torch.library.register_fake("sophon_fast::_cpp_inner_step_")
    def _(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad):
        return None

    @torch.library.register_fake("sophon_fast::_cpp_inner_step_capturable_")
    def _(param, grad, exp_avg, exp_avg_sq, step, kind, lr, beta1, beta2, eps, weight_decay, zero_grad):
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


def row_losses_bwd_(grad_loss, logits, target, stats, weights, scale, ignore_index):
    """The backward written over ``logits`` (contiguous; the caller's private buffer)."""
    torch.ops.sophon_fast._cpp_row_losses_bwd_(grad_loss.contiguous(), logits, target, stats.contiguous(),
                                               [float(w) for w in weights], float(scale), int(ignore_index))


def fused_loss(logits, target, weights, scale, ignore_index, reduction, check_targets):
    """(N, C) logits (unit class stride), contiguous int64 target or None, weights as 4 floats, reduction
    code (REDUCTION_CODES) -> the reduced loss in the logits' dtype, differentiable (twice) for the logits.
    The caller (sophon_fast.functional) has validated every argument."""
    return torch.ops.sophon_fast._cpp_fused_loss(_rows(logits), target, weights, scale, ignore_index, reduction,
                                                 check_targets)


def inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad):
    torch.ops.sophon_fast._cpp_inner_step_(param, grad, exp_avg, exp_avg_sq, int(kind), float(lr), float(beta1),
                                           float(beta2), float(eps), float(weight_decay), int(step),
                                           bool(zero_grad))


def inner_step_capturable_(param, grad, exp_avg, exp_avg_sq, step, kind, lr, beta1, beta2, eps, weight_decay,
                           zero_grad):
    torch.ops.sophon_fast._cpp_inner_step_capturable_(param, grad, exp_avg, exp_avg_sq, step, int(kind), float(lr),
                                                      float(beta1), float(beta2), float(eps), float(weight_decay),
                                                      bool(zero_grad))


def row_sq_mean(x, y):
    return torch.ops.sophon_fast._cpp_row_sq_mean(x.contiguous(), None if y is None else y.contiguous())


_IMPL = SimpleNamespace(row_losses_fwd=row_losses_fwd, row_losses_bwd=row_losses_bwd, row_losses_bwd_=row_losses_bwd_,
                        fused_loss=fused_loss,
                        inner_step_=inner_step_, inner_step_capturable_=inner_step_capturable_,
                        row_sq_mean=row_sq_mean)
_loaded: dict = {}


def _load():
    """sophon_fast._C, loaded once (fake kernels registered with it); raises ImportError when not built."""
    if "C" not in _loaded:
        from sophon_fast import _C
        _register_fakes()
        _loaded["C"] = _C
    return _loaded["C"]


def _probe_cpp() -> _backend.Probe:
    try:
        _load()
    except ImportError as e:
        return _backend.unusable("cpp", f"extension sophon_fast._C not built ({e}); run "
                                        "`pip install --no-build-isolation -e .`")
    return _backend.Probe("cpp", True, {"cpu": True, "cuda": False},
                          {"cpu": "", "cuda": "the C++ backend serves CPU tensors (the CUDA one serves GPU tensors)"},
                          _IMPL)


def _probe_cuda() -> _backend.Probe:
    try:
        built = bool(_load().has_cuda())
    except ImportError as e:
        return _backend.unusable("cuda", f"extension sophon_fast._C not built ({e})")
    cuda_why = ""
    if not built:
        cuda_why = "extension built without CUDA sources (torch has no CUDA or no nvcc at build time)"
    elif not torch.cuda.is_available():
        cuda_why = "no CUDA device available"
    return _backend.Probe("cuda", built, {"cpu": False, "cuda": not cuda_why},
                          {"cpu": "the CUDA backend serves GPU tensors only", "cuda": cuda_why}, _IMPL)


_backend.register_prober("cpp", _probe_cpp)
_backend.register_prober("cuda", _probe_cuda)
