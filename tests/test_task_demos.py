"""`sophon-fast demo --task lm|diffusion` end to end at tiny sizes: every file, the report schema, resumability
(not the quality numbers: the demos' budgets are far larger)."""
import dataclasses
import json

import pytest

from sophon_fast import cli


def _check_report(out, task):
    for f in ("report.json", "report.md", "curves.png"):
        assert (out / f).exists(), f
    r = json.loads((out / "report.json").read_text())
    assert r["task"] == task and r["higher_is_better"] is False and set(r["domains"]) == {"original", "restricted"}
    assert set(r["original"]) >= {"unprotected", "protected"}
    for a in r["attacks"]:
        assert len(a["protected"]) == len(a["scratch"]) == len(a["steps"]) >= 2
    assert r["targets"] and all("met" in t for t in r["targets"])
    label = {"lm": "original next-token loss", "diffusion": "original eps-MSE (uniform t)"}[task]   # one renderer
    assert f"| model | {label} |" in (out / "report.md").read_text() and r["targets"][0]["target"].startswith(label)
    return r


def test_lm_demo_tiny(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from sophon_fast.apps import lm_demo
    tiny = dataclasses.replace(lm_demo.sizes(True), vocab_size=300, block_size=32, n_layer=1, n_embd=32, n_head=2,
                               pretrain_steps=4, train_blocks=40, test_blocks=4, attack_steps=2, attack_evals=2)
    monkeypatch.setattr(lm_demo, "sizes", lambda quick: tiny)
    monkeypatch.setattr(lm_demo, "demo_attacks", lambda quick: lm_demo.default_attacks(
        steps=2, batch_size=2, full_lrs=(1e-3,), ranks=(8,), evals=2))
    out = tmp_path / "lm"
    args = ["--threads", "1", "demo", "--task", "lm", "--quick", "--out", str(out), "--iterations", "2",
            "--no-progress"]
    assert cli.main(args) == 0
    r = _check_report(out, "lm")
    assert {a["method"] for a in r["attacks"]} == {"full", "lora"}
    assert cli.main(args) == 0                          # rerun: the protection is reused
    assert json.loads((out / "report.json").read_text())["timing"]["protect"] == 0.0
    from sophon_fast import recipes
    recipe = recipes.language_model
    monkeypatch.setattr(recipes, "language_model", lambda quick: recipe(quick).replace(loss="klu"))
    assert cli.main(args) == 0                          # another recipe: its stale checkpoint is dropped
    assert json.loads((out / "report.json").read_text())["timing"]["protect"] > 0.0


def test_diffusion_demo_tiny(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from sophon_fast.apps import diffusion_demo as dd
    from sophon_fast.attacks import diffusion as dattacks
    monkeypatch.setitem(dd.SIZES, True, {"pretrain_steps": 2, "original_test": 16, "restricted_test": 16,
                                         "samples": 0})
    monkeypatch.setattr(dattacks, "suite", lambda quick=False: [dattacks.DiffusionAttack(
        optimizer="adam", lr=1e-3, batch_size=8, steps=2, eval_every=1)])
    out = tmp_path / "diffusion"
    assert cli.main(["--threads", "1", "demo", "--task", "diffusion", "--quick", "--out", str(out),
                     "--iterations", "1", "--no-progress"]) == 0
    _check_report(out, "diffusion")
