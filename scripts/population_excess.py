"""The adaptive suite's statistic with the scratch curve replaced by the pointwise median of every random body.

    .venv/bin/python scripts/population_excess.py runs/adaptive/REPORT.json [...]

A report made with ``--null-seeds`` holds, per (attack, rate, attack seed), the curves of six random
initialisations: the scratch model and five null bodies. The issue's statistic compares the protected model with
one of them (scratch). Here the reference is the pointwise median of all six: the protected and unprotected
models are compared with it, and each random body with the median of the other five (leave-one-out). Per
replicate the value is the worst over rates and the best-rate envelope, then the median over replicates, exactly
as ``check_targets`` does (``_attack_values`` computes it). docs/experiments.md a13 has the results.
"""
import json
import statistics
import sys

from sophon_fast.attacks.adaptive import NULL_PREFIX, AdaptiveConfig, _attack_values


def pointwise_median(curves):
    return [statistics.median(v) for v in zip(*curves)]


def population_values(report: dict, attack: str, config: AdaptiveConfig) -> dict:
    """``{body: median over replicates}`` for the protected and unprotected models and every random body."""
    rows = [r for r in report["finetune"] if r["attack"] == attack]
    randoms = ["scratch"] + sorted((b for b in rows[0]["curves"] if b.startswith(NULL_PREFIX)),
                                   key=lambda b: int(b[len(NULL_PREFIX):]))
    if len(randoms) < 3 or not all(b in r["curves"] for r in rows for b in randoms):
        raise ValueError(f"{attack}: the report needs null bodies in every row (adaptive_eval.py --null-seeds)")
    out = {}
    for body in ["protected", "unprotected", *randoms]:
        ref = [b for b in randoms if b != body]
        synthetic = [{**r, "curves": {"probe": r["curves"][body], "unprotected": r["curves"]["unprotected"],
                                      "scratch": pointwise_median([r["curves"][b] for b in ref])}} for r in rows]
        per = _attack_values(synthetic, "probe", config)[0]
        out[body] = statistics.median(per.values()) if per else None
    return out


def main(paths):
    config = AdaptiveConfig()
    for path in paths:
        report = json.load(open(path))
        print(f"== {path}")
        for attack in dict.fromkeys(r["attack"] for r in report["finetune"]):
            v = population_values(report, attack, config)
            rand = sorted(x for b, x in v.items() if b not in ("protected", "unprotected") and x is not None)
            pts = lambda x: "n/a" if x is None else f"{100 * x:+.1f}"  # noqa: E731
            print(f"  {attack:<24} protected {pts(v['protected']):>6}  unprotected {pts(v['unprotected']):>6}  "
                  f"random bodies median {pts(statistics.median(rand))} range {pts(rand[0])} to {pts(rand[-1])} "
                  f"({len(rand)}), protected above {sum(x < v['protected'] for x in rand)}")


if __name__ == "__main__":
    main(sys.argv[1:])
