"""Row-wise suppression losses, forward + backward: reference composite (eager and torch.compile), the
sophon_fast fast backends, and a copy_ of the logits as the floor; on a CUDA machine also the GPU shapes
(bf16 and fp32 at language-model vocabularies) with Liger-Kernel's cross-entropy as the peer where it imports.

Bytes per fwd+bwd: 2 reads + 1 write of the logits (copy_: 1 read + 1 write). Under
--benchmark-disable every provider runs once on a small shape (torch.compile on the first only).

Host overhead (``bench_host_overhead``): one forward + backward of cross-entropy on 8 x 10 logits (CPU, one
thread), where the kernels cost nothing and the time is the call path: ``torch`` (F.cross_entropy, the peer),
``lean`` (sophon_fast.functional.cross_entropy: one dispatcher op, autograd in C++), ``custom_op`` (the path
it replaced, still taken under torch.compile and on the Triton/reference backends: the async target assertion,
the Python custom ops and the reduction in torch ops). The summary prints each provider's ratio to ``torch``.
Target: lean <= 2x torch. CPU time, not wall clock, on a shared machine:

    SOPHON_BENCH_THREADS=1 .venv/bin/python -m pytest benchmarks/bench_losses.py -k host \
        --benchmark-timer=time.process_time
"""
import pytest
import torch

import sophon_fast
from conftest import COMPILED, DEVICES, LIGER, liger_available, provider_names
from sophon_fast import functional as F
from sophon_fast.reference import losses as R

FP32, BF16 = torch.float32, torch.bfloat16
# Per device: name -> (N, C, dtype) measured, and the small stand-in used under --benchmark-disable.
# GPU: Liger's published shapes (8192x131072 bf16 on H100, 16384x131072 fp32 on A100) and two more.
SHAPES = {"cpu": {"4096x1000": (4096, 1000, FP32), "2048x32000": (2048, 32000, FP32),
                  "512x128256": (512, 128256, FP32)},
          "cuda": {"4096x1000": (4096, 1000, FP32), "8192x32000-bf16": (8192, 32000, BF16),
                   "8192x131072-bf16": (8192, 131072, BF16), "16384x131072": (16384, 131072, FP32)}}
SMALL = {"4096x1000": (64, 1000), "2048x32000": (8, 32000), "512x128256": (2, 128256),
         "8192x32000-bf16": (8, 32000), "8192x131072-bf16": (2, 131072), "16384x131072": (2, 131072)}
LOSSES = {
    "ice": (lambda z, y: R.inverse_cross_entropy(z, y, variant="paper"),
            lambda z, y: F.inverse_cross_entropy(z, y, variant="paper")),
    "klu": (lambda z, y: R.kl_uniform(z), lambda z, y: F.kl_uniform(z)),
    "ce": (lambda z, y: R.cross_entropy(z, y), lambda z, y: F.cross_entropy(z, y)),
}
_inputs = {}


def _logits(n, c, dtype, device):
    key = (n, c, dtype, device)
    if key not in _inputs:
        _inputs.clear()   # keep one shape alive (the largest is 8.6 GB, on the GPU)
        g = torch.Generator(device).manual_seed(0)   # drawn where it lives: no host copy of GPU-sized logits
        z = torch.randn(n, c, generator=g, device=device).mul_(3).to(dtype)
        _inputs[key] = (z, torch.randint(0, c, (n,), generator=g, device=device))
    return _inputs[key]


def _liger_ce():
    from liger_kernel.transformers import LigerCrossEntropyLoss
    return LigerCrossEntropyLoss(ignore_index=R.IGNORE_INDEX)


def _cases():
    out = []
    for device in DEVICES:
        providers = provider_names(device) + ([LIGER] if device == "cuda" and liger_available() else [])
        out += [(device, shape, loss, p) for shape in SHAPES[device] for loss in LOSSES for p in providers
                if p != LIGER or loss == "ce"]
    return out


@pytest.mark.parametrize("device,shape,loss,provider", _cases(), ids=["-".join(c) for c in _cases()])
def bench_row_loss_fwd_bwd(measure, fwd_bwd, bench_disabled, device, shape, loss, provider):
    if bench_disabled and provider == COMPILED and shape != next(iter(SHAPES[device])):
        pytest.skip("torch.compile warm-up is only exercised on the first shape under --benchmark-disable")
    n, c, dtype = SHAPES[device][shape]
    if bench_disabled:
        n, c = SMALL[shape]
    z, y = _logits(n, c, dtype, device)
    reference_fn, fast_fn = LOSSES[loss]
    fn, nbytes = fwd_bwd(reference_fn, _liger_ce() if provider == LIGER else fast_fn, z, y)
    tag = "fp32" if dtype == FP32 else "bf16"
    measure(fn, group=f"{loss} fwd+bwd {tag} {n}x{c}" + (" cuda" if device == "cuda" else ""), provider=provider,
            nbytes=nbytes, device=torch.device(device))


HOST_IMPLS = ("torch", "lean", "custom_op")


def _host_fn(impl):
    import torch.nn.functional as TF
    from sophon_fast.functional import _reduce
    from sophon_fast.ops._checks import assert_targets_in_range
    if impl == "torch":
        return TF.cross_entropy
    if impl == "lean":
        return F.cross_entropy

    def custom_op(z, y):
        assert_targets_in_range(y, z.shape[1], R.IGNORE_INDEX, "cross_entropy")
        loss, _ = torch.ops.sophon_fast.row_losses(z, y, [1.0, 0.0, 0.0, 0.0], 1.0, R.IGNORE_INDEX)
        return _reduce(loss, y, "mean", R.IGNORE_INDEX, z.dtype)
    return custom_op


@pytest.mark.parametrize("impl", HOST_IMPLS)
def bench_host_overhead(measure, impl):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 10, generator=g).requires_grad_(True)
    y = torch.randint(0, 10, (8,), generator=g)
    fn = _host_fn(impl)

    def run():
        loss = fn(z, y)
        return torch.autograd.grad(loss, z)[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sophon_fast.use_backend("cpp" if impl != "torch" else None):
            measure(run, group="host overhead: cross_entropy fwd+bwd 8x10 fp32 cpu (1 thread)", provider=impl,
                    device=torch.device("cpu"), warmup=100, layer="host_overhead")
    finally:
        torch.set_num_threads(threads)
