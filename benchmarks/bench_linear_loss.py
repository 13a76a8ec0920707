"""Fused linear + suppression loss, forward + backward (gradients for hidden and weight), fp32: the
materialised textbook composite (eager and torch.compile) against sophon_fast's fused op, for ICE and
for CE (the fused op with loss="ce" is a Liger-style fused linear cross-entropy).

Per case: time in this process (``measure``: one warm-up, then one timed call: cases of seconds) and peak memory
in a fresh child process (benchmarks/linear_loss_case.py: RSS high-water above the baseline, one
warm-up excluded), in ``extra_info['peak_mb']``. Under --benchmark-disable every case runs once on a
small stand-in shape, in process, with no child (torch.compile on the first shape only).
"""
import pytest
import torch

from linear_loss_case import fwd_bwd, make_inputs, run_in_child
from conftest import THREADS

# (tokens, vocab, hidden) measured, and the stand-in used under --benchmark-disable. The target shape
# runs ICE only (each materialised call there holds ~10 GB); CE (Liger-style) runs on the others.
SHAPES = {"4096x128256x512": (4096, 128256, 512), "1024x128256x512": (1024, 128256, 512),
          "2048x32000x512": (2048, 32000, 512)}
SMALL = {"4096x128256x512": (16, 2003, 32), "1024x128256x512": (8, 4001, 16), "2048x32000x512": (16, 1001, 32)}
CASES = [("4096x128256x512", "ice"), ("1024x128256x512", "ice"), ("1024x128256x512", "ce"),
         ("2048x32000x512", "ice"), ("2048x32000x512", "ce")]
IMPLS = ("eager", "compile", "fused")
DEVICE = torch.device("cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,loss", CASES, ids=[f"{s}-{loss}" for s, loss in CASES])
def bench_linear_loss(measure, bench_disabled, shape, loss, impl):
    if bench_disabled and impl == "compile" and shape != next(iter(SHAPES)):
        pytest.skip("torch.compile warm-up is only exercised on the first shape under --benchmark-disable")
    n, v, h = (SMALL if bench_disabled else SHAPES)[shape]
    hidden, weight, target = make_inputs(n, v, h)
    run = fwd_bwd(impl, loss)
    group = f"linear+{loss} fwd+bwd fp32 tokens={n} vocab={v} hidden={h}"
    extra = dict(layer="linear_loss", tokens=n, vocab=v, hidden=h, loss=loss, logits_mb=round(n * v * 4 / 2 ** 20, 1))
    if not bench_disabled:
        res = run_in_child(n, v, h, loss, impl, reps=1, threads=THREADS)
        extra.update(peak_mb=round(res["peak_mb"], 1), peak_kind=res["peak_kind"], chunk_size=res["chunk_size"],
                     backend=res["backend"])
    measure(lambda: run(hidden, weight, target), group=group, provider=impl, device=DEVICE, rounds=1, **extra)
