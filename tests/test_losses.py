"""Op-level tests of the public losses (sophon_fast.functional) and the inner optimiser step on every
backend usable on CPU: the reference and, when the extension is built, cpp (Triton:
tests/test_triton_kernels.py).

Parity rule (tests/tolerances.py): a backend's error against an fp64 gold (the reference backend on
fp64-upcast inputs) is at most twice the reference backend's own error in that dtype, plus a floor.
"""
import functools
import itertools

import pytest
import torch

import sophon_fast
from sophon_fast import _backend
from sophon_fast import functional as F
from sophon_fast.reference import losses as R
from sophon_fast.reference.inner_step import KINDS
from sophon_fast.reference.inner_step import inner_step_ as spec_inner_step
from tolerances import FLOOR, assert_parity, max_err

BACKENDS = [b for b in ("cpp", "reference") if _backend.probe(b).usable["cpu"]]
IGNORE = R.IGNORE_INDEX
REDUCTIONS = ("mean", "sum", "none")
FUNCS = {
    "ice_paper": lambda z, y, r: F.inverse_cross_entropy(z, y, variant="paper", reduction=r),
    "ice_reference_code": lambda z, y, r: F.inverse_cross_entropy(z, y, variant="reference_code", reduction=r),
    "kl_uniform": lambda z, y, r: F.kl_uniform(z, reduction=r),
    "neg_entropy": lambda z, y, r: F.neg_entropy(z, reduction=r),
    "cross_entropy": lambda z, y, r: F.cross_entropy(z, y, reduction=r),
    "fused": lambda z, y, r: F.fused_loss(z, y, ce=0.5, ice=1.0, klu=0.25, negent=2.0, scale=1.5, reduction=r),
    "fused_no_target": lambda z, y, r: F.fused_loss(z, None, klu=1.0, negent=0.5, scale=-0.75, reduction=r),
}
SHAPES = {
    torch.float32: [(1, 2), (7, 10), (33, 1000), (5, 32001), (3, 262144)],
    torch.float16: [(1, 2), (7, 10), (33, 1000), (5, 32001)],
    torch.bfloat16: [(7, 10), (33, 1000), (3, 262144)],
}
CASES = [(d, s) for d, shapes in SHAPES.items() for s in shapes]
# Layouts of (N, C) logits built from a base tensor: (base shape, view).
LAYOUTS = {
    "contiguous": (lambda n, c: (n, c), lambda b, n, c: b),
    "column_slice": (lambda n, c: (n, c + 5), lambda b, n, c: b[:, 2:2 + c]),               # row stride C + 5
    "transposed_slice": (lambda n, c: (c, n + 2), lambda b, n, c: b.t()[1:1 + n]),         # class stride != 1
    "expanded": (lambda n, c: (1, c), lambda b, n, c: b.expand(n, c)),                     # row stride 0
}


def _targets(n, c, seed):
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed + 1))
    if n >= 3:
        y[1::3] = IGNORE
    return y


def _base(shape, dtype, seed):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def _run(fn, base, view, y, reduction, backend, cot):
    """(loss, d loss / d base . cot) of fn(view(base)) on one backend."""
    base = base.detach().requires_grad_(True)
    with sophon_fast.use_backend(backend):
        out = fn(view(base), y, reduction)
        grad, = torch.autograd.grad(out, base, cot.to(out.dtype))
    return out.detach(), grad


@functools.lru_cache(maxsize=4)
def _gold_and_baseline(func, reduction, dtype, shape, layout, seed=0):
    n, c = shape
    base_shape, view = LAYOUTS[layout]
    base = _base(base_shape(n, c), dtype, seed)
    y = _targets(n, c, seed)
    cot = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)) if reduction == "none" else torch.tensor(1.0)
    cot = cot.to(dtype)
    v = functools.partial(view, n=n, c=c)
    gold = _run(FUNCS[func], base.double(), v, y, reduction, "reference", cot.double())
    baseline = _run(FUNCS[func], base, v, y, reduction, "reference", cot)
    return base, v, y, cot, gold, baseline


def _check_parity(backend, func, reduction, dtype, shape, layout):
    base, view, y, cot, gold, baseline = _gold_and_baseline(func, reduction, dtype, shape, layout)
    out, grad = _run(FUNCS[func], base, view, y, reduction, backend, cot)
    assert out.dtype == dtype and grad.dtype == dtype
    what = f"{backend} {func} {reduction} {dtype} {shape} {layout}"
    assert_parity(out, baseline[0], gold[0], dtype, what + " value")
    assert_parity(grad, baseline[1], gold[1], dtype, what + " grad", "grad")


