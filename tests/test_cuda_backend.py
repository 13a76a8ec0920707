"""Op-level parity of the CUDA backend (csrc/cuda/*.cu through sophon_fast._C) against the reference.

Runs only on a machine with a CUDA device and an extension built with the CUDA sources:

    .venv/bin/python -m pytest tests/test_cuda_backend.py -q

Launch paths covered: a warp per row (C <= 1024), 256-thread rows (C <= 16384), 1024-thread rows
(longer), 128-bit and scalar loads (aligned and unaligned rows), the inner step's vector body and tail.
Same rule as tests/test_triton_kernels.py: max error against an fp64 gold at most twice the
reference's own error in that dtype, plus a floor of a few output ulps.
"""
import itertools

import pytest
import torch
import tolerances

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA backend cannot run here", allow_module_level=True)

import sophon_fast  # noqa: E402
from sophon_fast import _backend  # noqa: E402
from sophon_fast import functional as F  # noqa: E402
from sophon_fast.reference import losses as R  # noqa: E402
from sophon_fast.reference.inner_step import inner_step_ as ref_inner_step  # noqa: E402

_probe = _backend.probe("cuda")
if not _probe.usable.get("cuda"):
    pytest.skip(f"CUDA backend unusable: {_probe.reason.get('cuda')}", allow_module_level=True)

DEV = "cuda"
IGNORE = R.IGNORE_INDEX
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BASE_W = (0.5, 1.0, 0.25, 2.0)
COMBOS = [tuple(BASE_W[i] if bits[i] else 0.0 for i in range(4))
          for bits in itertools.product((0, 1), repeat=4) if any(bits)]
FUSED = BASE_W


def assert_parity(fast, ref, gold, what):
    """The one parity rule (tests/tolerances.py)."""
    assert fast.dtype == ref.dtype, f"{what}: {fast.dtype} vs {ref.dtype}"
    tolerances.assert_parity(fast, ref, gold, fast.dtype, what)


def make(n, c, dtype=torch.float32, seed=0, target=True, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * spread).to(dtype).to(DEV)
    if not target:
        return logits, None
    y = torch.randint(0, c, (n,), generator=g)
    if n > 1:
        y[1::3] = IGNORE
    return logits, y.to(DEV)


def check_core(logits, target, weights, scale=1.0, ignore_index=IGNORE, what=""):
    """torch.ops.sophon_fast.row_losses(+_backward) on the CUDA backend vs the reference and fp64 gold."""
    w = [float(x) for x in weights]
    with sophon_fast.use_backend("cuda"):
        loss, stats = torch.ops.sophon_fast.row_losses(logits, target, w, scale, ignore_index)
    loss_r, stats_r = R.row_losses_forward(logits, target, w, scale, ignore_index)
    loss_g, stats_g = R.row_losses_forward(logits.double(), target, w, scale, ignore_index)
    what = f"{what} {tuple(logits.shape)} {logits.dtype} w={w} scale={scale}"
    assert_parity(loss, loss_r, loss_g, f"loss {what}")
    # stats[:, 2] (NEGENT) is only defined with the NEGENT term (the spec: a kernel may skip its accumulation)
    cols = 3 if w[3] else 2
    assert_parity(stats[:, :cols], stats_r[:, :cols], stats_g[:, :cols], f"stats {what}")
    gl = torch.linspace(-1.5, 2.0, logits.shape[0], dtype=torch.float64, device=DEV)
    with sophon_fast.use_backend("cuda"):
        grad = torch.ops.sophon_fast.row_losses_backward(gl.to(loss.dtype), logits, target, stats, w, scale,
                                                         ignore_index)
    grad_r = R.row_losses_backward(gl.to(loss_r.dtype), logits, target, stats_r, w, scale, ignore_index)
    grad_g = R.row_losses_backward(gl, logits.double(), target, stats_g, w, scale, ignore_index)
    assert_parity(grad, grad_r, grad_g, f"grad {what}")
    return loss, grad


