"""scripts/population_excess.py: the adaptive statistic against the pointwise median of the random bodies."""
import importlib.util
import pathlib

import pytest

from sophon_fast.attacks.adaptive import AdaptiveConfig

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "population_excess.py"
_spec = importlib.util.spec_from_file_location("population_excess", _PATH)
pe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pe)


def _row(lr, curves, seed=0):
    return {"attack": "reinit_block-adam", "lr": lr, "seed": seed, "steps": [0, 1, 2], "curves": curves}


def test_protected_against_the_median_and_random_bodies_leave_one_out():
    curves = {"protected": [0.1, 0.6, 0.6], "unprotected": [0.1, 0.9, 0.9], "scratch": [0.1, 0.1, 0.5],
              "null100": [0.1, 0.3, 0.5], "null101": [0.1, 0.2, 0.7]}
    v = pe.population_values({"finetune": [_row(1e-3, curves)]}, "reinit_block-adam", AdaptiveConfig())
    # reference for the protected / unprotected model: median of the three random bodies = [0.1, 0.2, 0.5]
    assert v["protected"] == pytest.approx(0.4)
    assert v["unprotected"] == pytest.approx(0.7)
    # scratch against median(null100, null101) = [0.1, 0.25, 0.6]: -0.15 and -0.1 where eligible
    assert v["scratch"] == pytest.approx(-0.1)
    # null101 against median(scratch, null100) = [0.1, 0.2, 0.5]: 0.0 and +0.2
    assert v["null101"] == pytest.approx(0.2)


def test_worst_over_rates_then_median_over_seeds():
    def curves(p):
        return {"protected": p, "unprotected": [0.1, 0.9, 0.9], "scratch": [0.1, 0.1, 0.1],
                "null100": [0.1, 0.1, 0.1], "null101": [0.1, 0.1, 0.1]}
    rows = [_row(1e-3, curves([0.1, 0.2, 0.2]), seed=0), _row(1e-2, curves([0.1, 0.5, 0.1]), seed=0),
            _row(1e-3, curves([0.1, 0.1, 0.1]), seed=1), _row(1e-2, curves([0.1, 0.1, 0.3]), seed=1),
            _row(1e-3, curves([0.1, 0.1, 0.1]), seed=2), _row(1e-2, curves([0.1, 0.1, 0.1]), seed=2)]
    v = pe.population_values({"finetune": rows}, "reinit_block-adam", AdaptiveConfig())
    # per seed the worst over the rates and their envelope: 0.4, 0.2, 0.0; the median is 0.2
    assert v["protected"] == pytest.approx(0.2)


def test_a_report_without_null_bodies_is_refused():
    curves = {"protected": [0.1, 0.6], "unprotected": [0.1, 0.9], "scratch": [0.1, 0.1]}
    with pytest.raises(ValueError, match="null bodies"):
        pe.population_values({"finetune": [_row(1e-3, curves)]}, "reinit_block-adam", AdaptiveConfig())
