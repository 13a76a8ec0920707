"""Public loss functions, each one custom op (sophon_fast/ops/) plus an O(N) reduction:

* logits losses (``fused_loss``, ``inverse_cross_entropy``, ``kl_uniform``, ``neg_entropy``,
  ``cross_entropy``): the row-wise core ``sophon_fast::row_losses`` (one read of the logits forward,
  one read + one write backward);
* ``linear_suppression_loss``: ``sophon_fast::linear_loss``, the same losses of ``hidden @ weight.T``
  without materialising the logits;
* ``denial_of_service``, ``negated_mse`` (diffusion): ``sophon_fast::row_sq_mean``.

Common contract of the logits losses:
    logits: (N, C) floating tensor (fp32, fp16, bf16 or fp64), N >= 1, 2 <= C; any strides.
    target: (N,) integer tensor with values in [0, C) or ``ignore_index`` (rows that contribute
            nothing and are not counted by "mean").
    reduction: "mean" (over counted rows), "sum" or "none" ((N,), zeros on ignored rows).
    Returns a tensor of the logits' dtype. Raises ValueError on bad input (type, shape, dtype, device,
    options), on every backend. Target values are asserted without a host sync (RuntimeError: inside the
    kernels of the lean path, by ``torch._assert_async`` otherwise; on CUDA at a later sync);
    ``set_target_checks(True)`` checks them on the host and raises ValueError instead. The hot path never synchronises, so the losses compile with
    ``torch.compile(fullgraph=True)`` and can be captured in CUDA graphs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sophon_fast import _backend
from sophon_fast.ops._checks import (assert_targets_in_range, check_linear_inputs, check_logits,
                                     check_per_sample_inputs, check_reduction, check_target, target_checks_on_host)
from sophon_fast.ops._checks import set_target_checks  # noqa: F401  (re-exported: the debug switch)
from sophon_fast.ops.linear_loss import linear_loss
from sophon_fast.ops.row_losses import row_losses
from sophon_fast.ops.sq_mean import row_sq_mean
from sophon_fast.reference.linear_loss import LOSS_WEIGHTS as LINEAR_LOSSES
from sophon_fast.reference.losses import IGNORE_INDEX

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def _check(logits: Tensor, target: Optional[Tensor], reduction: str, who: str) -> None:
    """Metadata checks (ValueError): the one validation of a logits loss call, here at the public boundary."""
    check_logits(logits, who, min_classes=2)
    if logits.shape[0] == 0:
        raise ValueError(f"{who}: logits has N = 0 rows")
    check_reduction(reduction, who)
    check_target(target, logits.shape[0], logits.device, who)


def _reduce(loss: Tensor, target: Optional[Tensor], reduction: str, ignore_index: int, dtype) -> Tensor:
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(dtype)
    count = loss.shape[0] if target is None else (target != ignore_index).sum()
    return (total / count).to(dtype)


def fused_loss(logits: Tensor, target: Optional[Tensor] = None, *, ce: float = 0.0, ice: float = 0.0,
               klu: float = 0.0, negent: float = 0.0, scale: float = 1.0, reduction: str = "mean",
               ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Weighted sum ``ce*CE + ice*ICE + klu*KLU + negent*NEGENT`` of ``scale * logits`` from ONE read
    of the logits (forward) and one read + one write (backward). CE and ICE need ``target``.

    Eager calls on a backend with a lean path (the C++/CUDA extension: ``_cpp_fused_loss``) are one dispatcher op
    with its autograd in C++, the reduction and the target-range check inside its kernels (second derivatives
    through the custom op ``row_losses_backward``); under ``torch.compile`` or a ``torch.func`` transform, and on
    the other backends, the custom op ``sophon_fast::row_losses`` plus the reduction in torch ops."""
    who = "fused_loss"
    _check(logits, target, reduction, who)
    weights = [float(ce), float(ice), float(klu), float(negent)]
    if target is None and (weights[0] or weights[1]):
        raise ValueError("fused_loss: ce and ice need a target")
    if target is not None and (target.dtype != torch.int64 or not target.is_contiguous()):
        target = target.long().contiguous()
    ignore_index = int(ignore_index)
    host_check = target is not None and target_checks_on_host()
    # the lean path is eager only: torch.compile traces the custom ops, and torch.func transforms (grad, vmap)
    # cannot run a C++ autograd function; meta tensors (shape propagation) take the custom ops' fake kernels
    if not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(logits) \
            and logits.device.type != "meta":
        lean = getattr(_backend.select_backend("row_losses_fwd", logits.device.type, logits.dtype)[1], "fused_loss",
                       None)
        if lean is not None:
            if host_check:
                assert_targets_in_range(target, logits.shape[1], ignore_index, who)
            return lean(logits, target, weights, float(scale), ignore_index, _REDUCTION_CODES[reduction],
                        not host_check)
    if target is not None:
        assert_targets_in_range(target, logits.shape[1], ignore_index, who)
    loss, _ = row_losses(logits, target, weights, float(scale), ignore_index)
    return _reduce(loss, target, reduction, ignore_index, logits.dtype)


