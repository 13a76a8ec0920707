"""The adaptive attack suite (sophon_fast.attacks.adaptive / probes), its runner hooks, and the probe adversary
defence experiments (docs/experiments.md e26-e28)."""
import dataclasses

import pytest
import torch
from torch import nn

from sophon_fast import models
from sophon_fast.attacks import Attack, run
from sophon_fast.attacks.adaptive import (AdaptiveAttack, AdaptiveConfig, check_targets, classifier_block,
                                          evaluate_adaptive, excess, prepare, render_markdown,
                                          signatures)
from sophon_fast.attacks.probes import HEAD_INPUT, block_features, capture, feature_blocks, probe_curve
from sophon_fast.attacks.spec import Lion


def _data(n, seed, classes=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.3
    x[:, 0, :4, :4] += y.view(-1, 1, 1).float()   # learnable: the label is in one corner
    return x, y


def test_run_eval_steps_and_loss_log():
    m = models.build("cnn_small", num_classes=4, seed=0)
    train, test = _data(50, 0), _data(20, 1)
    atk = Attack(method="full", optimizer="adam", lr=1e-3, batch_size=10, epochs=3)   # 5 steps per epoch
    log = []
    curve = run(m, train, test, atk, eval_steps=[1, 2, 7], loss_log=log)
    assert len(curve) == 4 and len(log) == 7 and all(t.dim() == 0 and not t.requires_grad for t in log)
    assert len(run(m, train, test, atk)) == 4   # per epoch without eval_steps
    for bad in ([0, 2], [3, 3], [2, 16]):
        with pytest.raises(ValueError):
            run(m, train, test, atk, eval_steps=bad)


def test_sign_optimizers_move_every_weight_by_lr():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    p.grad = torch.tensor([1e-9, -5.0, 0.3])
    Lion([p], lr=0.1, betas=(0.0, 0.0)).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 2.9]))
    for name in ("signsgd", "sign_momentum"):
        opt = Attack(optimizer=name, lr=0.5).make_optimizer([p])
        assert isinstance(opt, Lion) and opt.defaults["weight_decay"] == 1e-4
    with pytest.raises(ValueError):
        Lion([p], lr=0.1, betas=(1.0, 0.0))


def test_classifier_block_and_blocks():
    m = models.build("cnn_small", seed=0)
    assert classifier_block(m) == [m.features[7], m.head]
    assert classifier_block(m, last=1) == [m.head]
    with pytest.raises(ValueError):
        classifier_block(models.build("mlp", seed=0))
    assert feature_blocks(m) == ["features.2", "features.5", HEAD_INPUT]
    r = models.build("resnet_narrow", seed=0)
    assert feature_blocks(r)[-4:] == ["stages.0", "stages.1", "stages.2", HEAD_INPUT]
    x = _data(6, 0)[0]
    feats = block_features(m, x, feature_blocks(m))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"features.2": (6, 16 * 14 * 14),
                                                            "features.5": (6, 32 * 7 * 7), HEAD_INPUT: (6, 64)}
    with capture(m, ["features.5"]) as got:
        m(x).sum().backward()
    assert got["features.5"][0].requires_grad and not m.features[5]._forward_hooks
    with pytest.raises(ValueError):
        with capture(m, ["nope"]):
            pass


def test_prepare_preps():
    a, b = models.build("cnn_small", seed=0), models.build("cnn_small", seed=1)
    pa, pb = (prepare(m, AdaptiveAttack("r", "reinit_block"), seed=3) for m in (a, b))
    torch.testing.assert_close(pa.head.weight, pb.head.weight)              # same draws for every body
    torch.testing.assert_close(pa.features[7].weight, pb.features[7].weight)
    torch.testing.assert_close(pa.features[0].weight, a.features[0].weight)  # below the block: untouched
    assert not torch.equal(pa.head.weight, a.head.weight)
    z = prepare(a, AdaptiveAttack("z", "zero_bias"), seed=0)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in z.named_parameters() if n.endswith("bias"))
    assert float(a.head.bias.detach().abs().sum()) > 0   # the original is untouched
    n1, n2 = (prepare(a, AdaptiveAttack("n", "noise", noise_std=0.1), seed=5) for _ in range(2))
    torch.testing.assert_close(n1.head.weight, n2.head.weight)
    rel = ((n1.head.weight - a.head.weight).std() / a.head.weight.std()).detach()
    assert 0.05 < float(rel) < 0.2
    benign = AdaptiveAttack("b", "benign_first", batch_size=8, benign_steps=2)
    with pytest.raises(ValueError):
        prepare(a, benign, seed=0)
    moved = prepare(a, benign, seed=0, original=_data(20, 2))
    assert not torch.equal(moved.head.weight, a.head.weight)


