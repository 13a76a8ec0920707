"""protect(): reference vs fast parity in fp64, resume, non-finite handling, rollback, bad input."""
import copy
import math

import pytest
import torch
from torch import nn

import sophon_fast as sf
from sophon_fast.engine.attackers import LoRA
from sophon_fast.defences import TrapConfig
from sophon_fast.engine.loop import NonFiniteError

LOSSES = ["ice", "ice_reference_code", "klu", "neg_entropy"]
INNER = ["sgd", "momentum", "adam"]


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5))


def cnn_bn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5))


def cnn_relu():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 8),
                         nn.ReLU(), nn.Linear(8, 5))


def relu_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))


SHAPES = {mlp: (20,), cnn_bn: (1, 8, 8), cnn_relu: (1, 8, 8), relu_mlp: (20,)}


def data(shape, n=120, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 5, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]
                     + [b.detach().reshape(-1).double() for b in model.buffers()])


def _protect(builder, mode, **kw):
    torch.manual_seed(0)
    model = builder().double()
    shape = SHAPES[builder]
    kw.setdefault("strategies", [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8, attacker="as_is")])
    res = sf.protect(model, data(shape, seed=1), data(shape, seed=2), mode=mode, progress=False, **kw)
    return model, res


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("builder", [mlp, cnn_bn])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("inner", INNER)
def test_meta_gradient_parity(builder, loss, inner):
    """One iteration, SGD outer lr 1, no clipping, no NTR: theta0 - theta1 IS the meta-gradient."""
    strat = [sf.Strategy(inner, lr=1e-2, batch_size=24, query_size=8, attacker="reinit_head" if loss.startswith("ice") else "as_is",
                         weight_decay=1e-3)]
    grads = {}
    for mode in ("reference", "fast"):
        model, res = _protect(builder, mode, loss=loss, iterations=1, inner_steps=4, fts_optimizer="sgd",
                              alpha=1e4, clip_norm=None, ntr_steps=0, strategies=strat)
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        after = torch.cat([p.detach().reshape(-1) for p in res.model.parameters()])
        grads[mode] = before - after
        bufs = [b.clone() for b in res.model.buffers()]
        assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers())), "BN buffers must be restored"
    assert grads["fast"].abs().max() > 0
    assert rel(grads["fast"], grads["reference"]) <= 1e-9


@pytest.mark.parametrize("builder", [mlp, cnn_bn])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("inner", INNER)
def test_three_iterations_parity(builder, loss, inner):
    strat = [sf.Strategy(inner, lr=1e-2, batch_size=24, query_size=8, attacker="reinit_head")]
    out = {}
    for mode in ("reference", "fast"):
        model, res = _protect(builder, mode, loss=loss, iterations=3, inner_steps=3, strategies=strat,
                              alpha=30, beta=10, ntr_batch_size=16)
        out[mode] = flat(res.model)
        assert not torch.equal(out[mode], flat(model))
    assert rel(out["fast"], out["reference"]) <= 1e-9


@pytest.mark.parametrize("builder,trap", [(mlp, None), (cnn_bn, None),
                                          (relu_mlp, TrapConfig(weight=0.5, margin=1.0, decay=0.3,
                                                                robust=0.01, straight_through=True)),
                                          (cnn_relu, TrapConfig(weight=0.5, margin=1.0, decay=0.3))])
def test_parity_strategy_mixture_two_domains_sgd_outer(builder, trap):
    strats = [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8),
              sf.Strategy("adam", lr=1e-3, batch_size=20, query_size=5, attacker="reinit_head", steps=2),
              sf.Strategy("momentum", lr=1e-2, batch_size=16, query_size=4)]
    out = {}
    for mode in ("reference", "fast"):
        torch.manual_seed(0)
        model = builder().double()
        shape = SHAPES[builder]
        res = sf.protect(model, data(shape, seed=1), [data(shape, seed=2), data(shape, seed=3)], mode=mode,
                         progress=False, loss="klu", iterations=3, inner_steps=3, strategies=strats,
                         trajectories=2, strategy_sampling="random", fts_optimizer="sgd", alpha=100,
                         clip_norm=None, defences=[trap] if trap else [])
        out[mode] = flat(res.model)
        assert not torch.equal(out[mode], flat(model))
    assert rel(out["fast"], out["reference"]) <= 1e-9


