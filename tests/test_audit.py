"""The attack-search audit (sophon_fast.audit) and the attack-spec extensions it searches over."""
import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("optuna")

from sophon_fast import data as sfdata  # noqa: E402
from sophon_fast import models  # noqa: E402
from sophon_fast.attacks import Attack, run  # noqa: E402
from sophon_fast.attacks.compose import ComposedAttack, eval_grid, rescale_block_input, run_composed  # noqa: E402
from sophon_fast.attacks.spec import warmup_cosine  # noqa: E402
from sophon_fast.audit import ImageSpace, audit, load_studies  # noqa: E402
from sophon_fast.audit import spaces as audit_spaces  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist():
    X, Y = sfdata.as_tensors(sfdata.load("mnist", "train"))
    Xt, Yt = sfdata.as_tensors(sfdata.load("mnist", "test"))
    return (X[:1000], Y[:1000]), (Xt[:500], Yt[:500])


class Gated(nn.Module):
    """``gate * net(x) + offset``: a classifier whose skill sits behind a closed gate (gate 0) and a large
    offset on class 0, so it predicts class 0 for every input until the gate opens."""

    def __init__(self, net: nn.Module, offset: float):
        super().__init__()
        self.net = net
        self.gate = nn.Parameter(torch.zeros(()))
        self.offset = nn.Parameter(torch.zeros(net.head.out_features))
        with torch.no_grad():
            self.offset[0] = offset

    def forward(self, x):
        return self.gate * self.net(x) + self.offset


@pytest.fixture(scope="module")
def planted(mnist):
    """(protected, unprotected): a small MLP trained on the restricted data (about 86% test accuracy), its
    logits scaled by 100, behind a closed gate and an offset of 4,500 on class 0.

    The weakness is real and specific to the optimiser: the gate's gradient is the restricted logit margin
    (about 900), so momentum SGD moves it by lr x 900 / (1 - 0.9) per step and opens it within a few steps at
    rates from 1e-4 up, which gives back the MLP's skill; Adam moves every parameter by about lr per step
    whatever its gradient, which within a 12-step budget leaves the gate nearly shut at every rate (at most
    about 40% accuracy, at 1e-2 to 1e-1, the rates at which it also scrambles the first layer)."""
    train, test = mnist
    net = models.build("mlp", hidden=(64,), seed=0)
    net = run(net, train, test, Attack(optimizer="adam", lr=3e-3, batch_size=100, epochs=20), 0, return_model=True)[1]
    with torch.no_grad():
        net.head.weight.mul_(100.0)
        net.head.bias.mul_(100.0)
    return Gated(net, 4500.0), net


PLANT_SPACE = {"methods": ["full"], "optimizers": ["adam", "momentum"], "batch_sizes": [64],
               "weight_decays": [0.0], "schedules": ["constant"], "block_input_rms": [None]}
ADAM_FIRST = [{"method": "full", "optimizer": "adam", "lr_adam": lr, "batch_size": 64, "weight_decay": 0.0,
               "schedule": "constant"} for lr in (1e-3, 1e-2, 1e-1)]


def test_search_finds_the_planted_weakness(planted, mnist, tmp_path):
    protected, unprotected = planted
    train, test = mnist
    report = audit(protected, train, test, unprotected=unprotected, trials=10, null_bodies=2, steps=12,
                   out=str(tmp_path), seed=0, fixed=ADAM_FIRST, space_options=PLANT_SPACE, progress=False)
    prot = report["models"]["protected"]
    assert prot["all_trials"][0]["curve"][0] < 0.15                # the plant hides the skill before any attack
    assert report["verdict"]["state"] == "broken"
    best = prot["best"]
    assert best["params"]["optimizer"] == "momentum" and not best["fixed"]   # found by the sampler, not enqueued
    adam_best = max(r["value"] for r in prot["all_trials"] if r["params"]["optimizer"] == "adam")
    assert best["value"] - adam_best > 0.3                          # momentum, not any attack, breaks it
    assert report["verdict"]["breaking_trial"]["number"] == best["number"]
    assert best["value"] > report["verdict"]["null_edge"] + 0.3
    assert report["models"]["unprotected"]["best"]["value"] > report["verdict"]["null_edge"]
    for name in ("report.json", "report.md", "report.png"):
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "report.json").read_text())["verdict"]["state"] == "broken"
    assert "Verdict: broken" in (tmp_path / "report.md").read_text()