def test_block_input_rms_rescales_the_fresh_block_input():
    a = models.build("cnn_small", seed=0)
    x = torch.rand(40, 1, 28, 28)
    restricted = (x, torch.randint(0, 10, (40,)))
    att = AdaptiveAttack("r", "reinit_block", block_input_rms=0.5)
    with pytest.raises(ValueError):
        prepare(a, att, seed=0)                       # needs the restricted data
    m = prepare(a, att, seed=0, restricted=restricted)
    plain = prepare(a, AdaptiveAttack("r", "reinit_block"), seed=0)
    torch.testing.assert_close(m.features[7].weight, plain.features[7].weight)   # same fresh draws
    seen = []
    m.features[7].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    m.eval()
    with torch.no_grad():
        out = m(x)
        unscaled = plain.eval().features[:7](x)
    assert abs(float(seen[0].pow(2).mean().sqrt()) - 0.5) < 1e-4
    ratio = float(seen[0].norm() / unscaled.norm())
    torch.testing.assert_close(seen[0], unscaled * ratio)    # a constant factor, nothing else
    assert torch.isfinite(out).all()
    assert not a.features[7]._forward_pre_hooks and not plain.features[7]._forward_pre_hooks
    fit = run(m, restricted, restricted, Attack("ft", "full", "adam", lr=1e-3, batch_size=20, epochs=1), seed=0)
    assert len(fit) == 2 and all(0.0 <= v <= 1.0 for v in fit)   # the hook survives run's deep copy


def test_attack_validation():
    for kw in ({"prep": "nope"}, {"optimizer": "lbfgs"}, {"lrs": ()}, {"lrs": (0.0,)}, {"reinit_last": 0},
               {"block_input_rms": 1.0}, {"prep": "reinit_block", "block_input_rms": 0.0}):
        with pytest.raises(ValueError):
            AdaptiveAttack("x", **kw)
    with pytest.raises(ValueError):
        AdaptiveConfig(eval_steps=(2, 1)).validate()
    with pytest.raises(ValueError):
        AdaptiveConfig(probe_kinds=("svm",)).validate()


def test_probe_learns_informative_features_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    info = torch.nn.functional.one_hot(y, 3).float() * 3 + torch.randn(300, 3, generator=g) * 0.1
    noise = torch.randn(300, 3, generator=g)
    atk = Attack(optimizer="adam", lr=0.1, batch_size=20, epochs=5, weight_decay=0.0)
    good = probe_curve((info[:200], y[:200]), (info[200:], y[200:]), "linear", atk)
    bad = probe_curve((noise[:200], y[:200]), (noise[200:], y[200:]), "mlp", atk)
    assert good[-1] > 0.95 and max(bad) < 0.6 and len(good) == 6


def test_signatures_and_excess():
    cfg = AdaptiveConfig(loss_window=2)
    sig = signatures([0.5, 0.4, 0.3], [1.0, 1.0, 2.0, 2.0], [0.1, 0.5, 0.9], cfg)
    assert sig == {"acc_drops": True, "loss_rises": True, "far_below_scratch": True}
    sig = signatures([0.1, 0.5, 0.9], [2.0, 2.0, 1.0, 1.0], [0.1, 0.5, 0.9], cfg)
    assert not any(sig.values())
    with pytest.raises(ValueError):
        signatures([0.1], [1.0], [0.1], cfg)
    # excess only counts points where the unprotected model is >= 5 points above scratch
    assert excess([0.9, 0.5, 0.2], [0.9, 0.9, 0.9], [0.9, 0.4, 0.1], cfg) == (pytest.approx(0.1), 2)
    assert excess([0.9], [0.9], [0.9], cfg) == (None, 0)


def _row(attack, p, u, s, seed=0):
    cfg = AdaptiveConfig()
    ex = excess(p, u, s, cfg)
    flat = {"acc_drops": False, "loss_rises": False, "far_below_scratch": False}
    return {"attack": attack, "seed": seed, "curves": {"protected": p, "unprotected": u, "scratch": s},
            "excess": ex[0], "signatures": {"protected": flat}}


