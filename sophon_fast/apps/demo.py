"""The offline demo: pre-train, protect, attack, report — one resumable pipeline.

Steps (each resumable: a finished step's file is reused, protection resumes from its checkpoint):
  1. pre-train ``arch`` on the original domain      -> original.safetensors (+ .json)
  2. protect it against the restricted domain        -> protected.safetensors (+ .json), checkpoints/
  3. run the attack suite on protected, unprotected and scratch (each attack cached in attacks.partial.json)
  4. the adaptive suite: attacks that know the model was protected, and probes  -> adaptive.json
     (with ``audit=True`` also the attack search, its first trials the adaptive stage's attacks -> audit/)
  5. report.json, report.md, curves.png, adaptive.png
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

import torch
from torch import nn

from sophon_fast import data as sfdata
from sophon_fast import models, recipes
from sophon_fast.apps.pipeline import protect_stage, write_json
from sophon_fast.apps.report import write_report
from sophon_fast.attacks import Attack, evaluate_suite, run, scratch, suite
from sophon_fast.attacks import accuracy as attack_accuracy
from sophon_fast.attacks.adaptive import AdaptiveConfig, default_attacks, evaluate_adaptive, excess
from sophon_fast.engine import Checkpointing, ProtectConfig
from sophon_fast.io import load_model, save_model

DEMO_DOMAINS = {"original": "fashion_mnist", "restricted": "mnist", "arch": "cnn_small"}

DEMO_ITERATIONS = {"quick": 40, "full": 1000, "full_batchnorm": 400}


def demo_config(quick: bool, iterations: Optional[int] = None, seed: int = 0, progress: bool = True,
                checkpoint_dir: Optional[str] = None, model: Optional[nn.Module] = None) -> ProtectConfig:
    """The demo's protection: :func:`sophon_fast.recipes.adaptive` for ``model`` (1,000 iterations, 400 with
    BatchNorm; 40 when ``quick``), checkpointed every 10 iterations into ``checkpoint_dir``. On cnn_small 1,000
    iterations are what the full demo's 45-minute budget on 2 CPU cores leaves room for; on a BatchNorm network the
    400 measured there take the demo to about 56 minutes."""
    default = DEMO_ITERATIONS["quick" if quick else "full_batchnorm" if recipes.has_batchnorm(model) else "full"]
    return recipes.adaptive(model, iterations if iterations is not None else default).replace(
        seed=seed, progress=progress, checkpoint=Checkpointing(checkpoint_dir, every=10, resume=True))


# The demo's adaptive stage: the attacks that know the model was protected by which docs/experiments.md judges
# the recipe (re-initialise the classifier block and train everything, under Adam and momentum SGD; 100 benign
# original-domain Adam steps first), each at three rates over two orders of magnitude with evaluations on a fine
# step grid, and a linear and an MLP probe on each block's frozen features. Null bodies (random initialisations
# attacked as if each were the protected model, docs/experiments.md a8) give each target the value a body with no
# knowledge gets from the same statistic: three in the full demo, one in the quick one.
ADAPTIVE_ATTACKS = ("reinit_block-adam", "reinit_block-momentum", "benign_first-adam")


def demo_null_seeds(quick: bool, seed: int) -> tuple:
    return tuple(seed + 100 + i for i in range(1 if quick else 3))


def demo_audit(protected: nn.Module, unprotected: nn.Module, train, test, original, quick: bool, seed: int, out: str,
               progress: bool = True, say: Callable[[str], None] = print) -> dict:
    """The attack search of :func:`sophon_fast.audit.audit` (budget "quick" or "full") into ``out``, its first
    trials today's fixed attacks at the audit's step budget: the adaptive stage's (``ADAPTIVE_ATTACKS`` at their
    three rates) in the quick demo, the default and adaptive suites' in the full one. Resumes a stored audit."""
    from sophon_fast.audit import BUDGETS, audit, make_space
    budget = "quick" if quick else "full"
    space = make_space("image", train, test, original, BUDGETS[budget]["steps"])
    fixed, _ = space.fixed_trials(protected, ("adaptive",) if quick else ("default", "adaptive"),
                                  only=ADAPTIVE_ATTACKS if quick else None)
    trials = max(BUDGETS[budget]["trials"], len(fixed) + 3)
    say(f"[demo] audit ({budget}): {trials} trials per model, the first {len(fixed)} today's fixed attacks, on the "
        f"protected, unprotected and scratch models and {BUDGETS[budget]['null_bodies']} null bodies")
    return audit(protected, train, test, unprotected=unprotected, original=original, budget=budget, trials=trials,
                 out=out, seed=seed, fixed=fixed, progress=progress, say=say)


