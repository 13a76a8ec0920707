"""One engine benchmark case, importable (in-process timing) and runnable as a child process (peak
memory above the process's baseline, so cases never share a heap):

    python benchmarks/engine_case.py --arch cnn --mode fast --K 50 --iterations 3

prints one JSON line: t_outer (median seconds per outer iteration, first excluded), t_passes (the same
forward+backward passes run bare), peak_rss_mb (peak RSS above the RSS just before protect()).
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from sophon_fast import models
from sophon_fast.engine import protect

BATCH, QUERY, NTR_BATCH = 150, 20, 150


def make_case(arch: str, n: int = 1200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return models.build(arch, num_classes=10, seed=seed), (x, y)


def outer_iterations(model, data, K: int, mode: str, iterations: int):
    """protect() for ``iterations`` outer iterations; per-iteration seconds from its history."""
    res = protect(model, data, data, mode=mode, loss="ice", iterations=iterations, inner_steps=K,
                  progress=False, original_acc_floor=None)
    return [h["t_fts"] + h["t_ntr"] for h in res.history]


def bare_passes(model, data, K: int, ntr_steps: int = 1):
    """The forward+backward passes of one outer iteration, with nothing else around them."""
    x, y = data
    model.train()
    t = time.perf_counter()
    for k in range(K):
        F.cross_entropy(model(x[:BATCH - QUERY]), y[:BATCH - QUERY]).backward()
        F.cross_entropy(model(x[BATCH - QUERY:BATCH]), y[BATCH - QUERY:BATCH]).backward()
    for _ in range(ntr_steps):
        F.cross_entropy(model(x[:NTR_BATCH]), y[:NTR_BATCH]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, data = make_case(a.arch)
    bare_passes(model, data, 2)                      # warm the allocator and the kernels
    base = _rss_mb()
    times = outer_iterations(model, data, a.K, a.mode, a.iterations)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    passes = statistics.median(bare_passes(model, data, a.K) for _ in range(3))
    print(json.dumps({"arch": a.arch, "mode": a.mode, "K": a.K, "t_outer": statistics.median(times[1:] or times),
                      "t_passes": passes, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
