"""``sophon_fast::inner_step_``: one simulated-attacker optimiser step over flat buffers, in place,
optionally zeroing the gradient in the same pass (spec: sophon_fast/reference/inner_step.py).

``sophon_fast::inner_step_capturable_`` is the same step with Adam's step counter as a device tensor
(``step``: one int64 element on the buffers' device, incremented by the op before the update): no host
synchronisation and no host value that changes from step to step, so a CUDA graph can capture one call and
replay it for every inner step. Starting from ``step = 0``, call k equals ``inner_step_(..., step=k, ...)``.
"""
import torch
from torch import Tensor

from sophon_fast import _backend


@torch.library.custom_op("sophon_fast::inner_step_", mutates_args=("param", "grad", "exp_avg", "exp_avg_sq"))
def inner_step_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, kind: int, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, step: int, zero_grad: bool) -> None:
    _check_buffers(param, grad, exp_avg, exp_avg_sq, kind)
    if kind == 2 and step < 1:
        raise ValueError(f"inner_step_: Adam needs step >= 1, got {step}")
    _backend.select("inner_step_", param.device.type, param.dtype)(param, grad, exp_avg, exp_avg_sq, kind, lr,
                                                                   beta1, beta2, eps, weight_decay, step, zero_grad)


@inner_step_.register_fake
def _(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad):
    return None


@torch.library.custom_op("sophon_fast::inner_step_capturable_",
                         mutates_args=("param", "grad", "exp_avg", "exp_avg_sq", "step"))
def inner_step_capturable_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor,
                           kind: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                           zero_grad: bool) -> None:
    _check_buffers(param, grad, exp_avg, exp_avg_sq, kind)
    if step.numel() != 1 or step.dtype != torch.int64 or step.device != param.device:
        raise ValueError(f"inner_step_capturable_: step must be a one-element int64 tensor on {param.device}, got "
                         f"{tuple(step.shape)} {step.dtype} on {step.device}")
    _backend.select("inner_step_capturable_", param.device.type, param.dtype)(
        param, grad, exp_avg, exp_avg_sq, step, kind, lr, beta1, beta2, eps, weight_decay, zero_grad)


@inner_step_capturable_.register_fake
def _(param, grad, exp_avg, exp_avg_sq, step, kind, lr, beta1, beta2, eps, weight_decay, zero_grad):
    return None


def _check_buffers(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, kind: int) -> None:
    used = (("grad", grad),) + ((("exp_avg", exp_avg),) if kind >= 1 else ()) + \
        ((("exp_avg_sq", exp_avg_sq),) if kind == 2 else ())
    for name, t in used:  # buffers a kind does not use may be any tensor (e.g. empty): never touched
        if t.shape != param.shape or t.dtype != param.dtype or t.device != param.device:
            raise ValueError(f"inner_step_: {name} must match param (shape {tuple(param.shape)}, {param.dtype}, "
                             f"{param.device}); got {tuple(t.shape)}, {t.dtype}, {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"inner_step_: {name} must be contiguous")
    if not param.is_contiguous():
        raise ValueError("inner_step_: param must be contiguous")
    if kind not in (0, 1, 2):
        raise ValueError(f"inner_step_: kind must be 0 (sgd), 1 (momentum) or 2 (adam), got {kind}")
