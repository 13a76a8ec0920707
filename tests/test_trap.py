"""The dead-unit trap component (sophon_fast/defences/trap.py)."""
import pytest
import torch
from torch import nn

import sophon_fast as sf
from sophon_fast.defences import TrapConfig
from sophon_fast.defences.trap import soft_threshold
from sophon_fast.models import build
from sophon_fast.tasks import ClassificationTask


def data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def trap_for(model, x, **kw):
    trap = TrapConfig(**{"weight": 1.0, **kw}).build()
    trap.attach(model, ClassificationTask())
    trap._locate(model, x)
    return trap


def test_preacts_are_the_relu_input_and_only_two_layers_are_hooked():
    model = build("cnn_small", seed=0).double()   # in-place ReLUs
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    trap = trap_for(model, x)
    assert trap.relu is model.features[8] and trap.linear is model.features[7]
    out_before = model(x)
    out, z, h = trap.preacts(lambda: model(x))
    assert torch.equal(z, model.features[:8](x)) and (z < 0).any()
    assert torch.equal(h, model.features[:7](x))
    assert torch.equal(model(x), out_before) and torch.equal(out, out_before)
    with pytest.raises(ValueError, match="nn.ReLU"):
        m = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5)).double()
        trap_for(m, torch.randn(2, 20, dtype=torch.float64))


def test_protect_with_the_trap_switches_restricted_units_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    xr, yr = data(seed=2)
    res = sf.protect(model, data(seed=1), (xr, yr), iterations=60, inner_steps=1, progress=False, ntr_steps=0,
                     alpha=1e2, defences=[TrapConfig(weight=1.0, margin=0.5)],
                     strategies=[sf.Strategy("sgd", lr=1e-6, batch_size=24, query_size=8)])
    before, after = model[1](xr.flatten(1)), res.model[1](xr.flatten(1)).detach()
    assert (before > 0).float().mean() > 0.3
    assert (after <= 0).float().mean() > 0.95 and after.mean() < -0.4
    hinge = [r["defence_loss"] for r in res.history]
    assert hinge[-1] < 0.1 * hinge[0]


def test_decay_hinge_is_taken_at_soft_thresholded_body_weights():
    model = build("cnn_small", seed=0).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(soft_threshold(torch.tensor([-0.5, -0.1, 0.0, 0.2, 0.7]), 0.3),
                          torch.tensor([-0.2, 0.0, 0.0, 0.0, 0.4]))
    gen = torch.Generator().manual_seed(0)
    s = float(torch.rand(1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)) * 0.02
    shrunk = build("cnn_small", seed=0).double()
    with torch.no_grad():
        for n, p in shrunk.named_parameters():
            if not n.startswith("head."):
                p.copy_(soft_threshold(p, s))
    hinge = lambda m: torch.relu(m.features[:8](x) + 1.0).sum(1).mean()  # noqa: E731
    trap = trap_for(model, x, margin=1.0, decay=0.02)
    got = trap.loss(model, (x,), None, gen)
    assert torch.allclose(got, (hinge(model) + hinge(shrunk)) / 2, rtol=1e-12)
    got.backward()
    assert model.head.weight.grad is None and model.features[0].weight.grad.abs().sum() > 0


def test_robust_margin_is_the_worst_case_of_a_sign_step_on_the_last_body_linear():
    model = build("cnn_small", seed=0).double()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    fc, h = model.features[7], model.features[:7](x)
    d = 0.003
    hinge = trap_for(model, x, margin=1.0, robust=d).hinge(lambda: model(x))
    with torch.no_grad():
        worst = fc(h) + d * (h.abs().sum(1, keepdim=True) + 1)
        fc.weight.add_(d * torch.sign(h).mean(0, keepdim=True).sign())    # one common step: a lower bound
    assert torch.allclose(hinge, torch.relu(worst + 1.0).sum(1).mean(), rtol=1e-12)
    assert torch.all(fc(h) + 1e-9 <= worst)
    with pytest.raises(ValueError, match="robust"):
        m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 26 * 26, 5)).double()
        trap_for(m, x, robust=d)


def test_straight_through_pushes_decayed_weights():
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    grads = {}
    for st in (False, True):
        model = build("cnn_small", seed=0).double()
        with torch.no_grad():
            model.features[7].bias.fill_(0.001)                # inside the dead zone of every s >= 0.001
        trap = trap_for(model, x, margin=1.0, decay=5.0, straight_through=st)
        trap.loss(model, (x,), None, torch.Generator().manual_seed(1)).backward()
        grads[st] = model.features[7].bias.grad.clone()
    assert torch.all(grads[True] >= grads[False]) and grads[True].sum() > grads[False].sum() + 1.0


def test_trap_config_errors():
    with pytest.raises(ValueError, match="margin"):
        TrapConfig(margin=-1.0)
    with pytest.raises(ValueError, match="decay"):
        TrapConfig(decay_samples=0)
    with pytest.raises(ValueError, match="unknown kind"):
        sf.ProtectConfig(defences=[{"kind": "moat"}])


