"""Endless reproducible batches from in-memory tensors, drawn on the data's device."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


class BatchStream:
    """Shuffled passes over a tuple of tensors sharing dim 0; permutations come from ``gen``, a generator
    on the tensors' device, so drawing a batch never synchronises with the host."""

    def __init__(self, tensors: Tuple[Tensor, ...], gen: torch.Generator):
        self.tensors, self.gen = tuple(tensors), gen
        self.n = len(self.tensors[0])
        self.perm = self._perm()
        self.pos = 0

    def _perm(self) -> Tensor:
        return torch.randperm(self.n, generator=self.gen, device=self.gen.device)

    def next(self, n: int) -> Tuple[Tensor, ...]:
        idx = self._indices(n).to(self.tensors[0].device)
        return tuple(t[idx] for t in self.tensors)

    def skip(self, n: int) -> None:
        """Advance exactly as ``next(n)`` does, without gathering the batch."""
        self._indices(n)

    def _indices(self, n: int) -> Tensor:
        parts, need = [], n
        while need:
            if self.pos == self.n:
                self.perm, self.pos = self._perm(), 0
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.perm, self.pos = s["perm"].to(self.perm.device), int(s["pos"])


def split(batch: Tuple[Tensor, ...], query_size: int):
    """(support, query): all rows but the last ``query_size``, and those."""
    return tuple(t[:-query_size] for t in batch), tuple(t[-query_size:] for t in batch)