def test_check_targets_worst_case_and_envelope():
    rows = [_row("a", [0.1, 0.2], [0.1, 0.9], [0.1, 0.3]),      # protected below scratch
            _row("a", [0.1, 0.5], [0.1, 0.9], [0.1, 0.9]),      # no head start at this rate
            _row("b", [0.1, 0.5], [0.1, 0.5], [0.1, 0.5])]      # no head start at all
    probes = [{"block": "x", "kind": "linear", "curves": {"protected": [0.5, 0.7], "unprotected": [0.9],
                                                          "scratch": [0.6]}}]
    out = {t["target"].split(":")[0]: t for t in check_targets({"finetune": rows, "probes": probes, "seeds": [0]},
                                                                 AdaptiveConfig())}
    # per-rate excess -0.1 is met, but the best-rate envelope (protected 0.5 vs scratch 0.9) is not eligible
    assert out["a"]["met"] is True and out["a"]["value"] == pytest.approx(-0.1)
    assert out["b"]["met"] is None
    assert out["linear probe on x"]["met"] is False and out["linear probe on x"]["value"] == pytest.approx(0.1)
    rows.append(_row("a", [0.1, 0.8], [0.1, 0.95], [0.1, 0.6]))   # a rate where the head start survives
    out = check_targets({"finetune": rows, "probes": [], "seeds": [0]}, AdaptiveConfig())
    assert out[0]["met"] is False and out[0]["value"] == pytest.approx(0.2)


def test_check_targets_median_over_replicates():
    u = [0.1, 0.9]
    # three attack seeds of one protected model: excess +0.3, -0.1, +0.01 -> median +0.01 (met), worst +0.3
    rows = [_row("a", [0.1, 0.6], u, [0.1, 0.3], seed=0), _row("a", [0.1, 0.2], u, [0.1, 0.3], seed=1),
            _row("a", [0.1, 0.31], u, [0.1, 0.3], seed=2)]
    probes = [{"block": "x", "kind": "linear", "seed": s, "curves": {"protected": [p], "unprotected": [0.9],
                                                                   "scratch": [0.5]}}
              for s, p in ((0, 0.9), (1, 0.5), (2, 0.51))]
    t, pr = check_targets({"finetune": rows, "probes": probes, "seeds": [0, 1, 2]}, AdaptiveConfig())
    assert t["met"] is True and t["value"] == pytest.approx(0.01) and t["worst"] == pytest.approx(0.3)
    assert sorted(v for *_, v in t["per_replicate"]) == pytest.approx([-0.1, 0.01, 0.3])
    assert pr["met"] is True and pr["value"] == pytest.approx(0.01) and pr["worst"] == pytest.approx(0.4)
    # a replicate's value is its worst over rates: a second rate at seed 1 with +0.2 moves the median to +0.2
    rows.append(_row("a", [0.1, 0.5], u, [0.1, 0.3], seed=1))
    t = check_targets({"finetune": rows, "probes": [], "seeds": [0, 1, 2]}, AdaptiveConfig())[0]
    assert t["met"] is False and t["value"] == pytest.approx(0.2)
    # two protected models attacked with the same seed are two replicates, not one: the median of +0.3 and
    # -0.1 is their mean
    two = [dict(_row("a", [0.1, 0.6], u, [0.1, 0.3]), replicate=0), dict(_row("a", [0.1, 0.2], u, [0.1, 0.3]),
                                                                          replicate=1)]
    t = check_targets({"finetune": two, "probes": [], "seeds": [0]}, AdaptiveConfig())[0]
    assert len(t["per_replicate"]) == 2 and t["value"] == pytest.approx(0.1)


def test_evaluate_adaptive_end_to_end():
    prot, unprot = models.build("cnn_small", num_classes=4, seed=0), models.build("cnn_small", num_classes=4, seed=1)
    cfg = AdaptiveConfig(attacks=(AdaptiveAttack("rb", "reinit_block", "adam", (1e-3,), batch_size=16),
                                  AdaptiveAttack("bf", "benign_first", "signsgd", (1e-4,), batch_size=16,
                                                 benign_steps=1)),
                         eval_steps=(1, 2, 4), loss_window=2, probe_kinds=("linear",), probe_lrs=(1e-2,),
                         probe_epochs=1, probe_batch_size=16, blocks=("features.5", HEAD_INPUT))
    with pytest.raises(ValueError):
        evaluate_adaptive(prot, unprot, _data(32, 0), _data(16, 1), None, cfg)
    rep = evaluate_adaptive(prot, unprot, _data(32, 0), _data(16, 1), _data(32, 2), cfg)
    assert [(r["attack"], r["steps"]) for r in rep["finetune"]] == [("rb", [0, 1, 2, 4]), ("bf", [0, 1, 2, 4])]
    assert all(len(r["losses"]["protected"]) == 4 and set(r["curves"]) == {"protected", "unprotected", "scratch"}
               for r in rep["finetune"])
    assert [(r["block"], len(r["curves"]["scratch"])) for r in rep["probes"]] == [("features.5", 2), (HEAD_INPUT, 2)]
    assert len(rep["targets"]) == 4
    assert dataclasses.asdict(cfg) == rep["config"]
    # baselines: the unprotected / scratch runs of an earlier report are reused, not rerun
    rep["finetune"][0]["curves"]["scratch"] = [-1.0] * 4
    rep["probes"][1]["curves"]["unprotected"] = [-2.0] * 2
    again = evaluate_adaptive(prot, unprot, _data(32, 0), _data(16, 1), _data(32, 2), cfg, baselines=rep)
    assert again["finetune"][0]["curves"]["scratch"] == [-1.0] * 4
    assert again["finetune"][1]["curves"]["scratch"] == rep["finetune"][1]["curves"]["scratch"]
    assert again["probes"][1]["curves"]["unprotected"] == [-2.0] * 2
    assert again["probes"][0]["curves"] == rep["probes"][0]["curves"]
    # the markdown (scripts/adaptive_eval.py's and the demo report's): one line per run, probe and target
    md = render_markdown(rep)
    assert "| rb | 0.001 | 0 |" in md and "| bf | 0.0001 | 0 |" in md and "| features.5 |" in md
    assert sum(line.startswith("- ") for line in md.splitlines()) == len(rep["targets"])


