"""The unrolled meta-gradient on the fast path against the reference mode: peak memory and time per iteration.

    python benchmarks/unrolled_case.py memory   [--arch cnn_bn] [--ks 10 100]
    python benchmarks/unrolled_case.py time     [--archs cnn_small cnn_bn] [--k 20] [--iterations 3]
    python benchmarks/unrolled_case.py lm-memory [--k 20]

memory: one iteration of the adaptive recipe's first attacker (a fresh classifier block under Adam 1e-3,
unrolled, 150-row batches of 28x28 images) at each K, in a child process per (mode, K); the growth of the
child's peak RSS over its peak before protect(), and for the fast mode the snapshot bytes it kept.
time: seconds per iteration of the adaptive recipe (its five attackers taking turns, unrolled, K as given),
fast and reference alternating in one process, medians; plus every first-order attacker kind alone.
lm-memory: a GPT-2 of 12 layers, width 768, 32k vocabulary, 128-token blocks (about 110M parameters) against
a simulated LoRA r8 attacker, K steps unrolled, one iteration, peak RSS per mode (child processes).
Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _images(n, seed, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, classes, (n,), generator=g)


def _recipe(mode: str, k: int, first_only: bool, iterations: int = 1):
    import sophon_fast as sf
    from sophon_fast.recipes import ADAPTIVE_STRATEGIES, adaptive
    strategies = [sf.Strategy(s.optimizer, lr=s.lr, attacker=s.attacker, steps=k) for s in ADAPTIVE_STRATEGIES]
    return adaptive(iterations=iterations).replace(
        mode=mode, inner_steps=k, strategies=[s.to_dict() for s in (strategies[:1] if first_only else strategies)],
        progress=False, evaluation={"every": 10_000, "size": None, "max_drop": None}), sf


def child_memory(arch: str, mode: str, k: int) -> dict:
    from sophon_fast.models import build
    torch.set_num_threads(1)
    cfg, sf = _recipe(mode, k, first_only=True)
    model = build(arch, num_classes=10)
    original, restricted = _images(600, 1), _images(150 * (k + 2), 2)
    before = _rss_mb()
    t0 = time.perf_counter()
    res = sf.protect(model, original, restricted, cfg)
    out = {"arch": arch, "mode": mode, "K": k, "peak_growth_mb": round(_rss_mb() - before, 1),
           "seconds": round(time.perf_counter() - t0, 2), "params": sum(p.numel() for p in model.parameters())}
    if mode == "fast":      # what the forward sweep keeps: (T, m, v) of every weight per step, and the batches
        out["snapshot_mb"] = round(k * 3 * out["params"] * 4 / 2 ** 20, 1)
        out["batches_mb"] = round(k * 150 * 28 * 28 * 4 / 2 ** 20, 1)
    del res
    return out


def child_lm(mode: str, k: int) -> dict:
    import sophon_fast as sf
    from sophon_fast.engine.attackers import LoRA
    from sophon_fast.models import lm
    from sophon_fast.tasks.lm import LanguageModelTask
    torch.set_num_threads(2)
    model = lm.gpt2(32_000, n_layer=12, n_embd=768, n_head=12, n_positions=128, seed=0, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    original, restricted = torch.randint(2, 32_000, (16, 128), generator=g), torch.randint(2, 32_000, (8 * (k + 1), 128), generator=g)
    before = _rss_mb()
    t0 = time.perf_counter()
    sf.protect(model, original, restricted, task=LanguageModelTask(second_order=True), mode=mode, loss="ice",
               meta_gradient="unrolled", iterations=1, inner_steps=k, ntr_steps=1, ntr_batch_size=4, progress=False,
               in_place=True, strategies=[sf.Strategy("adam", lr=1e-4, batch_size=4, query_size=2, attacker=LoRA(8))],
               evaluation={"every": 10, "size": None, "max_drop": None})
    return {"model": "gpt2-12x768-32k", "params": sum(p.numel() for p in model.parameters()), "mode": mode, "K": k,
            "peak_growth_mb": round(_rss_mb() - before, 1), "peak_mb": round(_rss_mb(), 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def _spawn(args) -> None:
    proc = subprocess.run([sys.executable, __file__, "child", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(json.dumps({"child": args, "failed": proc.stderr.strip().splitlines()[-1:]}), flush=True)
    else:
        print(proc.stdout.strip().splitlines()[-1], flush=True)


def time_per_iteration(archs, k: int, iterations: int, first_order_only: bool = False) -> None:
    import sophon_fast as sf
    from sophon_fast.engine.attackers import LoRA, Probe
    from sophon_fast.models import build
    torch.set_num_threads(1)
    for arch in archs:
        model = build(arch, num_classes=10)
        original, restricted = _images(600, 1), _images(3000, 2)
        cases = {} if first_order_only else {"unrolled/adaptive": lambda m: _recipe(m, k, first_only=False, iterations=5)[0]}
        for kind in ("as_is", "reinit_head", "fresh_head", "fresh_block", "probe", Probe("block"), LoRA(8)):
            cases[f"first_order/{kind}"] = lambda m, kind=kind: sf.ProtectConfig(
                loss="ice", mode=m, inner_steps=k, iterations=5, ntr_steps=1, progress=False,
                strategies=[sf.Strategy("adam", lr=1e-3, attacker=kind)],
                evaluation={"every": 10_000, "size": None, "max_drop": None})
        for name, make in cases.items():
            times = {"fast": [], "reference": []}
            for _ in range(iterations):
                for mode in ("fast", "reference"):
                    cfg = make(mode)
                    res = sf.protect(model, original, restricted, cfg)
                    times[mode].append(statistics.median(r["t_fts"] + r["t_ntr"] for r in res.history[1:]))
            f, r = statistics.median(times["fast"]), statistics.median(times["reference"])
            print(json.dumps({"arch": arch, "case": name, "K": k, "fast_s": round(f, 4), "reference_s": round(r, 4),
                              "fast_over_reference": round(f / r, 3)}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("memory", "time", "lm-memory", "child"))
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--arch", default="cnn_bn")
    ap.add_argument("--archs", nargs="+", default=["cnn_small", "cnn_bn"])
    ap.add_argument("--ks", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["fast", "reference"])
    ap.add_argument("--first-order-only", action="store_true", help="time: the first-order attacker kinds only")
    a = ap.parse_args(argv)
    if a.what == "child":
        kind, *rest = a.rest
        out = child_memory(rest[0], rest[1], int(rest[2])) if kind == "memory" else child_lm(rest[0], int(rest[1]))
        print(json.dumps(out), flush=True)
    elif a.what == "memory":
        for mode in a.modes:
            for k in a.ks:
                _spawn(["memory", a.arch, mode, k])
    elif a.what == "lm-memory":
        for mode in a.modes:
            _spawn(["lm", mode, a.k])
    else:
        time_per_iteration(a.archs, a.k, a.iterations, a.first_order_only)


if __name__ == "__main__":
    main()
