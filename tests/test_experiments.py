"""experiments/: every config loads with today's code, the generated results table is current, and the one runner
writes a results.json with its commit."""
import json

import pytest

from sophon_fast.apps import experiments as ex


def test_every_experiment_loads_with_todays_code():
    found = ex.all_experiments()
    assert {e["id"] for e in found} >= {"demo-quick", "adaptive-2400", "trap-400"}
    for e in found:
        assert e["config"].to_dict() == type(e["config"]).from_dict(e["config"].to_dict()).to_dict()
        if e["results"] is not None:
            assert e["results"]["commit"] and e["results"]["config"]["protect"]["iterations"] == e["config"].iterations


def test_the_results_table_is_generated_from_the_results():
    assert ex.TABLE.read_text() == ex.table(ex.all_experiments()), \
        "docs/experiment-results.md is stale: python -m sophon_fast.apps.experiments table"


def test_a_config_todays_code_rejects_names_the_file(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({"loss": "ice", "feature_weight": 0.1}))
    (tmp_path / "old" / "experiment.json").write_text("{}")
    with pytest.raises(ValueError, match=r"old/config.json: does not load with today's ProtectConfig"):
        ex.load(tmp_path / "old")


def test_the_runner_writes_results_with_the_commit(tmp_path):
    import sophon_fast as sf
    exp = tmp_path / "tiny"
    exp.mkdir()
    cfg = sf.recipes.trap(iterations=1).replace(inner_steps=2, progress=None)
    (exp / "config.json").write_text(json.dumps(cfg.to_dict()))
    (exp / "experiment.json").write_text(json.dumps({
        "description": "tiny", "task": "image", "domains": {"original": "fashion_mnist", "restricted": "mnist"},
        "arch": "cnn_small", "seed": 0, "quick": True, "suite": "paper", "attack_epochs": 1, "pretrain_epochs": 1,
        "subset": 200, "adaptive": False, "threads": 1}))
    results = ex.run(exp, tmp_path / "work")
    saved = json.loads((exp / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and len(saved["commit"]) >= 40
    assert saved["config"]["protect"]["inner_steps"] == 2 and saved["attacks"][0]["name"] == "paper"
    assert "| tiny | tiny | fashion_mnist → mnist | cnn_small | 1 |" in ex.table([ex.load(exp)])
