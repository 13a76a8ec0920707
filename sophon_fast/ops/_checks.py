"""The one place that validates loss inputs (public functions, custom ops and the Triton launchers).

Metadata checks (type, rank, shape, dtype, device, reduction) raise ``ValueError`` and cost no device
work. Target *values* are data: checking them on the host would synchronise with the device and break
``torch.compile(fullgraph=True)`` and CUDA-graph capture, so by default they are asserted
asynchronously with ``torch._assert_async`` (a ``RuntimeError``; on CUDA reported at a later sync).
The debug switch ``set_target_checks(True)`` (or ``SOPHON_FAST_CHECK_TARGETS=1`` at import) turns on a
synchronous host check that raises ``ValueError`` naming the first bad value; it is skipped while
``torch.compile`` traces. Every kernel is memory-safe for out-of-range targets anyway: such a row gets
a NaN loss and gradient, never an out-of-bounds read.

The C++ ops (csrc/binding.cpp) only guard the layouts their kernels index; they are reached through
the custom ops, after these checks.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

_check_targets_on_host = os.environ.get("SOPHON_FAST_CHECK_TARGETS", "0") not in ("", "0")


def set_target_checks(enabled: bool) -> None:
    """Debug switch: True makes every loss check its target values on the host (a device sync) and
    raise ValueError naming the first bad one; False (default) asserts them asynchronously."""
    global _check_targets_on_host
    _check_targets_on_host = bool(enabled)


def target_checks_on_host() -> bool:
    return _check_targets_on_host


def check_logits(logits: Tensor, who: str, min_classes: int = 1) -> None:
    """logits: a 2-D floating tensor (fp32/fp16/bf16/fp64) with at least ``min_classes`` columns."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"{who}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{who}: logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    if logits.shape[1] < min_classes:
        raise ValueError(f"{who}: logits needs at least {min_classes} classes, got C = {logits.shape[1]}")
    if logits.dtype not in FLOATS:
        raise ValueError(f"{who}: logits dtype must be one of fp32/fp16/bf16/fp64, got {logits.dtype}")


def check_target(target: Optional[Tensor], n: int, device: torch.device, who: str) -> None:
    """target: None or an integer tensor of shape (n,) on ``device``."""
    if target is None:
        return
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool \
            or target.is_complex():
        raise ValueError(f"{who}: target must be an integer tensor, got "
                         f"{target.dtype if isinstance(target, Tensor) else type(target).__name__}")
    if target.shape != (n,):
        raise ValueError(f"{who}: target must have shape ({n},), got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"{who}: target is on {target.device} but the inputs on {device}")


def check_weights(weights: Sequence[float], has_target: bool, who: str) -> None:
    """weights: [w_ce, w_ice, w_klu, w_negent]; CE and ICE need a target."""
    if len(weights) != 4:
        raise ValueError(f"{who}: weights must be [w_ce, w_ice, w_klu, w_negent], got {list(weights)}")
    if not has_target and (weights[0] or weights[1]):
        raise ValueError(f"{who}: ce and ice need a target")


def check_reduction(reduction: str, who: str, allowed: Sequence[str] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"{who}: reduction must be one of {tuple(allowed)}, got {reduction!r}")


def check_row_inputs(logits: Tensor, target: Optional[Tensor], weights: Sequence[float], who: str) -> None:
    """Op-level contract of the row-loss core (sophon_fast::row_losses and every backend of it)."""
    check_logits(logits, who)
    check_target(target, logits.shape[0], logits.device, who)
    check_weights(weights, target is not None, who)


def assert_targets_in_range(target: Tensor, num_classes: int, ignore_index: int, who: str) -> None:
    """Every target is in [0, num_classes) or equals ``ignore_index``: asynchronously by default, on
    the host (ValueError) under the debug switch. No host synchronisation unless the switch is on."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if _check_targets_on_host and not torch.compiler.is_compiling():
        if bool(bad.any()):
            v = int(target[bad][0])
            raise ValueError(f"{who}: target value {v} is out of range for C = {num_classes} classes "
                             f"(allowed: 0..{num_classes - 1} or ignore_index={ignore_index})")
        return
    torch._assert_async(~bad.any(), f"{who}: a target is out of range for C = {num_classes} classes "
                                    f"(and is not ignore_index={ignore_index})")


def check_linear_inputs(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                        chunk_size: Optional[int], who: str) -> None:
    """Contract of the fused linear + loss: hidden (N, H), weight (V, H), bias (V,) or None, all of one
    floating dtype and device; target (N,) integer; N >= 1, V >= 2; chunk_size None or >= 1."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{who}: {name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if hidden.dtype not in FLOATS:
        raise ValueError(f"{who}: hidden dtype must be one of fp32/fp16/bf16/fp64, got {hidden.dtype}")
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        raise ValueError(f"{who}: hidden has N = 0 rows")
    if weight.shape[1] != h:
        raise ValueError(f"{who}: weight must have shape (V, {h}) to match hidden {tuple(hidden.shape)}, "
                         f"got {tuple(weight.shape)}")
    if v < 2:
        raise ValueError(f"{who}: weight needs at least 2 rows (classes), got V = {v}")
    others = (("weight", weight),) + ((("bias", bias),) if bias is not None else ())
    for name, t in others:
        if t.dtype != hidden.dtype or t.device != hidden.device:
            raise ValueError(f"{who}: {name} is {t.dtype} on {t.device} but hidden is {hidden.dtype} on "
                             f"{hidden.device}")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"{who}: bias must have shape ({v},), got {tuple(bias.shape)}")
    if target is None:
        raise ValueError(f"{who}: target is required (ignore_index marks rows that do not count)")
    check_target(target, n, hidden.device, who)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{who}: chunk_size must be None or a positive int, got {chunk_size!r}")


def check_sq_mean_inputs(x: Tensor, y: Optional[Tensor], who: str) -> None:
    """x: a 2-D floating tensor (B, D), D >= 1; y: None or a tensor of x's shape, dtype and device."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{who}: input must be a 2-D tensor (B, D) with D >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.dtype not in FLOATS:
        raise ValueError(f"{who}: dtype must be one of fp32/fp16/bf16/fp64, got {x.dtype}")
    if y is not None and (not isinstance(y, Tensor) or y.shape != x.shape or y.dtype != x.dtype
                          or y.device != x.device):
        raise ValueError(f"{who}: target must match the prediction ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                         f"{(tuple(y.shape), y.dtype, y.device) if isinstance(y, Tensor) else type(y).__name__}")


def check_per_sample_inputs(pred: Tensor, target: Optional[Tensor], reduction: str, who: str) -> None:
    """pred: a floating tensor with at least 1 dim and B >= 1 samples along dim 0 (each sample may be
    any shape, at least one element); target: None or pred's shape, dtype and device."""
    if not isinstance(pred, Tensor) or pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"{who}: pred must be a tensor with a non-empty batch dim, got "
                         f"{tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__}")
    if pred.numel() == 0:
        raise ValueError(f"{who}: pred has samples with no elements, shape {tuple(pred.shape)}")
    if pred.dtype not in FLOATS:
        raise ValueError(f"{who}: pred dtype must be one of fp32/fp16/bf16/fp64, got {pred.dtype}")
    check_reduction(reduction, who)
    if target is not None and (not isinstance(target, Tensor) or target.shape != pred.shape
                               or target.dtype != pred.dtype or target.device != pred.device):
        got = (tuple(target.shape), target.dtype, target.device) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{who}: target must match pred ({tuple(pred.shape)}, {pred.dtype}, {pred.device}), "
                         f"got {got}")
