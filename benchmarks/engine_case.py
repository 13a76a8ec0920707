"""One engine benchmark case, importable (in-process timing) and runnable as a child process (peak
memory above the process's baseline, so cases never share a heap):

    python benchmarks/engine_case.py --arch cnn --mode fast --K 50 --iterations 3
    python benchmarks/engine_case.py --arch demo --mode fast --iterations 10 --memory-only

prints one JSON line: t_outer (median seconds per outer iteration, first excluded), t_passes (the same
forward+backward passes run bare), peak_mb (peak memory above the baseline taken just before
protect()) and how it was measured (``peak_kind``). ``--memory-only`` skips the timing parts.

Cases: ``--arch NAME`` is a models.build() architecture on random 28x28 inputs (1200 samples, the
engine's defaults: one SGD strategy, ICE, batches of 130 support + 20 query, one NTR step);
``--arch demo`` is the demo task (fashion_mnist -> mnist, cnn_small, the demo's ProtectConfig, with
an original-domain evaluation every 10 iterations but no accuracy floor and no checkpoints).

Peak memory: a one-iteration protect() of the same mode first warms the process (the first
torch.optim optimiser imports torch._dynamo and triton: ~65 MB of RSS once per process, whatever K
is); then, on CUDA, ``max_memory_allocated`` above the allocation before the measured protect(); on
CPU the high-water RSS (VmHWM) above the RSS before it, with the warm-up's freed heap returned to the
OS (malloc_trim) and the high-water mark reset (/proc/self/clear_refs), so the warm-up's own peak
is never counted. run_in_child fixes glibc's mmap threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_) so
freed tensors leave the RSS at once: cnn_bn fast K=10/100 then reads 80.2/80.3 MB run after run,
where the adaptive default wandered between 133 and 172 MB.
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from sophon_fast import models
from sophon_fast.engine import Checkpointing, Evaluation, Strategy, protect
from sophon_fast.apps.quickbench import median_time, sync

BATCH, QUERY, NTR_BATCH = 150, 20, 150
DEMO = "demo"
LM = "gpt2_32k"           # a 2-layer, 128-wide GPT-2 with a 32,768-token vocabulary (4.3M of its 4.7M parameters in
                          # the tied embedding/head), blocks of 128 tokens: the language-model case
IMPLS = ("passes", "reference", "fast", "reference-setup", "fast-setup")   # an engine group (see time_outer)
MMAP_THRESHOLD = 64 * 1024                 # bytes; for run_in_child's allocator (see there)
# The suite's engine cases run here: SOPHON_BENCH_DEVICE, else the GPU when there is one.
DEVICE = os.environ.get("SOPHON_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


UNROLLED = "+adaptive"       # "cnn_bn+adaptive": the adaptive recipe's five attackers, unrolled (run_protect)


def make_case(arch: str, n: int = 1200, seed: int = 0, device: str = "cpu"):
    arch = arch.replace(UNROLLED, "")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return models.build(arch, num_classes=10, seed=seed).to(device), (x.to(device), y.to(device))


def demo_case(device: str = "cpu"):
    """(model, original train, restricted train, original test) of the demo task, as in sophon_fast.apps.demo."""
    from sophon_fast import data
    from sophon_fast.apps.demo import DEMO_DOMAINS
    o_train, o_test, r_train = (data.load(DEMO_DOMAINS[d], s) for d, s in
                                (("original", "train"), ("original", "test"), ("restricted", "train")))
    classes = 1 + max(int(data.as_tensors(d)[1].max()) for d in (o_train, r_train))
    return models.build(DEMO_DOMAINS["arch"], num_classes=classes, seed=0).to(device), o_train, r_train, o_test


def demo_config(mode: str, iterations: int, device: str = "cpu"):
    """The trap recipe (e24, the demo's until issue 12): first order, so both modes run it. The demo's recipe
    now unrolls the meta-gradient through the attacker's steps, which only the reference mode does."""
    from sophon_fast.recipes import trap
    return trap(iterations=iterations).replace(progress=False, 
        mode=mode, device=device, evaluation=Evaluation(max_drop=None), checkpoint=Checkpointing())


def lm_case(device: str = "cpu", n: int = 64, T: int = 128, V: int = 32768):
    """(GPT-2, (input_ids, labels)) of the LM case: random tokens (memory does not depend on their values)."""
    from sophon_fast.models import lm
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (n, T), generator=g).to(device)
    return lm.gpt2(V, 2, 128, 4, T, seed=0).to(device), (ids, ids.clone())


