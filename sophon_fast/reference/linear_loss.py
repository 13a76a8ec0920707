"""Specification of the fused linear + suppression loss (``sophon_fast::linear_loss``).

    logits = hidden @ weight.T (+ bias)               (N, V), materialised in the inputs' dtype
    loss   = reduce_i [valid_i * row_loss(logits_i, target_i)]
    valid_i = target_i != ignore_index;  "mean" divides by sum(valid) (NaN when no row counts), "sum" does not.

``row_loss`` is one of the row-loss core's terms (sophon_fast/reference/losses.py): "ce", "ice" (paper
variant), "klu" or "neg_entropy" (the last two ignore the target's class but honour ignore_index, so padding
tokens do not count). Two forms:

* ``linear_suppression_loss``: the textbook formulas through autograd (the gold, in fp64);
* ``linear_loss_with_grads``: the reference *backend* of the op, which returns the loss and the gradients
  for hidden, weight and bias from the materialised logits and the row-loss reference, in the inputs'
  dtype with fp32 accumulation, exactly as an eager composite would round them.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from sophon_fast.reference import losses as R

# Row-loss weights [w_ce, w_ice, w_klu, w_negent] of each named loss.
LOSS_WEIGHTS = {
    "ce": (1.0, 0.0, 0.0, 0.0),
    "ice": (0.0, 1.0, 0.0, 0.0),
    "klu": (0.0, 0.0, 1.0, 0.0),
    "neg_entropy": (0.0, 0.0, 0.0, 1.0),
}


def linear_suppression_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, loss: str = "ice",
                            bias: Optional[torch.Tensor] = None, ignore_index: int = R.IGNORE_INDEX,
                            reduction: str = "mean") -> torch.Tensor:
    """The textbook composite (differentiable by autograd): materialise the logits, apply the loss."""
    logits = F.linear(hidden, weight, bias)
    valid = target != ignore_index
    if loss == "ce":
        rows = R.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)
    elif loss == "ice":
        rows = R.inverse_cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)
    elif loss == "klu":
        rows = R.kl_uniform(logits, reduction="none")
    elif loss == "neg_entropy":
        rows = R.neg_entropy(logits, reduction="none")
    else:
        raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSS_WEIGHTS)}")
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return R._reduce(rows, valid, reduction)


def linear_loss_with_grads(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                           bias: Optional[torch.Tensor], weights: Sequence[float], ignore_index: int,
                           reduction: str, chunk_size: int, compute_grad: bool, low_memory: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference backend of ``sophon_fast::linear_loss``: (loss, grad_hidden, grad_weight, grad_bias) with
    the full (N, V) logits materialised (``chunk_size`` and ``low_memory`` are ignored). Gradients are of the reduced loss
    (cotangent 1); empty (0,) tensors when ``compute_grad`` is False or there is no bias."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden, weight, bias)
    rows, stats = R.row_losses_forward(logits, target, weights, 1.0, ignore_index)
    valid = target != ignore_index
    total = rows.sum()
    per_row = torch.ones_like(rows)
    if reduction == "mean":
        count = valid.sum().to(acc)
        total = total / count
        per_row = per_row / count
    if not compute_grad:
        return total.to(hidden.dtype), hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,))
    g = R.row_losses_backward(per_row, logits, target, stats, weights, 1.0, ignore_index)
    grad_bias = g.sum(0, dtype=acc).to(hidden.dtype) if bias is not None else hidden.new_empty((0,))
    return total.to(hidden.dtype), g @ weight, g.t() @ hidden, grad_bias
