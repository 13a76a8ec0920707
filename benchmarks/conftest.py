"""Shared benchmark machinery: thread count, device sync, providers, the one timing fixture, metadata.

    .venv/bin/python -m pytest benchmarks                       # measure (a few minutes on 2 cores)
    .venv/bin/python -m pytest benchmarks --benchmark-disable   # CI: every provider once, small shapes

Providers of a fwd+bwd op sit side by side in one pytest-benchmark group:
    copy     ``out.copy_(x)`` of the same input: the memory floor (1 read + 1 write)
    eager    the plain-PyTorch reference composite (sophon_fast.reference)
    compile  the same composite under ``torch.compile``
    cpp / triton / cuda   sophon_fast with that backend forced (each one usable on the device)
Each benchmark records GB/s in ``extra_info``; the terminal summary prints, per group, every
provider's median and its ratio to the copy floor and to torch.compile.
"""
from __future__ import annotations

import os
import platform
import subprocess
from collections import defaultdict

import pytest
import torch

import sophon_fast
from sophon_fast import _backend

THREADS = int(os.environ.get("SOPHON_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)

FLOOR, COMPILED = "copy", "compile"
FAST_BACKENDS = ("cuda", "triton", "cpp")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def provider_names(device_type: str = "cpu"):
    """Providers of a fwd+bwd op on this device: floor, reference eager/compiled, usable fast backends."""
    fast = [b for b in FAST_BACKENDS if _backend.probe(b).usable.get(device_type)]
    return [FLOOR, "eager", COMPILED, *fast]


def pytest_generate_tests(metafunc):
    # Every benchmark taking a `provider` argument runs once per provider usable on CPU.
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", provider_names("cpu"))


def _make(name: str, reference_fn, fast_fn, x: torch.Tensor, *args):
    if name == FLOOR:
        out = torch.empty_like(x)
        return lambda: out.copy_(x)
    xg = x.detach().requires_grad_(True)
    if name in ("eager", COMPILED):
        fn = reference_fn if name == "eager" else torch.compile(reference_fn)

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
    """measure(fn, group=, provider=, nbytes=, device=): time fn (synced) after one warm-up call."""
    def run(fn, *, group: str, provider: str, nbytes: int, device: torch.device):
        def call():
            fn()
            sync(device)
        if not benchmark.disabled:
            call()   # warm-up: compilation, first-touch allocations
        benchmark.group = group
        benchmark.extra_info.update(provider=provider, bytes=int(nbytes))
        benchmark(call)
        if benchmark.stats is not None:
            median = benchmark.stats.stats.median
            benchmark.extra_info["GB/s"] = round(nbytes / median / 1e9, 2)
            _medians[group][provider] = median
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
        floor, compiled = meds.get(FLOOR), meds.get(COMPILED)
        for provider, median in meds.items():
            parts = [f"  {provider:<8} {median * 1e3:9.3f} ms"]
            if floor:
                parts.append(f"{median / floor:7.2f} x copy_")
            if compiled and provider != COMPILED:
                parts.append(f"{compiled / median:7.2f} x faster than compile")
            tr.write_line("".join(parts))
