"""Kernel-level parity of the Triton kernels (``sophon_fast.kernels``) against the reference spec.

Run on CPU under the interpreter, in its own pytest process (the variable must be set before triton
is imported):

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_kernels.py -q

Every comparison follows one rule: the kernel's max error against an fp64 gold is at most twice the
reference's own max error in that dtype, plus a floor of a few output ulps (tests/tolerances.py).
"""
import itertools
import math
import os

import pytest
import torch
import tolerances

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before pytest starts to run "
                "them on CPU", allow_module_level=True)
pytest.importorskip("triton")

import sophon_fast  # noqa: E402
from sophon_fast import kernels as K  # noqa: E402
from sophon_fast.reference import losses as R  # noqa: E402
from sophon_fast.reference.inner_step import inner_step_ as ref_inner_step  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
IGNORE = R.IGNORE_INDEX
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BASE_W = (0.5, 1.0, 0.25, 2.0)   # w_ce, w_ice, w_klu, w_negent when switched on
COMBOS = [tuple(BASE_W[i] if bits[i] else 0.0 for i in range(4))
          for bits in itertools.product((0, 1), repeat=4) if any(bits)]
NO_TARGET_COMBOS = [w for w in COMBOS if not (w[0] or w[1])]
FUSED = BASE_W


def assert_parity(fast, ref, gold, what):
    """The one parity rule (tests/tolerances.py)."""
    assert fast.dtype == ref.dtype, f"{what}: {fast.dtype} vs {ref.dtype}"
    tolerances.assert_parity(fast, ref, gold, fast.dtype, what)


def make(n, c, dtype=torch.float32, seed=0, target=True, spread=4.0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * spread).to(dtype).to(DEVICE)
    if not target:
        return logits, None
    y = torch.randint(0, c, (n,), generator=g)
    if ignore_every and n > 1:
        y[1::ignore_every] = IGNORE
    return logits, y.to(DEVICE)


def check_core(logits, target, weights, scale=1.0, ignore_index=IGNORE, resident_max_c=K.RESIDENT_MAX_C, what=""):
    """Forward loss/stats and backward gradient of the kernels against the reference and fp64 gold."""
    kw = dict(resident_max_c=resident_max_c)
    loss, stats = K.row_losses_fwd(logits, target, weights, scale, ignore_index, **kw)
    loss_r, stats_r = R.row_losses_forward(logits, target, weights, scale, ignore_index)
    loss_g, stats_g = R.row_losses_forward(logits.double(), target, weights, scale, ignore_index)
    what = f"{what} {tuple(logits.shape)} {logits.dtype} w={weights} scale={scale}"
    assert_parity(loss, loss_r, loss_g, f"loss {what}")
    assert_parity(stats, stats_r, stats_g, f"stats {what}")
    gl = torch.linspace(-1.5, 2.0, logits.shape[0], dtype=torch.float64, device=logits.device)
    grad = K.row_losses_bwd(gl.to(loss.dtype), logits, target, stats, weights, scale, ignore_index, **kw)
    grad_r = R.row_losses_backward(gl.to(loss_r.dtype), logits, target, stats_r, weights, scale, ignore_index)
    grad_g = R.row_losses_backward(gl, logits.double(), target, stats_g, weights, scale, ignore_index)
    assert grad.is_contiguous()
    assert_parity(grad, grad_r, grad_g, f"grad {what}")
    return loss, grad


# ------------------------------------------------------------------------------------------------
# Row-loss core
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", COMBOS)
@pytest.mark.parametrize("shape", [(7, 10), (13, 1000)])
def test_weight_combos(shape, weights):
    check_core(*make(*shape), weights)


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0, 0.0), FUSED])
@pytest.mark.parametrize("resident_max_c", [K.RESIDENT_MAX_C, 256])
def test_scale_minus_one(weights, resident_max_c):
    """scale=-1 with CE is the reference code's ICE, CE(1 - z, y) = CE(-z, y)."""
    check_core(*make(13, 1000, seed=1), weights, scale=-1.0, resident_max_c=resident_max_c)


@pytest.mark.parametrize("weights", NO_TARGET_COMBOS)
@pytest.mark.parametrize("shape,resident_max_c", [((7, 10), K.RESIDENT_MAX_C), ((3, 5000), 1024)])
def test_no_target(shape, resident_max_c, weights):
    check_core(*make(*shape, target=False), weights, resident_max_c=resident_max_c)