def test_model_not_modified_unless_in_place():
    model = mlp().double()
    before = flat(model)
    sf.protect(model, data((20,), seed=1), data((20,), seed=2), iterations=2, inner_steps=2, progress=False)
    assert torch.equal(flat(model), before)
    res = sf.protect(model, data((20,), seed=1), data((20,), seed=2), iterations=2, inner_steps=2,
                     progress=False, in_place=True)
    assert res.model is model and not torch.equal(flat(model), before)
    # the returned module owns ordinary, separate parameter storage again
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert len(ptrs) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_resume_equals_uninterrupted(tmp_path, mode):
    kw = dict(loss="ice", iterations=6, inner_steps=2, mode=mode,
              strategies=[sf.Strategy("adam", lr=1e-3, batch_size=24, query_size=8, attacker="reinit_head")])
    ck = lambda d, resume=False: sf.Checkpointing(str(tmp_path / d), every=2, resume=resume)  # noqa: E731
    _, full = _protect(mlp, **{**kw, "checkpoint": ck("a")})
    _, part = _protect(mlp, **{**kw, "iterations": 4, "checkpoint": ck("b")})
    _, resumed = _protect(mlp, **{**kw, "checkpoint": ck("b", True)})
    assert not torch.equal(flat(part.model), flat(full.model))
    assert torch.equal(flat(resumed.model), flat(full.model))
    assert [r["iteration"] for r in resumed.history] == list(range(6))
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.endswith(".tmp")]


def test_nonfinite_iterations_are_skipped_then_stop():
    x, y = data((20,), seed=2)
    x[::2] = float("nan")   # most batches hold a NaN row
    model = mlp().double()
    with pytest.raises(NonFiniteError) as e:
        sf.protect(model, data((20,), seed=1), (x, y), iterations=5, inner_steps=2, max_nonfinite=2,
                   progress=False)
    assert torch.isfinite(flat(e.value.model)).all()
    assert torch.equal(flat(e.value.model), flat(model))   # nothing non-finite was ever applied


def test_single_nonfinite_iteration_is_skipped_and_counted():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = mlp().double(), 0

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            return out * float("nan") if self.calls == 5 else out   # one query forward of iteration 0
    res = sf.protect(Flaky(), data((20,), seed=1), data((20,), seed=2), iterations=3, inner_steps=2,
                     progress=False)
    skipped = [r for r in res.history if r.get("skipped")]
    assert len(skipped) == 1 and len(res.history) == 3
    assert torch.isfinite(flat(res.model)).all()


def test_rollback_when_original_accuracy_falls():
    model = mlp().double()
    res = sf.protect(model, data((20,), seed=1), data((20,), seed=2), original_test=data((20,), seed=4),
                     iterations=5, inner_steps=2, evaluation=sf.Evaluation(every=2, max_drop=0.0), progress=False,
                     alpha=300)
    assert res.stopped_early and "rolled back" in res.stop_reason
    assert len(res.history) == 2
    assert torch.equal(flat(res.model), flat(model))       # rolled back to the last good (initial) weights


def test_history_records():
    res = sf.protect(mlp().double(), data((20,), seed=1), data((20,), seed=2), original_test=data((20,), seed=4),
                     iterations=4, inner_steps=2, evaluation=sf.Evaluation(every=2, max_drop=None), progress=False)
    assert len(res.history) == 4
    for r in res.history:
        assert math.isfinite(r["fts_loss"]) and math.isfinite(r["ntr_loss"]) and r["t_fts"] > 0
    assert "original_metric" in res.history[1] and "original_metric" not in res.history[0]
    assert 0 <= res.original_metric <= 1


@pytest.mark.parametrize("bad, match", [
    (lambda: dict(restricted=(torch.randn(10, 20).double(), torch.full((10,), 7))), "labels span"),
    (lambda: dict(restricted=(torch.randn(0, 20).double(), torch.zeros(0, dtype=torch.long))), "empty"),
    (lambda: dict(original=(torch.randn(10, 7).double(), torch.zeros(10, dtype=torch.long))), "rejected"),
    (lambda: dict(restricted=[]), "empty list"),
])
def test_bad_input_errors(bad, match):
    kw = dict(original=data((20,), seed=1), restricted=data((20,), seed=2))
    kw.update(bad())
    with pytest.raises(ValueError, match=match):
        sf.protect(mlp().double(), kw["original"], kw["restricted"], iterations=1, inner_steps=1, progress=False)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="loss"):
        sf.ProtectConfig(loss="mse")
    with pytest.raises(ValueError, match="query_size"):
        sf.ProtectConfig(strategies=[sf.Strategy(batch_size=10, query_size=10)])
    with pytest.raises(ValueError, match="optimizer"):
        sf.Strategy(optimizer="lbfgs")
    with pytest.raises(ValueError, match="unknown settings.*inner_lr"):
        sf.ProtectConfig().replace(inner_lr=1e-3)
    with pytest.raises(ValueError, match="max_drop"):
        sf.Evaluation(max_drop=-1)
    with pytest.raises(ValueError, match="nn.Linear"):
        sf.protect(nn.Sequential(nn.Unflatten(1, (1, 20)), nn.Conv1d(1, 5, 20), nn.Flatten()).double(),
                   data((20,)), data((20,)), progress=False)