SHAPES = [(1, 2), (7, 10), (33, 1000), (5, 1024), (3, 1025), (4, 5000), (3, 16384), (2, 16385), (2, 70000),
          (2, 262144)]


@pytest.mark.parametrize("weights", COMBOS)
def test_weight_combos(weights):
    for shape in ((37, 100), (4, 5000), (2, 40000)):
        check_core(*make(*shape), weights)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{c}" for n, c in SHAPES])
def test_shapes_dtypes(shape, dtype):
    check_core(*make(*shape, dtype=dtype, seed=1), FUSED)
    check_core(*make(*shape, dtype=dtype, seed=2, target=False), (0.0, 0.0, 1.0, 0.5))


@pytest.mark.parametrize("shape", [(33, 1000), (3, 5000), (2, 70000)])
def test_scale_minus_one(shape):
    check_core(*make(*shape, seed=3), (1.0, 0.0, 0.0, 0.0), scale=-1.0)
    check_core(*make(*shape, seed=3), FUSED, scale=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unaligned_rows(dtype):
    """Odd row strides and offsets take the scalar-load path; an aligned wide buffer the vector path."""
    base, _ = make(9, 3001, dtype=dtype, seed=4)
    _, y = make(9, 2999, seed=4)
    check_core(base[:, 1:3000], y, FUSED, what="offset 1, stride 3001")
    check_core(base[:, :2999], y, FUSED, what="stride 3001")
    _, y8 = make(9, 1000, seed=5)
    check_core(make(9, 1024, dtype=dtype, seed=5)[0][:, :1000], y8, FUSED, what="aligned stride 1024")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [37, 3000, 20000])
def test_extreme_logits(dtype, c):
    n = 4
    z = torch.full((n, c), -1e4, dtype=torch.float64)
    y = torch.tensor([0, c - 1, 5, 8])
    z[0, 0] = z[1, c - 1] = 1e4           # p_y == 1 in fp32: ICE stays finite
    z[2] = 1e4
    z[2, 5] = -1e4                        # p_y == 0
    z[3, ::2] = 1e4                       # ties at the max
    for w in [(1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 1.0), FUSED]:
        loss, grad = check_core(z.to(dtype).to(DEV), y.to(DEV), w, what="extreme")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_ignore_index_rows():
    logits, y = make(8, 3000, seed=6)
    y = torch.where(y == IGNORE, 0, y)
    y[::2] = -1
    loss, grad = check_core(logits, y, FUSED, ignore_index=-1)
    assert (loss[::2] == 0).all() and (grad[::2] == 0).all()


@pytest.mark.parametrize("c", [37, 3000, 20000])
def test_out_of_range_targets_give_nan_rows(c):
    """A target outside [0, C) (not ignore_index) is never used as an index: NaN loss, stats and grad."""
    logits, _ = make(5, c, seed=8)
    y = torch.tensor([0, c, IGNORE, -3, c - 1], device=DEV)
    good = torch.tensor([True, False, True, False, True], device=DEV)
    with sophon_fast.use_backend("cuda"):
        loss, stats = torch.ops.sophon_fast.row_losses(logits, y, list(FUSED), 1.0, IGNORE)
        grad = torch.ops.sophon_fast.row_losses_backward(torch.ones_like(loss), logits, y, stats, list(FUSED), 1.0,
                                                         IGNORE)
    assert loss[~good].isnan().all() and stats[~good].isnan().all() and grad[~good].isnan().all()
    want, want_stats = R.row_losses_forward(logits, torch.where(good, y, IGNORE), FUSED)
    want_grad = R.row_losses_backward(torch.ones_like(want), logits, torch.where(good, y, IGNORE), want_stats, FUSED)
    torch.testing.assert_close(loss[good], want[good])
    torch.testing.assert_close(grad[good], want_grad[good])


from op_cases import OPS, linear_loss_results, value_and_grad  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(OPS))
def test_functional_cuda_backend(name, dtype):
    logits, y = make(64, 3000, dtype=dtype, seed=7)
    fn = OPS[name]
    val, grad = value_and_grad("cuda", fn, logits, y)
    val_r, grad_r = value_and_grad("reference", fn, logits, y)
    val_g, grad_g = value_and_grad("reference", fn, logits.double(), y)
    assert_parity(val, val_r, val_g, f"{name} value")
    assert_parity(grad, grad_r, grad_g, f"{name} grad")


