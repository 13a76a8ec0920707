"""Layer 4: end-to-end protect() on the demo task, and layer 5: scaling with model size.

Layer 4: wall-clock of protect() in each mode for the same ``ITERATIONS`` outer iterations of the
demo task (fashion_mnist -> mnist, cnn_small, the trap recipe ``sophon_fast.recipes.trap``, the demo's
until issue 12 and first order, so both modes run it: K = 20, three strategies taking turns, an
original-test evaluation every 10 iterations; no accuracy floor, no checkpoints),
and each mode's peak memory over the same run in a child process.

Layer 5: one outer iteration at K = 10, fast vs reference vs the bare passes, for cnn_small (0.11M)
and vgg (0.58M); cnn (0.42M) and resnet18_width (11.2M) at K = 10 come from layer 3
(bench_engine.py), so RESULTS.md's scaling table spans 0.1M -> 11M parameters without timing a
case twice.

Under --benchmark-disable: the demo with K = 2 for one iteration, the scaling cases at K = 2, no
child processes.
"""
import pytest
import torch

import engine_case as ec

ITERATIONS = 10
ROUNDS = 2
SCALING = ("cnn_small", "vgg")
DEVICE = ec.DEVICE


@pytest.fixture(scope="module")
def demo_case():
    try:
        return ec.demo_case(DEVICE)
    except Exception as e:   # sophon_fast.data.DatasetUnavailable: a data package is missing
        pytest.skip(f"demo data unavailable: {e}")


@pytest.mark.parametrize("impl", ("reference", "fast"))
def bench_protect_demo(measure, engine_memory, bench_disabled, demo_case, impl):
    iterations = 1 if bench_disabled else ITERATIONS
    config = ec.demo_config(impl, iterations, DEVICE)
    if bench_disabled:
        config.inner_steps = 2
    model, o_train, r_train, o_test = demo_case
    if not bench_disabled:
        ec.run_demo(demo_case, impl, 1, DEVICE)       # warm-up outside the timed rounds

    def fn():
        return ec.protect(model, o_train, r_train, config, original_test=o_test)
    measure(fn, group=f"protect demo fashion_mnist->mnist cnn_small {iterations} iterations", provider=impl,
            device=torch.device(DEVICE), rounds=ROUNDS, warmup=0, layer="e2e", iterations=iterations,
            K=config.inner_steps, strategies=len(config.strategies), threads=torch.get_num_threads())
    engine_memory(ec.DEMO, impl, config.inner_steps, iterations=iterations, device=DEVICE)


@pytest.mark.parametrize("impl", ec.IMPLS)
@pytest.mark.parametrize("arch", SCALING)
def bench_scaling(measure, engine_memory, bench_disabled, arch, impl):
    K = 2 if bench_disabled else 10
    ec.time_outer(measure, arch, K, impl, rounds=3, device=DEVICE)
    if impl in ("reference", "fast"):
        engine_memory(arch, impl, K, iterations=1, device=DEVICE)
