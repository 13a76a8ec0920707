"""A protection run on 1 or N gloo ranks (one torch thread each), timed inside the ranks.

Throughput = simulated trajectories per second over the measured iterations (the first, warm-up, excluded),
from rank 0's history (t_fts + t_ntr per iteration: FTS with its all-reduce, and NTR).

Sharded memory (``run_sharded_lm``): the LM case of the LM memory table (GPT-2, vocabulary 32,768, width 128,
2 layers; its head untied: 8.9M parameters), protected in fast mode by 1 process, or sharded with FSDP2
(each block, the decoder, the root) over N ranks; each rank's peak RSS above its baseline taken just before
protect() (engine_case.PeakMemory), the largest over the ranks.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
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


def _lm_worker(rank, world, tmp, K, iterations):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    import sophon_fast as sf
    from engine_case import PeakMemory, lm_case
    from sophon_fast.models import lm
    from sophon_fast.tasks.lm import LanguageModelTask
    model, data = lm_case(n=32)
    lm.untie_head(model)
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model.transformer)
        fully_shard(model)
    cfg = sf.ProtectConfig(task="lm", loss="ice", iterations=iterations, inner_steps=K, progress=False,
                           strategies=[sf.Strategy("adam", lr=1e-3, batch_size=8, query_size=2)], ntr_batch_size=8,
                           evaluation=sf.Evaluation(max_drop=None), in_place=True)
    peak = PeakMemory("cpu")
    peak.start()
    t0 = time.perf_counter()
    sf.protect(model, data, data, cfg, task=LanguageModelTask())
    out = {"peak_mb": peak.stop(), "seconds": time.perf_counter() - t0,
           "params": sum(p.numel() for p in model.parameters())}
    with open(os.path.join(tmp, f"mem{rank}.json"), "w") as f:
        json.dump(out, f)
    if world > 1:
        dist.destroy_process_group()


def run_sharded_lm(world: int, tmp: str, K: int = 3, iterations: int = 2) -> dict:
    """The LM case on ``world`` ranks (1: unsharded fast mode; more: FSDP2); the largest peak over the ranks."""
    _spawn(_lm_worker, world, tmp, K, iterations)
    runs = []
    for r in range(world):
        with open(os.path.join(tmp, f"mem{r}.json")) as f:
            runs.append(json.load(f))
    return {"peak_mb": max(x["peak_mb"] for x in runs), "peak_mb_per_rank": [x["peak_mb"] for x in runs],
            "seconds": max(x["seconds"] for x in runs), "params": runs[0]["params"]}


def _spawn(target, world, tmp, *args) -> float:
    """Run ``target(rank, world, tmp, *args)`` on ``world`` spawned ranks to completion; their wall time."""
    os.makedirs(tmp, exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # the ranks import engine_case
    from engine_case import MMAP_THRESHOLD
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, tmp, *args)) for r in range(world)]
    t0 = time.perf_counter()
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)   # the ranks' RSS follows live tensors (engine_case)
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return time.perf_counter() - t0


def run(world: int, tmp: str, K: int = 10, iterations: int = 5) -> dict:
    """Run ``world`` ranks to completion; rank 0's throughput."""
    wall = _spawn(_worker, world, tmp, K, iterations)
    with open(os.path.join(tmp, "result.json")) as f:
        return {**json.load(f), "wall_seconds": wall}