@pytest.mark.parametrize("shape,resident_max_c", [
    ((1, 2), K.RESIDENT_MAX_C), ((7, 10), K.RESIDENT_MAX_C), ((33, 1000), K.RESIDENT_MAX_C),
    ((3, 5000), 1024),            # chunked: 5 chunks of 1024, ragged last chunk
    ((13, 1000), 256),            # chunked: targets in every chunk position
    ((5, 3), 2),                  # chunked with 2-wide chunks (a chunk may hold only the target)
    ((1, K.RESIDENT_MAX_C), K.RESIDENT_MAX_C),   # the longest row resident by default
    ((1, 65536), 65536),                         # the longest resident row supported
    ((2, 70000), K.RESIDENT_MAX_C),              # the default chunked path
])
@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), FUSED])
def test_shapes(shape, resident_max_c, weights):
    check_core(*make(*shape, seed=2), weights, resident_max_c=resident_max_c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,resident_max_c", [((13, 1000), K.RESIDENT_MAX_C), ((3, 5000), 1024)])
def test_dtypes(dtype, shape, resident_max_c):
    check_core(*make(*shape, dtype=dtype, seed=3), FUSED, resident_max_c=resident_max_c)
    check_core(*make(*shape, dtype=dtype, seed=4, target=False), (0.0, 0.0, 1.0, 0.5),
               resident_max_c=resident_max_c)


@pytest.mark.parametrize("resident_max_c", [K.RESIDENT_MAX_C, 128])
def test_row_stride(resident_max_c):
    """Rows of a wider buffer are read in place; a transposed view (class stride != 1) is copied."""
    base, _ = make(9, 700, seed=5)
    _, y = make(9, 600, seed=5)
    check_core(base[:, 50:650], y, FUSED, resident_max_c=resident_max_c, what="row-strided")
    check_core(base[:, 50:650].t().contiguous().t(), y, FUSED, resident_max_c=resident_max_c,
               what="column-major")
    check_core(base[::2, :600], y[::2].contiguous(), FUSED, resident_max_c=resident_max_c, what="every other row")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("resident_max_c", [K.RESIDENT_MAX_C, 8])
def test_extreme_logits(dtype, resident_max_c):
    """|z| = 1e4: p_y rounds to 1 (ICE stays finite, = z_y - lse_x) or to 0 (ICE underflows to 0)."""
    n, c = 6, 37
    z = torch.full((n, c), -1e4, dtype=torch.float64)
    y = torch.tensor([0, 36, 5, 8, 11, 20])
    z[0, 0] = z[1, 36] = 1e4                 # rows 0, 1: the target dominates, p_y == 1 in fp32
    z[2] = 1e4
    z[2, 5] = -1e4                           # row 2: the target is the only small logit, p_y == 0
    z[3, ::2] = 1e4                          # row 3: ties at the max, target among them
    z[4] = torch.linspace(-1e4, 1e4, c)      # row 4: a wide spread
    z[5] = 0.0                               # row 5: uniform
    logits, target = z.to(dtype).to(DEVICE), y.to(DEVICE)
    singles = [tuple(float(i == k) for i in range(4)) for k in range(4)]
    for w in singles + [FUSED]:
        loss, grad = check_core(logits, target, w, resident_max_c=resident_max_c, what="extreme")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ice, _ = K.row_losses_fwd(logits, target, (0.0, 1.0, 0.0, 0.0), 1.0, IGNORE, resident_max_c=resident_max_c)
    zz = logits.double().cpu()
    assert ice[0].item() == pytest.approx(zz[0, 0].item() - zz[0, 1].item() - math.log(c - 1), rel=1e-6)
    assert ice[2].item() == 0.0


def test_ignore_index():
    """A custom ignore_index, and rows that are all ignored: zero loss and zero gradient."""
    logits, y = make(8, 50, seed=6, ignore_every=0)
    y[::2] = -1
    loss, grad = check_core(logits, y, FUSED, ignore_index=-1, what="ignore_index=-1")
    assert (loss[::2] == 0).all() and (grad[::2] == 0).all()
    y_all = torch.full_like(y, IGNORE)
    loss, grad = check_core(logits, y_all, FUSED, what="all ignored")
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("shape,resident_max_c", [((5, 10), K.RESIDENT_MAX_C), ((5, 3000), 1024)])
def test_out_of_range_targets_give_nan_rows(shape, resident_max_c):
    """A target outside [0, C) (not ignore_index) is never used as an index: NaN loss, stats and grad."""
    logits, _ = make(*shape, seed=8)
    c = shape[1]
    y = torch.tensor([0, c, IGNORE, -3, c - 1], device=DEVICE)
    good = torch.tensor([True, False, True, False, True], device=DEVICE)
    loss, stats = K.row_losses_fwd(logits, y, FUSED, 1.0, IGNORE, resident_max_c=resident_max_c)
    grad = K.row_losses_bwd(torch.ones_like(loss), logits, y, stats, FUSED, 1.0, IGNORE,
                            resident_max_c=resident_max_c)
    assert loss[~good].isnan().all() and stats[~good].isnan().all() and grad[~good].isnan().all()
    want, want_stats = R.row_losses_forward(logits, torch.where(good, y, IGNORE), FUSED)
    want_grad = R.row_losses_backward(torch.ones_like(want), logits, torch.where(good, y, IGNORE), want_stats, FUSED)
    torch.testing.assert_close(loss[good], want[good])
    torch.testing.assert_close(grad[good], want_grad[good])


def test_errors():
    logits, y = make(4, 9)
    with pytest.raises(ValueError, match="need a target"):
        K.row_losses_fwd(logits, None, (1.0, 0.0, 0.0, 0.0), 1.0, IGNORE)
    with pytest.raises(ValueError, match="2-D"):
        K.row_losses_fwd(logits[None], y, FUSED, 1.0, IGNORE)
    with pytest.raises(ValueError, match="dtype"):
        K.row_losses_fwd(logits.to(torch.int32), y, FUSED, 1.0, IGNORE)
    with pytest.raises(ValueError, match="shape"):
        K.row_losses_fwd(logits, y[:3], FUSED, 1.0, IGNORE)


# ------------------------------------------------------------------------------------------------
# Fused inner optimiser step
# ------------------------------------------------------------------------------------------------
def _buffers(numel, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(numel, generator=g, dtype=torch.float64) * s for s in (1.0, 1.0, 0.1)]
    raw.append(torch.rand(numel, generator=g, dtype=torch.float64) * 0.01)
    return [t.to(dtype).to(DEVICE) for t in raw]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("weight_decay,zero_grad", [(0.0, False), (0.01, True)])
def test_inner_step(kind, dtype, weight_decay, zero_grad):
    numel = 3001   # three full blocks and a ragged tail
    fast = _buffers(numel, dtype, seed=kind)
    ref = [t.clone() for t in fast]
    gold = [t.double() for t in fast]
    untouched = [t.clone() for t in fast]
    args = (kind, 1e-2, 0.9, 0.999, 1e-8, weight_decay, 3, zero_grad)
    K.inner_step_(*fast, *args)
    ref_inner_step(*ref, *args)
    ref_inner_step(*gold, *args)
    for name, f, r, g, u in zip(("param", "grad", "exp_avg", "exp_avg_sq"), fast, ref, gold, untouched):
        if (name == "exp_avg" and kind == 0) or (name == "exp_avg_sq" and kind != 2):
            assert torch.equal(f, u), f"{name} must not be touched by kind {kind}"
        elif name == "grad":
            assert torch.equal(f, torch.zeros_like(f) if zero_grad else u)
        else:
            assert_parity(f, r, g, f"inner step kind={kind} {dtype} {name}")


def test_inner_step_errors():
    p, g, m, v = _buffers(10, torch.float32, 0)
    with pytest.raises(ValueError, match="kind"):
        K.inner_step_(p, g, m, v, 3, 1e-2, 0.9, 0.999, 1e-8, 0.0, 1, False)
    with pytest.raises(ValueError, match="step"):
        K.inner_step_(p, g, m, v, 2, 1e-2, 0.9, 0.999, 1e-8, 0.0, 0, False)
    with pytest.raises(ValueError, match="exp_avg"):
        K.inner_step_(p, g, m[:5], v, 1, 1e-2, 0.9, 0.999, 1e-8, 0.0, 1, False)


# ------------------------------------------------------------------------------------------------
# Op level: the public functions with the Triton backend against the reference backend
# ------------------------------------------------------------------------------------------------
from op_cases import OPS, linear_loss_results, value_and_grad  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(OPS))
def test_functional_triton_backend(name, dtype):
    logits, y = make(11, 300, dtype=dtype, seed=7)
    fn = OPS[name]
    val, grad = value_and_grad("triton", fn, logits, y)
    val_r, grad_r = value_and_grad("reference", fn, logits, y)
    val_g, grad_g = value_and_grad("reference", fn, logits.double(), y)
    assert_parity(val, val_r, val_g, f"{name} value")
    assert_parity(grad, grad_r, grad_g, f"{name} grad")