def demo_adaptive_config(quick: bool) -> AdaptiveConfig:
    attacks = tuple(a for a in default_attacks() if a.name in ADAPTIVE_ATTACKS)
    if quick:
        return AdaptiveConfig(attacks=attacks, eval_steps=(1, 2, 5, 10, 20), probe_epochs=2)
    return AdaptiveConfig(attacks=attacks, eval_steps=(1, 2, 3, 5, 7, 10, 15, 20, 30, 40))


def pretrain(arch: str, classes: int, train, test, epochs: int, seed: int = 0, progress: bool = False):
    """``arch`` trained from a seeded initialisation: Adam lr 1e-3, batch 128, ``epochs`` epochs."""
    base = models.build(arch, num_classes=classes, seed=seed)
    recipe = Attack("pretrain", "full", "adam", lr=1e-3, batch_size=128, epochs=epochs)
    return run(base, train, test, recipe, seed=seed, progress=progress, return_model=True)[1]


def _subset(ds, n: Optional[int], seed: int):
    if n is None or n >= len(ds):
        return ds
    x, y = sfdata.as_tensors(ds)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.TensorDataset(x[idx], y[idx])


_JUDGE = AdaptiveConfig()   # the adaptive suite's thresholds, applied to the default suite's epochs as well


def _targets(report: dict) -> list:
    o = report["original"]
    out = [{"target": "protected original accuracy >= unprotected - 2 points",
            "met": o["protected"] >= o["unprotected"] - 0.02,
            "detail": f"{100 * o['protected']:.1f}% vs {100 * o['unprotected']:.1f}%"}]
    for a in report["attacks"]:
        h = a["head_start_removed"]
        if h is not None:
            out.append({"target": f"{a['name']}: head start removed >= 0.8", "met": h >= 0.8, "detail": f"{h:.2f}"})
        if a["name"] != "paper":
            ov = "never reached" if a["never_reached"] else f"{a['overhead']:.2f}"
            out.append({"target": f"{a['name']}: overhead >= 1", "met": a["never_reached"] or a["overhead"] >= 1,
                        "detail": ov})
        else:
            gap = max(p - s for p, s in zip(a["protected"], a["scratch"]))
            out.append({"target": "paper attack: protected <= scratch + 5 points at every epoch",
                        "met": gap <= 0.05, "detail": f"largest excess {100 * gap:+.1f} points"})
        ex, n = excess(a["protected"], a["unprotected"], a["scratch"], _JUDGE)
        out.append({"target": f"{a['name']}: protected <= scratch + {100 * _JUDGE.max_excess:g} points where "
                              f"unprotected >= scratch + {100 * _JUDGE.eligible_gap:g}",
                    "met": None if ex is None else ex <= _JUDGE.max_excess + 1e-9,
                    "detail": "no such epoch" if ex is None else f"largest {100 * ex:+.1f} points over {n} epochs"})
    if "audit" in report:
        v = report["audit"]["verdict"]
        out.append({"target": "audit: the protected model's best searched attack within the null bodies' range",
                    "met": None if v["state"] == "inconclusive" else v["state"] == "held",
                    "detail": f"{v['state']}: {v['detail']} (audit/report.md)"})
    for t in report.get("adaptive", {}).get("targets", []):
        out.append({"target": f"adaptive: {t['target']}", "met": t["met"], "detail": t["detail"]})
    return out