def test_reference_defaults():
    ice, klu = sf.ProtectConfig(loss="ice").resolved(), sf.ProtectConfig(loss="klu").resolved()
    assert (ice.alpha, ice.beta, ice.ntr_steps, ice.strategies[0].attacker.kind == "reinit_head") == (3, 5, 1, True)
    assert ice.fts_lr == pytest.approx(3e-4) and ice.ntr_lr == pytest.approx(5e-4)
    assert (klu.fts_lr, klu.ntr_lr, klu.ntr_steps, klu.strategies[0].attacker.kind == "reinit_head") == (1e-4, 1e-4, 5, False)
    s = ice.strategies[0]
    assert (s.optimizer, s.lr, s.batch_size, s.query_size, ice.inner_steps, ice.clip_norm) == \
        ("sgd", 1e-4, 150, 20, 50, 0.5)
    assert sf.ProtectConfig.from_dict(ice.to_dict()) == ice
    with_trap = sf.ProtectConfig(defences=[TrapConfig(robust=0.01)])
    assert sf.ProtectConfig.from_dict(with_trap.to_dict()) == with_trap


def test_resume_with_a_different_config_is_refused(tmp_path):
    kw = dict(iterations=2, inner_steps=2, checkpoint=sf.Checkpointing(str(tmp_path), every=1))
    _protect(mlp, "fast", **kw)
    resume = sf.Checkpointing(str(tmp_path), every=1, resume=True)
    with pytest.raises(ValueError, match="different config.*alpha"):
        _protect(mlp, "fast", alpha=7.0, **{**kw, "iterations": 4, "checkpoint": resume})
    _, res = _protect(mlp, "fast", **{**kw, "iterations": 4, "checkpoint": resume})   # more iterations: fine
    assert len(res.history) == 4


# ---- defects found by a careful reader (issue 13) ----
def test_a_nan_original_sample_never_reaches_the_weights():
    """One NaN sample in 300 original samples (NTR batch 40): NTR steps that draw it are skipped, and the
    returned model (or the error's model) is finite."""
    xo, yo = data((20,), n=300, seed=1)
    xo[17] = float("nan")
    try:
        res = sf.protect(mlp().double(), (xo, yo), data((20,), seed=2), iterations=12, inner_steps=1, ntr_steps=1,
                         ntr_batch_size=40, progress=False)
        model, skipped = res.model, [r for r in res.history if r.get("skipped")]
        assert skipped, "some NTR batches hold the NaN sample"
    except NonFiniteError as e:
        model = e.model
    assert torch.isfinite(flat(model)).all()


def test_overrides_resolve_loss_dependent_defaults_from_the_final_loss():
    res = sf.protect(mlp().double(), data((20,), seed=1), data((20,), seed=2), sf.ProtectConfig(loss="klu"),
                     loss="ice", iterations=1, inner_steps=1, progress=False)
    c = res.config
    assert (c.alpha, c.beta, c.ntr_steps, c.strategies[0].attacker.kind == "reinit_head") == (3, 5, 1, True)
    fresh = sf.ProtectConfig(loss="ice").resolved()
    assert (c.alpha, c.beta, c.ntr_steps) == (fresh.alpha, fresh.beta, fresh.ntr_steps)


def test_protect_leaves_the_callers_global_rng_alone():
    model = mlp().double()
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    sf.protect(model, data((20,), seed=1), data((20,), seed=2), iterations=2, inner_steps=1, progress=False)
    assert torch.equal(torch.rand(3), want)


def test_a_model_that_starts_below_80_percent_is_not_stopped_at_once():
    """The rollback is relative to the starting metric (an untrained model starts near chance)."""
    res = sf.protect(mlp().double(), data((20,), seed=1), data((20,), seed=2), original_test=data((20,), seed=4),
                     iterations=4, inner_steps=1, evaluation=sf.Evaluation(every=1), progress=False)
    assert not res.stopped_early and len(res.history) == 4


def test_checkpoints_load_without_pickle(tmp_path):
    _protect(mlp, "fast", iterations=2, inner_steps=1, checkpoint=sf.Checkpointing(str(tmp_path), every=1))
    state = torch.load(tmp_path / "protect.pt", weights_only=True)
    assert state["iteration"] == 2


