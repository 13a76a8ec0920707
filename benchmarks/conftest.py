"""Shared benchmark machinery: thread count, device sync, providers, the one timing fixture, metadata.

    .venv/bin/python -m pytest benchmarks                       # measure (a few minutes on 2 cores)
    .venv/bin/python -m pytest benchmarks --benchmark-disable   # CI: every provider once, small shapes

Providers of a fwd+bwd op sit side by side in one pytest-benchmark group:
    copy     ``out.copy_(x)`` of the same input: the memory floor (1 read + 1 write)
    eager    the plain-PyTorch reference composite (sophon_fast.reference)
    compile  the same composite under ``torch.compile`` (on CUDA: ``dynamic=False``, one compile per shape)
    cpp / triton / cuda   sophon_fast with that backend forced (each one usable on the device)
    liger    Liger-Kernel's cross-entropy (CUDA, where ``liger_kernel`` imports): the peer kernel
Each benchmark records GB/s in ``extra_info``; the terminal summary prints, per group, every
provider's median and its ratio to the copy floor and to torch.compile.

Engine-level cases (bench_engine.py, bench_e2e.py) use the same ``measure`` with fixed rounds and
``engine_memory`` for peak memory in a child process. Threads: SOPHON_BENCH_THREADS (recorded in the
metadata); 1 gives stable numbers on a shared 2-core machine, and so does
``--benchmark-timer=time.process_time`` (CPU time: other processes' load stays out; wall clock on GPU). ``make bench`` writes the JSON under
benchmarks/results/ (created here); benchmarks/render_results.py turns it into RESULTS.md.
"""
from __future__ import annotations

import os
import platform
import subprocess
from collections import defaultdict
from typing import Optional

import pytest
import torch

import sophon_fast
from sophon_fast import _backend
from sophon_fast.apps.quickbench import sync  # noqa: F401  (the package's one device sync, shared with its timer)

THREADS = int(os.environ.get("SOPHON_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)

FLOOR, COMPILED, LIGER = "copy", "compile", "liger"
FAST_BACKENDS = ("cuda", "triton", "cpp")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config):
    path = config.getoption("benchmark_json", None)
    if isinstance(path, (str, os.PathLike)):   # written at the very end, folder not created (some versions open it)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def provider_names(device_type: str = "cpu"):
    """Providers of a fwd+bwd op on this device: floor, reference eager/compiled, usable fast backends."""
    fast = [b for b in FAST_BACKENDS if _backend.probe(b).usable.get(device_type)]
    return [FLOOR, "eager", COMPILED, *fast]


def liger_available() -> bool:
    """Liger-Kernel (a peer: Triton cross-entropy) importable, on a CUDA machine."""
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
        return True
    except Exception:  # not installed, or built against another triton
        return False


def pytest_generate_tests(metafunc):
    # A benchmark taking `provider` but no `device` runs once per provider usable on CPU; one taking
    # both parametrizes the pairs itself (bench_losses.py).
    if "provider" in metafunc.fixturenames and "device" not in metafunc.fixturenames:
        metafunc.parametrize("provider", provider_names("cpu"))


def _make(name: str, reference_fn, fast_fn, x: torch.Tensor, *args):
    if name == FLOOR:
        out = torch.empty_like(x)
        return lambda: out.copy_(x)
    if name == LIGER:      # fast_fn is the peer's function; it writes its gradient into its input
        x = x.clone()
    xg = x.detach().requires_grad_(True)
    if name in ("eager", COMPILED, LIGER):
        # on CUDA each shape gets its own static compile (the strongest torch.compile peer)
        fn = {"eager": reference_fn, LIGER: fast_fn}.get(name) or torch.compile(
            reference_fn, **({"dynamic": False} if x.is_cuda else {}))

        def run():
            loss = fn(xg, *args)
            return loss, torch.autograd.grad(loss, xg)[0]
        return run

    def run_fast():
        with sophon_fast.use_backend(name):
            loss = fast_fn(xg, *args)
            return loss, torch.autograd.grad(loss, xg)[0]
    return run_fast


@pytest.fixture
def fwd_bwd(provider):
    """fwd_bwd(reference_fn, fast_fn, x, *args) -> (callable, bytes) for this provider: the callable
    computes loss and d loss / d x (``copy_`` of x for the floor); bytes = 2R + 1W of x (1R + 1W)."""
    def build(reference_fn, fast_fn, x, *args):
        nbytes = (2 if provider == FLOOR else 3) * x.numel() * x.element_size()
        return _make(provider, reference_fn, fast_fn, x, *args), nbytes
    return build


_medians: dict = defaultdict(dict)   # group -> provider -> median seconds


@pytest.fixture
def bench_disabled(benchmark) -> bool:
    """True under --benchmark-disable (each function runs once: use small shapes, skip slow warm-ups)."""
    return benchmark.disabled


@pytest.fixture
def measure(benchmark):
    """measure(fn, group=, provider=, device=, nbytes=None, rounds=None, warmup=1, **extra) -> median s.

    Times fn (device synced). rounds=None: pytest-benchmark calibrates the rounds after ``warmup``
    untimed calls; rounds=N: exactly N rounds of one call after ``warmup`` untimed ones (cases of
    seconds). nbytes adds GB/s to ``extra_info``; ``extra`` goes there as is. Returns the median, or
    None under --benchmark-disable (fn then runs once)."""
    def run(fn, *, group: str, provider: str, device: torch.device, nbytes: Optional[int] = None,
            rounds: Optional[int] = None, warmup: int = 1, **extra):
        def call():
            out = fn()
            sync(device)
            return out
        benchmark.group = group
        benchmark.extra_info.update(provider=provider, **extra)
        if nbytes is not None:
            benchmark.extra_info["bytes"] = int(nbytes)
        if rounds is not None:
            benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup)
        else:
            if not benchmark.disabled:
                for _ in range(warmup):
                    call()   # warm-up: compilation, first-touch allocations
            benchmark(call)
        if benchmark.stats is None:
            return None
        median = benchmark.stats.stats.median
        benchmark.extra_info["loadavg_1m"] = round(os.getloadavg()[0], 2)   # contention while it ran
        if nbytes is not None:
            benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 2)
        _medians[group][provider] = median
        return median
    return run