def inverse_cross_entropy(logits: Tensor, target: Tensor, *, variant: str = "paper", reduction: str = "mean",
                          ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Inverse cross-entropy.

    variant="paper": ``-log(1 - softmax(logits)[y])``, stable for any finite logits (also when p_y
    rounds to 1). variant="reference_code": the SOPHON repository's ``CE(1 - logits, y)``, which
    equals ``CE(-logits, y)``.
    """
    if variant == "paper":
        return fused_loss(logits, target, ice=1.0, reduction=reduction, ignore_index=ignore_index)
    if variant == "reference_code":
        return fused_loss(logits, target, ce=1.0, scale=-1.0, reduction=reduction, ignore_index=ignore_index)
    raise ValueError(f"inverse_cross_entropy: variant must be 'paper' or 'reference_code', got {variant!r}")


def kl_uniform(logits: Tensor, *, reduction: str = "mean") -> Tensor:
    """KL(uniform || softmax(logits)) = logsumexp(z) - mean(z) - log C, with the true C."""
    return fused_loss(logits, None, klu=1.0, reduction=reduction)


def neg_entropy(logits: Tensor, *, reduction: str = "mean") -> Tensor:
    """-H(softmax(logits)) = sum_c p_c log p_c (the tamper-resistance literature's suppression loss)."""
    return fused_loss(logits, None, negent=1.0, reduction=reduction)


def cross_entropy(logits: Tensor, target: Tensor, *, reduction: str = "mean",
                  ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Plain cross-entropy through the same fused core (NTR and inner attacker steps)."""
    return fused_loss(logits, target, ce=1.0, reduction=reduction, ignore_index=ignore_index)


SUPPRESSION_LOSSES = {
    "ice": lambda z, y: inverse_cross_entropy(z, y, variant="paper"),
    "ice_reference_code": lambda z, y: inverse_cross_entropy(z, y, variant="reference_code"),
    "klu": lambda z, y: kl_uniform(z),
    "neg_entropy": lambda z, y: neg_entropy(z),
}


def suppression_loss(name: str, logits: Tensor, target: Tensor) -> Tensor:
    """The named suppression loss ("ice", "ice_reference_code", "klu", "neg_entropy"), mean-reduced."""
    try:
        fn = SUPPRESSION_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown suppression loss {name!r}; choose from {sorted(SUPPRESSION_LOSSES)}") from None
    return fn(logits, target)


def linear_suppression_loss(hidden: Tensor, weight: Tensor, target: Tensor, *, loss: str = "ice",
                            bias: Optional[Tensor] = None, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                            chunk_size: Optional[int] = None, low_memory: bool = False) -> Tensor:
    """The loss of ``logits = hidden @ weight.T (+ bias)`` without ever holding the full logits.

    hidden: (N, H); weight: (V, H) (the LM head, possibly tied to an input embedding: gradients add up);
    bias: (V,) or None; all of one floating dtype (fp32/fp16/bf16/fp64) and device. target: (N,) integer,
    values in [0, V) or ``ignore_index`` (rows that contribute nothing and are not counted by "mean",
    for every loss, including "klu" and "neg_entropy", which do not otherwise use the target).
    loss: "ice" (paper variant), "klu", "ce" or "neg_entropy". reduction: "mean" or "sum" (the gradients
    are formed during the forward, which needs a scalar loss; there is no "none").
    chunk_size: tokens per chunk (default: one (T, V) logits buffer of at most 64 MiB on CPU, 256 MiB on CUDA, in
    whole GEMM tiles of 256 tokens). low_memory: 16-bit inputs accumulate grad_weight in their own dtype instead
    of an fp32 (V, H) buffer (one rounding of the running sum per chunk: the bound is in tests/tolerances.py),
    with 64 MiB chunks on every device, and the backward of a loss with cotangent 1 returns the gradients
    without a copy (one host sync on CUDA to test that); no effect on the values for fp32/fp64 inputs.
    Returns a 0-d tensor of the inputs' dtype, differentiable for hidden, weight and bias. Extra memory:
    one (chunk_size, V) buffer (the gradient of a chunk is written over its logits on the C++/CUDA backends)
    plus the fp32 gradient accumulators, never (N, V) and never a (V, H) temporary per chunk. Raises ValueError
    on bad input; target values are asserted like the other losses (no host sync).
    """
    who = "linear_suppression_loss"
    check_linear_inputs(hidden, weight, target, bias, chunk_size, who)
    check_reduction(reduction, who, allowed=("mean", "sum"))
    if loss not in LINEAR_LOSSES:
        raise ValueError(f"{who}: loss must be one of {sorted(LINEAR_LOSSES)}, got {loss!r}")
    assert_targets_in_range(target, weight.shape[0], ignore_index, who)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    out, _, _, _ = linear_loss(hidden, weight, target.long().contiguous(), bias, list(LINEAR_LOSSES[loss]),
                               int(ignore_index), reduction, int(chunk_size or 0), compute_grad, bool(low_memory))
    return out


def _per_sample(per_sample: Tensor, reduction: str, dtype) -> Tensor:
    if reduction == "none":
        return per_sample.to(dtype)
    return (per_sample.sum() if reduction == "sum" else per_sample.mean()).to(dtype)


def denial_of_service(pred: Tensor, *, reduction: str = "mean") -> Tensor:
    """Denial-of-service loss for diffusion models: the mean of ``pred ** 2``.

    pred: (B, ...) floating tensor (fp32/fp16/bf16/fp64), B >= 1, any layout. Per sample, the mean of
    pred^2 over every dim but the first; reduction "mean" (over samples, = over all elements), "sum"
    (over samples) or "none" ((B,)). One fused read of pred (``sophon_fast::row_sq_mean``); returns the
    pred's dtype. Raises ValueError on bad input.
    """
    check_per_sample_inputs(pred, None, reduction, "denial_of_service")
    return _per_sample(row_sq_mean(pred.reshape(pred.shape[0], -1), None), reduction, pred.dtype)


def negated_mse(pred: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Negated mean squared error, ``-MSE(pred, target)`` (the noise-prediction loss turned around).

    pred, target: (B, ...) floating tensors of one shape, dtype and device. Per sample, -mean of
    (pred - target)^2 over every dim but the first; reduction "mean", "sum" or "none" ((B,)), as in
    ``denial_of_service``. Returns the pred's dtype. Raises ValueError on bad input.
    """
    if target is None:
        raise ValueError("negated_mse: target is required")
    check_per_sample_inputs(pred, target, reduction, "negated_mse")
    b = pred.shape[0]
    return -_per_sample(row_sq_mean(pred.reshape(b, -1), target.reshape(b, -1)), reduction, pred.dtype)