def _tiny(seed=0):
    return models.build("mlp", hidden=(16,), seed=seed)


def _summary(out):
    import optuna
    return {name: [(t.number, t.state.name, t.params, t.value) for t in study.get_trials()
                   if t.state == optuna.trial.TrialState.COMPLETE]
            for name, study in load_studies(out).items()}


def test_an_interrupted_audit_resumes_to_the_same_study(mnist, tmp_path, monkeypatch):
    train, test = mnist
    kw = dict(trials=5, null_bodies=1, steps=4, seed=3, progress=False, space_options={"batch_sizes": [64]})
    whole = tmp_path / "whole"
    audit(_tiny(), train, test, out=str(whole), **kw)

    calls = {"n": 0}
    real = audit_spaces.ImageSpace.evaluate

    def dies_on_the_seventh(self, model, p, seed):
        calls["n"] += 1
        if calls["n"] == 7:               # the protected study's 5 trials, then the scratch study's second
            raise KeyboardInterrupt
        return real(self, model, p, seed)

    cut = tmp_path / "cut"
    monkeypatch.setattr(audit_spaces.ImageSpace, "evaluate", dies_on_the_seventh)
    with pytest.raises(KeyboardInterrupt):
        audit(_tiny(), train, test, out=str(cut), **kw)
    before = _summary(str(cut))
    assert [len(before[k]) for k in ("protected", "scratch")] == [5, 1]
    calls["n"] = -10**9                   # no more interruptions; count the trials the rerun runs
    audit(_tiny(), train, test, out=str(cut), **kw)
    assert calls["n"] == -10**9 + 4 + 5   # only the missing trials ran: scratch's last 4, the null body's 5
    after, ref = _summary(str(cut)), _summary(str(whole))
    assert set(after) == set(ref) == {"protected", "scratch", "null103"}
    for name in ref:                      # the same parameters and values, in the same order
        assert [r[2:] for r in after[name]] == [r[2:] for r in ref[name]]
    assert after["protected"] == before["protected"]
    monkeypatch.setattr(audit_spaces.ImageSpace, "evaluate", real)
    longer = audit(_tiny(), train, test, out=str(cut), **{**kw, "trials": 6})   # a rerun continues the study
    assert longer["models"]["protected"]["trials"] == 6
    assert _summary(str(cut))["protected"][:5] == after["protected"]


def test_bad_input_is_a_value_error_before_any_trial(mnist, tmp_path, monkeypatch):
    train, test = mnist

    def no_trial(*a, **k):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(audit_spaces.ImageSpace, "evaluate", no_trial)
    bad = [dict(trials=0), dict(steps=0), dict(null_bodies=0), dict(budget="huge"), dict(task="speech"),
           dict(space_options={"methods": ["full", "lora"]}), dict(space_options={"optimizers": ["lbfgs"]}),
           dict(space_options={"methods": []})]
    for kw in bad:
        with pytest.raises(ValueError):
            audit(_tiny(), train, test, out=str(tmp_path / "a"), progress=False, **kw)
    five = models.build("mlp", num_classes=5, hidden=(16,), seed=0)     # MNIST has 10 classes
    with pytest.raises(ValueError, match="do not cover"):
        audit(five, train, test, out=str(tmp_path / "b"), progress=False)
    with pytest.raises(ValueError, match="do not cover"):
        audit(_tiny(), train, test, unprotected=five, out=str(tmp_path / "c"), progress=False)
    assert not (tmp_path / "b" / "report.json").exists()
    monkeypatch.setattr(audit_spaces.ImageSpace, "evaluate", lambda self, m, p, s: {
        "value": 0.5, "steps": [0, 1], "curve": [0.1, 0.5], "stopped": None})
    audit(_tiny(), train, test, out=str(tmp_path / "d"), trials=1, null_bodies=1, progress=False)
    monkeypatch.setattr(audit_spaces.ImageSpace, "evaluate", no_trial)
    for kw in (dict(seed=1), dict(steps=30), dict(model=_tiny(seed=5))):   # the stored study does not match
        model = kw.pop("model", _tiny())
        with pytest.raises(ValueError, match="another"):
            audit(model, train, test, out=str(tmp_path / "d"), trials=2, null_bodies=1, progress=False, **kw)


