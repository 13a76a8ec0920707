"""protect(): reference vs fast parity in fp64, resume, non-finite handling, rollback, bad input."""
import math

import pytest
import torch
from torch import nn

import sophon_fast as sf
from sophon_fast.engine.loop import NonFiniteError

LOSSES = ["ice", "ice_reference_code", "klu", "neg_entropy"]
INNER = ["sgd", "momentum", "adam"]


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5))


def cnn_bn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5))


def relu_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))


SHAPES = {mlp: (20,), cnn_bn: (1, 8, 8), relu_mlp: (20,)}


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
    kw.setdefault("strategies", [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8, reinit_head=False)])
    res = sf.protect(model, data(shape, seed=1), data(shape, seed=2), mode=mode, progress=False, **kw)
    return model, res


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("builder", [mlp, cnn_bn])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("inner", INNER)
def test_meta_gradient_parity(builder, loss, inner):
    """One iteration, SGD outer lr 1, no clipping, no NTR: theta0 - theta1 IS the meta-gradient."""
    strat = [sf.Strategy(inner, lr=1e-2, batch_size=24, query_size=8, reinit_head=loss.startswith("ice"),
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
    strat = [sf.Strategy(inner, lr=1e-2, batch_size=24, query_size=8, reinit_head=True)]
    out = {}
    for mode in ("reference", "fast"):
        model, res = _protect(builder, mode, loss=loss, iterations=3, inner_steps=3, strategies=strat,
                              alpha=30, beta=10, ntr_batch_size=16)
        out[mode] = flat(res.model)
        assert not torch.equal(out[mode], flat(model))
    assert rel(out["fast"], out["reference"]) <= 1e-9


@pytest.mark.parametrize("builder,feature_loss", [(mlp, "collapse"), (mlp, "energy"), (cnn_bn, "collapse"),
                                                  (cnn_bn, "energy"), (cnn_bn, "margin"), (relu_mlp, "margin")])
def test_parity_strategy_mixture_two_domains_sgd_outer(builder, feature_loss):
    strats = [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8),
              sf.Strategy("adam", lr=1e-3, batch_size=20, query_size=5, reinit_head=True, steps=2, warmup_steps=3),
              sf.Strategy("momentum", lr=1e-2, batch_size=16, query_size=4)]
    out = {}
    for mode in ("reference", "fast"):
        torch.manual_seed(0)
        model = builder().double()
        shape = SHAPES[builder]
        res = sf.protect(model, data(shape, seed=1), [data(shape, seed=2), data(shape, seed=3)], mode=mode,
                         progress=False, loss="klu", iterations=3, inner_steps=3, strategies=strats,
                         trajectories=2, strategy_sampling="random", fts_optimizer="sgd", alpha=100,
                         clip_norm=None, step_weighting="linear", feature_weight=0.5,
                         feature_loss=feature_loss, feature_decay=0.3 if feature_loss == "margin" else 0.0,
                         feature_decay_samples=2, feature_inner_weight=0.3 if feature_loss == "margin" else 0.0,
                         feature_robust=0.01 if builder is relu_mlp else 0.0, feature_decay_st=builder is relu_mlp)
        out[mode] = flat(res.model)
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
    kw = dict(loss="ice", iterations=6, inner_steps=2, checkpoint_every=2, mode=mode,
              strategies=[sf.Strategy("adam", lr=1e-3, batch_size=24, query_size=8, reinit_head=True)])
    _, full = _protect(mlp, **{**kw, "checkpoint_dir": str(tmp_path / "a")})
    _, part = _protect(mlp, **{**kw, "iterations": 4, "checkpoint_dir": str(tmp_path / "b")})
    _, resumed = _protect(mlp, **{**kw, "checkpoint_dir": str(tmp_path / "b"), "resume": True})
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
                     iterations=5, inner_steps=2, eval_every=2, original_acc_floor=1.0, progress=False)
    assert res.stopped_early and "floor" in res.stop_reason
    assert len(res.history) == 2
    assert torch.equal(flat(res.model), flat(model))       # rolled back to the last good (initial) weights


