"""``sophon-fast bench``: a one-minute speed check of this machine (the full suite is `make bench`).

Prints medians and ratios measured side by side in this process:
  * ICE / KLU / CE forward+backward on 4096 x 1000 fp32 logits: the selected backend vs the eager
    textbook reference, and vs a ``copy_`` of the logits (the memory floor);
  * one protect() outer iteration (K = 10, a small CNN on 28 x 28 inputs): fast vs reference mode.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from sophon_fast import _backend
from sophon_fast import functional as F
from sophon_fast.reference import losses as R


def median_time(fn, repeat: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _loss_case(fast, ref, z, y):
    def run(fn):
        def go():
            x = z.detach().requires_grad_()
            fn(x, y).backward()
        return go
    return median_time(run(fast)), median_time(run(ref))


def main() -> int:
    torch.manual_seed(0)
    print(f"sophon-fast bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU backend {_backend.selected_name('cpu')}")
    z = torch.randn(4096, 1000)
    y = torch.randint(0, 1000, (4096,))
    dst = torch.empty_like(z)
    floor = median_time(lambda: dst.copy_(z))
    print(f"copy_ of 4096x1000 fp32 logits: {1e3 * floor:.2f} ms")
    cases = {"ice": (lambda x, t: F.inverse_cross_entropy(x, t), lambda x, t: R.inverse_cross_entropy(x, t)),
             "klu": (lambda x, t: F.kl_uniform(x), lambda x, t: R.kl_uniform(x)),
             "ce": (lambda x, t: F.cross_entropy(x, t), lambda x, t: R.cross_entropy(x, t))}
    for name, (fast, ref) in cases.items():
        tf, tr = _loss_case(fast, ref, z, y)
        print(f"{name:>4} fwd+bwd: fast {1e3 * tf:7.2f} ms  eager reference {1e3 * tr:7.2f} ms  "
              f"speed-up {tr / tf:5.2f}x  fast/copy_ {tf / floor:5.2f}x")

    from sophon_fast.engine import protect
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(600, 1, 28, 28)
    t = torch.randint(0, 10, (600,))
    times = {}
    for mode in ("reference", "fast"):
        res = protect(model, (x, t), (x, t), mode=mode, iterations=4, inner_steps=10, progress=False)
        times[mode] = statistics.median(h["t_fts"] + h["t_ntr"] for h in res.history[1:])
    print(f"protect outer iteration (K=10, small CNN): fast {1e3 * times['fast']:.0f} ms  reference "
          f"{1e3 * times['reference']:.0f} ms  speed-up {times['reference'] / times['fast']:.2f}x")
    return 0
