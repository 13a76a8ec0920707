"""The demo pipeline end to end (tiny budget), report rendering, and the command line."""
import json
import os

import pytest

from sophon_fast import cli
from sophon_fast.apps.demo import ADAPTIVE_ATTACKS
from sophon_fast.apps.report import load_report, render_markdown, validate, write_report


def _report():
    curve = [0.1, 0.2, 0.3]
    return {"task": "image", "domains": {"original": "fashion_mnist", "restricted": "mnist"},
            "metric": "test accuracy", "higher_is_better": True,
            "original": {"metric": "original-domain test accuracy", "unprotected": 0.88, "protected": 0.87},
            "attacks": [{"name": "paper", "method": "full", "optimizer": "momentum", "lr": 1e-4, "batch_size": 200,
                         "epochs": 2, "steps": [0, 1, 2], "protected": curve, "unprotected": [0.1, 0.5, 0.6], "scratch": [0.1, 0.1, 0.1],
                         "overhead": None, "never_reached": True, "head_start_removed": 0.6}],
            "config": {"seed": 0}, "timing": {"protect": 1.5},
            "targets": [{"target": "t", "met": False, "detail": "d"}]}


def test_report_renders_tables_and_plot(tmp_path):
    paths = write_report(_report(), str(tmp_path))
    md = open(paths["md"]).read()
    assert "| paper | full | momentum | 0.0001 | 200 | 2 | 30.0% | 60.0% | 10.0% | ∞ | 0.60 |" in md
    assert "88.0%" in md and "**no**" in md
    assert os.path.getsize(paths["png"]) > 1000
    assert load_report(str(tmp_path)) == json.loads(json.dumps(_report()))
    assert render_markdown(_report()) == md
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_report_validation():
    bad = _report()
    del bad["attacks"][0]["scratch"]
    with pytest.raises(ValueError, match="scratch"):
        validate(bad)
    with pytest.raises(ValueError, match="timing"):
        validate({k: v for k, v in _report().items() if k != "timing"})


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["demo", "--iterations", "many"])
    assert "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="threads"):
        cli.main(["--threads", "0", "backends"])


def test_cli_backends(capsys):
    assert cli.main(["backends"]) == 0
    assert "reference" in capsys.readouterr().out


def test_demo_quick_end_to_end(tmp_path):
    """`demo --quick` with a tiny budget: every file, and the report schema (not the quality numbers)."""
    out = tmp_path / "demo"
    args = ["--threads", "1", "demo", "--quick", "--out", str(out), "--iterations", "2", "--suite", "paper",
            "--attack-epochs", "1", "--subset", "300", "--pretrain-epochs", "1", "--no-progress"]
    assert cli.main(args) == 0
    for f in ("report.json", "report.md", "curves.png", "original.safetensors", "original.json",
              "protected.safetensors", "protected.json", "adaptive.json", "adaptive.png"):
        assert (out / f).exists(), f
    report = json.loads((out / "report.json").read_text())
    validate(report)
    ad = report["adaptive"]      # the adaptive stage: three attacks at three rates each, probes, their targets
    assert sorted({r["attack"] for r in ad["finetune"]}) == sorted(ADAPTIVE_ATTACKS) and len(ad["finetune"]) == 9
    assert all(r["steps"] == [0, 1, 2, 5, 10, 20] for r in ad["finetune"]) and ad["probes"]
    assert ad["null_seeds"] == [100] and all("null100" in r["curves"] for r in ad["finetune"])   # a random init
    names = [t["target"] for t in report["targets"]]
    assert sum(n.startswith("adaptive: ") for n in names) == len(ad["targets"]) > 0
    assert any("where unprotected >= scratch + 5" in n and n.startswith("paper") for n in names)
    assert "## Attacks that know the model was protected" in (out / "report.md").read_text()
    assert set(report["domains"].values()) == {"fashion_mnist", "mnist"}
    a = report["attacks"][0]
    assert a["name"] == "paper" and a["epochs"] == 1
    for key in ("protected", "unprotected", "scratch"):
        assert len(a[key]) == 2 and all(0 <= v <= 1 for v in a[key])
    assert 0 <= report["original"]["protected"] <= 1 and a["steps"] == [0, 1]
    # a rerun reuses every finished step (resumable) and gives the same report
    assert cli.main(args) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["attacks"] == report["attacks"] and again["adaptive"] == report["adaptive"]
    # the report command re-renders from report.json
    os.remove(out / "report.md")
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.md").exists()