def run_lm(model, data, K: int, mode: str, iterations: int, device: str = "cpu"):
    """protect() of the LM case: ICE over the vocabulary, an Adam attacker on 6 support + 2 query blocks."""
    from sophon_fast.tasks.lm import LanguageModelTask
    strat = Strategy("adam", lr=1e-3, batch_size=8, query_size=2, attacker="as_is")
    return protect(model, data, data, task=LanguageModelTask(), mode=mode, loss="ice", iterations=iterations,
                   inner_steps=K, strategies=[strat], ntr_batch_size=8, progress=False,
                   evaluation=Evaluation(max_drop=None), device=device)


def run_protect(model, data, K: int, mode: str, iterations: int, device: str = "cpu", unrolled: bool = False):
    """protect() of an architecture case for ``iterations`` outer iterations; returns its ProtectResult.
    ``unrolled``: the adaptive recipe (sophon_fast.recipes.adaptive: a fresh block under Adam and momentum, the
    model as it is, two probes, taking turns; the meta-gradient unrolled), every attacker at K steps."""
    if unrolled:
        from sophon_fast.recipes import ADAPTIVE_STRATEGIES, adaptive
        strategies = [Strategy(s.optimizer, lr=s.lr, attacker=s.attacker, steps=K).to_dict() for s in ADAPTIVE_STRATEGIES]
        cfg = adaptive(iterations=iterations).replace(mode=mode, inner_steps=K, strategies=strategies, progress=False,
                                                      evaluation={"every": 10, "size": None, "max_drop": None},
                                                      device=device)
        return protect(model, data, data, cfg)
    return protect(model, data, data, mode=mode, loss="ice", iterations=iterations, inner_steps=K,
                   progress=False, evaluation=Evaluation(max_drop=None), device=device)


def run_demo(case, mode: str, iterations: int, device: str = "cpu"):
    model, o_train, r_train, o_test = case
    return protect(model, o_train, r_train, demo_config(mode, iterations, device), original_test=o_test)


def bare_passes(model, data, K: int, ntr_steps: int = 1):
    """The forward+backward passes of one outer iteration, with nothing else around them."""
    x, y = data
    model.train()
    for k in range(K):
        F.cross_entropy(model(x[:BATCH - QUERY]), y[:BATCH - QUERY]).backward()
        F.cross_entropy(model(x[BATCH - QUERY:BATCH]), y[BATCH - QUERY:BATCH]).backward()
    for _ in range(ntr_steps):
        F.cross_entropy(model(x[:NTR_BATCH]), y[:NTR_BATCH]).backward()
    model.zero_grad(set_to_none=True)


