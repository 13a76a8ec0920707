"""Specification of ``sophon_fast::row_sq_mean`` and the diffusion losses built on it.

    row_sq_mean(x (B, D), y (B, D) or None) -> (B,):  mean_j (x_ij - y_ij)^2   (y None: mean_j x_ij^2)

accumulated and returned in fp32 (fp64 for fp64 inputs). Gradients: d/dx = 2 (x - y) g_i / D, d/dy = -d/dx.

    denial_of_service(pred)    per sample: mean of pred^2 over every dim but the first
    negated_mse(pred, target)  per sample: -mean of (pred - target)^2
    reduction: "mean" over samples (= over all elements), "sum" over samples, "none" (B,)
"""
from __future__ import annotations

from typing import Optional

import torch


def row_sq_mean(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, D) -> (B,) mean of squares (of the difference), in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = x.to(acc) if y is None else x.to(acc) - y.to(acc)
    return (d * d).mean(1)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def denial_of_service(pred: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Textbook DoS loss (a model pushed to predict zeros): per-sample mean of pred^2."""
    return _reduce((pred * pred).flatten(1).mean(1), reduction)


def negated_mse(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Textbook negated MSE: per-sample -mean of (pred - target)^2."""
    return _reduce(-((pred - target) ** 2).flatten(1).mean(1), reduction)