def test_demo_reprotects_a_model_made_with_other_settings(tmp_path, capsys):
    """A protected.safetensors (and its attack results) from another recipe is not silently reused."""
    out = tmp_path / "demo"
    args = ["--threads", "1", "demo", "--quick", "--out", str(out), "--iterations", "1", "--suite", "paper",
            "--attack-epochs", "1", "--subset", "200", "--pretrain-epochs", "1", "--no-adaptive", "--no-progress"]
    assert cli.main(args) == 0
    rec_path = out / "protected.config.json"                   # the protect stage's record (apps/pipeline.py)
    rec = json.loads(rec_path.read_text())
    import sophon_fast as sf
    assert rec["strategies"] == sf.recipes.adaptive().to_dict()["strategies"]     # the demo's recipe, e61
    rec["alpha"] = 1.0                                         # as if an older recipe had made it
    rec_path.write_text(json.dumps(rec))
    capsys.readouterr()
    assert cli.main(args) == 0
    said = capsys.readouterr()
    assert "made with other settings (alpha): protecting again" in said.out + said.err
    assert json.loads(rec_path.read_text())["alpha"] == 10.0
    assert cli.main(args) == 0                                  # now it is reused
    said = capsys.readouterr()
    assert "reusing the protected model" in said.out + said.err
    longer = args[:args.index("--iterations") + 1] + ["2"] + args[args.index("--iterations") + 2:]
    assert cli.main(longer) == 0                                # more iterations: continue from the checkpoint
    said = capsys.readouterr()
    assert "(iterations): protecting again (resuming its checkpoint)" in said.out + said.err
    assert json.loads((out / "protected.json").read_text())["metadata"]["iterations"] == 2


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    assert cli.main(["protect", str(tmp_path / "missing.safetensors"), "--original", "fashion_mnist",
                     "--restricted", "mnist", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sophon-fast: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_protect_reads_a_config_file(tmp_path):
    import sophon_fast as sf
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(sf.ProtectConfig(loss="klu", inner_steps=3).to_dict()))
    assert cli.load_config(str(path)) == sf.ProtectConfig(loss="klu", inner_steps=3)
    assert cli.load_config("trap").defences[0].kind == "trap"
    assert cli.load_config("trap").ntr_steps == 3                                       # e24
    assert cli.load_config("trap", sf.models.build("cnn_bn", seed=0)).ntr_steps == 6     # e75
    assert cli.load_config("trap", sf.models.build("cnn_small", seed=0)).ntr_steps == 3
    demo = cli.load_config("adaptive")                                                  # e61
    assert not demo.defences and (demo.meta_gradient, demo.iterations) == ("unrolled", 1000) and demo == sf.recipes.adaptive()
    assert cli.load_config("adaptive", sf.models.build("cnn_bn", seed=0)).iterations == 400  # e72, e90-e93
    assert cli.load_config("lm") == sf.recipes.language_model()
    assert cli.load_config("diffusion").task == "diffusion"
    path.write_text('{"inner_lr": 1}')
    with pytest.raises(ValueError, match="unknown settings"):
        cli.load_config(str(path))


def test_the_adaptive_recipe_file_is_e68s_config():
    """docs/recipes/adaptive.json is the demo's recipe at 2,400 iterations (docs/experiments.md e68): simulated
    attackers from a fresh classifier block and from a fresh head, the meta-gradient unrolled through them."""
    import sophon_fast as sf
    from sophon_fast.apps.demo import demo_config
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "recipes", "adaptive.json")
    cfg = cli.load_config(path)
    assert (cfg.loss, cfg.iterations, cfg.mode, cfg.meta_gradient, cfg.ntr_steps) == \
        ("ice", 2400, "fast", "unrolled", 3)
    assert [(s.optimizer, s.lr, s.attacker.kind, s.steps) for s in cfg.strategies] == [
        ("adam", 1e-3, "fresh_block", None), ("momentum", 1e-2, "fresh_block", 40), ("adam", 1e-3, "as_is", None),
        ("momentum", 1e-2, "probe", 40), ("adam", 1e-3, "probe", None)]
    assert not cfg.defences                                     # no trap: the recipe does not rest on one layer
    demo = demo_config(quick=False)
    assert demo.strategies == sf.recipes.adaptive().strategies
    same = ("loss", "alpha", "beta", "inner_steps", "mode", "meta_gradient", "strategies", "ntr_steps", "seed")
    assert all(getattr(demo, k) == getattr(cfg, k) for k in same)
