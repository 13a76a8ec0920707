"""The dead-unit trap component (sophon_fast/defences/trap.py)."""
import copy

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


def test_on_a_batchnorm_model_the_hinge_is_averaged_over_train_and_eval_mode():
    """The last-layer attacker reads the body in eval mode (running statistics), full fine-tuning in train mode:
    the hinge covers both, and leaves the model's mode as it was."""
    model = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.2, 3)
    x = data(n=12)[0]
    trap = trap_for(model, x, margin=1.0)
    hinge = lambda m: torch.relu(m[:2](x) + 1.0).sum(1).mean()  # noqa: E731
    with torch.no_grad():
        want_train = hinge(copy.deepcopy(model).train())
        want_eval = hinge(copy.deepcopy(model).eval())
    saved = [b.clone() for b in model.buffers()]
    for was in (True, False):
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)
        model.train(was)
        got = trap.loss(model, (x,), None, torch.Generator().manual_seed(0))
        assert torch.allclose(got, (want_train + want_eval) / 2, rtol=1e-12) and model.training == was
    assert not torch.allclose(want_train, want_eval)


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
        TrapConfig(decay=-1.0)
    with pytest.raises(ValueError, match="unknown kind"):
        sf.ProtectConfig(defences=[{"kind": "moat"}])
