"""``sophon-fast bench``: a one-minute speed check of this machine (the full suite is `make bench`).

Prints medians and ratios measured side by side in this process:
  * ICE / KLU / CE forward+backward on 4096 x 1000 fp32 logits: the selected backend vs the eager
    reference composite and vs ``torch.compile`` of it, and vs a ``copy_`` of the logits (the floor);
  * one protect() outer iteration (K = 10, ``cnn_small`` on 28 x 28 inputs): fast vs reference mode.

``median_time`` is the one timing helper outside pytest-benchmark: this command, the benchmark
suite's conftest and its child processes (benchmarks/engine_case.py) all use it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional

import torch

from sophon_fast import _backend
from sophon_fast import functional as F
from sophon_fast.reference import losses as R


def sync(device: Optional[torch.device] = None) -> None:
    """Wait for queued device work (no-op on CPU) so that a clock read after it is meaningful."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def times(fn: Callable[[], object], repeat: int = 7, warmup: int = 2,
          device: Optional[torch.device] = None) -> List[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones (device synced)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def median_time(fn: Callable[[], object], repeat: int = 7, warmup: int = 2,
                device: Optional[torch.device] = None) -> float:
    """Median seconds of ``fn`` over ``repeat`` timed calls (see :func:`times`)."""
    return statistics.median(times(fn, repeat, warmup, device))


def _fwd_bwd(fn, z, y):
    def go():
        x = z.detach().requires_grad_()
        fn(x, y).backward()
    return go


def _protect_iteration(mode: str, K: int = 10, iterations: int = 4) -> float:
    """Median seconds of one outer iteration (the first, warm-up, excluded), from protect()'s history."""
    from sophon_fast import models
    from sophon_fast.engine import Evaluation, protect
    model = models.build("cnn_small", num_classes=10, seed=0)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(600, 1, 28, 28, generator=g), torch.randint(0, 10, (600,), generator=g))
    res = protect(model, data, data, mode=mode, iterations=iterations, inner_steps=K, progress=False,
                  evaluation=Evaluation(max_drop=None))
    return statistics.median(h["t_fts"] + h["t_ntr"] for h in res.history[1:])


def main() -> int:
    torch.manual_seed(0)
    print(f"sophon-fast bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU backend {_backend.selected_name('cpu')}")
    z = torch.randn(4096, 1000)
    y = torch.randint(0, 1000, (4096,))
    dst = torch.empty_like(z)
    floor = median_time(lambda: dst.copy_(z))
    print(f"copy_ of 4096x1000 fp32 logits: {1e3 * floor:.2f} ms (the floor)")
    cases = {"ice": (F.inverse_cross_entropy, R.inverse_cross_entropy),
             "klu": (lambda x, t: F.kl_uniform(x), lambda x, t: R.kl_uniform(x)),
             "ce": (F.cross_entropy, R.cross_entropy)}
    for name, (fast, ref) in cases.items():
        tf = median_time(_fwd_bwd(fast, z, y))
        tr = median_time(_fwd_bwd(ref, z, y))
        tc = median_time(_fwd_bwd(torch.compile(ref), z, y), warmup=3)   # the first call compiles
        print(f"{name:>4} fwd+bwd: fast {1e3 * tf:6.2f} ms | eager {1e3 * tr:6.2f} ms ({tr / tf:5.2f}x) | "
              f"torch.compile {1e3 * tc:6.2f} ms ({tc / tf:5.2f}x) | fast/copy_ {tf / floor:5.2f}")

    t = {mode: _protect_iteration(mode) for mode in ("reference", "fast")}
    print(f"protect outer iteration (K=10, cnn_small): fast {1e3 * t['fast']:.0f} ms | reference "
          f"{1e3 * t['reference']:.0f} ms ({t['reference'] / t['fast']:.2f}x)")
    print("(Nx) = that time / fast time: above 1 means fast is faster. Full suite: make bench")
    return 0
