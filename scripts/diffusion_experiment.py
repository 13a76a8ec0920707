"""Diffusion protection experiments (docs/experiments.md d1-d10) at the diffusion demo's sizes.

    .venv/bin/python scripts/diffusion_experiment.py NAME [loss=mse_neg] [alpha=10] [tmax=300] [ntr=20]
        [iters=150] [K=5] [beta=2] [maxdrop=0.1] [ts=uniform|fixed1] [att_ts=uniform|fixed1] [ev=50]
        [quick=1] [attack=1] [meta=first_order|unrolled]
    .venv/bin/python scripts/diffusion_experiment.py --early runs/dexp/NAME.pt   # a quick run's first attack steps
    .venv/bin/python scripts/diffusion_experiment.py --bands      # where the head start over scratch lives
    .venv/bin/python scripts/diffusion_experiment.py --recovery runs/demo-diffusion-full   # how fast it goes
    .venv/bin/python scripts/diffusion_experiment.py --generic [--full] [white|permuted ...]   # denoisers that know no domain

Protects the demo's pre-trained denoiser (cached in runs/diffusion_cache) with ``diffusion_demo.demo_config(quick)``
and the listed fields replaced; ``tmax`` is ``suppression_tmax`` (1000: None, all timesteps); ``ts`` is the task's
timesteps, ``att_ts`` the attacks' training timesteps, ``ev`` their evaluation interval. d1-d10 ran before the
demo's recipe changed: there the unlisted fields were loss=dos alpha=3 tmax=1000 ntr=10 iters=60 K=5. Prints one JSON line for the protection (original eps-MSE, restricted
eps-MSE before the attack, per-band eps-MSE) and one per attack; saves the protected weights to runs/dexp/NAME.pt.
"""
import copy
import dataclasses
import json
import os
import sys
import time

import torch

import sophon_fast as sf
from sophon_fast.apps import diffusion_demo as dd
from sophon_fast.attacks import diffusion as da
from sophon_fast.attacks.run import scratch
from sophon_fast.engine import Evaluation
from sophon_fast.tasks.diffusion import eps_mse

BANDS = [(0, 50), (50, 150), (150, 300), (300, 500), (500, 700), (700, 1000)]     # --bands: 4 timesteps each
PROFILE_BANDS = [(0, 100), (100, 300), (300, 600), (600, 1000)]                   # a run's profile: 5 each


