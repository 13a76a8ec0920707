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
automatic backend). Inputs: fp32 hidden (N, H) ~ N(0, 1), weight (V, H) ~ N(0, 1/H), targets uniform,
gradients for hidden and weight.
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

IMPLS = ("eager", "compile", "fused")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from engine_case import PeakMemory, child_json  # noqa: E402


def make_inputs(tokens: int, vocab: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    y = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, y


def fwd_bwd(impl: str, loss: str, chunk_size=None):
    """A callable (hidden, weight, target) -> (loss, grad_hidden, grad_weight) for ``impl``."""
    if impl == "fused":
        def fn(h, w, y):
            return F.linear_suppression_loss(h, w, y, loss=loss, chunk_size=chunk_size)
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


def run_case(tokens: int, vocab: int, hidden: int, loss: str, impl: str, reps: int = 2) -> dict:
    h, w, y = make_inputs(tokens, vocab, hidden)
    run = fwd_bwd(impl, loss)
    run(h, w, y)   # warm-up
    peak = PeakMemory("cpu")
    peak.start()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        run(h, w, y)
        times.append(time.process_time() - t0)
    return {"tokens": tokens, "vocab": vocab, "hidden": hidden, "loss": loss, "impl": impl,
            "threads": torch.get_num_threads(), "seconds": statistics.median(times), "times": times,
            "peak_mb": peak.stop(), "peak_kind": peak.kind, "logits_mb": tokens * vocab * 4 / 2 ** 20,
            "chunk_size": auto_chunk(tokens, vocab, torch.float32) if impl == "fused" else None,
            "backend": _backend.selected_name("cpu", "linear_loss", torch.float32) if impl == "fused" else None}


def run_in_child(tokens: int, vocab: int, hidden: int, loss: str, impl: str, reps: int = 2, threads: int = 1,
                 timeout: float = 3600) -> dict:
    """run_case() in a fresh Python process; its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--tokens", str(tokens), "--vocab", str(vocab),
           "--hidden", str(hidden), "--loss", loss, "--impl", impl, "--reps", str(reps), "--threads", str(threads)]
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(run_case(a.tokens, a.vocab, a.hidden, a.loss, a.impl, a.reps)))


if __name__ == "__main__":
    main()
