"""Scale-out: simulated trajectories per second at 1 and 2 gloo ranks (one thread each), cnn_small, K = 10,
2 trajectories per iteration (benchmarks/distributed_case.py). Target: 2 ranks >= 1.6x of 1 rank.

The timed function is the whole spawned run (process start-up included); the throughput that matters is
measured inside the ranks and recorded in extra_info. Under --benchmark-disable: K = 2, 2 iterations.
"""
import pytest

import distributed_case as dc


@pytest.mark.parametrize("world", [1, 2])
def bench_distributed_trajectories(benchmark, bench_disabled, tmp_path, world):
    K, iterations = (2, 2) if bench_disabled else (10, 5)
    out = {}

    def go():
        out.update(dc.run(world, str(tmp_path), K=K, iterations=iterations))
    benchmark.group = "distributed: trajectories/s (cnn_small, K=10, 2 trajectories per iteration)"
    benchmark.pedantic(go, rounds=1, iterations=1)
    benchmark.extra_info.update({"layer": "distributed", "provider": f"{world} rank(s)", "world": world, "K": K, **out})
