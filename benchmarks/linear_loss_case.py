"""One case of the fused linear + loss benchmark, runnable as a child process (peak memory above the
process's baseline, so cases never share a heap):

    python benchmarks/linear_loss_case.py --tokens 4096 --vocab 128256 --hidden 512 --loss ice --impl fused

prints one JSON line: ``seconds`` (median CPU time, ``time.process_time``, of ``--reps`` forward +
backward calls: on a shared machine it leaves out the time spent waiting for a core; after one
untimed warm-up at the same shape: compilation, lazy imports, first-touch allocations), ``peak_mb``
(RSS high-water above the RSS before the timed calls, engine_case.PeakMemory: the warm-up's peak is
never counted) and the fused op's chunk size.

Impls: ``eager`` (the materialised textbook composite, sophon_fast/reference/linear_loss.py),
``compile`` (``torch.compile`` of it), ``fused`` (sophon_fast.functional.linear_suppression_loss on the
automatic backend), ``fused_low_memory`` (the same with ``low_memory=True``: 16-bit grad_weight accumulation), ``liger`` (Liger-Kernel's fused linear cross-entropy: CUDA, ``--loss ce`` only).
Inputs: hidden (N, H) ~ N(0, 1), weight (V, H) ~ N(0, 1/H) in ``--dtype`` on ``--device``, targets
uniform, gradients for hidden and weight. On CUDA the time is wall clock after a device sync and the peak
is ``max_memory_allocated`` above the allocation at the start.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

from sophon_fast import _backend
from sophon_fast import functional as F
from sophon_fast.ops.linear_loss import auto_chunk
from sophon_fast.reference.linear_loss import linear_suppression_loss as textbook

IMPLS = ("eager", "compile", "fused", "fused_low_memory", "liger")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from engine_case import PeakMemory, child_json  # noqa: E402


def make_inputs(tokens: int, vocab: int, hidden: int, seed: int = 0, device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    g = torch.Generator(device).manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, device=device) / hidden ** 0.5).to(dtype)
    y = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return h, w, y


def fwd_bwd(impl: str, loss: str, chunk_size=None):
    """A callable (hidden, weight, target) -> (loss, grad_hidden, grad_weight) for ``impl``."""
    if impl in ("fused", "fused_low_memory"):
        def fn(h, w, y):
            return F.linear_suppression_loss(h, w, y, loss=loss, chunk_size=chunk_size,
                                             low_memory=impl == "fused_low_memory")
    elif impl == "liger":
        if loss != "ce":
            raise ValueError("impl 'liger' is Liger-Kernel's fused linear cross-entropy: loss must be 'ce'")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

        def fn(h, w, y):
            return flce(w, h, y)
    elif impl in ("eager", "compile"):
        def fn(h, w, y):
            return textbook(h, w, y, loss)
        if impl == "compile":
            fn = torch.compile(fn)
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def run(h, w, y):
        hg, wg = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = fn(hg, wg, y)
        return (out.detach(),) + torch.autograd.grad(out, (hg, wg))
    return run


def run_case(tokens: int, vocab: int, hidden: int, loss: str, impl: str, reps: int = 2, device: str = "cpu",
             dtype: str = "fp32") -> dict:
    h, w, y = make_inputs(tokens, vocab, hidden, device=device, dtype=DTYPES[dtype])
    run = fwd_bwd(impl, loss)
    cuda = torch.device(device).type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    run(h, w, y)   # warm-up
    peak = PeakMemory(device)
    peak.start()
    times = []
    for _ in range(reps):
        t0 = clock()
        run(h, w, y)
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return {"tokens": tokens, "vocab": vocab, "hidden": hidden, "loss": loss, "impl": impl, "device": device,
            "dtype": dtype, "threads": torch.get_num_threads(), "seconds": statistics.median(times), "times": times,
            "peak_mb": peak.stop(), "peak_kind": peak.kind,
            "logits_mb": tokens * vocab * DTYPES[dtype].itemsize / 2 ** 20,
            "chunk_size": (auto_chunk(tokens, vocab, DTYPES[dtype], torch.device(device).type,
                                      impl == "fused_low_memory") if impl.startswith("fused") else None),
            # the linear loss runs its chunk loop over the row-loss kernels of this backend
            "backend": _backend.selected_name(torch.device(device).type, "row_losses_fwd", DTYPES[dtype])
            if impl.startswith("fused") else None}


def run_in_child(tokens: int, vocab: int, hidden: int, loss: str, impl: str, reps: int = 2, threads: int = 1,
                 timeout: float = 3600, device: str = "cpu", dtype: str = "fp32") -> dict:
    """run_case() in a fresh Python process; its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--tokens", str(tokens), "--vocab", str(vocab),
           "--hidden", str(hidden), "--loss", loss, "--impl", impl, "--reps", str(reps), "--threads", str(threads),
           "--device", device, "--dtype", dtype]
    return child_json(cmd, "linear loss case", timeout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--loss", default="ice", choices=("ice", "klu", "ce", "neg_entropy"))
    ap.add_argument("--impl", required=True, choices=IMPLS)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(run_case(a.tokens, a.vocab, a.hidden, a.loss, a.impl, a.reps, a.device, a.dtype)))


if __name__ == "__main__":
    main()