def test_the_hot_path_creates_nothing_off_the_models_device_and_never_syncs():
    """Simulated trajectories (with head re-initialisation), the FTS step and an NTR step on the meta device:
    a tensor made on another device would fail to mix with meta tensors, and a host read (.item(), bool())
    of a meta tensor raises."""
    from sophon_fast.engine.modes import FastMode, ReferenceMode
    from sophon_fast.engine.streams import BatchStream
    from sophon_fast.tasks import ClassificationTask
    task = ClassificationTask()
    from sophon_fast.engine.config import Unroll
    makers = (FastMode, ReferenceMode, lambda m, t, p: FastMode(m, t, p, unrolled=True, unroll=Unroll(snapshot_every=2)))
    for mode_cls in makers:
        model = mlp().to("meta")
        mode = mode_cls(model, task, list(model.parameters()))
        x = torch.empty(64, 20, device="meta")
        y = torch.empty(64, dtype=torch.long, device="meta")
        stream = BatchStream((x, y), torch.Generator())  # a meta generator does not exist; draws are meta
        stream.perm = torch.empty(64, dtype=torch.long, device="meta")
        gen = torch.Generator()
        mode.begin_iteration()
        for strat in (sf.Strategy("adam", lr=1e-3, batch_size=24, query_size=8, attacker="reinit_head"),
                      sf.Strategy("momentum", lr=1e-2, batch_size=16, query_size=4),
                      sf.Strategy("adam", lr=1e-3, batch_size=16, query_size=4, attacker="probe", benign_steps=1,
                                  schedule="warmup_cosine", warmup=1),
                      sf.Strategy("sgd", lr=1e-3, batch_size=16, query_size=4, attacker={"kind": "lora", "rank": 2})):
            losses = mode.trajectory(strat, stream, "ice", [0.5, 0.5], gen, stream)
            assert losses.device.type == "meta"
        norm = mode.meta_grad_norm(0.5)
        assert norm.device.type == "meta"
        opt = torch.optim.Adam(mode.optim_params, lr=1e-3)
        mode.step(opt, "meta")
        mode.plain_backward(task.train_loss(model, stream.next(16), gen))
        mode.step(opt, "plain")