def band_profile(model, schedule, x, bands=PROFILE_BANDS, per=5):
    """eps-MSE of ``model`` on ``x`` per band, each the mean over ``per`` evenly spaced timesteps."""
    out = []
    for lo, hi in bands:
        ts = range(lo, hi, (hi - lo) // per)
        out.append(round(sum(float(eps_mse(model, schedule, x, t)) for t in ts) / len(ts), 4))
    return out


def fine_tuned(data, base, images, optimizer, lr, steps):
    """A copy of ``base`` after ``steps`` steps of ``optimizer`` at ``lr`` (batch 32, uniform t) on ``images``."""
    m = copy.deepcopy(base)
    attack = da.DiffusionAttack(optimizer=optimizer, lr=lr, batch_size=32, steps=steps)
    da.fit(m, images, attack.make_optimizer(m.parameters()), steps, 32, "uniform", data.schedule,
           torch.Generator().manual_seed(0))
    return m


def bands(data):
    """The unprotected model and scratch per band after 0, 50 and 150 steps of each quick attack."""
    x = data.restricted_test[:300]
    out = {"bands": BANDS}
    for opt, lr in (("momentum", 1e-2), ("adam", 1e-3)):
        for steps in (0, 50, 150):
            for key, base in (("unprotected", data.unprotected), ("scratch", scratch(data.unprotected, 0))):
                m = fine_tuned(data, base, data.restricted_train, opt, lr, steps)
                out[f"{opt}_{steps}_{key}"] = band_profile(m, data.schedule, x, BANDS, 4)
    print(json.dumps(out), flush=True)


def score(data, model, x):
    """Restricted eps-MSE (uniform t) of ``model`` on ``x``, rounded as the log prints it."""
    return round(float(eps_mse(model, data.schedule, x, "uniform")), 4)


def models_of(data, protected):
    return {"protected": protected, "unprotected": data.unprotected, "scratch": scratch(data.unprotected, 0)}


def early_steps(data, models, steps):
    """{optimizer: {model: [eps-MSE after each count in ``steps``]}}: the first restricted momentum 1e-2 and Adam 1e-3
    steps (batch 32, uniform t) from each model, scored on the restricted test images."""
    return {opt: {key: [score(data, fine_tuned(data, base, data.restricted_train, opt, lr, k), data.restricted_test)
                        for k in steps] for key, base in models.items()}
            for opt, lr in (("momentum", 1e-2), ("adam", 1e-3))}


def recovery(data, protected):
    """How fast the suppression goes: benign (original-domain) fine-tuning of the protected model, the first 1-5
    restricted momentum and Adam steps, and an attacker with only 32 or 256 restricted images, against the unprotected
    model and scratch. Restricted eps-MSE (uniform t) on the test images."""
    models = models_of(data, protected)
    out = {"benign": {}, "few_images_adam": {}}
    for opt, lr in (("adam", 1e-4), ("adam", 1e-3), ("momentum", 1e-2)):
        for steps in (10, 50):
            m = fine_tuned(data, protected, data.original_train, opt, lr, steps)
            out["benign"][f"{opt} {lr:g}, {steps} steps"] = [score(data, m, data.restricted_test),
                                                           score(data, m, data.original_test)]
    for opt, rows in early_steps(data, models, (1, 2, 3, 5)).items():
        out[f"early_{opt}"] = rows
    for key, base in models.items():
        for n in (32, 256):
            out["few_images_adam"][f"{key}, {n} images"] = [
                score(data, fine_tuned(data, base, data.restricted_train[:n], "adam", 1e-3, k), data.restricted_test)
                for k in (0, 50, 150)]
    print(json.dumps(out), flush=True)


def early(data, protected, steps=(0, 1, 2, 3, 5, 10)):
    """A quick-size run's first restricted steps: :func:`early_steps` of the protected model, the unprotected model
    and scratch."""
    print(json.dumps(early_steps(data, models_of(data, protected), steps)), flush=True)


def structureless(kind, like, seed=0):
    """Training images with no image structure, shaped like ``like`` ((N, 1, 28, 28) in [-1, 1]): ``white`` draws
    every pixel uniformly from [-1, 1]; ``permuted`` moves every image's pixels by one fixed random permutation
    (each pixel keeps its value distribution, no spatial structure is left)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "white":
        return torch.rand(like.shape, generator=gen) * 2 - 1
    if kind == "permuted":
        perm = torch.randperm(like[0].numel(), generator=gen)
        return like.flatten(1)[:, perm].reshape(like.shape)
    raise ValueError(f"unknown structureless kind {kind!r} (white, permuted)")


def generic(data, kinds, ev=10, quick=True):
    """Denoisers that know no image domain: ``ddpm_unet_small`` pre-trained as the demo's (same seed, steps, batch
    and rate) on :func:`structureless` images instead of Fashion-MNIST, then attacked by the demo's suite (the quick
    one unless ``quick`` is false; every ``ev`` steps) as "protected" beside the Fashion-MNIST model ("unprotected")
    and scratch."""
    info = data.pretrain
    for kind in kinds:
        images = structureless(kind, data.original_train)
        t0 = time.perf_counter()
        model = dd.pretrain(sf.models.build(dd.DOMAINS["arch"], seed=info["seed"]), images, info["steps"],
                            info["batch_size"], info["lr"], info["seed"]).eval()
        attacks = [dataclasses.replace(a, name=None, eval_every=ev) for a in da.suite(quick)]
        result = da.evaluate_suite(model, data.unprotected, data.restricted_train, data.restricted_test, attacks,
                                   seed=0, schedule=data.schedule, samples=0, say=lambda s: None)
        print(json.dumps({"generic": kind, "pretrain_s": round(time.perf_counter() - t0, 1),
                          "original": score(data, model, data.original_test),
                          "restricted": score(data, model, data.restricted_test),
                          "own_domain": score(data, model, images[:300]),
                          "bands_restricted": band_profile(model, data.schedule, data.restricted_test[:200]),
                          "attacks": [{k: a[k] for k in ("name", "steps", "protected", "unprotected", "scratch")}
                                      for a in result["attacks"]]}), flush=True)


def main(argv):
    torch.set_num_threads(1)
    if argv == ["--bands"]:
        return bands(dd.prepare(True, 0, cache_dir="runs/diffusion_cache", say=lambda s: None))
    if argv[:1] == ["--early"]:             # --early runs/dexp/NAME.pt of a quick-size run: its first restricted steps
        data = dd.prepare(True, 0, cache_dir="runs/diffusion_cache", say=lambda s: None)
        model = copy.deepcopy(data.unprotected)
        model.load_state_dict(torch.load(argv[1]))
        return early(data, model)
    if argv[:1] == ["--generic"]:           # --generic [--full] [white] [permuted]: structureless pre-training vs scratch
        full = "--full" in argv
        kinds = [k for k in argv[1:] if k != "--full"] or ["white", "permuted"]
        return generic(dd.prepare(not full, 0, cache_dir="runs/diffusion_cache", say=lambda s: None), kinds,
                       ev=100 if full else 10, quick=not full)
    if argv[:1] == ["--recovery"]:          # --recovery RUN_DIR of a full demo run (its cache and protected model)
        from sophon_fast.io import load_model
        data = dd.prepare(False, 0, cache_dir=os.path.join(argv[1], "cache"), say=lambda s: None)
        return recovery(data, load_model(os.path.join(argv[1], "protected.safetensors")))
    name, kv = argv[0], dict(a.split("=", 1) for a in argv[1:])
    quick = kv.get("quick", "1") == "1"
    data = dd.prepare(quick, 0, cache_dir="runs/diffusion_cache", say=print)
    cfg = dd.demo_config(quick, 0)
    cfg = cfg.replace(loss=kv.get("loss", cfg.loss), alpha=float(kv.get("alpha", cfg.alpha)),
                      ntr_steps=int(kv.get("ntr", cfg.ntr_steps)), beta=float(kv.get("beta", cfg.beta)),
                      iterations=int(kv.get("iters", cfg.iterations)), inner_steps=int(kv.get("K", cfg.inner_steps)),
                      evaluation=Evaluation(every=10, size=cfg.evaluation.size,
                                            max_drop=float(kv.get("maxdrop", cfg.evaluation.max_drop))))
    if kv.get("meta", "first_order") != "first_order":
        cfg = cfg.replace(meta_gradient=kv["meta"], mode="reference")
    tmax = int(kv.get("tmax", cfg.suppression_tmax or 1000))
    timestep = kv.get("ts", cfg.timestep)
    cfg = cfg.replace(timestep=timestep, suppression_tmax=tmax if timestep == "uniform" and tmax < 1000 else None)
    t0 = time.perf_counter()
    res = sf.protect(data.unprotected, data.original_train, data.restricted_train, cfg,
                     original_test=data.original_test)
    os.makedirs("runs/dexp", exist_ok=True)
    torch.save(res.model.state_dict(), f"runs/dexp/{name}.pt")
    profile = {f"{k}_{d}": band_profile(m, data.schedule, x[:200])
               for k, m in (("unprotected", data.unprotected), ("protected", res.model))
               for d, x in (("original", data.original_test), ("restricted", data.restricted_test))}
    print(json.dumps({"name": name, "cfg": kv, "protect_s": round(time.perf_counter() - t0, 1), "stop": res.stop_reason,
                      "original": dd.original_metrics(data, res.model),
                      "restricted_uniform": float(eps_mse(res.model, data.schedule, data.restricted_test, "uniform")),
                      "bands": profile,
                      "history": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
                                  for h in res.history if h["iteration"] % 10 == 9]}), flush=True)
    if kv.get("attack", "1") != "1":
        return
    attacks = [dataclasses.replace(a, timestep=kv.get("att_ts", "uniform"), name=None,
                                   eval_every=int(kv.get("ev", a.eval_every))) for a in da.suite(quick)]
    result = da.evaluate_suite(res.model, data.unprotected, data.restricted_train, data.restricted_test, attacks,
                               seed=0, schedule=data.schedule, samples=0, say=print)
    for a in result["attacks"]:
        print(json.dumps({"attack": a["name"], **{k: a[k] for k in ("steps", "protected", "unprotected", "scratch",
                                                                     "protected_t1", "unprotected_t1", "scratch_t1")}}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
