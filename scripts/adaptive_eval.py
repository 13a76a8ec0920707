"""Run the adaptive attack suite (sophon_fast.attacks.adaptive) on a protected model and report it.

    .venv/bin/python scripts/adaptive_eval.py NAME --protected runs/exp/X/model_s0.safetensors \
        --unprotected runs/exp/cache/fashion_mnist_cnn_small_p3_s0.safetensors [--pair fashion_mnist:mnist] \
        [--seeds 0] [--attacks reinit_block-adam,full-adam] [--no-probes] [--no-finetune] [--threads 1]
        [--eval-steps 1 2 5 10 20 40] [--baselines runs/adaptive/EARLIER.json] [--null-seeds 100 101 102]
    .venv/bin/python scripts/adaptive_eval.py NAME --merge runs/adaptive/A.json runs/adaptive/B.json [--replicates]

Writes runs/adaptive/NAME.json (every curve and per-step loss) and prints a markdown summary (the
tables of docs/experiments.md): per (attack, rate) the three models at a few steps, the excess over
scratch where the unprotected model has a head start, the gradient-masking signatures; per probe the
best accuracy over rates and epochs; and the issue's targets: per replicate (a protected model and an
attack seed) the worst case over the rate sweep, then the median over replicates (and the worst).
`--merge --replicates`: the reports are of different protected models (e.g. three protection seeds), so
each report's rows form their own replicates even where the attack seeds repeat.
`--null-seeds`: random initialisations (those seeds) attacked as if each were the protected model; each
target then also gives the null bodies' values of the same statistic (docs/experiments.md a8). They do not
depend on the protected model, so a report with them serves as --baselines for the next protected model.
"""
import argparse
import dataclasses
import json
import os
import sys

import torch

from sophon_fast import data as sfdata
from sophon_fast.attacks.adaptive import (AdaptiveConfig, check_targets, default_attacks, evaluate_adaptive,
                                          render_markdown)
from sophon_fast.io import load_model

ROOT = "runs/adaptive"


def merge(paths, replicates=False):
    """One report from finished ones; ``replicates``: each report is another protected model, so its rows
    get ``"replicate": index`` (see ``sophon_fast.attacks.adaptive.replicate``)."""
    reports = [json.load(open(p)) for p in paths]
    if replicates:
        for i, rep in enumerate(reports):
            for r in rep["finetune"] + rep["probes"]:
                r["replicate"] = i
    merged = {"finetune": [r for rep in reports for r in rep["finetune"]],
              "probes": [r for rep in reports for r in rep["probes"]],
              "seeds": sorted({s for rep in reports for s in rep["seeds"]}), "config": reports[0]["config"],
              "meta": [rep.get("meta") for rep in reports]}
    cfg = AdaptiveConfig(**{k: v for k, v in reports[0]["config"].items() if k != "attacks"})
    merged["targets"] = check_targets(merged, cfg)
    return merged


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--protected")
    ap.add_argument("--unprotected")
    ap.add_argument("--pair", default="fashion_mnist:mnist")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--attacks", default=None, help="comma-separated attack names (default: the whole suite)")
    ap.add_argument("--eval-steps", type=int, nargs="+", default=None)
    ap.add_argument("--probe-epochs", type=int, default=None)
    ap.add_argument("--no-probes", action="store_true")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baselines", default=None,
                    help="an earlier NAME.json with the same unprotected model: reuse its unprotected/scratch runs")
    ap.add_argument("--null-seeds", type=int, nargs="+", default=[],
                    help="random initialisations attacked as if protected: the statistic's value for no knowledge")
    ap.add_argument("--merge", nargs="+", default=None, help="combine finished NAME.json reports instead of running")
    ap.add_argument("--replicates", action="store_true",
                    help="with --merge: the reports are of different protected models (one replicate each)")
    a = ap.parse_args()
    os.makedirs(ROOT, exist_ok=True)
    if a.merge:
        report = merge(a.merge, a.replicates)
    else:
        if not (a.protected and a.unprotected):
            ap.error("--protected and --unprotected are required unless --merge is given")
        torch.set_num_threads(a.threads)
        orig, restr = a.pair.split(":")
        attacks = default_attacks()
        if a.attacks is not None:
            wanted = a.attacks.split(",")
            unknown = set(wanted) - {x.name for x in attacks}
            if unknown:
                ap.error(f"unknown attacks {sorted(unknown)}; known: {[x.name for x in attacks]}")
            attacks = tuple(x for x in attacks if x.name in wanted)
        cfg = AdaptiveConfig(attacks=() if a.no_finetune else attacks)
        if a.eval_steps:
            cfg = dataclasses.replace(cfg, eval_steps=tuple(a.eval_steps))
        if a.probe_epochs:
            cfg = dataclasses.replace(cfg, probe_epochs=a.probe_epochs)
        prot, unprot = load_model(a.protected), load_model(a.unprotected)
        report = evaluate_adaptive(prot, unprot, sfdata.load(restr, "train"), sfdata.load(restr, "test"),
                                   sfdata.load(orig, "train"), cfg, a.seeds, probes=not a.no_probes,
                                   say=lambda s: print(s, flush=True),
                                   baselines=json.load(open(a.baselines)) if a.baselines else None,
                                   null_seeds=a.null_seeds)
        report["meta"] = {"protected": a.protected, "unprotected": a.unprotected, "pair": a.pair}
    with open(f"{ROOT}/{a.name}.json", "w") as f:
        json.dump(report, f)
    print(render_markdown(report))


if __name__ == "__main__":
    sys.exit(main())