def run_demo(out: str = "runs/demo", quick: bool = False, seed: int = 0, original: Optional[str] = None,
             restricted: Optional[str] = None, arch: Optional[str] = None, iterations: Optional[int] = None,
             attacks: Optional[str] = None, attack_epochs: Optional[int] = None, subset: Optional[int] = None,
             pretrain_epochs: Optional[int] = None, adaptive: bool = True, progress: bool = True,
             say: Callable[[str], None] = print, config: Optional[ProtectConfig] = None, audit: bool = False) -> dict:
    """Run the whole demo into ``out``; returns the report dict (also written as report.json).
    ``adaptive``: run the adaptive stage (:func:`demo_adaptive_config`) after the attack suite. ``config``: protect
    with these settings (checkpointed into ``out``) instead of :func:`demo_config`'s (an experiment's config.json).
    ``audit``: also run :func:`demo_audit` into ``out/audit`` (needs optuna); its verdict becomes a target."""
    original = original or DEMO_DOMAINS["original"]
    restricted = restricted or DEMO_DOMAINS["restricted"]
    arch = arch or DEMO_DOMAINS["arch"]
    os.makedirs(out, exist_ok=True)
    timing = {}
    o_train, o_test = (_subset(sfdata.load(original, s), subset, seed) for s in ("train", "test"))
    r_train, r_test = (_subset(sfdata.load(restricted, s), subset, seed + 1) for s in ("train", "test"))
    classes = int(max(int(sfdata.as_tensors(d)[1].max()) for d in (o_train, r_train))) + 1

    # 1. pre-training (Adam 1e-3, batch 128)
    orig_path = os.path.join(out, "original.safetensors")
    t0 = time.perf_counter()
    if os.path.exists(orig_path):
        unprotected = load_model(orig_path)
        say(f"[demo] reusing pre-trained model {orig_path}")
    else:
        epochs = pretrain_epochs or (1 if quick else 3)
        say(f"[demo] pre-training {arch} on {original} for {epochs} epochs")
        unprotected = pretrain(arch, classes, o_train, o_test, epochs, seed, progress)
        save_model(unprotected, orig_path, metadata={"domain": original, "epochs": epochs})
    timing["pretrain"] = time.perf_counter() - t0
    unprot_acc = attack_accuracy(unprotected, o_test)
    say(f"[demo] unprotected {original} test accuracy {100 * unprot_acc:.1f}%")

    # 2. protection
    prot_path = os.path.join(out, "protected.safetensors")
    cfg = demo_config(quick, iterations, seed, progress, os.path.join(out, "checkpoints"), unprotected) \
        if config is None else config.replace(progress=progress, checkpoint=Checkpointing(
            os.path.join(out, "checkpoints"), every=10, resume=True))
    meta = {"original": original, "restricted": restricted, "iterations": cfg.iterations}
    protected, history, timing["protect"] = protect_stage(
        out, cfg, unprotected, o_train, r_train, o_test, None,
        lambda m: save_model(m, prot_path, metadata={**meta, "protect_config": cfg.to_dict()}),
        lambda: load_model(prot_path), say,
        derived=[os.path.join(out, "attacks.partial.json"), os.path.join(out, "adaptive.json")])
    prot_acc = attack_accuracy(protected, o_test)
    say(f"[demo] protected {original} test accuracy {100 * prot_acc:.1f}%")

    # 3. attacks (each finished attack is cached, so an interrupted demo resumes here)
    suite_name = attacks or ("quick" if quick else "default")
    attack_list = demo_attacks(suite_name, attack_epochs)
    partial_path = os.path.join(out, "attacks.partial.json")
    done = {}
    if os.path.exists(partial_path):
        with open(partial_path) as f:
            done = {r["name"]: r for r in json.load(f)}
    t0 = time.perf_counter()
    base = scratch(protected, seed)
    rows = []
    for a in attack_list:
        if a.name in done and done[a.name]["epochs"] == a.epochs:
            rows.append(done[a.name])
            continue
        say(f"[demo] attack {a.name}: {a.method}, {a.optimizer} lr {a.lr:g}, batch {a.batch_size}, {a.epochs} epochs")
        row = evaluate_suite(protected, unprotected, r_train, r_test, [a], seed=seed, progress=False,
                             scratch_model=base)[0]
        row["name"] = row.pop("attack", a.name)
        rows.append(row)
        say(f"[demo]   protected {100 * row['protected'][-1]:.1f}%  unprotected "
            f"{100 * row['unprotected'][-1]:.1f}%  scratch {100 * row['scratch'][-1]:.1f}%")
        write_json(partial_path, rows)
    timing["attacks"] = time.perf_counter() - t0

    # 4. the adaptive suite (cached in adaptive.json with its settings)
    adaptive_report = None
    if adaptive:
        t0 = time.perf_counter()
        acfg, nulls = demo_adaptive_config(quick), demo_null_seeds(quick, seed)
        want = json.loads(json.dumps(dataclasses.asdict(acfg)))
        adaptive_path = os.path.join(out, "adaptive.json")
        if os.path.exists(adaptive_path):
            with open(adaptive_path) as f:
                adaptive_report = json.load(f)
            if adaptive_report.get("config") != want or adaptive_report.get("seeds") != [seed] \
                    or adaptive_report.get("null_seeds") != list(nulls):
                adaptive_report = None
        if adaptive_report is None:
            say(f"[demo] adaptive attacks: {', '.join(ADAPTIVE_ATTACKS)} at three rates each, "
                f"{acfg.eval_steps[-1]} steps, on the protected, unprotected and scratch models and "
                f"{len(nulls)} random initialisations; probes on each block's frozen features")
            adaptive_report = evaluate_adaptive(protected, unprotected, r_train, r_test, o_train, acfg, seeds=(seed,),
                                                say=lambda line: say(f"[demo]   {line}"), null_seeds=nulls)
            adaptive_report = json.loads(json.dumps(adaptive_report))
            write_json(adaptive_path, adaptive_report)
        else:
            say(f"[demo] reusing the adaptive suite's results {adaptive_path}")
        timing["adaptive"] = time.perf_counter() - t0
    audit_report = None
    if audit:
        t0 = time.perf_counter()
        audit_report = demo_audit(protected, unprotected, r_train, r_test, o_train, quick, seed,
                                  os.path.join(out, "audit"), progress, say)
        timing["audit"] = time.perf_counter() - t0

    report = {"task": "image", "domains": {"original": original, "restricted": restricted},
              "metric": "test accuracy", "higher_is_better": True,
              "original": {"metric": "original-domain test accuracy", "unprotected": unprot_acc, "protected": prot_acc},
              "attacks": [{**r, "steps": list(range(len(r["protected"])))} for r in rows], "architecture": arch,
              "config": {"protect": cfg.to_dict(), "suite": suite_name, "quick": quick, "seed": seed,
                         "subset": subset, "threads": torch.get_num_threads()},
              "timing": timing,
              "protect_history": [{k: v for k, v in h.items() if k in ("iteration", "fts_loss", "ntr_loss",
                                                                        "original_metric", "grad_norm")}
                                  for h in history]}
    if adaptive_report is not None:
        report["adaptive"] = adaptive_report
    if audit_report is not None:
        report["audit"] = {"verdict": audit_report["verdict"], "report": "audit/report.md",
                           "best": {n: m["best"]["value"] for n, m in audit_report["models"].items()}}
    report["targets"] = _targets(report)
    paths = write_report(report, out)
    say(f"[demo] wrote {', '.join(p for p in paths.values() if p)}")
    return report


def demo_attacks(name: str, epochs: Optional[int] = None) -> list:
    """The demo's attacks: "paper" first, then the named suite ("quick": a small default subset)."""
    if name == "quick":
        attacks = [suite("paper")[0]] + [a for a in suite("default")
                                         if (a.method, a.optimizer) in (("full", "adam"), ("reinit_head", "momentum"))][::2]
        attacks = [_with_epochs(a, min(a.epochs, 8)) for a in attacks]
    else:
        attacks = suite("paper") + (suite(name) if name != "paper" else [])
    if epochs is not None:
        attacks = [_with_epochs(a, epochs) for a in attacks]
    return attacks


def _with_epochs(a: Attack, epochs: int) -> Attack:
    # generated names spell the epochs out: let them be regenerated
    return dataclasses.replace(a, epochs=epochs, name=a.name if a.name == "paper" else None)