def test_history_records():
    res = sf.protect(mlp().double(), data((20,), seed=1), data((20,), seed=2), original_test=data((20,), seed=4),
                     iterations=4, inner_steps=2, eval_every=2, original_acc_floor=None, progress=False)
    assert len(res.history) == 4
    for r in res.history:
        assert math.isfinite(r["fts_loss"]) and math.isfinite(r["ntr_loss"]) and r["t_fts"] > 0
    assert "original_acc" in res.history[1] and "original_acc" not in res.history[0]
    assert 0 <= res.original_acc <= 1


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
        sf.Strategy(optimizer="lbfgs").validate()
    with pytest.raises(ValueError, match="nn.Linear"):
        sf.protect(nn.Sequential(nn.Flatten(), nn.Identity()), data((20,)), data((20,)), progress=False)


def test_reference_defaults():
    ice, klu = sf.ProtectConfig(loss="ice"), sf.ProtectConfig(loss="klu")
    assert (ice.alpha, ice.beta, ice.ntr_steps, ice.strategies[0].reinit_head) == (3, 5, 1, True)
    assert ice.fts_lr == pytest.approx(3e-4) and ice.ntr_lr == pytest.approx(5e-4)
    assert (klu.fts_lr, klu.ntr_lr, klu.ntr_steps, klu.strategies[0].reinit_head) == (1e-4, 1e-4, 5, False)
    s = ice.strategies[0]
    assert (s.optimizer, s.lr, s.batch_size, s.query_size, ice.inner_steps, ice.clip_norm) == \
        ("sgd", 1e-4, 150, 20, 50, 0.5)
    assert sf.ProtectConfig.from_dict(ice.to_dict()) == ice


def test_head_preacts_is_the_relu_input_and_leaves_the_model_unchanged():
    from sophon_fast.engine.loop import _head_preacts
    from sophon_fast.models import build
    model = build("cnn_small", seed=0).double()   # in-place ReLUs
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    want = model.features[:-1](x)                        # up to the Linear before the last ReLU
    out_before = model(x)
    z = _head_preacts(model, model.head, x)
    assert torch.equal(z, want) and (z < 0).any()
    assert torch.equal(model(x), out_before)
    with pytest.raises(ValueError, match="nn.ReLU"):
        _head_preacts(mlp().double(), mlp().double()[-1], torch.randn(2, 20, dtype=torch.float64))


def test_margin_feature_loss_switches_restricted_units_off():
    """feature_loss="margin" (with a negligible inner step and no NTR) drives the restricted pre-activations below
    -margin, and the hinge it reports falls."""
    from sophon_fast.engine.loop import _head_preacts
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    xr, yr = data((20,), seed=2)
    res = sf.protect(model, data((20,), seed=1), (xr, yr), iterations=60, inner_steps=1, progress=False,
                     feature_loss="margin", feature_weight=1.0, feature_margin=0.5, ntr_steps=0, alpha=1e2,
                     strategies=[sf.Strategy("sgd", lr=1e-6, batch_size=24, query_size=8)])
    with torch.no_grad():
        before, after = _head_preacts(model, model[-1], xr), _head_preacts(res.model, res.model[-1], xr)
    assert (before > 0).float().mean() > 0.3
    assert (after <= 0).float().mean() > 0.95 and after.mean() < -0.4
    hinge = [r["feature_loss"] for r in res.history]
    assert hinge[-1] < 0.1 * hinge[0]


def test_margin_config_errors():
    with pytest.raises(ValueError, match="feature_margin"):
        sf.ProtectConfig(feature_margin=-1.0)
    with pytest.raises(ValueError, match="feature_decay"):
        sf.ProtectConfig(feature_decay=-0.1)
    with pytest.raises(ValueError, match="feature_decay"):
        sf.ProtectConfig(feature_decay_samples=0)
    with pytest.raises(ValueError, match="feature_loss"):
        sf.ProtectConfig(feature_loss="dead")
    with pytest.raises(ValueError, match="nn.ReLU"):
        sf.protect(mlp().double(), data((20,), seed=1), data((20,), seed=2), iterations=1, inner_steps=1,
                   progress=False, feature_loss="margin", feature_weight=1.0)