def _buffers(numel, dtype, seed, offset=0):
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(numel + offset, generator=g, dtype=torch.float64) * s for s in (1.0, 1.0, 0.1)]
    raw.append(torch.rand(numel + offset, generator=g, dtype=torch.float64) * 0.01)
    return [t.to(dtype).to(DEV)[offset:] for t in raw]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("numel,offset", [(1, 0), (3001, 0), (1 << 20, 0), (4099, 1)])
def test_inner_step(kind, dtype, numel, offset):
    fast = _buffers(numel, dtype, seed=kind, offset=offset)
    for weight_decay, zero_grad in ((0.0, False), (0.01, True)):
        ref = [t.clone() for t in fast]
        gold = [t.double() for t in fast]
        untouched = [t.clone() for t in fast]
        args = (kind, 1e-2, 0.9, 0.999, 1e-8, weight_decay, 3, zero_grad)
        with sophon_fast.use_backend("cuda"):
            torch.ops.sophon_fast.inner_step_(*fast, *args)
        ref_inner_step(*ref, *args)
        ref_inner_step(*gold, *args)
        for name, f, r, g, u in zip(("param", "grad", "exp_avg", "exp_avg_sq"), fast, ref, gold, untouched):
            if (name == "exp_avg" and kind == 0) or (name == "exp_avg_sq" and kind != 2):
                assert torch.equal(f, u), f"{name} must not be touched by kind {kind}"
            elif name == "grad":
                assert torch.equal(f, torch.zeros_like(f) if zero_grad else u)
            else:
                assert_parity(f, r, g, f"inner step kind={kind} {dtype} numel={numel} offset={offset} {name}")
        for f, u in zip(fast, untouched):   # restore in place: keeps the (mis)alignment under test
            f.copy_(u)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 37, 5000])
def test_row_sq_mean_cuda(dtype, d):
    from sophon_fast.reference.sq_mean import row_sq_mean as spec

    g = torch.Generator().manual_seed(14)
    x, y = (torch.randn(6, d, generator=g, dtype=torch.float64).to(dtype).to(DEV) for _ in range(2))
    for target in (None, y):
        with sophon_fast.use_backend("cuda"):
            got = torch.ops.sophon_fast.row_sq_mean(x, target)
        gold = spec(x.double(), None if target is None else target.double())
        assert_parity(got, spec(x, target), gold, f"row_sq_mean cuda d={d} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["ice", "klu", "ce", "neg_entropy"])
def test_linear_suppression_loss_cuda(loss, dtype):
    """The chunk loop over the CUDA row kernels vs the materialised fp64 textbook composite."""
    got, baseline, gold = linear_loss_results("cuda", DEV, loss, dtype, 37, 19, 1031, 8, 15, 4)
    for name, out, base_out, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, baseline, gold):
        tolerances.assert_parity(out, base_out, want, dtype, f"cuda linear {loss} {dtype} {name}",
                                 "value" if name == "loss" else "grad")


# ------------------------------------------------------------------------------------------------
# Issue 37: the lean path (_cpp_fused_loss on CUDA: reduction kernel, device-side target check), the in-place
# backward of the fused linear loss, the capturable inner step under CUDA-graph capture
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("c", [10, 1000, 20000])
def test_lean_path_cuda(c, reduction, dtype):
    logits, y = make(37, c, dtype)
    z = logits.clone().requires_grad_(True)
    kw = dict(ce=0.5, ice=1.0, klu=0.25, negent=2.0, reduction=reduction)
    with sophon_fast.use_backend("cuda"):
        out = F.fused_loss(z, y, **kw)
        assert type(out.grad_fn).__name__ == "CppFunction"
        grad, = torch.autograd.grad(out.sum(), z)
    with sophon_fast.use_backend("reference"):
        zr = logits.clone().requires_grad_(True)
        ref = F.fused_loss(zr, y, **kw)
        ref_grad, = torch.autograd.grad(ref.sum(), zr)
    zg = logits.double().requires_grad_(True)
    with sophon_fast.use_backend("reference"):
        gold = F.fused_loss(zg, y, **kw)
        gold_grad, = torch.autograd.grad(gold.sum(), zg)
    assert_parity(out, ref, gold, f"lean {reduction} {dtype} c={c}")
    tolerances.assert_parity(grad, ref_grad, gold_grad, dtype, f"lean grad {reduction} {dtype} c={c}", "grad")