def time_outer(measure, arch: str, K: int, impl: str, rounds: int, device: str = "cpu"):
    """Time one outer iteration with the suite's ``measure`` fixture, grouped per (arch, K) so that
    ``passes`` (the bare forward+backward passes), ``reference`` and ``fast`` sit side by side.

    A mode's round is one protect() call of one outer iteration; ``reference-setup`` / ``fast-setup``
    time protect() with zero iterations (deepcopy, input checks, arena, snapshot, release: tens of
    ms), which RESULTS.md subtracts, so a mode's t_outer is the iteration alone. extra_info
    ``t_outer_history_s`` lists each round's iteration by protect()'s own (wall) clock.
    Returns the median seconds (None under --benchmark-disable)."""
    model, data = make_case(arch, device=device)
    history, mode, unrolled = [], impl.replace("-setup", ""), arch.endswith(UNROLLED)
    if impl == "passes":
        bare_passes(model, data, 1)                      # warm-up outside the timed rounds

        def fn():
            bare_passes(model, data, K)
    elif impl.endswith("-setup"):
        def fn():
            run_protect(model, data, K, mode, 0, device, unrolled)
        rounds = None                                    # milliseconds: let pytest-benchmark calibrate
    else:
        run_protect(model, data, 2, impl, 1, device, unrolled)     # warm-up outside the timed rounds

        iters = 5 if unrolled else 1                     # unrolled: one iteration of each of the recipe's attackers

        def fn():
            hs = run_protect(model, data, K, impl, iters, device, unrolled).history
            history.append(sum(h["t_fts"] + h["t_ntr"] for h in hs))
    return measure(fn, group=f"engine outer iteration {arch} K={K}", provider=impl, device=torch.device(device),
                   rounds=rounds, warmup=0 if rounds else 1, layer="engine", arch=arch, K=K,
                   params=models.num_parameters(model), threads=torch.get_num_threads(),
                   **({"t_outer_history_s": history} if impl in ("reference", "fast") else {}))


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak memory of what runs between ``start()`` and ``stop()``, in MB above the state at start()."""

    def __init__(self, device: str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda max_memory_allocated" if self.cuda else "RSS high-water (VmHWM) above baseline"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2 ** 20
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed warm-up heap back to the OS
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w") as f:    # VmHWM := current RSS
            f.write("5")
        self.base = _status_mb("VmRSS")

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2 ** 20 - self.base
        return _status_mb("VmHWM") - self.base


def run_case(arch: str, mode: str, K: int = 50, iterations: int = 3, device: str = "cpu",
             memory_only: bool = False) -> dict:
    """One case measured in this process (run it in a fresh child process for a meaningful peak)."""
    out = {"arch": arch, "mode": mode, "K": K, "iterations": iterations, "device": device,
           "threads": torch.get_num_threads()}
    peak = PeakMemory(device)
    if arch == LM:
        model, data = lm_case(device)
        run_lm(model, data, 1, mode, 1, device)          # warm-up
        peak.start()
        res = run_lm(model, data, K, mode, iterations, device)
        memory_only = True
    elif arch == DEMO:
        case = demo_case(device)
        run_demo(case, mode, 1, device)                  # warm-up: kernels, lazy imports, allocator
        peak.start()
        res = run_demo(case, mode, iterations, device)
        out["K"] = res.config.inner_steps
    else:
        model, data = make_case(arch, device=device)
        unrolled = arch.endswith(UNROLLED)
        run_protect(model, data, 2, mode, 1, device, unrolled)     # warm-up: kernels, lazy imports, allocator
        peak.start()
        res = run_protect(model, data, K, mode, iterations, device, unrolled)
    sync(device)
    out.update(peak_mb=peak.stop(), peak_kind=peak.kind, protect_s=res.seconds)
    if not memory_only:
        t = [h["t_fts"] + h["t_ntr"] for h in res.history]
        out["t_outer"] = statistics.median(t[1:] or t)
        if arch != DEMO and not arch.endswith(UNROLLED):
            out["t_passes"] = median_time(lambda: bare_passes(model, data, K), repeat=3, warmup=0, device=device)
    return out


def run_in_child(arch: str, mode: str, K: int, iterations: int, device: str = "cpu",
                 memory_only: bool = True, threads: int = None, timeout: float = 3600) -> dict:
    """run_case() in a fresh Python process (same interpreter, same thread count); its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--arch", arch, "--mode", mode, "--K", str(K),
           "--iterations", str(iterations), "--device", device,
           "--threads", str(threads or torch.get_num_threads())] + (["--memory-only"] if memory_only else [])
    return child_json(cmd, "engine case", timeout)


def child_json(cmd, what: str, timeout: float) -> dict:
    """Run ``cmd`` (a case script) in a fresh process; the JSON of its last stdout line."""
    # Tensors of 64 KiB and more get their own mmap, returned on free: RSS then follows the live tensors
    # (glibc's adaptive threshold otherwise keeps freed blocks, and the peak wanders by +-20 MB).
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} {' '.join(cmd[2:])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="cnn", help=f"a models.build() name, or {DEMO!r} for the demo task")
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-only", action="store_true", help="peak memory only, no timing")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(run_case(a.arch, a.mode, a.K, a.iterations, a.device, a.memory_only)))


if __name__ == "__main__":
    main()
