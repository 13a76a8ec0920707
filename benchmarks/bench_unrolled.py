"""The unrolled meta-gradient, fast vs reference, on the adaptive recipe (sophon_fast.recipes.adaptive: a fresh
classifier block under Adam and momentum, the model as it is, two probes, taking turns, every attacker at K steps,
the meta-gradient unrolled through their steps; benchmarks/engine_case.py, arch ``NAME+adaptive``).

    time    cnn_small and cnn_bn at K = 20: five outer iterations (one per attacker) per round, 3 rounds, the
            modes side by side in one group; target fast / reference <= 1.3 on the CPU (>= 1.5x faster on a GPU)
    memory  cnn_bn at K = 10 and 100, one iteration of the first attacker (fresh block, Adam), each case in a
            child process (the peak above the baseline after a warm-up, glibc's mmap threshold fixed); target:
            the fast mode grows by at most what its forward sweep keeps (3 |theta| fp32 per step for Adam, and
            the step's 150-row batch), the reference as measured

Under --benchmark-disable: K = 2 on cnn_small, one call per mode, no child process.
"""
import pytest

import engine_case as ec

TIME_CASES = [("cnn_small", 20), ("cnn_bn", 20)]
MEMORY_KS = (10, 100)


@pytest.mark.parametrize("impl", ("reference", "fast"))
@pytest.mark.parametrize("arch,K", TIME_CASES, ids=[f"{a}-K{K}" for a, K in TIME_CASES])
def bench_unrolled_time(measure, bench_disabled, arch, K, impl):
    if bench_disabled and arch != TIME_CASES[0][0]:
        pytest.skip("--benchmark-disable runs cnn_small at K = 2 only")
    K = 2 if bench_disabled else K
    model, data = ec.make_case(arch, device=ec.DEVICE)
    ec.run_protect(model, data, 2, impl, 1, ec.DEVICE, unrolled=True)          # warm-up outside the rounds

    def fn():
        return ec.run_protect(model, data, K, impl, 5, ec.DEVICE, unrolled=True)
    measure(fn, group=f"unrolled adaptive {arch} K={K}", provider=impl, device=ec.torch.device(ec.DEVICE),
            rounds=None if bench_disabled else 3, warmup=0, layer="unrolled", what="time", arch=arch, K=K,
            iterations=5, params=ec.models.num_parameters(model))


@pytest.mark.parametrize("impl", ("reference", "fast"))
@pytest.mark.parametrize("K", MEMORY_KS)
def bench_unrolled_memory(benchmark, bench_disabled, K, impl):
    out = {}
    if bench_disabled:
        if K != MEMORY_KS[0]:
            pytest.skip("--benchmark-disable runs one small case per mode")
        model, data = ec.make_case("cnn_bn")

        def go():
            ec.run_protect(model, data, 2, impl, 1, unrolled=True)
    else:
        def go():
            out.update(ec.run_in_child("cnn_bn" + ec.UNROLLED, impl, K, iterations=1, device=ec.DEVICE,
                                       memory_only=True, threads=1))
    benchmark.group = f"unrolled adaptive memory cnn_bn K={K}"
    benchmark.pedantic(go, rounds=1, iterations=1)
    params = ec.models.num_parameters(ec.make_case("cnn_bn")[0])
    benchmark.extra_info.update({"layer": "unrolled", "what": "memory", "provider": impl, "K": K, "arch": "cnn_bn",
                                 "params": params, "kept_mb": round(K * (3 * params * 4 + ec.BATCH * 28 * 28 * 4) / 2 ** 20, 1),
                                 **{k: out[k] for k in ("peak_mb", "peak_kind") if k in out}})
