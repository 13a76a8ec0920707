"""Row-wise suppression losses, forward + backward, fp32: reference composite (eager and
torch.compile), the sophon_fast fast backends, and a copy_ of the logits as the floor.

Bytes per fwd+bwd: 2 reads + 1 write of the logits (copy_: 1 read + 1 write). Under
--benchmark-disable every provider runs once on a small shape (torch.compile on the first only).
"""
import pytest
import torch

from sophon_fast import functional as F
from sophon_fast.reference import losses as R

# (N, C) measured, and the small stand-in used under --benchmark-disable.
SHAPES = {"4096x1000": (4096, 1000), "2048x32000": (2048, 32000), "512x128256": (512, 128256)}
SMALL = {"4096x1000": (64, 1000), "2048x32000": (8, 32000), "512x128256": (2, 128256)}
LOSSES = {
    "ice": (lambda z, y: R.inverse_cross_entropy(z, y, variant="paper"),
            lambda z, y: F.inverse_cross_entropy(z, y, variant="paper")),
    "klu": (lambda z, y: R.kl_uniform(z), lambda z, y: F.kl_uniform(z)),
    "ce": (lambda z, y: R.cross_entropy(z, y), lambda z, y: F.cross_entropy(z, y)),
}
DEVICE = torch.device("cpu")
_inputs = {}


def _logits(n, c):
    if (n, c) not in _inputs:
        _inputs.clear()   # keep one shape alive (the largest is 263 MB)
        g = torch.Generator().manual_seed(0)
        _inputs[(n, c)] = (torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g))
    return _inputs[(n, c)]


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("shape", list(SHAPES))
def bench_row_loss_fwd_bwd(measure, fwd_bwd, bench_disabled, shape, loss, provider):
    if bench_disabled and provider == "compile" and shape != next(iter(SHAPES)):
        pytest.skip("torch.compile warm-up is only exercised on the first shape under --benchmark-disable")
    n, c = (SMALL if bench_disabled else SHAPES)[shape]
    z, y = _logits(n, c)
    fn, nbytes = fwd_bwd(*LOSSES[loss], z, y)
    measure(fn, group=f"{loss} fwd+bwd fp32 {n}x{c}", provider=provider, nbytes=nbytes, device=DEVICE)