def test_first_order_meta_gradient_matches_torch_func_unrolled():
    """A third, independent computation: for a tiny MLP, theta'_k by explicit unrolling with torch.func.grad
    (detached inner gradients), and sum_k w_k grad L_k(theta'_k) by torch.func.grad at each theta'_k."""
    from torch.func import functional_call, grad
    from sophon_fast.reference.losses import inverse_cross_entropy
    torch.manual_seed(0)
    model = mlp().double()
    xr, yr = data((20,), n=24 * 3, seed=2)
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, K = 1e-1, 3
    # the batches protect draws: its stream is a permutation from a generator seeded with cfg.seed
    perm = torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))

    def ce(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def ice(p, x, y):
        return inverse_cross_entropy(functional_call(model, p, (x,)), y)

    theta, meta = dict(params0), {n: torch.zeros_like(p) for n, p in params0.items()}
    for k in range(K):
        idx = perm[24 * k:24 * (k + 1)]
        xs, ys, xq, yq = xr[idx][:-8], yr[idx][:-8], xr[idx][-8:], yr[idx][-8:]
        g = grad(ce)(theta, xs, ys)
        theta = {n: theta[n] - lr * g[n] for n in theta}
        gq = grad(ice)(theta, xq, yq)
        meta = {n: meta[n] + gq[n] / K for n in meta}
    want = torch.cat([meta[n].reshape(-1) for n in params0])
    for mode in ("reference", "fast"):
        res = sf.protect(model, data((20,), seed=1), (xr, yr), mode=mode, loss="ice", iterations=1, inner_steps=K,
                         fts_optimizer="sgd", alpha=1e4, clip_norm=None, ntr_steps=0, progress=False,
                         strategies=[sf.Strategy("sgd", lr=lr, batch_size=24, query_size=8, attacker="as_is")])
        got = (torch.cat([p.detach().reshape(-1) for p in model.parameters()])
               - torch.cat([p.detach().reshape(-1) for p in res.model.parameters()]))
        assert rel(got, want) <= 1e-9, mode


def test_param_filter_freezes_the_rest():
    model = mlp().double()
    res = sf.protect(model, data((20,), seed=1), data((20,), seed=2), iterations=2, inner_steps=1, progress=False,
                     params=["3.*"])
    assert torch.equal(res.model[1].weight, model[1].weight)
    assert not torch.equal(res.model[3].weight, model[3].weight)
    assert all(p.requires_grad for p in res.model.parameters())
    with pytest.raises(ValueError, match="matches no parameter"):
        sf.protect(model, data((20,), seed=1), data((20,), seed=2), iterations=1, progress=False, params=["nope*"])


def test_fast_mode_memory_per_parameter_matches_the_documented_count():
    from sophon_fast.engine.modes import FastMode, bytes_per_parameter
    from sophon_fast.tasks import ClassificationTask
    for dtype in (torch.float32, torch.bfloat16):
        model = mlp().to(dtype)
        mode = FastMode(model, ClassificationTask(), list(model.parameters()))
        n = mode.flat.numel()
        opts = [torch.optim.Adam(mode.optim_params, lr=1e-3) for _ in range(2)]
        states = [mode.state_buffer(k, n) for k in ("m", "v")]          # what an Adam attacker of every weight uses
        x, y = torch.randn(8, 20, dtype=dtype), torch.randint(0, 5, (8,))
        mode.plain_backward(ClassificationTask().train_loss(model, (x, y), None))
        for o in opts:
            mode.step(o, "plain")
        held = [mode.flat, mode.backup, mode.grad, mode.qgrad, *states, mode.snapshot()[0]]
        if mode.lowp:
            held += [mode.master, mode.meta]
        held += [t for o in opts for st in o.state.values() for t in st.values() if t.dim() > 0]
        measured = sum(t.numel() * t.element_size() for t in held)
        assert measured == bytes_per_parameter(dtype, "adam") * n, dtype


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("inner", INNER)
def test_unrolled_meta_gradient_is_the_exact_derivative_through_the_attacker_steps(inner, mode):
    """meta_gradient="unrolled": theta0 - theta1 (SGD outer lr 1) equals torch.func.grad of
    sum_k w_k ICE(theta'_k(theta)) with every inner step differentiated (torch's optimiser formulas written out
    here), and differs from the first-order meta-gradient."""
    from torch.func import functional_call, grad
    from sophon_fast.reference.losses import inverse_cross_entropy
    torch.manual_seed(0)
    model = mlp().double()
    xr, yr = data((20,), n=24 * 3, seed=2)
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = {"sgd": 1e-1, "momentum": 5e-2, "adam": 1e-2}[inner]
    K, wd, b1, b2, eps = 3, 1e-3, 0.9, 0.999, 1e-8
    perm = torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))

    def ce(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def objective(theta):
        m = {n: torch.zeros_like(t) for n, t in theta.items()}
        v = {n: torch.zeros_like(t) for n, t in theta.items()}
        total = 0.0
        for k in range(K):
            idx = perm[24 * k:24 * (k + 1)]
            g = grad(ce)(theta, xr[idx][:-8], yr[idx][:-8])
            new = {}
            for n in theta:
                gn = g[n] + wd * theta[n]
                if inner == "sgd":
                    new[n] = theta[n] - lr * gn
                elif inner == "momentum":
                    m[n] = 0.9 * m[n] + gn
                    new[n] = theta[n] - lr * m[n]
                else:
                    m[n] = b1 * m[n] + (1 - b1) * gn
                    v[n] = b2 * v[n] + (1 - b2) * gn * gn
                    denom = v[n].sqrt() / math.sqrt(1 - b2 ** (k + 1)) + eps
                    new[n] = theta[n] - lr / (1 - b1 ** (k + 1)) * m[n] / denom
            theta = new
            total = total + inverse_cross_entropy(functional_call(model, theta, (xr[idx][-8:],)), yr[idx][-8:]) / K
        return total

    want = grad(objective)(params0)
    want = torch.cat([want[n].reshape(-1) for n in params0])
    got = {}
    for meta in ("unrolled", "first_order"):
        res = sf.protect(model, data((20,), seed=1), (xr, yr), mode=mode, meta_gradient=meta, loss="ice",
                         iterations=1, inner_steps=K, fts_optimizer="sgd", alpha=1e4, clip_norm=None, ntr_steps=0,
                         progress=False, strategies=[sf.Strategy(inner, lr=lr, batch_size=24, query_size=8,
                                                                 attacker="as_is", weight_decay=wd)])
        got[meta] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                     - torch.cat([p.detach().reshape(-1) for p in res.model.parameters()]))
    assert rel(got["unrolled"], want) <= 1e-9
    assert rel(got["first_order"], want) > 1e-4      # the second-order terms are not negligible here


def test_unrolled_meta_gradient_runs_with_batchnorm_head_reinit_and_a_trap():
    strat = [sf.Strategy("adam", lr=1e-2, batch_size=24, query_size=8, attacker="reinit_head"),
             sf.Strategy("momentum", lr=1e-2, batch_size=24, query_size=8)]
    model, res = _protect(cnn_relu, "reference", meta_gradient="unrolled", iterations=2, inner_steps=2,
                          strategies=strat, ntr_batch_size=16, defences=[TrapConfig(weight=0.5, margin=1.0)])
    assert len(res.history) == 2 and all(math.isfinite(r["fts_loss"]) for r in res.history)
    assert not torch.equal(flat(res.model), flat(model))


def test_meta_gradient_and_unroll_settings_are_checked():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="snapshot_every must be an int >= 1"):
            sf.ProtectConfig(meta_gradient="unrolled", unroll={"snapshot_every": bad})
    with pytest.raises(ValueError, match="meta_gradient"):
        sf.ProtectConfig(meta_gradient="second")


def test_a_checkpoint_without_a_newer_config_field_resumes_with_its_default():
    from sophon_fast.engine.state import config_changes
    cfg = sf.ProtectConfig()
    saved = cfg.to_dict()
    del saved["meta_gradient"]
    assert config_changes(saved, cfg) == []
    assert config_changes(saved, cfg.replace(mode="reference", meta_gradient="unrolled")) == ["meta_gradient", "mode"]