# ---- at="block": the trap at the ReLU feeding the classifier block (docs/experiments.md e37-) ----

def test_block_trap_hooks_the_relu_feeding_the_classifier_block():
    model = build("cnn_small", seed=0).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    trap = trap_for(model, x, at="block")
    assert trap.relu is model.features[4] and trap.linear is None      # the ReLU after conv2; fc64 is features[7]
    out_before = model(x)
    out, z, h = trap.preacts(lambda: model(x))
    assert z.shape == (6, 32 * 14 * 14) and torch.equal(z, model.features[:4](x).flatten(1)) and h is None
    assert torch.equal(out, out_before) and torch.equal(model(x), out_before)
    head = trap_for(model, x)                                           # at="head" unchanged
    assert head.relu is model.features[8] and head.linear is model.features[7]


def test_block_hinge_is_zero_iff_every_unit_is_below_minus_margin():
    model = build("cnn_small", seed=0).double()
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    margin = 1.0
    trap = trap_for(model, x, at="block", margin=margin, weight=2.0)
    z = model.features[:4](x).detach()
    assert torch.allclose(trap.loss(model, (x,), None, None), 2.0 * torch.relu(z + margin).mean((1, 2, 3)).mean(),
                          rtol=1e-12)                                   # normalised by the 6,272 units
    assert trap.loss(model, (x,), None, None) > 0
    conv2 = model.features[3]
    with torch.no_grad():                                               # every channel's max just below -margin
        conv2.bias.sub_(z.amax((0, 2, 3)) + margin + 1e-6)
    loss = trap.loss(model, (x,), None, None).detach()
    assert float(loss) == 0.0 and model.features[:4](x).max() < -margin
    with torch.no_grad():
        conv2.bias[7] += 2e-6                                           # one channel's top unit above -margin
    assert trap.loss(model, (x,), None, None) > 0


def test_block_trap_config():
    with pytest.raises(ValueError, match="robust"):
        TrapConfig(at="block", robust=0.002)
    with pytest.raises(ValueError, match="at"):
        TrapConfig(at="neck")
    assert TrapConfig().at == "head"
    cfg = sf.ProtectConfig(defences=[TrapConfig(robust=0.002), TrapConfig(at="block", weight=15.0, margin=1.0)])
    assert sf.ProtectConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in sf.ProtectConfig(defences=[TrapConfig()]).to_dict().items()}
    old["defences"] = [{k: v for k, v in d.items() if k != "at"} for d in old["defences"]]   # a config from before
    assert sf.ProtectConfig.from_dict(old).defences == [TrapConfig()]


def conv_pool_net():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 8),
                         nn.ReLU(), nn.Linear(8, 5))


def images(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("defences", [[TrapConfig(weight=3.0, margin=0.5, at="block")],
                                      [TrapConfig(weight=0.5, margin=1.0, decay=0.3, straight_through=True),
                                       TrapConfig(weight=3.0, margin=0.5, decay=0.3, straight_through=True, at="block")]])
def test_block_trap_parity_fast_reference(defences):
    strats = [sf.Strategy("sgd", lr=1e-2, batch_size=24, query_size=8),
              sf.Strategy("adam", lr=1e-3, batch_size=20, query_size=5, reinit_head=True, steps=2)]
    out = {}
    for mode in ("reference", "fast"):
        torch.manual_seed(0)
        model = conv_pool_net().double()
        res = sf.protect(model, images(seed=1), images(seed=2), mode=mode, progress=False, loss="ice", iterations=3,
                         inner_steps=3, strategies=strats, fts_optimizer="sgd", alpha=100, clip_norm=None,
                         defences=defences)
        out[mode] = torch.cat([p.detach().reshape(-1) for p in res.model.parameters()])
        assert not torch.equal(out[mode], torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        assert all(r["defence_loss"] > 0 for r in res.history)
    assert float((out["fast"] - out["reference"]).norm() / out["reference"].norm()) <= 1e-9


def test_protect_with_a_head_and_a_block_trap_switches_conv_units_off():
    torch.manual_seed(0)
    model = conv_pool_net().double()
    xo, xr = images(seed=1), images(seed=2)
    x = xr[0]
    both = [TrapConfig(weight=1.0, margin=0.5), TrapConfig(weight=50.0, margin=0.5, at="block")]   # block: per unit
    traps = [c.build() for c in both]
    for t in traps:
        t.attach(model, ClassificationTask())
        t._locate(model, x)
    assert traps[0].relu is model[5] and traps[1].relu is model[1]
    res = sf.protect(model, xo, xr, iterations=60, inner_steps=1, progress=False, ntr_steps=0, alpha=1e2,
                     defences=both, strategies=[sf.Strategy("sgd", lr=1e-6, batch_size=24, query_size=8)])
    losses = [r["defence_loss"] for r in res.history]
    assert losses[-1] < 0.1 * losses[0]
    z, before = res.model[:1](x).detach(), model[:1](x).detach()
    assert (before > 0).float().mean() > 0.3 and (z <= 0).float().mean() > 0.95