def test_check_targets_reads_the_protected_value_against_null_bodies():
    u = [0.1, 0.9]
    rows = []
    # protected excess +0.1 at each seed; null bodies (random inits attacked as if protected): +0.3, +0.05, -0.2
    for seed in (0, 1, 2):
        r = _row("a", [0.1, 0.4], u, [0.1, 0.3], seed=seed)
        r["curves"].update(null7=[0.1, 0.6], null8=[0.1, 0.35], null9=[0.1, 0.1])
        rows.append(r)
    t = check_targets({"finetune": rows, "probes": [], "seeds": [0, 1, 2]}, AdaptiveConfig())[0]
    assert t["met"] is False and t["value"] == pytest.approx(0.1)          # the literal target is unchanged
    assert t["null"] == pytest.approx({"null7": 0.3, "null8": 0.05, "null9": -0.2})
    assert t["null_median"] == pytest.approx(0.05) and t["within_null"] is False
    assert "above 2 of 3" in t["detail"]
    # a null body's value is its own worst over rates per seed, then the median over seeds, as the protected one's
    rows[0]["curves"]["null9"] = [0.1, 0.9]
    rows[1]["curves"]["null9"] = [0.1, 0.8]
    t = check_targets({"finetune": rows, "probes": [], "seeds": [0, 1, 2]}, AdaptiveConfig())[0]
    assert t["null"]["null9"] == pytest.approx(0.5) and t["null_median"] == pytest.approx(0.3)
    assert t["within_null"] is True and "at or below the null median, above 1 of 3" in t["detail"]
    # without null curves the entry has no null keys
    plain = check_targets({"finetune": [_row("a", [0.1, 0.4], u, [0.1, 0.3])], "probes": [], "seeds": [0]},
                          AdaptiveConfig())[0]
    assert "null" not in plain and "within_null" not in plain


def test_evaluate_adaptive_null_bodies_are_random_inits_attacked_as_protected():
    prot, unprot = models.build("cnn_small", num_classes=4, seed=0), models.build("cnn_small", num_classes=4, seed=1)
    cfg = AdaptiveConfig(attacks=(AdaptiveAttack("rb", "reinit_block", "adam", (1e-3,), batch_size=16),),
                         eval_steps=(1, 2, 4), loss_window=2, probe_kinds=("linear",), probe_lrs=(1e-2,),
                         probe_epochs=1, probe_batch_size=16, blocks=(HEAD_INPUT,))
    data = (_data(32, 0), _data(16, 1))
    rep = evaluate_adaptive(prot, unprot, *data, None, cfg, seeds=(0,), null_seeds=(7,))
    row = rep["finetune"][0]
    assert set(row["curves"]) == {"protected", "unprotected", "scratch", "null7"} and rep["null_seeds"] == [7]
    assert [set(r["curves"]) for r in rep["probes"]] == [{"protected", "unprotected", "scratch"}]   # no null probes
    # the null curve is exactly what the suite measures for a protected model that is scratch(prot, 7)
    from sophon_fast.attacks.run import scratch
    direct = evaluate_adaptive(scratch(prot, 7), unprot, *data, None, cfg, seeds=(0,), probes=False)
    assert direct["finetune"][0]["curves"]["protected"] == row["curves"]["null7"]
    # baselines carry the null curves over (they do not depend on the protected model)
    rep["finetune"][0]["curves"]["null7"] = [-1.0] * 4
    again = evaluate_adaptive(prot, unprot, *data, None, cfg, seeds=(0,), probes=False, null_seeds=(7,),
                              baselines=rep)
    assert again["finetune"][0]["curves"]["null7"] == [-1.0] * 4
    for bad in ((0,), (7, 7)):
        with pytest.raises(ValueError):
            evaluate_adaptive(prot, unprot, *data, None, cfg, seeds=(0,), probes=False, null_seeds=bad)