@pytest.fixture
def fresh_draws(monkeypatch):
    """Every fresh layer the engine draws, as (module, parameter, copy of the fresh value), in draw order."""
    from sophon_fast.engine import attackers as modes
    drawn = []
    real = modes.fresh_parameters

    def record(module, gen):
        out = real(module, gen)
        drawn.extend((module, p, v.detach().clone()) for p, v in out)
        return out

    monkeypatch.setattr(modes, "fresh_parameters", record)
    return drawn


def test_a_fresh_block_is_a_constant_and_the_meta_gradient_goes_below_it(fresh_draws):
    """A fresh="block" trajectory: the block gets no meta-gradient, and the body gets exactly what it gets from a
    plain trajectory of a model whose block already holds the same fresh values (unrolled, one iteration, SGD
    outer lr 1: theta0 - theta1 is the meta-gradient)."""
    shape = SHAPES[cnn_relu]

    def run(model, **strategy):
        cfg = sf.ProtectConfig(loss="ice", iterations=1, inner_steps=3, fts_optimizer="sgd", alpha=1e4, clip_norm=None,
                               ntr_steps=0, mode="reference", meta_gradient="unrolled", progress=False,
                               strategies=[sf.Strategy("adam", lr=1e-2, batch_size=24, query_size=8, **strategy)])
        out = sf.protect(model, data(shape, seed=1), data(shape, seed=2), cfg).model
        run.names = {id(p): n for n, p in out.named_parameters()}
        return {n: p0.detach() - p1.detach() for (n, p0), p1 in zip(model.named_parameters(), out.parameters())}

    torch.manual_seed(0)
    model = cnn_relu().double()
    step = run(model, attacker="fresh_block")
    names = run.names
    block = {names[id(p)] for _, p, _ in fresh_draws}
    assert block == {"1.weight", "1.bias", "4.weight", "4.bias", "6.weight", "6.bias"}   # BN, fc, head
    assert all(step[n].abs().max() == 0 for n in block)
    assert step["0.weight"].abs().max() > 0
    preset = copy.deepcopy(model)
    with torch.no_grad():
        for _, p, v in fresh_draws:
            dict(preset.named_parameters())[names[id(p)]].copy_(v)
    got = run(preset, attacker="as_is")
    assert got["4.weight"].abs().max() > 0          # the preset block is the model's own: it does get one
    assert rel(step["0.weight"], got["0.weight"]) <= 1e-9       # (the conv bias has none: BatchNorm follows)


def test_fresh_parameters_follow_the_default_initialisation():
    from sophon_fast.tasks.base import fresh_parameters
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(400, 30)
    (w, vw), (b, vb) = fresh_parameters(lin, gen)
    assert w is lin.weight and b is lin.bias and vw.requires_grad and vw.is_leaf
    vw, vb = vw.detach(), vb.detach()
    assert 0.045 < vw.abs().max() <= 0.05 and vb.abs().max() <= 0.05 and abs(float(vw.mean())) < 0.002
    bn = nn.BatchNorm1d(7)
    assert [v.tolist() for _, v in fresh_parameters(bn, gen)] == [[1.0] * 7, [0.0] * 7]
    with pytest.raises(ValueError, match="Conv1D and norm layers"):
        fresh_parameters(nn.Conv2d(1, 2, 3), gen)


def test_fresh_head_draws_only_the_head(fresh_draws):
    torch.manual_seed(0)
    model, res = _protect(cnn_relu, "reference", iterations=1, meta_gradient="unrolled", ntr_steps=0,
                          strategies=[sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8, attacker="fresh_head")])
    drawn = [m for m, p, _ in fresh_draws if p is m.weight]           # one entry per drawn layer
    assert len(drawn) == 1 and isinstance(drawn[0], nn.Linear) and drawn[0].out_features == 5
    moved = [n for (n, a), b in zip(model.named_parameters(), res.model.parameters()) if not torch.equal(a, b)]
    assert "6.weight" not in moved and "4.weight" in moved      # the head is a constant, the layer under it is not