def test_warmup_cosine_schedule_drives_the_rate(mnist):
    train, test = mnist
    seen = []
    real_step = torch.optim.SGD.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    torch.optim.SGD.step = spy
    try:
        run(_tiny(), train, test, Attack(optimizer="sgd", lr=0.1, batch_size=100, epochs=1,
                                         schedule="warmup_cosine", warmup=0.2), 0, eval_steps=[4, 8])
    finally:
        torch.optim.SGD.step = real_step
    assert len(seen) == 8
    assert seen == pytest.approx([0.1 * warmup_cosine(k, 8, 0.2) for k in range(8)])
    assert seen[0] == pytest.approx(0.1 / 2) and seen[1] == pytest.approx(0.1)   # one warm-up step, then the peak
    assert warmup_cosine(7, 8, 0.2) < 0.1 and warmup_cosine(8, 8, 0.2) == pytest.approx(0.0)
    assert Attack(schedule="warmup_cosine").name.endswith("-wc0.1") and Attack().name.endswith("-ep20")
    for kw in ({"schedule": "step"}, {"warmup": 1.0}):
        with pytest.raises(ValueError):
            Attack(**kw)


def test_nan_weights_stop_a_trial_and_keep_its_best(mnist):
    train, test = mnist
    space = ImageSpace(train, test, steps=20, methods=["full"], optimizers=["sgd"])
    space.validate(_tiny())
    p = {"method": "full", "optimizer": "sgd", "lr_sgd": 1.0, "batch_size": 64, "weight_decay": 0.0,
         "schedule": "constant", "block_input_rms": None}
    model = _tiny()
    with torch.no_grad():
        model.head.weight.mul_(1e30)     # the first step overflows: NaN weights
    res = space.evaluate(model, p, 0)
    assert res["stopped"] == "NaN weights" and len(res["curve"]) < len(space.eval_steps) + 1
    assert res["value"] == max(res["curve"]) and len(res["steps"]) == len(res["curve"])
    fine = space.evaluate(_tiny(), {**p, "lr_sgd": 1e-2}, 0)
    assert fine["stopped"] is None and len(fine["curve"]) == len(space.eval_steps) + 1


def test_block_input_rescale_keeps_the_function_and_fresh_block_redraws_the_block(mnist):
    train, test = mnist
    m = models.build("cnn_small", seed=0)
    x = train[0][:64]
    r = rescale_block_input(m, 3.0, train[0])
    torch.testing.assert_close(r(x), m(x), rtol=1e-4, atol=1e-4)      # a6: same function
    seen = []
    first = models.classifier_block(r)[0]
    h = first.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    r.eval()
    r(train[0][:1000])
    h.remove()
    assert float(seen[0].detach().pow(2).mean().sqrt()) == pytest.approx(3.0, rel=1e-4)
    ft = Attack(name="t", optimizer="adam", lr=1e-3, batch_size=64, epochs=1)
    with pytest.raises(ValueError):
        ComposedAttack(dataclass_replace(ft, method="last_layer"), 5, fresh_block=2)
    curve = run_composed(m, train, test, ComposedAttack(ft, 5, fresh_block=3, block_input_rms=1.0), 0)
    assert len(curve) == len(eval_grid(5)) + 1 and all(0 <= c <= 1 for c in curve)
    with pytest.raises(ValueError, match="original"):
        run_composed(m, train, test, ComposedAttack(ft, 5, benign_steps=3), 0)


def dataclass_replace(a, **kw):
    import dataclasses
    return dataclasses.replace(a, **kw)


def test_fixed_trials_express_the_default_and_adaptive_suites(mnist):
    train, test = mnist
    space = ImageSpace(train, test, original=train, steps=10)
    params, skipped = space.fixed_trials(models.build("cnn_small", seed=0))
    assert len(params) == 12 + 9 * 3 and sorted(skipped) == sorted(
        f"{n}-lr{lr:g}" for n in ("zero_bias-adam", "noise0.1-adam") for lr in (1e-4, 1e-3, 1e-2))
    space_names = {"method", "depth", "optimizer", "batch_size", "weight_decay", "schedule", "warmup",
                   "benign_steps", "block_input_rms"}
    for p in params:
        assert set(p) - space_names == {f"lr_{p['optimizer']}"}
        assert math.isfinite(p[f"lr_{p['optimizer']}"])
        space.attack(p)                  # every one builds
    assert {p.get("depth") for p in params if p["method"] == "fresh_block"} == {2}


