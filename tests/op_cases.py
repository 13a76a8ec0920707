"""The public loss functions as (logits, target) -> scalar cases, and their value and gradient on a
chosen backend: shared by the Triton and CUDA op-level tests."""
import sophon_fast
from sophon_fast import functional as F

OPS = {
    "ice": lambda z, y: F.inverse_cross_entropy(z, y),
    "ice_reference_code": lambda z, y: F.inverse_cross_entropy(z, y, variant="reference_code"),
    "klu": lambda z, y: F.kl_uniform(z),
    "neg_entropy": lambda z, y: F.neg_entropy(z),
    "ce": lambda z, y: F.cross_entropy(z, y, reduction="sum"),
    "fused": lambda z, y: F.fused_loss(z, y, ce=0.5, ice=1.0, klu=0.25, negent=2.0, reduction="none").sum(),
}


def value_and_grad(backend, fn, logits, y):
    z = logits.detach().clone().requires_grad_(True)
    with sophon_fast.use_backend(backend):
        out = fn(z, y)
        out.backward()
    return out.detach(), z.grad


def linear_loss_results(backend, device, loss, dtype, n, h, v, chunk_size, seed, ignore_every):
    """``linear_suppression_loss`` with a bias, odd sizes, every ``ignore_every``-th row ignored and chunks of
    ``chunk_size``: (loss, grad_hidden, grad_weight, grad_bias) on ``backend`` and on the reference backend in
    ``dtype``, and of the materialised fp64 textbook composite (the gold)."""
    import torch

    from sophon_fast.reference.linear_loss import linear_suppression_loss as textbook
    from sophon_fast.reference.losses import IGNORE_INDEX
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64),
            torch.randn(v, generator=g, dtype=torch.float64)]
    y = torch.randint(0, v, (n,), generator=g)
    y[::ignore_every] = IGNORE_INDEX
    y = y.to(device)

    def run(fn, dt):
        leaves = [t.to(dt).to(device).requires_grad_(True) for t in base]
        out = fn(*leaves)
        return (out.detach(),) + torch.autograd.grad(out, leaves)

    def fused(name):
        def fn(hd, w, b):
            with sophon_fast.use_backend(name):
                return F.linear_suppression_loss(hd, w, y, loss=loss, bias=b, chunk_size=chunk_size)
        return fn

    gold = run(lambda hd, w, b: textbook(hd, w, y, loss, b), torch.float64)
    return run(fused(backend), dtype), run(fused("reference"), dtype), gold
