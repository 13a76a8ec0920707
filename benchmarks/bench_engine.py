"""Layer 3: one outer iteration of the protection engine, reference vs fast mode, against the bare
forward+backward passes of the same iteration (``t_outer / t_model_passes``), and each mode's peak
memory in a child process (benchmarks/engine_case.py).

    cnn (0.42M, no BN), cnn_bn (0.42M, BN): K in {10, 25, 50, 100}, 3 rounds each
    resnet18_width (11.2M, BN): K = 10, 2 rounds (about a minute per outer iteration on one core)

Also one bound on the "shared forward" idea (the query batch of step k and the support batch of
step k+1 see the same weights, so one forward could cover both): one forward over 150 rows vs
forward(130) + forward(20) on ``cnn`` in training mode; the difference is the most that idea could
save per inner step (the two gradients still need their own backward passes).

Under --benchmark-disable: K = 2 on cnn and cnn_bn only, no child processes.
"""
import pytest
import torch

import engine_case as ec

CASES = [(a, K) for a in ("cnn", "cnn_bn") for K in (10, 25, 50, 100)] + [("resnet18_width", 10)]
ROUNDS = {"resnet18_width": 2}
DEVICE = ec.DEVICE


@pytest.mark.parametrize("impl", ec.IMPLS)
@pytest.mark.parametrize("arch,K", CASES, ids=[f"{a}-K{K}" for a, K in CASES])
def bench_engine_outer(measure, engine_memory, bench_disabled, arch, K, impl):
    if bench_disabled:
        if arch == "resnet18_width" or K != CASES[0][1]:
            pytest.skip("--benchmark-disable runs the smallest K on cnn and cnn_bn only")
        K = 2
    ec.time_outer(measure, arch, K, impl, rounds=ROUNDS.get(arch, 3), device=DEVICE)
    if impl in ("reference", "fast"):
        engine_memory(arch, impl, K, iterations=1, device=DEVICE)


@pytest.mark.parametrize("impl", ("fwd150", "fwd130+fwd20"))
def bench_shared_forward_bound(measure, impl):
    model, (x, _) = ec.make_case("cnn", device=DEVICE)
    model.train()
    q = ec.BATCH - ec.QUERY
    if impl == "fwd150":
        def fn():
            return model(x[:ec.BATCH])
    else:
        def fn():
            return model(x[:q]), model(x[q:ec.BATCH])
    with torch.enable_grad():
        measure(fn, group="shared forward bound cnn (train mode, graph built)", provider=impl,
                device=torch.device(DEVICE), layer="shared_forward", arch="cnn")