# The top decorator varies fastest: backends of one case run back to back and share the cached gold.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,shape", CASES, ids=[f"{str(d)[6:]}-{n}x{c}" for d, (n, c) in CASES])
@pytest.mark.parametrize("func", list(FUNCS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity(backend, reduction, func, dtype, shape):
    _check_parity(backend, func, reduction, dtype, shape, "contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "contiguous"])
@pytest.mark.parametrize("func", list(FUNCS))
def test_parity_non_contiguous(backend, func, layout, dtype):
    for shape in [(7, 10), (5, 3001)]:
        _check_parity(backend, func, "none", dtype, shape, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_finite_and_accurate(backend, dtype):
    """+-1e4 logits and one-hot-like rows where p_y rounds to 1 (ICE paper stays finite and exact)."""
    c = 40
    z = torch.zeros(6, c)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    z[0, 0] = 1e4                       # p_y = 1 even in fp64; ICE = 1e4 - log(C - 1)
    z[1] = -1e4
    z[1, 1] = 1e4                       # the rest at -1e4
    z[2, 2] = 30.0                      # 1 - p_y ~ 4e-12: rounds to 0 in fp32
    z[3] = 1e4
    z[3, 3] = -1e4                      # p_y = 0: ICE = 0, CE = 2e4
    z[4] = 1e4                          # uniform at a large magnitude
    z[5, ::2] = -1e4                    # mixed
    z[5, 1::2] = 1e4
    z = z.to(dtype)
    # fp16: per-row values stay below 65504, batch sums need not
    for func, reduction in itertools.product(FUNCS, ("none",) if dtype == torch.float16 else ("none", "sum")):
        cot = torch.linspace(0.5, 1.5, 6).to(dtype) if reduction == "none" else torch.tensor(1.0, dtype=dtype)
        gold = _run(FUNCS[func], z.double(), lambda b: b, y, reduction, "reference", cot.double())
        baseline = _run(FUNCS[func], z, lambda b: b, y, reduction, "reference", cot)
        out, grad = _run(FUNCS[func], z, lambda b: b, y, reduction, backend, cot)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), f"{backend} {func} {reduction}"
        assert_parity(out, baseline[0], gold[0], dtype, f"{backend} {func} {reduction} extreme value")
        assert_parity(grad, baseline[1], gold[1], dtype, f"{backend} {func} {reduction} extreme grad", "grad")
    with sophon_fast.use_backend(backend):
        ice = F.inverse_cross_entropy(z, y, reduction="none").float()
    want = z[0, 0].float().item() - torch.tensor(c - 1.0).log().item()   # 1e4 rounds to 9984 in bf16
    assert abs(ice[0].item() - want) <= 2 * want * FLOOR[dtype]["value"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    z = torch.randn(4, 9, requires_grad=True)
    y = torch.full((4,), IGNORE)
    with sophon_fast.use_backend(backend):
        for func in ("ice_paper", "ice_reference_code", "cross_entropy", "fused"):
            for reduction in ("sum", "none"):
                out = FUNCS[func](z, y, reduction)
                grad, = torch.autograd.grad(out.sum(), z)
                assert (out == 0).all() and (grad == 0).all(), f"{func} {reduction}"
            # mean over zero rows is NaN, as in torch.nn.functional.cross_entropy; gradients stay 0
            out = FUNCS[func](z, y, "mean")
            grad, = torch.autograd.grad(out, z)
            assert out.isnan() and (grad == 0).all(), func


@pytest.mark.parametrize("backend", BACKENDS)
def test_textbook_formulas_match_functional_fp64(backend):
    z = _base((9, 17), torch.float64, 3).requires_grad_(True)
    y = _targets(9, 17, 3)
    textbook = {
        "ice_paper": lambda z, y, r: R.inverse_cross_entropy(z, y, variant="paper", reduction=r),
        "ice_reference_code": lambda z, y, r: R.inverse_cross_entropy(z, y, variant="reference_code", reduction=r),
        "kl_uniform": lambda z, y, r: R.kl_uniform(z, reduction=r),
        "neg_entropy": lambda z, y, r: R.neg_entropy(z, reduction=r),
        "cross_entropy": lambda z, y, r: R.cross_entropy(z, y, reduction=r),
    }

    def fused_textbook(z, y, r):   # the weights and scale of FUNCS["fused"], rows of ignored targets zeroed
        s = 1.5 * z
        rows = (0.5 * R.cross_entropy(s, y, reduction="none") + R.inverse_cross_entropy(s, y, reduction="none")
                + 0.25 * R.kl_uniform(s, reduction="none") + 2.0 * R.neg_entropy(s, reduction="none"))
        rows = torch.where(y != IGNORE, rows, torch.zeros_like(rows))
        return R._reduce(rows, y != IGNORE, r)
    textbook["fused"] = fused_textbook
    textbook["fused_no_target"] = lambda z, y, r: R._reduce(
        R.kl_uniform(-0.75 * z, reduction="none") + 0.5 * R.neg_entropy(-0.75 * z, reduction="none"),
        torch.ones(z.shape[0], dtype=torch.bool), r)
    for (name, fn), reduction in itertools.product(textbook.items(), REDUCTIONS):
        want = fn(z, y, reduction)
        want_grad, = torch.autograd.grad(want.sum(), z)
        with sophon_fast.use_backend(backend):
            got = FUNCS[name](z, y, reduction)
            got_grad, = torch.autograd.grad(got.sum(), z)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{name} {reduction}")
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12, msg=f"{name} {reduction} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_match_the_textbook_formulas_fp64(backend):
    """Every logits loss is twice differentiable (meta_gradient="unrolled" differentiates through the attacker's
    steps): gradgradcheck, and the Hessian-vector product against the textbook formulas'."""
    z = _base((6, 5), torch.float64, 4).requires_grad_(True)
    y = _targets(6, 5, 4)
    v = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    textbook = {"cross_entropy": lambda z, y: R.cross_entropy(z, y), "kl_uniform": lambda z, y: R.kl_uniform(z),
                "ice_paper": lambda z, y: R.inverse_cross_entropy(z, y, variant="paper"),
                "neg_entropy": lambda z, y: R.neg_entropy(z)}
    for name, fn in textbook.items():
        def hvp(f):
            (g,) = torch.autograd.grad(f(z, y), z, create_graph=True)
            return torch.autograd.grad((g * v).sum(), z)[0]
        with sophon_fast.use_backend(backend):
            got = hvp(lambda z, y: FUNCS[name](z, y, "mean"))
            assert torch.autograd.gradgradcheck(lambda z: FUNCS[name](z, y, "sum"), (z,))
        want = hvp(fn)
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_stay_finite_at_large_logit_gaps(backend):
    """A confident row (a logit gap above ~88, where exp overflows in fp32, e.g. an attacker's model that fits its
    batch) has a finite Hessian-vector product, equal to the closed forms: CE and KLU diag(p) - p p^T, whose
    entries are ~0 here, so the product is ~0. (Computing lse as logaddexp(z_y, lse_x) gave NaN.)"""
    z = torch.zeros(4, 10)
    z[0, 3] = z[1, 3] = 100.0            # rows 0, 1: the target dominates; rows 2, 3: another class does
    z[2, 5] = z[3, 7] = -120.0
    z[2, 0] = z[3, 1] = 100.0
    z.requires_grad_(True)
    y = torch.tensor([3, 3, 4, 2])
    v = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    for name in ("cross_entropy", "kl_uniform", "ice_paper", "neg_entropy"):
        with sophon_fast.use_backend(backend):
            (g,) = torch.autograd.grad(FUNCS[name](z, y, "sum"), z, create_graph=True)
            (hv,) = torch.autograd.grad((g * v).sum(), z)
        assert torch.isfinite(hv).all(), name
        if name in ("cross_entropy", "kl_uniform"):
            p = torch.softmax(z.detach().double(), 1)
            want = p * v.double() - p * (p * v.double()).sum(1, keepdim=True)
            torch.testing.assert_close(hv.double(), want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    z = torch.randn(5, 7, requires_grad=True)
    y = torch.tensor([0, 3, IGNORE, 6, 1])
    with sophon_fast.use_backend(backend):
        for target, w in ((y, [0.5, 1.0, 0.25, 2.0]), (None, [0.0, 0.0, 1.0, 0.5])):
            torch.library.opcheck(torch.ops.sophon_fast.row_losses.default, (z, target, w, 1.5, IGNORE))
            _, stats = torch.ops.sophon_fast.row_losses(z.detach(), target, w, 1.5, IGNORE)
            torch.library.opcheck(torch.ops.sophon_fast.row_losses_backward.default,
                                  (torch.randn(5), z.detach(), target, stats, w, 1.5, IGNORE))
        p, g, m, v = (torch.randn(37) for _ in range(4))
        torch.library.opcheck(torch.ops.sophon_fast.inner_step_.default,
                              (p, g, m, v.abs(), KINDS["adam"], 1e-2, 0.9, 0.99, 1e-8, 0.01, 3, True))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("func", list(FUNCS))
def test_fullgraph_compile_of_every_public_loss(func, compile_backend):
    """No host sync in the hot path: each public loss (with targets) compiles with fullgraph=True."""
    torch._dynamo.reset()
    z = _base((6, 11), torch.float32, 4).requires_grad_(True)
    y = torch.tensor([0, 3, IGNORE, 10, 1, 5])

    def f(z, y):
        return FUNCS[func](z, y, "mean")

    want = f(z, y)
    want_grad, = torch.autograd.grad(want, z)
    got = torch.compile(f, backend=compile_backend, fullgraph=True)(z, y)
    got_grad, = torch.autograd.grad(got, z)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend, compile_backend):
    torch._dynamo.reset()

    def f(z):
        return F.kl_uniform(2.0 * z, reduction="sum") + F.neg_entropy(z)

    z = torch.randn(6, 11, requires_grad=True)
    with sophon_fast.use_backend(backend):
        want = f(z)
        want_grad, = torch.autograd.grad(want, z)
        got = torch.compile(f, backend=compile_backend, fullgraph=True)(z)
        got_grad, = torch.autograd.grad(got, z)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


_z, _y = torch.randn(3, 4), torch.tensor([0, 1, 2])
BAD_INPUTS = {
    "1-D logits": lambda: F.kl_uniform(torch.randn(5)),
    "3-D logits": lambda: F.kl_uniform(torch.randn(2, 3, 4)),
    "N = 0": lambda: F.kl_uniform(torch.randn(0, 4)),
    "C = 1": lambda: F.cross_entropy(torch.randn(3, 1), torch.zeros(3, dtype=torch.long)),
    "integer logits": lambda: F.kl_uniform(torch.ones(2, 3, dtype=torch.long)),
    "target wrong shape": lambda: F.cross_entropy(_z, torch.tensor([0, 1])),
    "float target": lambda: F.cross_entropy(_z, torch.tensor([0.0, 1.0, 2.0])),
    "bad reduction": lambda: F.kl_uniform(_z, reduction="avg"),
    "bad variant": lambda: F.inverse_cross_entropy(_z, _y, variant="textbook"),
    "ce without target": lambda: F.fused_loss(_z, None, ce=1.0),
    "ice without target": lambda: F.fused_loss(_z, None, ice=1.0),
    "unknown suppression loss": lambda: F.suppression_loss("entropy", _z, _y),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_value_error(backend, case):
    with sophon_fast.use_backend(backend), pytest.raises(ValueError):
        BAD_INPUTS[case]()


BAD_TARGETS = {
    "target out of range": lambda: F.cross_entropy(_z, torch.tensor([0, 4, 1])),
    "negative target": lambda: F.inverse_cross_entropy(_z, torch.tensor([0, -1, 1])),
    "fused, ignore_index elsewhere": lambda: F.fused_loss(_z, torch.tensor([0, IGNORE, 3]), ice=1.0, ignore_index=-1),
}


@pytest.fixture
def checked_targets():
    F.set_target_checks(True)
    yield
    F.set_target_checks(False)


@pytest.mark.parametrize("case", list(BAD_TARGETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_target_raises_value_error_in_checked_mode(backend, case, checked_targets):
    with sophon_fast.use_backend(backend), pytest.raises(ValueError, match="out of range"):
        BAD_TARGETS[case]()


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_bad_target_fails_the_async_assertion_by_default(case):
    """Default mode: torch._assert_async (immediate on CPU tensors, at the next sync on CUDA)."""
    with pytest.raises(RuntimeError, match="out of range"):
        BAD_TARGETS[case]()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_turn_out_of_range_targets_into_nan_rows(backend):
    """Below the front end (no range assertion) no backend reads through a bad target: its row is NaN,
    the other rows are exact."""
    z = _base((5, 7), torch.float32, 5)
    y = torch.tensor([0, 7, IGNORE, -3, 6])
    good = torch.tensor([True, False, True, False, True])
    w = [0.5, 1.0, 0.25, 2.0]
    with sophon_fast.use_backend(backend):
        loss, stats = torch.ops.sophon_fast.row_losses(z, y, w, 1.0, IGNORE)
        grad = torch.ops.sophon_fast.row_losses_backward(torch.ones(5), z, y, stats, w, 1.0, IGNORE)
    want, want_stats = R.row_losses_forward(z, torch.where(good, y, IGNORE), w)
    want_grad = R.row_losses_backward(torch.ones(5), z, torch.where(good, y, IGNORE), want_stats, w)
    assert loss[~good].isnan().all() and grad[~good].isnan().all() and stats[~good].isnan().all()
    torch.testing.assert_close(loss[good], want[good])
    torch.testing.assert_close(grad[good], want_grad[good])


def _stats():
    return torch.ops.sophon_fast._cpp_row_losses_fwd(_z, _y, [1.0, 0.0, 0.0, 0.0], 1.0, IGNORE)[1]


# Direct calls into the C++ ops with arguments the Python layer would never pass: memory-safety guards.
BAD_CPP_CALLS = {
    "int32 target": lambda C: C._cpp_row_losses_fwd(_z, _y.int(), [1.0, 0, 0, 0], 1.0, IGNORE),
    "three weights": lambda C: C._cpp_row_losses_fwd(_z, _y, [1.0, 0, 0], 1.0, IGNORE),
    "ce without target": lambda C: C._cpp_row_losses_fwd(_z, None, [1.0, 0, 0, 0], 1.0, IGNORE),
    "class stride": lambda C: C._cpp_row_losses_fwd(torch.randn(4, 3).t(), _y, [1.0, 0, 0, 0], 1.0, IGNORE),
    "stats shape": lambda C: C._cpp_row_losses_bwd(torch.ones(3), _z, _y, _stats()[:, :2].contiguous(),
                                                   [1.0, 0, 0, 0], 1.0, IGNORE),
    "grad_loss dtype": lambda C: C._cpp_row_losses_bwd(torch.ones(3, dtype=torch.float64), _z, _y, _stats(),
                                                       [1.0, 0, 0, 0], 1.0, IGNORE),
    "step kind": lambda C: C._cpp_inner_step_(_z, _z, _z, _z, 7, 0.1, 0.9, 0.99, 1e-8, 0.0, 1, False),
    "step buffer shape": lambda C: C._cpp_inner_step_(_z, _z[:2], _z, _z, 0, 0.1, 0.9, 0.99, 1e-8, 0.0, 1, False),
}


@pytest.mark.skipif("cpp" not in BACKENDS, reason="extension not built")
@pytest.mark.parametrize("case", list(BAD_CPP_CALLS))
def test_cpp_ops_reject_bad_arguments(case):
    with pytest.raises(ValueError):
        BAD_CPP_CALLS[case](torch.ops.sophon_fast)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="extension not built")
def test_cpp_kernels_are_dispatcher_ops():
    """TORCH_LIBRARY_IMPL registration: CPU kernels in the dispatcher, fake kernels for tracing."""
    w = [0.5, 1.0, 0.25, 2.0]
    torch.library.opcheck(torch.ops.sophon_fast._cpp_row_losses_fwd.default, (_z, _y, w, 1.5, IGNORE),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.sophon_fast._cpp_row_losses_bwd.default,
                          (torch.ones(3), _z, _y, _stats(), w, 1.5, IGNORE),
                          test_utils=("test_schema", "test_faketensor"))
    p, g, m, v = (torch.randn(37) for _ in range(4))
    torch.library.opcheck(torch.ops.sophon_fast._cpp_inner_step_.default,
                          (p, g, m, v.abs(), KINDS["adam"], 1e-2, 0.9, 0.99, 1e-8, 0.01, 3, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_backend_choice_is_cached_per_op_device_dtype(monkeypatch):
    calls = []
    choose = _backend._choose
    monkeypatch.setattr(_backend, "_choose", lambda op, dev: calls.append((op, dev)) or choose(op, dev))
    monkeypatch.setattr(_backend, "_chosen", {})   # start from an empty cache
    z, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        F.cross_entropy(z, y)
        F.cross_entropy(z.double(), y)
    assert sorted(calls) == [("row_losses_fwd", "cpu")] * 2, calls
    with sophon_fast.use_backend("reference"):   # forcing a backend drops the cache
        F.cross_entropy(z, y)
        assert _backend.selected_name("cpu") == "reference"
    F.cross_entropy(z, y)   # leaving it drops the cache again: one new choice
    calls.clear()
    monkeypatch.setenv("SOPHON_FAST_BACKEND", "reference")   # the environment is read once, at import ...
    F.cross_entropy(z, y)
    assert calls == [] and _backend.selected_name("cpu", dtype=torch.float32) != "reference"
    _backend.reload_environment()                            # ... or when asked to
    F.cross_entropy(z, y)
    assert calls == [("row_losses_fwd", "cpu")] and _backend.selected_name("cpu", dtype=torch.float32) == "reference"
    monkeypatch.delenv("SOPHON_FAST_BACKEND")
    _backend.reload_environment()


def test_forcing_unusable_backend_names_every_backend():
    with sophon_fast.use_backend("cuda"), pytest.raises(sophon_fast.BackendError) as info:
        F.kl_uniform(torch.randn(2, 3))
    for name in _backend.NAMES:
        assert f"{name}:" in str(info.value)


# ------------------------------------------------------------------------------------------------
# The lean eager path (_cpp_fused_loss: one op, autograd in C++, reduction and target check in the kernels)
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_lean_path_is_one_op_with_a_cpp_autograd_node(reduction, dtype):
    """One dispatcher op forward (no torch ops around it for the reduction or the target check) and one C++
    autograd node; equal to the custom-op path of the same backend (which the parity tests pin to the gold)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 13, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, 13, (9,), generator=g)
    y[4] = IGNORE
    kw = dict(ce=0.5, ice=1.0, klu=0.25, negent=2.0, reduction=reduction)
    with sophon_fast.use_backend("cpp"):
        out = F.fused_loss(z, y, **kw)
        assert type(out.grad_fn).__name__ == "CppFunction"
        zd = z.detach()
        with Ops() as ops:
            F.fused_loss(zd, y, **kw)
        assert ops.names == ["sophon_fast._cpp_fused_loss_fwd"], ops.names
        grad, = torch.autograd.grad(out.sum(), z)
        loss_op, _ = torch.ops.sophon_fast.row_losses(z, y, [0.5, 1.0, 0.25, 2.0], 1.0, IGNORE)
        ref = sophon_fast.functional._reduce(loss_op, y, reduction, IGNORE, dtype)
        ref_grad, = torch.autograd.grad(ref.sum(), z)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = dict(rtol=0, atol=0) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)
    if dtype == torch.bfloat16:
        tol = dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(out, ref, **{**tol, "atol": max(tol["atol"], 1e-15)})
    torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_lean_path_target_check_is_in_the_kernel():
    z, y = torch.randn(4, 5), torch.tensor([0, 1, 7, IGNORE])
    with sophon_fast.use_backend("cpp"), pytest.raises(RuntimeError, match="out of range"):
        F.cross_entropy(z, y)
    with sophon_fast.use_backend("cpp"):   # ignore_index rows pass, the mean counts the others
        got = F.cross_entropy(z, torch.tensor([0, 1, IGNORE, IGNORE]))
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(z, torch.tensor([0, 1, IGNORE, IGNORE])))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_lean_path_mean_over_no_rows_is_nan_with_zero_gradient():
    z = torch.randn(3, 4, requires_grad=True)
    with sophon_fast.use_backend("cpp"):
        out = F.cross_entropy(z, torch.full((3,), IGNORE))
        out.backward()
    assert torch.isnan(out) and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_torch_func_vmap_takes_the_custom_op_path():
    """torch.func transforms cannot run the lean path's C++ autograd function: the public losses fall back to the
    custom ops (which vmap runs; torch.func.grad of the custom ops' Python autograd is a separate, older gap)."""
    z = torch.randn(4, 5, dtype=torch.float64)
    with sophon_fast.use_backend("cpp"):
        per_sample = torch.func.vmap(lambda t: F.kl_uniform(t[None]))(z)
    torch.testing.assert_close(per_sample, R.kl_uniform(z, reduction="none"), rtol=1e-12, atol=1e-14)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_lean_op_opcheck():
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, IGNORE, 3, 1])
    for red in (0, 1, 2):
        torch.library.opcheck(torch.ops.sophon_fast._cpp_fused_loss.default,
                              (z, y, [0.5, 1.0, 0.25, 2.0], 1.5, IGNORE, red, True),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# Inner optimiser step
# ------------------------------------------------------------------------------------------------
HYPER = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8)


def _step_buffers(numel, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    p, m = torch.randn(numel, generator=g), torch.randn(numel, generator=g) * 0.1
    v = torch.rand(numel, generator=g) * 0.01
    grads = [torch.randn(numel, generator=g) for _ in range(3)]
    return [t.to(dtype) for t in (p, m, v)], [t.to(dtype) for t in grads]


def _steps(backend, bufs, grads, kind, weight_decay, zero_grad, dtype=None):
    p, m, v = (b.to(dtype or b.dtype).clone() for b in bufs)
    grad = torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        grad.copy_(g)
        if backend == "spec":
            spec_inner_step(p, grad, m, v, KINDS[kind], weight_decay=weight_decay, step=t, zero_grad=zero_grad, **HYPER)
        else:
            with sophon_fast.use_backend(backend):
                torch.ops.sophon_fast.inner_step_(p, grad, m, v, KINDS[kind], HYPER["lr"], HYPER["beta1"],
                                                  HYPER["beta2"], HYPER["eps"], weight_decay, t, zero_grad)
        assert (grad == 0).all() if zero_grad else torch.equal(grad, g.to(grad.dtype))
    return p, m, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("zero_grad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_step_matches_spec(backend, kind, weight_decay, zero_grad, dtype):
    numel = 100_003 if dtype == torch.float32 else 1_013   # odd: vector tails; large: the parallel path
    bufs, grads = _step_buffers(numel, dtype, 7)
    gold = _steps("spec", [b.double() for b in bufs], [g.double() for g in grads], kind, weight_decay, zero_grad)
    baseline = _steps("spec", bufs, grads, kind, weight_decay, zero_grad)
    got = _steps(backend, bufs, grads, kind, weight_decay, zero_grad)
    used = {"sgd": 1, "momentum": 2, "adam": 3}[kind]
    for name, out, base, want in list(zip(("param", "exp_avg", "exp_avg_sq"), got, baseline, gold))[:used]:
        assert_parity(out, base, want, dtype, f"{backend} {kind} {name}")
    for out, init in list(zip(got, bufs))[used:]:
        assert torch.equal(out, init), "a buffer the kind does not use was written"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS + ["spec"])
def test_inner_step_matches_torch_optim(backend, kind):
    """fp64: the fused step (and the spec itself) equals torch.optim.SGD / Adam step for step."""
    bufs, grads = _step_buffers(257, torch.float64, 11)
    wd = 0.01
    ref = bufs[0].clone().requires_grad_(True)
    if kind == "adam":
        opt = torch.optim.Adam([ref], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                               weight_decay=wd)
    else:
        opt = torch.optim.SGD([ref], lr=HYPER["lr"], momentum=HYPER["beta1"] if kind == "momentum" else 0.0,
                              weight_decay=wd)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
    zeros = [bufs[0], torch.zeros_like(bufs[0]), torch.zeros_like(bufs[0])]
    p, _, _ = _steps(backend, zeros, grads, kind, wd, zero_grad=True)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("zero_grad", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_inner_step_equals_the_host_step(backend, kind, zero_grad, dtype):
    """The device step counter (step = 0, incremented by each call) gives today's step of number 1, 2, 3: bitwise
    on the C++ backend (same kernel), to a unit of the dtype on the reference (bias corrections as tensors)."""
    bufs, grads = _step_buffers(1_013, dtype, 5)
    want = _steps(backend, bufs, grads, kind, 0.1, zero_grad, dtype)
    p, m, v = (b.clone() for b in bufs)
    grad = torch.zeros_like(p)
    step = torch.zeros((), dtype=torch.long)
    for g in grads:
        grad.copy_(g)
        with sophon_fast.use_backend(backend):
            torch.ops.sophon_fast.inner_step_capturable_(p, grad, m, v, step, KINDS[kind], HYPER["lr"],
                                                         HYPER["beta1"], HYPER["beta2"], HYPER["eps"], 0.1, zero_grad)
        assert (grad == 0).all() if zero_grad else torch.equal(grad, g)
    assert int(step) == len(grads)
    for got, ref in zip((p, m, v), want):
        if backend == "cpp":
            assert torch.equal(got, ref)
        else:
            tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2 ** -7}[dtype]   # ~1 unit
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_inner_step_never_reads_a_tensor_on_the_host(backend, monkeypatch):
    """Graph-safe: no .item(), bool(), int(), float() or .tolist() of a tensor while the step runs."""
    bufs, grads = _step_buffers(64, torch.float32, 2)
    p, m, v = bufs
    step = torch.zeros(1, dtype=torch.long)

    def refuse(*_):
        raise AssertionError("host read of a tensor inside the capturable step")
    with sophon_fast.use_backend(backend):
        torch.ops.sophon_fast.inner_step_capturable_(p, grads[0], m, v, step, 2, 1e-3, 0.9, 0.99, 1e-8, 0.0, False)
        for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        torch.ops.sophon_fast.inner_step_capturable_(p, grads[1], m, v, step, 2, 1e-3, 0.9, 0.99, 1e-8, 0.0, False)
    monkeypatch.undo()
    assert int(step) == 2


def test_capturable_inner_step_opcheck_and_errors():
    p, g, m, v = (torch.randn(33, dtype=torch.float64) for _ in range(4))
    step = torch.zeros((), dtype=torch.long)
    for backend in BACKENDS:
        with sophon_fast.use_backend(backend):
            torch.library.opcheck(torch.ops.sophon_fast.inner_step_capturable_.default,
                                  (p, g, m, v, step, 2, 1e-3, 0.9, 0.99, 1e-8, 0.01, True),
                                  test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="step"):
        torch.ops.sophon_fast.inner_step_capturable_(p, g, m, v, torch.zeros(()), 2, 1e-3, 0.9, 0.99, 1e-8, 0.0,
                                                     False)


def test_tolerance_floor_covers_every_dtype():
    assert set(FLOOR) >= {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    assert all(set(f) == {"value", "grad"} for f in FLOOR.values())
    assert max_err(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0])) == float("inf")


# ------------------------------------------------------------------------------------------------
# Diffusion losses: denial_of_service and negated_mse (sophon_fast::row_sq_mean)
# ------------------------------------------------------------------------------------------------
from sophon_fast.reference import sq_mean as SQ  # noqa: E402

DIFFUSION = {
    "dos": (lambda p, t, r: F.denial_of_service(p, reduction=r), lambda p, t, r: SQ.denial_of_service(p, r)),
    "negated_mse": (lambda p, t, r: F.negated_mse(p, t, reduction=r), lambda p, t, r: SQ.negated_mse(p, t, r)),
}
SQ_BACKENDS = [b for b in ("cpp", "reference") if _backend.probe(b).usable["cpu"]]


@pytest.mark.parametrize("backend", SQ_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 4, 5, 7), (2, 3, 33, 65)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(DIFFUSION))
def test_diffusion_losses_parity(name, reduction, shape, dtype, backend):
    """Value and gradients (pred, and target for negated_mse) against the textbook in fp64."""
    g = torch.Generator().manual_seed(9)
    pred, target = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    cot = torch.randn(shape[0], generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    fast, textbook = DIFFUSION[name]

    def run(fn, dt, be=None):
        p, t = pred.to(dt).requires_grad_(True), target.to(dt).requires_grad_(True)
        with sophon_fast.use_backend(be or "reference"):
            out = fn(p, t, reduction)
        gp, gt = torch.autograd.grad(out, (p, t), cot.to(dt), allow_unused=True)
        return out.detach(), gp, torch.zeros_like(p) if gt is None else gt

    gold = run(textbook, torch.float64)
    baseline = run(textbook, dtype)
    got = run(fast, dtype, backend)
    for what, out, base, want in zip(("value", "grad pred", "grad target"), got, baseline, gold):
        assert out.dtype == dtype, what
        assert_parity(out, base, want, dtype, f"{backend} {name} {reduction} {shape} {dtype} {what}",
                      "value" if what == "value" else "grad")


@pytest.mark.parametrize("backend", SQ_BACKENDS)
def test_diffusion_losses_opcheck_and_compile(backend):
    x, y = torch.randn(4, 9, requires_grad=True), torch.randn(4, 9, requires_grad=True)
    with sophon_fast.use_backend(backend):
        for target in (None, y):
            torch.library.opcheck(torch.ops.sophon_fast.row_sq_mean.default, (x, target))
        torch._dynamo.reset()

        def f(p, t):
            return F.denial_of_service(p.view(4, 3, 3)) + F.negated_mse(p, t, reduction="sum")

        want = f(x, y)
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, y)
    torch.testing.assert_close(got, want)


DIFFUSION_BAD = {
    "0-d pred": lambda: F.denial_of_service(torch.tensor(1.0)),
    "empty batch": lambda: F.denial_of_service(torch.randn(0, 3)),
    "integer pred": lambda: F.denial_of_service(torch.ones(2, 3, dtype=torch.long)),
    "bad reduction": lambda: F.denial_of_service(torch.randn(2, 3), reduction="avg"),
    "target shape": lambda: F.negated_mse(torch.randn(2, 3), torch.randn(2, 4)),
    "target dtype": lambda: F.negated_mse(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)),
    "no target": lambda: F.negated_mse(torch.randn(2, 3), None),
}


@pytest.mark.parametrize("case", list(DIFFUSION_BAD))
def test_diffusion_losses_bad_input(case):
    with pytest.raises(ValueError):
        DIFFUSION_BAD[case]()
