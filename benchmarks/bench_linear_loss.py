"""Fused linear + suppression loss, forward + backward (gradients for hidden and weight), fp32: the
materialised textbook composite (eager and torch.compile) against sophon_fast's fused op, for ICE and
for CE (the fused op with loss="ce" is a Liger-style fused linear cross-entropy).

Per case: time in this process (``measure``: one warm-up, then one timed call: cases of seconds) and peak memory
in a fresh child process (benchmarks/linear_loss_case.py: RSS high-water above the baseline, one
warm-up excluded), in ``extra_info['peak_mb']``. Under --benchmark-disable every case runs once on a
small stand-in shape, in process, with no child (torch.compile on the first shape only).

On a CUDA machine also a Llama-3-sized head in bf16 (8192 tokens, vocabulary 128256, hidden 4096), with the fused
op's low-memory mode (``fused_low_memory``: bf16 grad_weight accumulation, issue 37) beside it and Liger-Kernel's
fused linear cross-entropy as the peer for CE where ``liger_kernel`` imports; time is wall
clock after a device sync, peak memory ``max_memory_allocated`` in the child.
"""
import pytest
import torch

from linear_loss_case import DTYPES, fwd_bwd, make_inputs, run_in_child
from conftest import DEVICES, THREADS, liger_available

# (tokens, vocab, hidden) measured, and the stand-in used under --benchmark-disable. The target shape
# runs ICE only (each materialised call there holds ~10 GB); CE (Liger-style) runs on the others.
SHAPES = {"4096x128256x512": (4096, 128256, 512), "1024x128256x512": (1024, 128256, 512),
          "2048x32000x512": (2048, 32000, 512)}
SMALL = {"4096x128256x512": (16, 2003, 32), "1024x128256x512": (8, 4001, 16), "2048x32000x512": (16, 1001, 32)}
CASES = [("4096x128256x512", "ice"), ("1024x128256x512", "ice"), ("1024x128256x512", "ce"),
         ("2048x32000x512", "ice"), ("2048x32000x512", "ce")]
IMPLS = ("eager", "compile", "fused")
GPU_SHAPES = {"8192x128256x4096-bf16": (8192, 128256, 4096)}
GPU_CASES = [("8192x128256x4096-bf16", "ice"), ("8192x128256x4096-bf16", "ce")]


def _params():
    out = [("cpu", s, loss, impl) for s, loss in CASES for impl in IMPLS]
    if "cuda" in DEVICES:
        impls = IMPLS + ("fused_low_memory",) + (("liger",) if liger_available() else ())
        out += [("cuda", s, loss, impl) for s, loss in GPU_CASES for impl in impls if impl != "liger" or loss == "ce"]
    return out


@pytest.mark.parametrize("device,shape,loss,impl", _params(), ids=["-".join(p) for p in _params()])
def bench_linear_loss(measure, bench_disabled, device, shape, loss, impl):
    if bench_disabled and impl == "compile" and shape != next(iter(SHAPES)):
        pytest.skip("torch.compile warm-up is only exercised on the first shape under --benchmark-disable")
    dtype = "bf16" if shape.endswith("-bf16") else "fp32"
    n, v, h = (SMALL[shape] if shape in SMALL else (16, 2003, 32)) if bench_disabled else \
        {**SHAPES, **GPU_SHAPES}[shape]
    hidden, weight, target = make_inputs(n, v, h, device=device, dtype=DTYPES[dtype])
    run = fwd_bwd(impl, loss)
    group = f"linear+{loss} fwd+bwd {dtype} tokens={n} vocab={v} hidden={h}" + (" cuda" if device == "cuda" else "")
    extra = dict(layer="linear_loss", tokens=n, vocab=v, hidden=h, loss=loss,
                 logits_mb=round(n * v * DTYPES[dtype].itemsize / 2 ** 20, 1))
    if not bench_disabled:
        res = run_in_child(n, v, h, loss, impl, reps=1 if device == "cpu" else 3, threads=THREADS, device=device,
                           dtype=dtype)
        extra.update(peak_mb=round(res["peak_mb"], 1), peak_kind=res["peak_kind"], chunk_size=res["chunk_size"],
                     backend=res["backend"], child_seconds=res["seconds"])
    measure(lambda: run(hidden, weight, target), group=group, provider=impl, device=torch.device(device),
            rounds=1 if device == "cpu" else 3, **extra)