def test_lm_and_diffusion_spaces_run_through_the_same_search(tmp_path):
    from sophon_fast.models import lm
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 97, (24, 12), generator=g)
    model = lm.gpt2(97, n_layer=1, n_embd=16, n_head=2, n_positions=12, seed=0)
    rep = audit(model, (ids[:16], ids[:16].clone()), (ids[16:], ids[16:].clone()), task="lm", trials=2,
                null_bodies=1, steps=4, out=str(tmp_path / "lm"), progress=False,
                space_options={"evals": 2, "methods": ["full", "lora"], "batch_sizes": [4]})
    assert rep["higher_is_better"] is False and rep["verdict"]["state"] in ("held", "broken", "inconclusive")
    best = rep["models"]["protected"]["best"]
    assert best["value"] == min(v for v in best["curve"] if v is not None) and len(best["steps"]) == 3
    unet = models.build("ddpm_unet_small", widths=(8, 16), norm_groups=4, seed=0)
    images = torch.rand(24, 1, 28, 28, generator=g) * 2 - 1
    rep = audit(unet, images[:16], images[16:], task="diffusion", trials=2, null_bodies=1, steps=2,
                out=str(tmp_path / "diffusion"), progress=False,
                space_options={"evals": 1, "batch_sizes": [8], "optimizers": ["adam", "momentum"]})
    assert rep["metric"].startswith("restricted eps-MSE") and rep["models"]["protected"]["trials"] == 2


def test_cli_audit_writes_the_report_and_a_rerun_continues(tmp_path, capsys):
    import sophon_fast as sf
    from sophon_fast import cli
    from sophon_fast.io import save_model
    assert sf.audit is audit
    path = str(save_model(_tiny(), tmp_path / "m.safetensors"))
    out = tmp_path / "a"
    argv = ["audit", "--model", path, "--restricted", "digits", "--steps", "3", "--null-bodies", "1",
            "--out", str(out), "--no-progress", "--methods", "full", "--trials"]
    assert cli.main(argv + ["1"]) == 0
    assert "[audit] verdict:" in capsys.readouterr().out
    assert cli.main(argv + ["2"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert [m["trials"] for m in rep["models"].values()] == [2, 2, 2]
    assert cli.main(argv + ["0"]) == 2
    assert "error: the audit budget" in capsys.readouterr().err


def test_the_demo_audit_starts_from_the_adaptive_stage_attacks(tmp_path, monkeypatch):
    from sophon_fast.apps import demo
    from sophon_fast.audit import BUDGETS
    monkeypatch.setitem(BUDGETS, "quick", {"trials": 1, "null_bodies": 1, "steps": 3})
    (X, Y), (Xt, Yt) = (sfdata.as_tensors(sfdata.load("digits", split)) for split in ("train", "test"))
    train, test = (X[:300], Y[:300]), (Xt[:150], Yt[:150])
    protected, unprotected = models.build("cnn_small", seed=1), models.build("cnn_small", seed=2)
    rep = demo.demo_audit(protected, unprotected, train, test, None, True, 0, str(tmp_path), progress=False,
                          say=lambda s: None)   # no original data: benign_first is left out of the space
    trials = rep["models"]["protected"]["all_trials"]
    assert len(trials) == 6 + 3 and [t["fixed"] for t in trials] == [True] * 6 + [False] * 3
    first = [(t["params"]["method"], t["params"]["optimizer"], t["params"][f"lr_{t['params']['optimizer']}"])
             for t in trials[:6]]
    assert first == [("fresh_block", "adam", lr) for lr in (1e-4, 1e-3, 1e-2)] + \
        [("fresh_block", "momentum", lr) for lr in (1e-3, 1e-2, 1e-1)]
    assert rep["verdict"]["state"] in ("held", "broken", "inconclusive")
