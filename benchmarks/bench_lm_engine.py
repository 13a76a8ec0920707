"""Peak memory of protection iterations on a language model with a 32,768-token vocabulary, reference vs
fast mode, at K = 5 and 20 (benchmarks/engine_case.py, case ``gpt2_32k``: a 2-layer, 128-wide GPT-2, blocks
of 128 tokens, an Adam attacker on 6 support + 2 query blocks, ICE over the vocabulary). Each case runs in its
own process; the peak is the RSS high-water above the process baseline after a warm-up (on a CUDA machine:
``max_memory_allocated`` on the GPU).

Under --benchmark-disable: K = 1 in this process on a small batch (no child process, no memory figure).
"""
import pytest

import engine_case as ec


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("K", [5, 20])
def bench_lm_protect_memory(benchmark, bench_disabled, mode, K):
    out = {}
    if bench_disabled:
        if K != 5:
            pytest.skip("--benchmark-disable runs K = 1 once per mode")
        model, (ids, labels) = ec.lm_case(n=16)

        def go():
            ec.run_lm(model, (ids, labels), 1, mode, 1)
    else:
        def go():
            out.update(ec.run_in_child(ec.LM, mode, K, iterations=1, device=ec.DEVICE, memory_only=True, threads=1))
    benchmark.group = f"LM protect memory (GPT-2, vocab 32768) K={K}" + (" cuda" if ec.DEVICE == "cuda" else "")
    benchmark.pedantic(go, rounds=1, iterations=1)
    benchmark.extra_info.update({"layer": "lm_memory", "provider": mode, "K": K,
                                 **{k: out[k] for k in ("peak_mb", "peak_kind") if k in out}})
