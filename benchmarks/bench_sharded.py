"""Sharded memory: the LM case (GPT-2, vocabulary 32,768, head untied: 8.8M parameters) protected by 1 process
in fast mode vs sharded with FSDP2 over 2 gloo ranks; the largest per-rank peak RSS above its baseline
(distributed_case.run_sharded_lm). Under --benchmark-disable: K = 1, 1 iteration.

Prediction written before the first run: 2 sharded ranks peak at ~0.55x of 1 process each (the persistent
state halves; FSDP2's unsharded copy of the unit it runs and the activations of half the rows come on top).
Measured: 0.72x (RESULTS.md, "Sharded memory (FSDP2)").
"""
import pytest

import distributed_case as dc


@pytest.mark.parametrize("world", [1, 2])
def bench_sharded_lm_memory(benchmark, bench_disabled, tmp_path, world):
    K, iterations = (1, 1) if bench_disabled else (3, 2)
    out = {}

    def go():
        out.update(dc.run_sharded_lm(world, str(tmp_path), K=K, iterations=iterations))
    benchmark.group = "sharded: peak memory per rank (GPT-2, vocab 32k, FSDP2)"
    benchmark.pedantic(go, rounds=1, iterations=1)
    benchmark.extra_info.update({"layer": "sharded_memory",
                                 "provider": "1 process (fast)" if world == 1 else f"{world} ranks (FSDP2)",
                                 "world": world, "K": K, "iterations": iterations, **out})
