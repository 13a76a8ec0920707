"""The feature-collapse component (sophon_fast/defences/collapse.py)."""
import math

import pytest
import torch
from torch import nn

import sophon_fast as sf
from sophon_fast.defences import CollapseConfig, TrapConfig
from sophon_fast.models import build
from sophon_fast.tasks import ClassificationTask


def identity_body():
    """A model whose classifier block's input is the flattened image itself (AvgPool2d(1) is the block end)."""
    return nn.Sequential(nn.AvgPool2d(1), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5)).double()


def collapse_for(model, **kw):
    c = CollapseConfig(**kw).build()
    c.attach(model, ClassificationTask())
    return c


def images(n, seed, shape=(1, 4, 4)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_feature_is_the_input_of_the_block_the_reinit_attack_resets():
    model = build("cnn_small", seed=0).double()
    c = collapse_for(model)
    assert c.module is model.features[7]
    x = images(3, 0, (1, 28, 28))
    assert torch.equal(c.features(model, x), model.features[:7](x))


def test_zero_at_the_original_mean_positive_elsewhere():
    model = identity_body()
    c = collapse_for(model, weight=2.0)
    xo = images(10, 1)
    at_mean = xo.mean(0, keepdim=True).expand(4, -1, -1, -1)
    assert float(c.loss(model, (at_mean,), (xo,), None)) == pytest.approx(0.0, abs=1e-24)
    xr = images(6, 2)
    got = c.loss(model, (xr,), (xo,), None)
    h_o, h_r = xo.flatten(1), xr.flatten(1)
    want = 2.0 * ((h_r - h_o.mean(0)) ** 2).sum(1).mean() / (h_o.var(0, unbiased=False).sum() + 1e-6)
    assert float(got) > 0 and torch.allclose(got, want, rtol=1e-12)


def test_scale_free_and_mean_detached_by_default():
    model = identity_body()
    xo, xr = images(10, 1), images(6, 2)
    a = collapse_for(model).loss(model, (xr,), (xo,), None)
    b = collapse_for(model).loss(model, (3 * xr,), (3 * xo,), None)
    assert torch.allclose(a, b, rtol=1e-6)                 # up to eps: shrinking every feature is no way out
    for detach in (True, False):
        xo_ = xo.clone().requires_grad_(True)
        xr_ = xr.clone().requires_grad_(True)
        collapse_for(model, detach_mean=detach).loss(model, (xr_,), (xo_,), None).backward()
        assert xr_.grad.abs().sum() > 0
        assert (xo_.grad is None) == detach


def test_finite_on_a_batch_of_one():
    model = build("cnn_small", seed=0).double()
    c = collapse_for(model)
    for nr, no in ((1, 8), (8, 1), (1, 1)):
        loss = c.loss(model, (images(nr, 1, (1, 28, 28)),), (images(no, 2, (1, 28, 28)),), None)
        loss.backward()
        assert math.isfinite(float(loss.detach()))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()


def test_errors():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(ValueError, match="no convolution or pooling"):
        collapse_for(mlp)
    with pytest.raises(ValueError, match="weight"):
        CollapseConfig(weight=0.0)
    with pytest.raises(ValueError, match="eps"):
        CollapseConfig(eps=0.0)
    with pytest.raises(ValueError, match="original"):
        collapse_for(identity_body()).loss(identity_body(), (images(2, 0),), None, None)
    cfg = sf.ProtectConfig(defences=[CollapseConfig(weight=3.0, detach_mean=False), TrapConfig()])
    assert sf.ProtectConfig.from_dict(cfg.to_dict()) == cfg


def cnn_relu():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 8),
                         nn.ReLU(), nn.Linear(8, 5))


def data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]
                     + [b.detach().reshape(-1).double() for b in model.buffers()])


@pytest.mark.parametrize("defences", [[CollapseConfig(weight=2.0)],
                                      [TrapConfig(weight=0.5, margin=1.0), CollapseConfig(weight=1.0, detach_mean=False)]])
def test_parity_fast_reference(defences):
    strats = [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8),
              sf.Strategy("adam", lr=1e-3, batch_size=20, query_size=5, attacker="reinit_head", steps=2)]
    out = {}
    for mode in ("reference", "fast"):
        torch.manual_seed(0)
        model = cnn_relu().double()
        res = sf.protect(model, data(seed=1), data(seed=2), mode=mode, progress=False, loss="ice", iterations=3,
                         inner_steps=3, strategies=strats, fts_optimizer="sgd", alpha=100, clip_norm=None,
                         ntr_batch_size=16, defences=defences)
        out[mode] = flat(res.model)
        assert not torch.equal(out[mode], flat(model))
        assert all(math.isfinite(r["defence_loss"]) and r["defence_loss"] > 0 for r in res.history)
    assert float((out["fast"] - out["reference"]).norm() / out["reference"].norm()) <= 1e-9


def test_protect_with_collapse_pulls_restricted_features_to_the_original_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 8), nn.ReLU(),
                          nn.Linear(8, 5)).double()      # no BatchNorm: it would renormalise each batch's features
    xo, xr = data(seed=1), data(seed=2)
    xr = (xr[0] * 2 + 1, xr[1])                                # a shifted restricted domain
    res = sf.protect(model, xo, xr, iterations=30, inner_steps=1, progress=False, ntr_steps=0, alpha=1e2,
                     defences=[CollapseConfig(weight=10.0)],
                     strategies=[sf.Strategy("sgd", lr=1e-6, batch_size=24, query_size=8)])
    losses = [r["defence_loss"] for r in res.history]
    assert sum(losses[20:]) / 10 < 0.5 * losses[0]
