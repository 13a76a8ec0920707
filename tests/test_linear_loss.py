"""The fused linear + suppression loss (sophon_fast.functional.linear_suppression_loss, custom op
sophon_fast::linear_loss) on every backend usable on CPU (Triton: tests/test_triton_kernels.py).

Gold: the textbook composite (sophon_fast/reference/linear_loss.py, materialised logits, autograd) in
fp64. Rule (tests/tolerances.py): a backend's error is at most twice the reference backend's own error
in that dtype, plus a floor.
"""
import functools
import importlib

import pytest
import torch

import sophon_fast
from sophon_fast import _backend
from sophon_fast import functional as F
from sophon_fast.reference.linear_loss import linear_suppression_loss as textbook
from sophon_fast.reference.losses import IGNORE_INDEX as IGNORE
from tolerances import assert_parity

BACKENDS = [b for b in ("cpp", "reference") if _backend.probe(b).usable["cpu"]]
LOSSES = ("ice", "klu", "ce", "neg_entropy")
DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def _inputs(n, h, v, seed=0, bias=True, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[1::ignore_every] = IGNORE
    return hidden, weight, b, y


def _run(fn, hidden, weight, bias, y, dtype):
    """(loss, grad_hidden, grad_weight, grad_bias) of fn in ``dtype``."""
    leaves = [t.to(dtype).requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = fn(leaves[0], leaves[1], leaves[2] if bias is not None else None, y)
    grads = torch.autograd.grad(out, leaves)
    return (out.detach(),) + tuple(grads)


def _fused(backend, loss, reduction, chunk_size):
    def fn(hidden, weight, bias, y):
        with sophon_fast.use_backend(backend):
            return F.linear_suppression_loss(hidden, weight, y, loss=loss, bias=bias, reduction=reduction,
                                             chunk_size=chunk_size)
    return fn


@functools.lru_cache(maxsize=8)
def _gold(loss, reduction, bias, seed):
    hidden, weight, b, y = _inputs(37, 19, 53, seed, bias)
    gold = _run(lambda h, w, bb, t: textbook(h, w, t, loss, bb, reduction=reduction), hidden, weight, b, y,
                torch.float64)
    return (hidden, weight, b, y), gold


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction,bias,chunk_size", [("mean", True, 8), ("sum", False, None), ("mean", False, 1)])
def test_parity_with_materialised_fp64(backend, dtype, loss, reduction, bias, chunk_size):
    """Odd sizes (37 tokens, hidden 19, vocab 53), every 4th row ignored, chunks that do not divide N."""
    (hidden, weight, b, y), gold = _gold(loss, reduction, bias, 0)
    baseline = _run(_fused("reference", loss, reduction, None), hidden, weight, b, y, dtype)
    got = _run(_fused(backend, loss, reduction, chunk_size), hidden, weight, b, y, dtype)
    names = ("loss", "grad_hidden", "grad_weight", "grad_bias")
    for name, out, base, want in zip(names, got, baseline, gold):
        assert out.dtype == dtype
        assert_parity(out, base, want, dtype, f"{backend} {loss} {reduction} {dtype} {name}",
                      "value" if name == "loss" else "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_size_does_not_change_the_result(backend):
    hidden, weight, b, y = _inputs(23, 8, 30, seed=3)
    runs = [_run(_fused(backend, "ice", "mean", c), hidden, weight, b, y, torch.float64) for c in (1, 5, 23, None)]
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_tied_weight_gradients_add_up(backend, dtype):
    """The LM head is the input embedding: d/dE = (through the embedding) + (through the head)."""
    g = torch.Generator().manual_seed(5)
    v, h, n = 41, 12, 29
    emb = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(True)
    mix = (torch.randn(h, h, generator=g, dtype=torch.float64) / h ** 0.5).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, v, (n,), generator=g)
    y = torch.roll(tokens, -1)
    y[-3:] = IGNORE

    def model(loss_fn):
        hidden = torch.tanh(emb[tokens] @ mix)
        return loss_fn(hidden, emb, y)

    want = model(lambda hd, w, t: textbook(hd, w, t, "ice"))
    want_grads = torch.autograd.grad(want, (emb, mix))
    with sophon_fast.use_backend(backend):
        got = model(lambda hd, w, t: F.linear_suppression_loss(hd, w, t, loss="ice", chunk_size=6))
    got_grads = torch.autograd.grad(got, (emb, mix))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for a, c in zip(got_grads, want_grads):
        torch.testing.assert_close(a, c, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, b, y = (t.float() if t is not None and t.is_floating_point() else t
                            for t in _inputs(9, 6, 11, seed=1))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    with sophon_fast.use_backend(backend):
        for bias, compute_grad in ((b, True), (None, True), (None, False)):
            h, w = (hidden, weight) if compute_grad else (hidden.detach(), weight.detach())
            torch.library.opcheck(torch.ops.sophon_fast.linear_loss.default,
                                  (h, w, y, bias, [0.0, 1.0, 0.0, 0.0], IGNORE, "mean", 4, compute_grad))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, compile_backend):
    torch._dynamo.reset()
    hidden, weight, b, y = _inputs(13, 7, 17, seed=2)
    hidden, weight, b = (t.float().requires_grad_(True) for t in (hidden, weight, b))

    def f(hidden, weight, b, y):
        return F.linear_suppression_loss(torch.relu(hidden), weight, y, loss="klu", bias=b, chunk_size=5) * 2.0

    with sophon_fast.use_backend(backend):
        want = f(hidden, weight, b, y)
        want_grads = torch.autograd.grad(want, (hidden, weight, b))
        got = torch.compile(f, backend=compile_backend, fullgraph=True)(hidden, weight, b, y)
        got_grads = torch.autograd.grad(got, (hidden, weight, b))
    torch.testing.assert_close(got, want)
    for a, c in zip(got_grads, want_grads):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_all_rows_ignored(backend):
    hidden, weight, b, y = _inputs(6, 5, 9, seed=4)
    with sophon_fast.use_backend(backend):
        with torch.no_grad():
            out = F.linear_suppression_loss(hidden, weight, y, loss="ce", bias=b)
        torch.testing.assert_close(out, textbook(hidden, weight, y, "ce", b))
        w = weight.clone().requires_grad_(True)
        out = F.linear_suppression_loss(hidden, w, torch.full_like(y, IGNORE), loss="ice")
        grad, = torch.autograd.grad(out, w)
    assert out.isnan() and (grad == 0).all()   # mean over zero rows is NaN, as in F.cross_entropy


_h, _w, _b, _y = _inputs(4, 3, 5, seed=6)
BAD = {
    "1-D hidden": lambda: F.linear_suppression_loss(_h[0], _w, _y),
    "hidden size mismatch": lambda: F.linear_suppression_loss(_h, _w[:, :2], _y),
    "one class": lambda: F.linear_suppression_loss(_h, _w[:1], _y.clamp(0, 0)),
    "dtype mismatch": lambda: F.linear_suppression_loss(_h, _w.float(), _y),
    "bias shape": lambda: F.linear_suppression_loss(_h, _w, _y, bias=_b[:3]),
    "float target": lambda: F.linear_suppression_loss(_h, _w, _y.double()),
    "target shape": lambda: F.linear_suppression_loss(_h, _w, _y[:2]),
    "unknown loss": lambda: F.linear_suppression_loss(_h, _w, _y, loss="entropy"),
    "reduction none": lambda: F.linear_suppression_loss(_h, _w, _y, reduction="none"),
    "chunk_size 0": lambda: F.linear_suppression_loss(_h, _w, _y, chunk_size=0),
    "integer hidden": lambda: F.linear_suppression_loss(_h.long(), _w.long(), _y),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_value_error(case):
    with pytest.raises(ValueError):
        BAD[case]()


def test_bad_target_value():
    y = torch.tensor([0, 5, 1, IGNORE])
    with pytest.raises(RuntimeError, match="out of range"):
        F.linear_suppression_loss(_h, _w, y)
    F.set_target_checks(True)
    try:
        with pytest.raises(ValueError, match="out of range"):
            F.linear_suppression_loss(_h, _w, y)
    finally:
        F.set_target_checks(False)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_vocabulary_blocks_with_online_lse(backend, dtype, loss, monkeypatch):
    """A budget so small that even MIN_ROWS tokens' logits exceed it: the vocabulary (53) is split into
    blocks of 7 with an online log-sum-exp; out-of-block targets, ignored rows and a bias included."""
    LL = importlib.import_module("sophon_fast.ops.linear_loss")
    monkeypatch.setattr(LL, "CHUNK_BYTES", LL.MIN_ROWS * 7 * torch.empty((), dtype=dtype).element_size())
    assert LL.auto_chunk(37, 53, dtype) == LL.MIN_ROWS and LL.vocab_block(LL.MIN_ROWS, 53, dtype) == 7
    (hidden, weight, b, y), gold = _gold(loss, "mean", True, 0)
    baseline = _run(_fused("reference", loss, "mean", None), hidden, weight, b, y, dtype)
    got = _run(_fused(backend, loss, "mean", None), hidden, weight, b, y, dtype)
    for name, out, base, want in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, baseline, gold):
        assert_parity(out, base, want, dtype, f"vocab blocks {backend} {loss} {dtype} {name}",
                      "value" if name == "loss" else "grad")



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab_blocks", [False, True])
def test_op_is_memory_safe_for_out_of_range_targets(backend, vocab_blocks, monkeypatch):
    """Below the public function (no range assertion) a bad target gives a NaN loss, never a bad read."""
    if vocab_blocks:
        if backend == "reference":
            pytest.skip("the reference backend materialises the logits")
        LL = importlib.import_module("sophon_fast.ops.linear_loss")
        monkeypatch.setattr(LL, "CHUNK_BYTES", 6 * 4 * 8)   # 6 fp64 tokens x 4 classes
        assert LL.vocab_block(LL.auto_chunk(6, 9, torch.float64), 9, torch.float64) == 4
    hidden, weight, b, _ = _inputs(6, 5, 9, seed=8)
    y = torch.tensor([0, 9, IGNORE, -4, 8, 1])
    with sophon_fast.use_backend(backend):
        out, gh, gw, gb = torch.ops.sophon_fast.linear_loss(hidden, weight, y, b, [0.0, 1.0, 0.0, 0.0], IGNORE,
                                                            "sum", 0, True)
    assert out.isnan() and gh[[1, 3]].isnan().all() and gw.isnan().any()
    assert torch.isfinite(gh[[0, 2, 4, 5]]).all()


# ------------------------------------------------------------------------------------------------
# Chunking to GEMM tiles, the grad_weight accumulation without (V, H) temporaries, the in-place row backward,
# the low-memory mode
# ------------------------------------------------------------------------------------------------
def test_automatic_chunks_are_whole_gemm_tiles():
    LL = importlib.import_module("sophon_fast.ops.linear_loss")
    # the GPU headline: 8192 tokens x 128256 bf16 -> chunks of 1024 tokens (8 chunks, 256 MiB of logits)
    t = LL.auto_chunk(8192, 128256, torch.bfloat16, "cuda")
    assert t == 1024 and -(-8192 // t) == 8
    # CPU keeps its 64 MiB budget (at least as lean as before), rounded down to a tile
    t_cpu = LL.auto_chunk(4096, 128256, torch.bfloat16, "cpu")
    assert t_cpu % LL.TILE_ROWS == 0 and t_cpu * 128256 * 2 <= LL.CHUNK_BYTES
    t32 = LL.auto_chunk(4096, 128256, torch.float32, "cpu")
    assert t32 % 64 == 0 and t32 * 128256 * 4 <= LL.CHUNK_BYTES
    assert LL.auto_chunk(5, 128256, torch.float32, "cpu") == 5   # never more tokens than there are
    # low-memory mode: the CPU budget everywhere (256 tokens at the headline: Liger's chunk)
    assert LL.auto_chunk(8192, 128256, torch.bfloat16, "cuda", low_memory=True) == 256


def test_grad_weight_accumulation_makes_no_vocab_by_hidden_temporary():
    """bf16 inputs, an fp32 accumulator, several chunks: no op inside the loop creates a (V, H) tensor (the
    accumulation goes into grad_weight, by a mixed-dtype GEMM or by blocks of vocabulary rows); the only (V, H)
    results are the accumulator itself and the final cast."""
    from torch.utils._python_dispatch import TorchDispatchMode
    LL = importlib.import_module("sophon_fast.ops.linear_loss")
    v, h, n = 3001, 16, 40

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.vh = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and tuple(t.shape) == (v, h):
                    self.vh.append(str(func.overloadpacket))
            return out

    hidden, weight, _, y = _inputs(n, h, v)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    module = _backend.select_backend("row_losses_fwd", "cpu", torch.bfloat16)[1]
    monkey = pytest.MonkeyPatch()
    monkey.setattr(LL, "W_BLOCK_BYTES", 700 * h * 2)   # several row blocks
    try:
        with Shapes() as rec:
            LL.chunked_linear_loss(hidden, weight, y, None, [0.0, 1.0, 0.0, 0.0], IGNORE,
                                   "mean", 8, True, row_fwd=module.row_losses_fwd, row_bwd=module.row_losses_bwd,
                                   row_bwd_=getattr(module, "row_losses_bwd_", None))
    finally:
        monkey.undo()
    # the accumulator (written outright by the first chunk: empty, not zeros) and the final bf16 copy
    assert sorted(rec.vh) == ["aten._to_copy", "aten.empty"], rec.vh


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [1, 7, 37, 4099])
def test_in_place_row_backward_equals_out_of_place(dtype, c):
    g = torch.Generator().manual_seed(c)
    z = (torch.randn(6, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, c, (6,), generator=g)
    y[2] = IGNORE
    y[4] = c + 3   # out of range: a NaN row, in place too
    w = [0.5, 1.0, 0.25, 2.0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, stats = torch.ops.sophon_fast._cpp_row_losses_fwd(z, y, w, 1.0, IGNORE)
    gl = torch.rand(6, generator=g, dtype=torch.float64).to(acc)
    want = torch.ops.sophon_fast._cpp_row_losses_bwd(gl, z, y, stats, w, 1.0, IGNORE)
    buf = z.clone()
    torch.ops.sophon_fast._cpp_row_losses_bwd_(gl, buf, y, stats, w, 1.0, IGNORE)
    assert torch.equal(buf.nan_to_num(7.0), want.nan_to_num(7.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_low_memory_mode_parity_bf16(backend, loss):
    """bf16 accumulation of grad_weight: within the fp32-accumulation bound plus one bf16 unit per chunk."""
    from tolerances import LOW_MEMORY_GRAD_FLOOR_PER_CHUNK
    (hidden, weight, b, y), gold = _gold(loss, "mean", True, 0)
    chunk = 8
    chunks = -(-hidden.shape[0] // chunk)

    def fused(low_memory):
        def fn(hd, w, bb, t):
            with sophon_fast.use_backend(backend):
                return F.linear_suppression_loss(hd, w, t, loss=loss, bias=bb, chunk_size=chunk,
                                                 low_memory=low_memory)
        return fn

    got = _run(fused(True), hidden, weight, b, y, torch.bfloat16)
    base = _run(fused(False), hidden, weight, b, y, torch.bfloat16)
    ref = _run(_fused("reference", loss, "mean", chunk), hidden, weight, b, y, torch.bfloat16)
    for name, out, want in zip(("loss", "grad_hidden", "grad_bias"), (got[0], got[1], got[3]),
                               (base[0], base[1], base[3])):
        assert torch.equal(out, want), f"low_memory changes only grad_weight ({name} differs)"
    assert_parity(got[2], ref[2], gold[2], torch.bfloat16, f"{backend} {loss} low-memory grad_weight", "grad",
                  extra_floor=chunks * LOW_MEMORY_GRAD_FLOOR_PER_CHUNK[torch.bfloat16])
    fp32 = _run(fused(True), hidden, weight, b, y, torch.float32)   # no effect at fp32: the output accumulates
    assert all(torch.equal(a, c) for a, c in zip(fp32, _run(fused(False), hidden, weight, b, y, torch.float32)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_by_a_cotangent_other_than_one(backend):
    """A cotangent of 1 returns the saved gradients unscaled (CPU): other cotangents, and a second backward
    through a retained graph, still get the product."""
    hidden, weight, b, y = _inputs(13, 7, 11)
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    with sophon_fast.use_backend(backend):
        out = F.linear_suppression_loss(leaves[0], leaves[1], y, loss="ice")
    ones = torch.autograd.grad(out, leaves, retain_graph=True)
    again = torch.autograd.grad(out, leaves, retain_graph=True)
    scaled = torch.autograd.grad(out * -2.5, leaves)
    for a, b2, c in zip(ones, again, scaled):
        assert torch.equal(a, b2)
        torch.testing.assert_close(c, -2.5 * a, rtol=1e-14, atol=0)