def test_margin_decay_hinge_is_taken_at_soft_thresholded_body_weights():
    """decays=[s]: the hinge is averaged with the one at body weights moved s towards 0 (head untouched)."""
    from sophon_fast.engine.loop import _feature_loss, _head_preacts, _soft_threshold
    from sophon_fast.models import build
    model = build("cnn_small", seed=0).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(_soft_threshold(torch.tensor([-0.5, -0.1, 0.0, 0.2, 0.7]), 0.3),
                       torch.tensor([-0.2, 0.0, 0.0, 0.0, 0.4]))
    s = 0.01
    shrunk = build("cnn_small", seed=0).double()
    with torch.no_grad():
        for n, p in shrunk.named_parameters():
            if not n.startswith("head."):
                p.copy_(_soft_threshold(p, s))
    hinge = lambda m: torch.relu(_head_preacts(m, m.head, x) + 1.0).sum(1).mean()  # noqa: E731
    got = _feature_loss("margin", model, model.head, x, None, 1.0, [s])
    assert torch.allclose(got, (hinge(model) + hinge(shrunk)) / 2, rtol=1e-12)
    got.backward()
    assert model.head.weight.grad is None and model.features[0].weight.grad.abs().sum() > 0


def test_feature_inner_weight_adds_the_hinge_to_every_query_loss():
    """With a zero inner learning rate theta'_k = theta, so each recorded query loss grows by exactly
    weight * hinge(theta) of its batch: the FTS loss rises and the weights move differently."""
    kw = dict(iterations=1, inner_steps=2, ntr_steps=0, progress=False, loss="klu",
              strategies=[sf.Strategy("sgd", lr=1e-12, batch_size=24, query_size=8)])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    base = sf.protect(model, data((20,), seed=1), data((20,), seed=2), **kw)
    extra = sf.protect(model, data((20,), seed=1), data((20,), seed=2), feature_inner_weight=2.0, **kw)
    assert extra.history[0]["fts_loss"] > base.history[0]["fts_loss"] + 0.1
    assert not torch.equal(flat(extra.model), flat(base.model))


def test_feature_robust_margin_is_the_worst_case_of_a_sign_step_on_the_last_body_linear():
    from sophon_fast.engine.loop import _margin_run
    from sophon_fast.models import build
    model = build("cnn_small", seed=0).double()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    fc = model.features[7]
    h = model.features[:7](x)
    d = 0.003
    _, hinge = _margin_run(model, model.head, lambda: model(x), 1.0, robust=d)
    with torch.no_grad():                   # the worst step of size d on fc for every unit: +d*sign(h), +d
        worst = fc(h) + d * (h.abs().sum(1, keepdim=True) + 1)
        fc.weight.add_(d * torch.sign(h).mean(0, keepdim=True).sign())  # one common step: a lower bound
    assert torch.allclose(hinge, torch.relu(worst + 1.0).sum(1).mean(), rtol=1e-12)
    assert torch.all(fc(h) + 1e-9 <= worst)
    with pytest.raises(ValueError, match="feature_robust"):
        sf.protect(cnn_bn().double(), data((1, 8, 8), seed=1), data((1, 8, 8), seed=2), iterations=1,
                   inner_steps=1, progress=False, feature_loss="margin", feature_weight=1.0, feature_robust=d)


def test_feature_decay_straight_through_pushes_decayed_weights():
    """Exact soft-threshold: weights within s of 0 get no hinge gradient; straight-through: they do."""
    from sophon_fast.engine.loop import _feature_loss
    from sophon_fast.models import build
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    grads = {}
    for st in (False, True):
        model = build("cnn_small", seed=0).double()
        with torch.no_grad():
            model.features[7].bias.fill_(0.001)                # inside the dead zone of s = 0.5
        _feature_loss("margin", model, model.head, x, None, 1.0, [0.5], straight_through=st).backward()
        grads[st] = model.features[7].bias.grad.clone()
    at_theta_only = grads[False]                               # only the hinge at theta reaches the bias
    assert torch.all(grads[True] >= at_theta_only) and grads[True].sum() > at_theta_only.sum() + 1.0


def test_resume_with_a_different_config_is_refused(tmp_path):
    kw = dict(iterations=2, inner_steps=2, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    _protect(mlp, "fast", **kw)
    with pytest.raises(ValueError, match="different config.*alpha"):
        _protect(mlp, "fast", resume=True, alpha=7.0, **{**kw, "iterations": 4})
    _, res = _protect(mlp, "fast", resume=True, **{**kw, "iterations": 4})   # more iterations: fine
    assert len(res.history) == 4
