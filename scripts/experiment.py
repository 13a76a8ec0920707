"""Protection-strength experiments (docs/experiments.md): protect with a config, attack, compare.

    .venv/bin/python scripts/experiment.py NAME --config '{"loss": "ice", ...}' [--seeds 0 1 2]
        [--pair fashion_mnist:mnist|fashion_mnist:mnist+digits] [--arch cnn_small] [--attacks core] [--epochs-scale 1]

Pre-trained models and the unprotected/scratch curves do not depend on the protection, so they are
cached per (pair, arch, seed, attack) under runs/exp/cache; each run writes runs/exp/NAME/s{seed}.json
and prints one summary line per attack.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from sophon_fast import data as sfdata
from sophon_fast.attacks import head_start_removed, overhead, run, scratch, suite
from sophon_fast.attacks import accuracy
from sophon_fast.apps.demo import pretrain
from sophon_fast.engine import ProtectConfig, protect
from sophon_fast.defences.trap import head_preacts
from sophon_fast.io import load_model, save_model

ROOT = "runs/exp"


def load_domain(name, split):
    """A built-in domain, or several joined by '+' (e.g. ``mnist+digits``: one dataset of both, same labels)."""
    parts = [sfdata.load(n, split) for n in name.split("+")]
    if len(parts) == 1:
        return parts[0]
    return sfdata.ImageDataset(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                               name, split, parts[0].classes)


def attack_set(name, scale):
    if name == "core":
        attacks = suite("paper") + suite("default")
    elif name == "strong":
        attacks = suite("paper") + [a for a in suite("default") if a.lr in (1e-2, 1e-3)]
    else:
        attacks = suite(name)
    if scale != 1:
        attacks = [dataclasses.replace(a, epochs=max(1, round(a.epochs * scale)),
                                       name=a.name if a.name == "paper" else None) for a in attacks]
        attacks = [dataclasses.replace(a, name=f"paper-ep{a.epochs}") if a.name == "paper" else a for a in attacks]
    return attacks


def save_cache(path, key, value):
    """Add one entry to a curves cache shared by concurrent runs: re-read, merge, replace atomically."""
    cache = json.load(open(path)) if os.path.exists(path) else {}
    cache[key] = value
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f)
    os.replace(tmp, path)


@torch.no_grad()
def dead_stats(model, dataset, n=2000):
    """How switched off the head's input ReLUs are: the fraction of inputs whose every unit is <= 0,
    and of (input, unit) pairs <= 0. Dead units pass no gradient to anything below the head."""
    x = sfdata.as_tensors(dataset)[0][:n]
    was = model.training
    model.eval()
    try:
        z = head_preacts(model, model.head, x)
    finally:
        model.train(was)
    return {"inputs_all_off": float((z.max(1).values <= 0).float().mean()), "units_off": float((z <= 0).float().mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--config", default="{}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pair", default="fashion_mnist:mnist")
    ap.add_argument("--arch", default="cnn_small")
    ap.add_argument("--attacks", default="core")
    ap.add_argument("--epochs-scale", type=float, default=1.0)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None,
                    help="attack this already-protected model instead of protecting ({seed} is replaced by the seed)")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th attack starting at i (parallel processes)")
    ap.add_argument("--methods", nargs="+", default=None, choices=("full", "reinit_head", "last_layer"),
                    help="only the attacks of these methods")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    orig, restr = a.pair.split(":")
    o_tr, o_te, r_tr, r_te = (load_domain(n, s) for n in (orig, restr) for s in ("train", "test"))
    classes = 1 + max(int(sfdata.as_tensors(d)[1].max()) for d in (o_tr, r_tr))
    attacks = [atk for atk in attack_set(a.attacks, a.epochs_scale) if a.methods is None or atk.method in a.methods]
    shard, nshards = (int(v) for v in a.shard.split("/"))
    attacks = attacks[shard::nshards]
    os.makedirs(f"{ROOT}/cache", exist_ok=True)
    os.makedirs(f"{ROOT}/{a.name}", exist_ok=True)
    for seed in a.seeds:
        tag = f"{orig}_{a.arch}_p{a.pretrain_epochs}_s{seed}"
        mpath = f"{ROOT}/cache/{tag}.safetensors"
        if os.path.exists(mpath):
            unprot = load_model(mpath)
        else:
            unprot = pretrain(a.arch, classes, o_tr, o_te, a.pretrain_epochs, seed)
            save_model(unprot, mpath)
        cpath = f"{ROOT}/cache/curves_{tag}_{restr}.json"
        cache = json.load(open(cpath)) if os.path.exists(cpath) else {}
        cfg = ProtectConfig.from_dict({**ProtectConfig().to_dict(), "progress": False, "seed": seed,
                                       **json.loads(a.config)})
        t0 = time.perf_counter()
        if a.model:
            path = a.model.format(seed=seed)
            prot, res = load_model(path), argparse.Namespace(stop_reason="loaded " + path)
        else:
            res = protect(unprot, o_tr, r_tr, cfg, original_test=o_te)
            prot = res.model
        t_protect = time.perf_counter() - t0
        out = {"name": a.name, "seed": seed, "pair": a.pair, "arch": a.arch, "config": json.loads(a.config),
               "original_acc": {"unprotected": accuracy(unprot, o_te), "protected": accuracy(prot, o_te)},
               "protect_seconds": t_protect, "stop_reason": res.stop_reason, "attacks": [],
               "dead": {k: dead_stats(prot, d) for k, d in (("restricted_train", r_tr), ("restricted_test", r_te),
                                                           ("original_test", o_te))}}
        print(f"[{a.name} s{seed}] dead head-input units (all units off / unit-input pairs off): "
              + ", ".join(f"{k} {v['inputs_all_off']:.3f}/{v['units_off']:.3f}" for k, v in out["dead"].items()),
              flush=True)
        print(f"[{a.name} s{seed}] original {100*out['original_acc']['unprotected']:.1f}% -> "
              f"{100*out['original_acc']['protected']:.1f}%  protect {t_protect:.0f}s  {res.stop_reason}", flush=True)
        save_model(prot, f"{ROOT}/{a.name}/model_s{seed}.safetensors")
        base = scratch(prot, seed)
        for atk in attacks:
            key = f"{atk.name}"
            if key not in cache:
                cache[key] = {"unprotected": run(unprot, r_tr, r_te, atk, seed), "scratch": run(base, r_tr, r_te, atk, seed)}
                save_cache(cpath, key, cache[key])
            p = run(prot, r_tr, r_te, atk, seed)
            u, s = cache[key]["unprotected"], cache[key]["scratch"]
            ov = overhead(p, s)
            row = {"attack": atk.name, "protected": p, "unprotected": u, "scratch": s, "overhead": ov.value,
                   "never_reached": ov.never_reached, "head_start_removed": head_start_removed(p, u, s),
                   "max_excess_over_scratch": max(pp - ss for pp, ss in zip(p, s))}
            out["attacks"].append(row)
            print(f"  {atk.name:<40} prot {100*p[-1]:5.1f}  unprot {100*u[-1]:5.1f}  scratch {100*s[-1]:5.1f}  "
                  f"overhead {'inf' if ov.never_reached else f'{ov.value:.2f}'}  hsr {row['head_start_removed']}"
                  f"  max_excess {100*row['max_excess_over_scratch']:+.1f}", flush=True)
        json.dump(out, open(f"{ROOT}/{a.name}/s{seed}.json", "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