def test_functional_matches_textbook():
    """Through the Triton backend, the public losses equal the textbook formulas of the reference."""
    logits, y = make(11, 300, dtype=torch.float64, seed=8)
    with sophon_fast.use_backend("triton"):
        got = {k: OPS[k](logits, y) for k in ("ice", "ice_reference_code", "klu", "neg_entropy")}
    want = {"ice": R.inverse_cross_entropy(logits, y), "klu": R.kl_uniform(logits),
            "ice_reference_code": R.inverse_cross_entropy(logits, y, variant="reference_code"),
            "neg_entropy": R.neg_entropy(logits)}
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_inner_step_op_triton_backend(kind):
    fast = _buffers(777, torch.float32, seed=9)
    ref = [t.clone() for t in fast]
    gold = [t.double() for t in fast]
    args = (kind, 1e-3, 0.9, 0.99, 1e-8, 0.1, 2, True)
    with sophon_fast.use_backend("triton"):
        torch.ops.sophon_fast.inner_step_(*fast, *args)
    with sophon_fast.use_backend("reference"):
        torch.ops.sophon_fast.inner_step_(*ref, *args)
        torch.ops.sophon_fast.inner_step_(*gold, *args)
    for name, f, r, g in zip(("param", "grad", "exp_avg", "exp_avg_sq"), fast, ref, gold):
        assert_parity(f, r, g, f"inner_step_ op kind={kind} {name}")


