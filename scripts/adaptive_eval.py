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
from sophon_fast.attacks.adaptive import AdaptiveConfig, check_targets, default_attacks, evaluate_adaptive
from sophon_fast.io import load_model

ROOT = "runs/adaptive"
SHOW_STEPS = (0, 5, 10, 20)


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _at(row, body, step):
    steps = row["steps"]
    return row["curves"][body][steps.index(step)] if step in steps else None


def markdown(report):
    cfg = report["config"]
    steps = report["finetune"][0]["steps"] if report["finetune"] else []
    show = sorted({s for s in SHOW_STEPS if s in steps} | ({steps[-1]} if steps else set()))
    out = []
    if report["finetune"]:
        out += [f"Fine-tuning attacks ({steps[-1]} steps, evaluated at steps {steps}); protected / unprotected / "
                "scratch restricted test accuracy (%) at steps " + ", ".join(map(str, show)) + "; excess = largest "
                f"protected − scratch where unprotected ≥ scratch + {100 * cfg['eligible_gap']:g}; signatures of "
                "the "
                "protected run: D = accuracy ends below its start, L = training loss rises at the start, F = ends "
                f"{100 * cfg['far_below']:g}+ points below scratch.", "",
                "| attack | lr | seed | " + " | ".join(f"step {s}" for s in show) + " | excess | signatures |",
                "| --- | --- | --- | " + " | ".join("---" for _ in show) + " | --- | --- |"]
        for r in report["finetune"]:
            sig = r["signatures"]["protected"]
            flags = "".join(c for c, k in (("D", "acc_drops"), ("L", "loss_rises"), ("F", "far_below_scratch"))
                            if sig[k]) or "–"
            cells = [" / ".join(_pct(_at(r, b, s)) for b in ("protected", "unprotected", "scratch")) for s in show]
            ex = "n/a" if r["excess"] is None else f"{100 * r['excess']:+.1f}"
            out.append(f"| {r['attack']} | {r['lr']:g} | {r['seed']} | " + " | ".join(cells) + f" | {ex} | {flags} |")
        out.append("")
    if report["probes"]:
        out += ["Probes on frozen, z-scored block features (best test accuracy % over rates "
                f"{cfg['probe_lrs']} and {cfg['probe_epochs']} epochs, {cfg['probe_optimizer']}):", "",
                "| block | dim | probe | protected | unprotected | random body |",
                "| --- | --- | --- | --- | --- | --- |"]
        seen = {}
        for r in report["probes"]:
            key = (r["block"], r["kind"])
            best = seen.setdefault(key, {"dim": r["dim"], **{k: 0.0 for k in r["curves"]}})
            for k, v in r["curves"].items():
                best[k] = max(best[k], max(v))
        for (block, kind), b in seen.items():
            out.append(f"| {block} | {b['dim']} | {kind} | {_pct(b['protected'])} | {_pct(b['unprotected'])} | "
                       f"{_pct(b['scratch'])} |")
        out.append("")
    met = [t for t in report["targets"] if t["met"] is not None]
    nulled = [t for t in report["targets"] if "within_null" in t]
    out += [f"Targets (per replicate the worst case over rates, then the median over replicates): "
            f"{sum(t['met'] for t in met)} of {len(met)} met"
            + (f", {len(report['targets']) - len(met)} without a head start to remove"
               if len(met) < len(report["targets"]) else "")
            + (f"; against the null bodies, {sum(t['within_null'] for t in nulled)} of {len(nulled)} at or below the "
               f"null median" if nulled else "") + ".", ""]
    for t in report["targets"]:
        state = "n/a" if t["met"] is None else ("met" if t["met"] else "**missed**")
        out.append(f"- {state}: {t['target']}: {t['detail']}")
    return "\n".join(out)


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
    print(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
