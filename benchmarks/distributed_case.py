"""A protection run on 1 or N gloo ranks (one torch thread each), timed inside the ranks.

Throughput = simulated trajectories per second over the measured iterations (the first, warm-up, excluded),
from rank 0's history (t_fts + t_ntr per iteration: FTS with its all-reduce, and NTR).
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TRAJECTORIES = 2       # per iteration, whatever the number of ranks


def _worker(rank, world, tmp, K, iterations):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    import sophon_fast as sf
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(1200, 1, 28, 28, generator=g), torch.randint(0, 10, (1200,), generator=g))
    model = sf.models.build("cnn_small", num_classes=10, seed=0)
    cfg = sf.ProtectConfig(loss="ice", iterations=iterations, inner_steps=K, trajectories=TRAJECTORIES,
                           ntr_steps=1, progress=False, evaluation=sf.Evaluation(max_drop=None))
    res = sf.protect(model, data, data, cfg)
    if rank == 0:
        per_iter = statistics.median(h["t_fts"] + h["t_ntr"] for h in res.history[1:])
        with open(os.path.join(tmp, "result.json"), "w") as f:
            json.dump({"seconds_per_iteration": per_iter, "trajectories_per_second": TRAJECTORIES / per_iter}, f)
    if world > 1:
        dist.destroy_process_group()


def run(world: int, tmp: str, K: int = 10, iterations: int = 5) -> dict:
    """Run ``world`` ranks to completion; rank 0's throughput."""
    os.makedirs(tmp, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, tmp, K, iterations)) for r in range(world)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    with open(os.path.join(tmp, "result.json")) as f:
        return {**json.load(f), "wall_seconds": time.perf_counter() - t0}