@pytest.fixture
def engine_memory(benchmark):
    """engine_memory(arch, mode, K, iterations=1, device="cpu") -> peak MB of that protect() case,
    measured in a fresh child process (benchmarks/engine_case.py: RSS high-water above the baseline
    on CPU, ``max_memory_allocated`` on CUDA) and recorded in ``extra_info``; None under
    --benchmark-disable (no child process runs)."""
    def run(arch: str, mode: str, K: int, iterations: int = 1, device: str = "cpu"):
        if benchmark.disabled:
            return None
        import engine_case   # benchmarks/ is on sys.path (rootdir conftest)
        res = engine_case.run_in_child(arch, mode, K, iterations, device, threads=THREADS)
        benchmark.extra_info.update(peak_mb=round(res["peak_mb"], 1), peak_kind=res["peak_kind"],
                                    peak_iterations=iterations)
        return res["peak_mb"]
    return run


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton missing or broken on this platform
        triton_version = None
    machine_info.update(
        torch=torch.__version__, triton=triton_version, git_sha=_git_sha(), threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(), processor=platform.processor(),
        cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        backends={d: _backend.selected_name(d) for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()},
    )


def pytest_terminal_summary(terminalreporter):
    if not _medians:
        return
    tr = terminalreporter
    tr.section("median ms; x copy_ = time / copy_ floor; vs compile = torch.compile time / time")
    for group, meds in _medians.items():
        tr.write_line(group)
        floor, compiled, peer = meds.get(FLOOR), meds.get(COMPILED), meds.get("torch")
        for provider, median in meds.items():
            parts = [f"  {provider:<8} {median * 1e3:9.3f} ms"]
            if floor:
                parts.append(f"{median / floor:7.2f} x copy_")
            if peer:   # a group with a plain-torch peer (the host-overhead case): time / torch's time
                parts.append(f"{median / peer:7.2f} x torch")
            if compiled and provider != COMPILED:
                parts.append(f"{compiled / median:7.2f} x faster than compile")
            tr.write_line("".join(parts))