def test_fresh_layer_errors():
    for old, new in ((dict(fresh="block"), "fresh_block"), (dict(reinit_head=True), "reinit_head"),
                     (dict(train="fresh"), "Probe"), (dict(lora=2), "LoRA")):
        with pytest.raises(ValueError, match=f"is gone; use .*{new}"):
            sf.Strategy(**old)
    with pytest.raises(ValueError, match="Strategy.attacker must be one of"):
        sf.Strategy(attacker="body")
    with pytest.raises(ValueError, match="'head' or 'block'"):
        sf.Strategy(attacker={"kind": "probe", "layers": "body"})
    assert sf.ProtectConfig(loss="ice", strategies=[sf.Strategy(attacker="fresh_head")]).resolved() \
        .strategies[0].attacker.kind == "fresh_head"
    assert sf.ProtectConfig(loss="ice").resolved().strategies[0].attacker.kind == "reinit_head"
    assert sf.ProtectConfig(loss="klu").resolved().strategies[0].attacker.kind == "as_is"
    for mode in ("reference", "fast"):
        with pytest.raises(ValueError, match="needs a classifier block"):
            _protect(mlp, mode, iterations=1, strategies=[sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8,
                                                                      attacker="fresh_block")])
        torch.manual_seed(0)
        with pytest.raises(ValueError, match="fresh_block attacker needs every parameter it draws among the protected"):
            _protect(cnn_relu, mode, iterations=1, params=["0.*", "4.*", "6.*"],
                     strategies=[sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8, attacker="fresh_block")])


@pytest.mark.parametrize("strategy", [dict(attacker="fresh_block"), dict(attacker="fresh_head"), dict(attacker="reinit_head"),
                                      dict(attacker="as_is"), dict(attacker="probe"),
                                      dict(attacker={"kind": "lora", "rank": 2}), dict(attacker="fresh_head", benign_steps=2)])
def test_skip_trajectory_makes_the_draws_of_the_trajectory(strategy):
    """Another rank's trajectory is skipped with the same random draws (head or block, K batches)."""
    from sophon_fast.engine.modes import ReferenceMode
    from sophon_fast.engine.streams import BatchStream
    from sophon_fast.tasks.classification import ClassificationTask
    torch.manual_seed(0)
    model = cnn_relu().double()
    x, y = data(SHAPES[cnn_relu])
    s = sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8, **strategy)
    states = []
    for run in ("trajectory", "skip_trajectory"):
        mode = ReferenceMode(model, ClassificationTask(), list(model.parameters()))
        gen = torch.Generator().manual_seed(0)
        stream, benign = BatchStream((x, y), gen), BatchStream((x, y), gen)
        mode.begin_iteration()
        if run == "trajectory":
            mode.trajectory(s, stream, "ice", [0.5, 0.5], gen, benign)
        else:
            mode.skip_trajectory(s, stream, 2, gen, benign)
        states.append((gen.get_state(), stream.pos, stream.perm.clone(), benign.pos))
    assert torch.equal(states[0][0], states[1][0]) and states[0][1] == states[1][1] and torch.equal(states[0][2], states[1][2])
    assert states[0][3] == states[1][3]


def mlp_bn():
    """mlp with BatchNorm under the head, its running statistics far from any batch's."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 5))
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(0.2, 3)
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("make", [mlp, mlp_bn])
def test_train_fresh_only_is_a_probe_attacker_differentiated_exactly(fresh_draws, make, mode):
    """attacker="probe", unrolled: only the fresh head takes the inner SGD steps, and the meta-gradient
    of the body is torch.func's derivative of sum_k ICE(body, head_k(body)) / K with head_0 the drawn head. The
    frozen body runs in eval mode, as a last-layer attacker's does (BatchNorm: running statistics), and the
    model's mode and buffers are as they were afterwards."""
    from torch.func import functional_call, grad
    from sophon_fast.reference.losses import inverse_cross_entropy
    torch.manual_seed(0)
    model = make().double()
    hd = str(len(model) - 1)                                  # the head's index
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    xr, yr = data((20,), n=24 * 3, seed=2)
    lr, K = 0.5, 3
    res = sf.protect(model, data((20,), seed=1), (xr, yr), mode=mode, meta_gradient="unrolled", loss="ice",
                     iterations=1, inner_steps=K, fts_optimizer="sgd", alpha=1e4, clip_norm=None, ntr_steps=0,
                     progress=False, strategies=[sf.Strategy("sgd", lr=lr, batch_size=24, query_size=8, attacker="probe")])
    perm = torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))
    body0 = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(hd + ".")}
    assert res.model.training and all(torch.equal(b, buffers[n]) for n, b in res.model.named_buffers())
    model.eval()

    def objective(body):
        head = {hd + ".weight": fresh_draws[0][2], hd + ".bias": fresh_draws[1][2]}
        ce = lambda h, x, y: torch.nn.functional.cross_entropy(functional_call(model, {**body, **h}, (x,)), y)  # noqa
        total = 0.0
        for k in range(K):
            idx = perm[24 * k:24 * (k + 1)]
            g = grad(ce)(head, xr[idx][:-8], yr[idx][:-8])
            head = {n: head[n] - lr * g[n] for n in head}
            total = total + inverse_cross_entropy(functional_call(model, {**body, **head}, (xr[idx][-8:],)),
                                                  yr[idx][-8:]) / K
        return total

    want = grad(objective)(body0)
    after = dict(res.model.named_parameters())
    for n in body0:
        assert rel(body0[n] - after[n].detach(), want[n]) <= 1e-9, n
    assert torch.equal(after[hd + ".weight"].detach(), model[-1].weight.detach())    # the model's own head: untouched
    with pytest.raises(ValueError, match="Probe"):
        sf.Strategy(train="fresh")