# ------------------------------------------------------------------------------------------------
# Fused linear + suppression loss through the Triton row kernels (small grids)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", ["ice", "klu", "ce", "neg_entropy"])
def test_linear_suppression_loss_triton_backend(loss, dtype):
    """Odd sizes, ignored rows, a bias and chunks that do not divide N, against the materialised fp64
    textbook composite (reference backend in the same dtype as the baseline)."""
    got, baseline, gold = linear_loss_results("triton", DEVICE, loss, dtype, 13, 7, 37, 5, 11, 3)
    for name, out, base_out, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, baseline, gold):
        assert out.dtype == dtype
        tolerances.assert_parity(out, base_out, want, dtype, f"triton linear {loss} {dtype} {name}",
                                 "value" if name == "loss" else "grad")


# ------------------------------------------------------------------------------------------------
# Per-row mean of squares (diffusion DoS / negated MSE)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (3, 2500)], ids=str)
@pytest.mark.parametrize("with_y", [False, True])
def test_row_sq_mean(shape, dtype, with_y):
    from sophon_fast.reference.sq_mean import row_sq_mean as spec

    g = torch.Generator().manual_seed(12)
    x, y = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE) for _ in range(2))
    y = y if with_y else None
    got = K.row_sq_mean(x, y)
    assert_parity(got, spec(x, y), spec(x.double(), None if y is None else y.double()),
                  f"row_sq_mean {shape} {dtype} y={with_y}")


def test_diffusion_losses_triton_backend():
    from sophon_fast.reference import sq_mean as SQ

    g = torch.Generator().manual_seed(13)
    pred, target = (torch.randn(3, 4, 9, generator=g).to(DEVICE) for _ in range(2))
    for fast, textbook in ((lambda p, t: sophon_fast.functional.denial_of_service(p), SQ.denial_of_service),
                           (lambda p, t: sophon_fast.functional.negated_mse(p, t), SQ.negated_mse)):
        p = pred.clone().requires_grad_(True)
        with sophon_fast.use_backend("triton"):
            out = fast(p, target)
        grad, = torch.autograd.grad(out, p)
        q = pred.clone().requires_grad_(True)
        want = textbook(q, target) if textbook is SQ.negated_mse else textbook(q)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(grad, torch.autograd.grad(want, q)[0])
