import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sophon_fast import attacks, models
from sophon_fast.attacks import Attack, head_start_removed, overhead
from sophon_fast.attacks.run import _head_inputs


def _toy(n=240, seed=0, classes=4):
    """Learnable 28x28 data: class c brightens row band c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.5
    for c in range(classes):
        x[y == c, :, 7 * c:7 * c + 7, :] += 1.0
    return TensorDataset(x, y)


TRAIN, TEST = _toy(240, 0), _toy(120, 1)
QUICK = Attack(method="full", optimizer="adam", lr=1e-3, batch_size=50, epochs=2)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_curve_shape_determinism_and_model_untouched():
    m = models.build("cnn_bn", num_classes=4, seed=0)
    before = _state(m)
    rng = torch.get_rng_state()
    a = attacks.run(m, TRAIN, TEST, QUICK, seed=5)
    b = attacks.run(m, DataLoader(TRAIN, batch_size=7), TEST, QUICK, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a == b and len(a) == QUICK.epochs + 1 and all(0.0 <= v <= 1.0 for v in a)
    assert a[-1] > 0.5   # it learns the toy task
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and m.training


def test_last_layer_changes_only_the_head():
    m = models.build("cnn_bn", num_classes=4, seed=0)
    m.train()
    atk = Attack(method="last_layer", optimizer="momentum", lr=1e-2, batch_size=60, epochs=2)
    curve, out = attacks.run(m, TRAIN, TEST, atk, seed=0, return_model=True)
    sd0, sd1 = m.state_dict(), out.state_dict()
    changed = {k for k in sd0 if not torch.equal(sd0[k], sd1[k])}
    assert changed == {"head.weight", "head.bias"}   # BN running statistics untouched too
    assert curve[-1] > curve[0]


def test_last_layer_shortcut_matches_full_forward():
    class Wrapped(nn.Module):   # head not the last op: run() must take the slow path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 1.0

    m = models.build("cnn_small", num_classes=4, seed=0).eval()
    X = TEST.tensors[0]
    assert _head_inputs(m, m.head, X) is not None and _head_inputs(Wrapped(m), m.head, X) is None
    atk = Attack(method="last_layer", optimizer="adam", lr=1e-2, batch_size=60, epochs=3)
    fast, fm = attacks.run(m, TRAIN, TEST, atk, seed=1, return_model=True)
    slow, sm = attacks.run(Wrapped(m), TRAIN, TEST, atk, seed=1, return_model=True)
    assert max(abs(a - b) for a, b in zip(fast, slow)) <= 2 / len(TEST)
    torch.testing.assert_close(fm.head.weight, sm.inner.head.weight, rtol=1e-4, atol=1e-5)


def test_reinit_head_initialisation():
    m = models.build("cnn_small", num_classes=4, seed=0)
    atk = Attack(method="reinit_head", optimizer="sgd", lr=1e-3, epochs=0)
    _, a = attacks.run(m, TRAIN, TEST, atk, seed=3, return_model=True)
    _, b = attacks.run(m, TRAIN, TEST, atk, seed=3, return_model=True)
    _, c = attacks.run(m, TRAIN, TEST, atk, seed=4, return_model=True)
    w = a.head.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))   # xavier_uniform_
    assert not torch.equal(w, m.head.weight) and w.abs().max() <= bound
    assert torch.equal(a.head.bias, torch.zeros_like(a.head.bias))
    assert torch.equal(w, b.head.weight) and not torch.equal(w, c.head.weight)
    body = [k for k in m.state_dict() if not k.startswith("head.")]
    assert all(torch.equal(m.state_dict()[k], a.state_dict()[k]) for k in body)


def test_full_changes_body():
    m = models.build("cnn_small", num_classes=4, seed=0)
    _, out = attacks.run(m, TRAIN, TEST, QUICK, seed=0, return_model=True)
    assert not torch.equal(out.features[0].weight, m.features[0].weight)
    assert not torch.equal(out.head.weight, m.head.weight)


def test_scratch():
    m = models.build("resnet_narrow", num_classes=4, widths=(4, 8, 8), blocks=(1, 1, 1), seed=0)
    s1, s2, s3 = attacks.scratch(m, seed=1), attacks.scratch(m, seed=1), attacks.scratch(m, seed=2)
    assert s1.sophon_arch == m.sophon_arch
    assert torch.equal(s1.head.weight, s2.head.weight) and not torch.equal(s1.head.weight, s3.head.weight)
    assert not torch.equal(s1.head.weight, m.head.weight)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    with torch.no_grad():
        plain[2].running_mean.fill_(3.0)
    p1, p2 = attacks.scratch(plain, seed=1), attacks.scratch(plain, seed=1)
    assert torch.equal(p1[3].weight, p2[3].weight) and not torch.equal(p1[3].weight, plain[3].weight)
    assert torch.equal(p1[2].running_mean, torch.zeros(8))
    assert attacks.scratch("mlp", seed=0, num_classes=3).head.out_features == 3
    assert attacks.scratch(m.sophon_arch, seed=1).sophon_arch == m.sophon_arch


def test_accuracy_helper():
    class Oracle(nn.Module):   # predicts the label stored in pixel (0, 0)
        def forward(self, x):
            return nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.zeros(10, 1, 28, 28)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0.0])
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])
    assert attacks.accuracy(Oracle(), TensorDataset(x, y), batch_size=3) == 0.9


def test_evaluate_suite_rows():
    m = models.build("cnn_small", num_classes=4, seed=0)
    atks = [QUICK, Attack(method="last_layer", optimizer="adam", lr=1e-3, batch_size=60, epochs=4)]
    rows = attacks.evaluate_suite(m, m, TRAIN, TEST, atks, seed=0, epochs_scale=0.5, progress=False)
    assert [r["attack"] for r in rows] == [a.name for a in atks]
    assert [r["epochs"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["protected"]) == len(r["scratch"]) == r["epochs"] + 1
        assert r["protected"] == r["unprotected"]
        assert r["overhead"] == overhead(r["protected"], r["scratch"]).value
        assert {"never_reached", "head_start_removed", "seconds", "optimizer", "lr"} <= r.keys()
    rows = attacks.evaluate_suite(m, None, TRAIN, TEST, [QUICK.scaled(0.5)], progress=False)
    assert rows[0]["unprotected"] is None and rows[0]["head_start_removed"] is None


def test_suites():
    (paper,) = attacks.suite("paper")
    assert (paper.method, paper.optimizer, paper.lr, paper.momentum, paper.weight_decay, paper.batch_size,
            paper.epochs) == ("full", "momentum", 1e-4, 0.9, 1e-4, 200, 20)
    default = attacks.suite("default")
    assert len(default) == 12 and len({a.name for a in default}) == 12
    assert {(a.optimizer, a.lr) for a in default} == {("momentum", 1e-3), ("momentum", 1e-2),
                                                      ("adam", 1e-4), ("adam", 1e-3)}
    assert {a.method for a in default} == set(attacks.METHODS)
    full = attacks.suite("full")
    assert len(full) == 7 * 3 * 2 * 3 == len({a.name for a in full})
    assert {a.optimizer for a in full} == set(attacks.OPTIMIZERS) and {a.batch_size for a in full} == {64, 200}
    assert all(a.epochs == 20 and a.weight_decay == 1e-4 for a in full)
    with pytest.raises(KeyError):
        attacks.suite("nope")


def test_attack_validation_and_optimizers():
    with pytest.raises(ValueError):
        Attack(method="lora")
    with pytest.raises(ValueError):
        Attack(optimizer="lion")
    with pytest.raises(ValueError):
        Attack(lr=0)
    assert Attack(method="full", optimizer="adam", lr=1e-3, batch_size=64, epochs=5).name == "full-adam-lr0.001-bs64-ep5"
    assert QUICK.scaled(0.1).epochs == 1 and QUICK.scaled(3).epochs == 6
    p = [nn.Parameter(torch.zeros(2))]
    expected = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adam": torch.optim.Adam,
                "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta,
                "rmsprop": torch.optim.RMSprop}
    for name, cls in expected.items():
        opt = Attack(optimizer=name, lr=0.5).make_optimizer(p)
        assert type(opt) is cls and opt.defaults["weight_decay"] == 1e-4 and opt.defaults["lr"] == 0.5
    assert Attack(optimizer="sgd").make_optimizer(p).defaults["momentum"] == 0.0
    assert Attack(optimizer="momentum").make_optimizer(p).defaults["momentum"] == 0.9


def test_overhead_arithmetic_and_edges():
    scratch = [0.1, 0.5, 0.8, 0.9, 1.0]   # target 0.9 reached at epoch 3
    assert overhead([0.1, 0.2, 0.3, 0.5, 0.6], scratch) == (None, True)
    assert overhead([0.1, 0.2, 0.3, 0.5, 0.95], scratch) == (4 / 3, False)
    assert overhead(scratch, scratch) == (1.0, False)
    assert overhead([0.95, 0.1, 0.1, 0.1, 0.1], scratch) == (0.0, False)        # starts above: zero epochs
    flat = [0.5, 0.5, 0.5]                                                      # scratch at target at epoch 0
    assert overhead([0.1, 0.1, 0.46], flat) == (2.0, False)                     # denominator clamped to 1
    assert overhead([0.5, 0.1, 0.1], flat) == (0.0, False)
    assert overhead([0.1, 0.2], [0.1, 0.2], fraction=1.0) == (1.0, False)
    assert overhead([0.1, float("nan")], [0.1, 0.5]) == (None, True)
    v, never = overhead([0.2, 0.9], [0.1, 0.2, 0.5])
    assert v == 0.5 and not never
    with pytest.raises(ValueError):
        overhead([], [0.1])
    with pytest.raises(ValueError):
        overhead([0.1], [0.1], fraction=0.0)
    assert attacks.epochs_to_reach([0.1, 0.3, 0.2], 0.25) == 1 and attacks.epochs_to_reach([0.1], 0.5) is None


def test_head_start_removed_arithmetic():
    assert head_start_removed([0.1, 0.2], [0.1, 0.9], [0.1, 0.6]) == pytest.approx(7 / 3)
    assert head_start_removed(0.6, 0.9, 0.6) == pytest.approx(1.0)
    assert head_start_removed(0.9, 0.9, 0.6) == 0.0
    assert head_start_removed(0.75, 0.9, 0.6) == pytest.approx(0.5)
    assert head_start_removed(0.95, 0.9, 0.6) == pytest.approx(-1 / 6)
    assert head_start_removed(0.1, 0.65, 0.6) is None                  # head start < 0.10
    assert head_start_removed(0.1, 0.5, 0.6) is None                   # unprotected below scratch
    assert head_start_removed(0.7, 0.8, 0.7) == pytest.approx(1.0)     # gap of exactly 0.10 counts
    with pytest.raises(ValueError):
        head_start_removed([], [0.5], [0.1])