def test_lean_path_second_derivative_cuda():
    logits, y = make(9, 37, torch.float64)
    outs = []
    for backend in ("cuda", "reference"):
        z = logits.clone().requires_grad_(True)
        with sophon_fast.use_backend(backend):
            g, = torch.autograd.grad(F.cross_entropy(z, y), z, create_graph=True)
            h, = torch.autograd.grad((g * g).sum(), z)
        outs.append(h)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


def test_lean_path_bad_target_fails_the_device_assertion():
    """As torch._assert_async on CUDA: the error surfaces at the next sync; it is sticky, so this runs in a child
    process (the device is unusable after it)."""
    import subprocess
    import sys
    code = ("import torch, sophon_fast; from sophon_fast import functional as F\n"
            "z = torch.randn(4, 5, device='cuda'); y = torch.tensor([0, 1, 9, -100], device='cuda')\n"
            "with sophon_fast.use_backend('cuda'):\n    F.cross_entropy(z, y)\ntorch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and ("assert" in proc.stderr.lower() or "out of range" in proc.stderr), proc.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("c", [7, 1000, 4099, 20000])
def test_in_place_row_backward_cuda(c, dtype):
    logits, y = make(11, c, dtype)
    w = [0.5, 1.0, 0.25, 2.0]
    _, stats = torch.ops.sophon_fast._cpp_row_losses_fwd(logits, y, w, 1.0, IGNORE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gl = torch.linspace(-1.0, 2.0, 11, device=DEV, dtype=acc)
    want = torch.ops.sophon_fast._cpp_row_losses_bwd(gl, logits, y, stats, w, 1.0, IGNORE)
    buf = logits.clone()
    torch.ops.sophon_fast._cpp_row_losses_bwd_(gl, buf, y, stats, w, 1.0, IGNORE)
    assert torch.equal(buf, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_capturable_inner_step_graph_replay_equals_eager(dtype):
    n = 100_003
    g = torch.Generator(DEV).manual_seed(0)
    p0 = torch.randn(n, generator=g, device=DEV).to(dtype)
    grad = (torch.randn(n, generator=g, device=DEV) * 1e-2).to(dtype)
    args = (2, 1e-3, 0.9, 0.999, 1e-8, 0.01, False)

    def fresh():
        return p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), torch.zeros((), dtype=torch.long, device=DEV)
    with sophon_fast.use_backend("cuda"):
        pe, me, ve, _ = fresh()
        for t in range(1, 6):   # today's host step
            torch.ops.sophon_fast.inner_step_(pe, grad, me, ve, *args[:6], t, False)
        pg, mg, vg, sg = fresh()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            torch.ops.sophon_fast.inner_step_capturable_(pg, grad, mg, vg, sg, *args)   # warm-up
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=s):
                torch.ops.sophon_fast.inner_step_capturable_(pg, grad, mg, vg, sg, *args)
        torch.cuda.current_stream().wait_stream(s)
        pg.copy_(p0)
        mg.zero_()
        vg.zero_()
        sg.zero_()
        for _ in range(5):
            graph.replay()
    torch.cuda.synchronize()
    assert int(sg) == 5
    # the bias corrections come from the device's pow here and the host's there (an ulp of fp64 apart at most)
    tol = dict(rtol=1e-14, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for a, b in ((pg, pe), (mg, me), (vg, ve)):
        torch.testing.assert_close(a, b, **tol)