def mlp3():
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("meta", ["first_order", "unrolled"])
def test_lora_attacker_trains_only_the_factors_and_the_meta_gradient_is_taken_at_the_adapted_weights(meta, mode,
                                                                                                     monkeypatch):
    """Strategy(lora=r): the inner Adam steps move only fresh factors A (drawn) and B (zero) of every linear layer but
    the head, the model computes with W + 2 B A, and the meta-gradient is torch.func's derivative of
    sum_k ICE(theta + 2 B_k A_k) / K: with B_k, A_k constants (first order) or differentiated through the steps
    (A's first gradient is exactly 0 with B = 0: Adam's sqrt(v) is taken at v clamped to 1e-30, as the engine does)."""
    from torch.func import functional_call, grad
    from sophon_fast.engine import attackers as modes
    from sophon_fast.reference.losses import inverse_cross_entropy
    drawn = []
    real = modes.lora_factors

    def record(w, t, r, gen):
        a, b = real(w, t, r, gen)
        drawn.append((a.detach().clone(), b.detach().clone()))
        return a, b

    monkeypatch.setattr(modes, "lora_factors", record)
    torch.manual_seed(0)
    model = mlp3().double()
    xr, yr = data((20,), n=24 * 3, seed=2)
    lr, K, b1, b2, eps = 5e-2, 3, 0.9, 0.999, 1e-8
    res = sf.protect(model, data((20,), seed=1), (xr, yr), mode=mode, meta_gradient=meta, loss="ice",
                     iterations=1, inner_steps=K, fts_optimizer="sgd", alpha=1e4, clip_norm=None, ntr_steps=0,
                     progress=False, strategies=[sf.Strategy("adam", lr=lr, batch_size=24, query_size=8, attacker={"kind": "lora", "rank": 2})])
    targets = ["1.weight", "3.weight"]                        # the head (5.weight) is never adapted
    assert len(drawn) == 2 and [tuple(a.shape) for a, _ in drawn] == [(2, 20), (2, 16)]
    assert all(not b.any() for _, b in drawn)
    perm = torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def adapted(theta, ab):
        return {**theta, **{n: theta[n] + 2.0 * ab[n + ".B"] @ ab[n + ".A"] for n in targets}}

    def trajectory(theta):
        ab = {n + x: t.clone() for n, (a, b) in zip(targets, drawn) for x, t in ((".A", a), (".B", b))}
        m = {n: torch.zeros_like(t) for n, t in ab.items()}
        v = {n: torch.zeros_like(t) for n, t in ab.items()}
        out = []
        for k in range(K):
            idx = perm[24 * k:24 * (k + 1)]
            ce = lambda f, x, y: torch.nn.functional.cross_entropy(functional_call(model, adapted(theta, f), (x,)), y)  # noqa
            g = grad(ce)(ab, xr[idx][:-8], yr[idx][:-8])
            for n in ab:
                m[n] = b1 * m[n] + (1 - b1) * g[n]
                v[n] = b2 * v[n] + (1 - b2) * g[n] * g[n]
                ab[n] = ab[n] - lr / (1 - b1 ** (k + 1)) * m[n] / (v[n].clamp_min(1e-30).sqrt() / math.sqrt(1 - b2 ** (k + 1)) + eps)
            out.append((idx, dict(ab)))
        return out

    def objective(theta):
        steps = trajectory(theta)
        if meta == "first_order":
            steps = [(idx, {n: t.detach() for n, t in ab.items()}) for idx, ab in steps]
        return sum(inverse_cross_entropy(functional_call(model, adapted(theta, ab), (xr[idx][-8:],)), yr[idx][-8:])
                   for idx, ab in steps) / K

    want = grad(objective)(theta0)
    after = dict(res.model.named_parameters())
    for n in theta0:
        assert rel(theta0[n] - after[n].detach(), want[n]) <= 1e-9, (meta, mode, n)


def test_lora_attacker_errors():
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="LoRA.rank"):
            sf.Strategy(attacker={"kind": "lora", "rank": bad})
    assert sf.ProtectConfig(loss="ice", strategies=[sf.Strategy(attacker="lora")]).resolved().strategies[0].attacker \
        == LoRA(8)
    one_layer = nn.Sequential(nn.Flatten(), nn.Linear(20, 5))      # its only linear layer is the head
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="lora attacker needs linear layers to adapt.*names none"):
        sf.protect(one_layer.double(), data((20,), seed=1), data((20,), seed=2), mode="reference", iterations=1,
                   inner_steps=1, progress=False, strategies=[sf.Strategy("sgd", batch_size=24, query_size=8, attacker={"kind": "lora", "rank": 2})])
