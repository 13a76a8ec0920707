"""Plain-PyTorch specification of the row-wise loss core and of the public losses.

Every backend (C++ CPU, Triton, CUDA) implements exactly ``row_losses_forward`` and
``row_losses_backward`` below; tests and benchmarks import these, nobody re-writes them.

The core ("row losses") works on one row of logits ``z`` (length C) at a time:

    z' = scale * z                                   (scale = -1 gives the reference code's ICE)
    m_x, S_x = max and sum(exp(z'_c - m_x)) over c != y   (over all c when the row has no target)
    lse_x = m_x + log(S_x)                           ("lse without y": finite for finite logits)
    lse   = logaddexp(z'_y, lse_x)                   (lse_x when the row has no target; = logsumexp_c z'_c,
                                                      which is how this reference computes it)
    p_c   = exp(z'_c - lse)

    CE      = lse - z'_y
    ICE     = -log(1 - p_y) = softplus(z'_y - lse_x)            (stable in both regimes)
    KLU     = KL(U || p) = lse - mean(z') - log C
    NEGENT  = -H(p) = sum_c p_c (z'_c - lse)

    loss_row = w_ce*CE + w_ice*ICE + w_klu*KLU + w_negent*NEGENT     (0 for ignored rows)

Gradients with respect to z' (then multiplied by ``scale`` for z):

    dCE/dz'_c     = p_c - [c == y]
    dICE/dz'_c    = p_y                              for c == y
                  = -p_y * exp(z'_c - lse_x)         for c != y   (= -p_c p_y / (1 - p_y))
    dKLU/dz'_c    = p_c - 1/C
    dNEGENT/dz'_c = p_c * (z'_c - lse - NEGENT)

Forward saves per-row ``stats = [lse, lse_x, negent]`` (fp32, shape (N, 3)); ``negent`` is only
defined when w_negent != 0 (backends that skip its accumulation may store anything there, the C++
one stores NaN, and no backward reads it then). A target outside [0, C) that is not ``ignore_index``
is never used as an index: that row's loss, stats and gradient are NaN (the public functions assert
the range first; the kernels only have to stay memory-safe). Backward re-reads the
logits once and writes the gradient once, so forward + backward costs two reads and one write of the
logits. CE and ICE need a target; KLU and NEGENT do not (``target=None``: every row counts).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Order of the weights vector everywhere (Python, C++, Triton, CUDA).
LOSS_NAMES = ("ce", "ice", "klu", "negent")


def _targets(target: Optional[torch.Tensor], n: int, c: int, ignore_index: int, device):
    """(valid, has_y, bad, y): rows that count, rows with a target in [0, c), rows whose target is out
    of range (NaN rows), and a safe index (0 where there is no usable target)."""
    if target is None:
        valid = torch.ones(n, dtype=torch.bool, device=device)
        none = torch.zeros(n, dtype=torch.bool, device=device)
        return valid, none, none, torch.zeros(n, dtype=torch.long, device=device)
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= c))
    has_y = valid & ~bad
    return valid, has_y, bad, torch.where(has_y, target, torch.zeros_like(target)).long()


def _row_terms(logits: torch.Tensor, target: Optional[torch.Tensor], scale: float, ignore_index: int):
    """Shared by forward and backward: fp32 (or fp64) stats of every row."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc) * scale
    n, c = z.shape
    valid, has_y, bad, y = _targets(target, n, c, ignore_index, z.device)
    onehot = F.one_hot(y, c).bool() & has_y[:, None]
    z_x = z.masked_fill(onehot, -math.inf)
    lse_x = torch.logsumexp(z_x, dim=1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    # = logaddexp(z_y, lse_x) (lse_x for rows without a target); as logsumexp its second derivative stays finite
    # (logaddexp's backward overflows exp(a - b) for a logit gap above ~88 in fp32, and the unrolled
    # meta-gradient's double backward then turns 0 * inf into NaN)
    lse = torch.logsumexp(z, dim=1)
    logp = z - lse[:, None]
    p = logp.exp()
    negent = (p * logp).sum(1)
    return z, y, valid, has_y, bad, onehot, z_y, lse, lse_x, p, negent


def row_losses_forward(logits: torch.Tensor, target: Optional[torch.Tensor], weights: Sequence[float],
                       scale: float = 1.0, ignore_index: int = IGNORE_INDEX):
    """(N, C) logits -> (loss (N,) fp32, stats (N, 3) fp32). See the module docstring."""
    w_ce, w_ice, w_klu, w_ne = weights
    z, y, valid, has_y, bad, onehot, z_y, lse, lse_x, p, negent = _row_terms(logits, target, scale, ignore_index)
    c = z.shape[1]
    loss = torch.zeros_like(lse)
    if w_ce:
        loss = loss + w_ce * (lse - z_y)
    if w_ice:
        loss = loss + w_ice * F.softplus(z_y - lse_x)
    if w_klu:
        loss = loss + w_klu * (lse - z.mean(1) - math.log(c))
    if w_ne:
        loss = loss + w_ne * negent
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    stats = torch.stack([lse, lse_x, negent], 1).to(out_dtype)
    nan = torch.full_like(loss, math.nan)
    loss = torch.where(bad, nan, loss)
    stats = torch.where(bad[:, None], nan[:, None], stats)
    return loss.to(out_dtype), stats


def row_losses_backward(grad_loss: torch.Tensor, logits: torch.Tensor, target: Optional[torch.Tensor],
                        stats: torch.Tensor, weights: Sequence[float], scale: float = 1.0,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """d(sum_i grad_loss[i] * loss[i]) / d logits, in the logits' dtype."""
    w_ce, w_ice, w_klu, w_ne = weights
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc) * scale
    n, c = z.shape
    valid, has_y, bad, y = _targets(target, n, c, ignore_index, z.device)
    onehot = (F.one_hot(y, c).bool() & has_y[:, None]).to(acc)
    lse, lse_x, negent = (stats[:, i].to(acc) for i in range(3))
    p = (z - lse[:, None]).exp()
    g = torch.zeros_like(z)
    if w_ce:
        g = g + w_ce * (p - onehot)
    if w_ice:
        z_y = z.gather(1, y[:, None])
        p_y = (z_y - lse[:, None]).exp()
        q = (z - lse_x[:, None]).exp()
        g = g + w_ice * torch.where(onehot.bool(), p_y.expand_as(z), -p_y * q)
    if w_klu:
        g = g + w_klu * (p - 1.0 / c)
    if w_ne:
        g = g + w_ne * p * (z - lse[:, None] - negent[:, None])
    # where, not a product: ignored rows get exactly 0 even when grad_loss is inf (mean over 0 rows)
    g = g * torch.where(valid, grad_loss.to(acc), torch.zeros_like(lse))[:, None] * scale
    g = torch.where(bad[:, None], torch.full_like(g, math.nan), g)
    return g.to(logits.dtype)


# ----------------------------------------------------------------------------------------------
# Public losses written directly from their formulas (the textbook spec the core must match).
# ----------------------------------------------------------------------------------------------
def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()


def inverse_cross_entropy(logits, target, variant="paper", reduction="mean", ignore_index=IGNORE_INDEX):
    """-log(1 - softmax(logits)[y]) ("paper") or CE(1 - logits, y) ("reference_code")."""
    valid = target != ignore_index
    if variant == "reference_code":
        loss = F.cross_entropy(1 - logits, target, reduction="none", ignore_index=ignore_index)
    else:
        y = torch.where(valid, target, torch.zeros_like(target))
        p_y = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
        loss = torch.where(valid, -torch.log1p(-p_y), torch.zeros_like(p_y))
    return _reduce(loss, valid, reduction)


def kl_uniform(logits, reduction="mean"):
    """KL(U || softmax(logits)) with the true class count."""
    c = logits.shape[1]
    loss = -math.log(c) - logits.log_softmax(1).mean(1)
    return _reduce(loss, torch.ones_like(loss, dtype=torch.bool), reduction)


def neg_entropy(logits, reduction="mean"):
    """-H(softmax(logits)) = sum_c p_c log p_c."""
    logp = logits.log_softmax(1)
    loss = (logp.exp() * logp).sum(1)
    return _reduce(loss, torch.ones_like(loss, dtype=torch.bool), reduction)


def cross_entropy(logits, target, reduction="mean", ignore_index=IGNORE_INDEX):
    return F.cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index)
