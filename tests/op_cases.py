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
