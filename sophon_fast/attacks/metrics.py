"""How much a protection costs an attacker, from accuracy curves (index e = after e epochs; 0 = before).

Pure functions on plain sequences of accuracies in [0, 1].
"""
from __future__ import annotations

from numbers import Real
from typing import NamedTuple, Optional, Sequence, Union


class Overhead(NamedTuple):
    value: Optional[float]
    never_reached: bool


def epochs_to_reach(curve: Sequence[float], target: float) -> Optional[int]:
    """The first epoch index ``e`` with ``curve[e] >= target``; ``None`` if the curve never gets there."""
    for e, acc in enumerate(curve):
        if acc >= target:
            return e
    return None


def overhead(protected_curve: Sequence[float], scratch_curve: Sequence[float], fraction: float = 0.9) -> Overhead:
    """Epochs the protected model needs to reach ``fraction`` x scratch's final accuracy, relative to scratch.

    ``target = fraction * scratch_curve[-1]``; ``e_p`` and ``e_s`` are the first epoch indices at which
    each curve reaches it (scratch always does, at its last epoch at the latest). Returns
    ``Overhead(e_p / max(e_s, 1), False)``, or ``Overhead(None, True)`` when the protected curve never
    reaches the target within its length. Edge cases, by that formula: scratch already at the target
    before training (``e_s = 0``) counts as one epoch, so the value is ``e_p``; a protected model
    that starts at the target gives 0.0 (no protection at all). 1.0 means "as slow as scratch";
    values above 1 mean fine-tuning the protected model is slower than training from scratch.
    A NaN anywhere counts as "not reached". Raises ``ValueError`` on empty curves or a bad fraction.
    """
    if len(protected_curve) == 0 or len(scratch_curve) == 0:
        raise ValueError("overhead: empty accuracy curve")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"overhead: fraction must be in (0, 1], got {fraction}")
    target = fraction * scratch_curve[-1]
    e_s = epochs_to_reach(scratch_curve, target)
    e_p = epochs_to_reach(protected_curve, target)
    if e_p is None or e_s is None:   # e_s is None only when scratch's final accuracy is NaN
        return Overhead(None, True)
    return Overhead(e_p / max(e_s, 1), False)


def _final(x: Union[Real, Sequence[float]]) -> float:
    if isinstance(x, Real):
        return float(x)
    if len(x) == 0:
        raise ValueError("head_start_removed: empty accuracy curve")
    return float(x[-1])


def head_start_removed(protected, unprotected, scratch, min_gap: float = 0.10) -> Optional[float]:
    """``(unprot - prot) / (unprot - scratch)`` at the last epoch: share of the pre-training head start removed.

    Each argument is a curve (its last value is used) or a final accuracy. 1.0: the protected model
    fine-tunes no better than scratch; 0.0: as well as the unprotected model; above 1: worse than
    scratch; below 0: better than unprotected. ``None`` when ``unprot - scratch < min_gap`` (no head
    start worth measuring). Not clipped.
    """
    p, u, s = _final(protected), _final(unprotected), _final(scratch)
    gap = u - s
    if gap < min_gap:
        return None
    return (u - p) / gap
