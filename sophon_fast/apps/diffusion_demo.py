"""The offline diffusion demo's pieces: original = Fashion-MNIST, restricted = MNIST, a small DDPM UNet.

    data = prepare(quick, seed, cache_dir)                 pre-trained denoiser (cached) and the images
    cfg = demo_config(quick)                               sophon_fast.recipes.diffusion with the demo's run settings
    protected = protect(data.unprotected, ..., cfg).model
    attacks = attack_all(protected, data, quick, seed, out_dir)
    sophon_fast.apps.report.write_report(build_report(data, protected, attacks, ...), out_dir)

The metric everywhere is eps-MSE (lower = better denoising): on the original domain it measures
intactness, on the restricted domain how well fine-tuning works. Budgets on a 2-core CPU with one
torch thread: ``quick`` (pre-training, protection and attacks) <= 10 minutes, full <= 45 minutes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from sophon_fast import data as sfdata
from sophon_fast import models, recipes
from sophon_fast.apps.report import step_targets
from sophon_fast.attacks import diffusion as dattacks
from sophon_fast.engine import Checkpointing, ProtectConfig
from sophon_fast.io import load_model, read_record, save_model
from sophon_fast.models.diffusion import NoiseSchedule
from sophon_fast.tasks.diffusion import eps_mse

DOMAINS = {"original": "fashion_mnist", "restricted": "mnist", "arch": "ddpm_unet_small"}
# quick / full: pre-training steps (batch 64, Adam), test images scored (None: all), samples per grid.
SIZES = {True: {"pretrain_steps": 400, "original_test": 500, "restricted_test": 300, "samples": 8},
         False: {"pretrain_steps": 1500, "original_test": 1000, "restricted_test": 500, "samples": 8}}


@dataclass
class DemoData:
    """What :func:`prepare` returns: the pre-trained denoiser and the images ((N, 1, 28, 28) in [-1, 1])."""

    unprotected: nn.Module
    original_train: Tensor
    original_test: Tensor
    restricted_train: Tensor
    restricted_test: Tensor
    schedule: NoiseSchedule
    timestep: str = "uniform"
    pretrain: Dict = field(default_factory=dict)


def pretrain(model: nn.Module, images: Tensor, steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
             schedule: Optional[NoiseSchedule] = None) -> nn.Module:
    """Train ``model`` in place with the DDPM loss (eps-MSE, uniform timesteps): Adam at ``lr``, constant,
    ``steps`` batches of ``batch_size`` images drawn without replacement from ``images`` (reshuffled
    each pass), noise from a generator seeded with ``seed`` on the model's device. Returns ``model``."""
    device = next(model.parameters()).device
    schedule = (schedule if schedule is not None else NoiseSchedule()).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    dattacks.fit(model, images.to(device), torch.optim.Adam(model.parameters(), lr=lr), steps, batch_size,
                 "uniform", schedule, gen)
    return model


def prepare(quick: bool, seed: int = 0, cache_dir: str = "runs/diffusion_demo", device: str = "cpu",
            say: Callable[[str], None] = print) -> DemoData:
    """The pre-trained denoiser and the demo's images (original = Fashion-MNIST, restricted = MNIST).

    The ``ddpm_unet_small`` denoiser, initialised from ``seed``, is pre-trained on the 60,000
    Fashion-MNIST training images (:func:`pretrain`, ``SIZES[quick]["pretrain_steps"]`` steps) and saved
    as ``cache_dir/original_<steps>_s<seed>.safetensors``; a later call with the same settings loads it.
    Test sets are the first ``original_test`` / ``restricted_test`` images of each test split (all when
    None). Raises :class:`sophon_fast.data.DatasetUnavailable` when a dataset is not installed.
    """
    size = SIZES[bool(quick)]
    o_train, o_test = (sfdata.load(DOMAINS["original"], s).images for s in ("train", "test"))
    r_train, r_test = (sfdata.load(DOMAINS["restricted"], s).images for s in ("train", "test"))
    o_test, r_test = o_test[:size["original_test"]], r_test[:size["restricted_test"]]
    steps = size["pretrain_steps"]
    path = os.path.join(cache_dir, f"original_{steps}_s{seed}.safetensors")
    info = {"domain": DOMAINS["original"], "steps": steps, "batch_size": 64, "lr": 2e-3, "seed": seed}
    t0 = time.perf_counter()
    if os.path.exists(path) and read_record(path).get("metadata", {}).get("pretrain") == info:
        model = load_model(path, map_location=device)
        say(f"[diffusion demo] reusing the pre-trained denoiser {path}")
        seconds = None
    else:
        say(f"[diffusion demo] pre-training {DOMAINS['arch']} on {DOMAINS['original']}: {steps} steps of 64")
        model = pretrain(models.build(DOMAINS["arch"], seed=seed).to(device), o_train, steps, 64, 2e-3, seed)
        save_model(model, path, metadata={"pretrain": info})
        seconds = time.perf_counter() - t0
    return DemoData(model.eval(), o_train, o_test, r_train, r_test, NoiseSchedule().to(device),
                    pretrain={**info, "path": path, "seconds": seconds})


def demo_config(quick: bool, seed: int = 0, progress: bool = False, checkpoint_dir: Optional[str] = None) -> ProtectConfig:
    """The demo's protection: :func:`sophon_fast.recipes.diffusion` (``quick``: 60 iterations with 10 NTR steps;
    full: 200 with 20), evaluated on the demo's original test images, checkpointed every 10 iterations.

    Measured on the quick sizes (docs/experiments.md d1-d10, seed 0; unprotected original eps-MSE 0.057, MNIST
    0.053, a fresh UNet 1.17): the quick recipe (d2) keeps the original at 0.061 and takes MNIST to 0.35 before
    the attack; with 150 iterations and 20 NTR steps (d7) the original improves to 0.053 and MNIST reaches 1.28,
    above a fresh UNet. Every variant is undone by fine-tuning: 10 attack steps bring MNIST below scratch, 50 to
    within 0.03 of the unprotected model. DoS at alpha 3 (the previous recipe, d1) did not move MNIST (0.051);
    DoS at alpha 10 with 3 NTR steps took the original to 0.24 within 10 iterations.
    """
    return recipes.diffusion(quick, SIZES[bool(quick)]["original_test"]).replace(
        checkpoint=Checkpointing(dir=checkpoint_dir, every=10, resume=checkpoint_dir is not None), seed=seed,
        progress=progress)


def original_metrics(data: DemoData, protected: nn.Module) -> dict:
    """Original-domain (Fashion-MNIST test) eps-MSE of the unprotected and protected models, averaged over
    uniform timesteps (``unprotected``, ``protected``) and at t = 1 (``*_t1``)."""
    out = {}
    for key, model in (("unprotected", data.unprotected), ("protected", protected)):
        x = data.original_test.to(next(model.parameters()).device)
        out[key] = float(eps_mse(model, data.schedule, x, "uniform"))
        out[f"{key}_t1"] = float(eps_mse(model, data.schedule, x, 1))
    return out


def attack_all(protected: nn.Module, data: DemoData, quick: bool, seed: int = 0, out_dir: Optional[str] = None,
               say: Callable[[str], None] = print) -> dict:
    """The demo's attacks (:func:`sophon_fast.attacks.diffusion.suite`) on the protected model, the
    unprotected model and scratch, on MNIST; sample grids (``SIZES[quick]["samples"]`` samples per model,
    full T-step sampling) saved in ``out_dir`` for every attack (quick: the first only). Returns
    :func:`sophon_fast.attacks.diffusion.evaluate_suite`'s dict."""
    size = SIZES[bool(quick)]
    return dattacks.evaluate_suite(protected, data.unprotected, data.restricted_train, data.restricted_test,
                                   dattacks.suite(quick), seed=seed, schedule=data.schedule, samples=size["samples"],
                                   sample_dir=out_dir, sample_attacks=1 if quick else None, say=say)


def build_report(data: DemoData, protected: nn.Module, attacks: dict, config: Optional[dict] = None,
                 timing: Optional[dict] = None, quick: bool = False, seed: int = 0) -> dict:
    """The report dict (what report.json holds)::

        {"task": "diffusion", "domains": {"original", "restricted"}, "metric": "eps_mse", "higher_is_better": False,
         "original": {"metric", "unprotected", "protected", "unprotected_t1", "protected_t1"},
         "attacks": [per attack: name, settings, "steps", and per-evaluation lists "protected",
                     "unprotected", "scratch" (uniform t) and "*_t1", "samples", "head_start"], "targets": [...],
         "schedule": {...}, "pretrain": {...}, "config": {...}, "timing": {...}}

    ``head_start`` = scratch - unprotected eps-MSE at each evaluation (> 0: the pre-trained model fine-tunes
    better than scratch)."""
    rows = [{**a, "head_start": [None if u is None or s is None else s - u
                                 for u, s in zip(a["unprotected"] or [], a["scratch"])]} for a in attacks["attacks"]]
    report = {"task": "diffusion", "domains": {"original": DOMAINS["original"], "restricted": DOMAINS["restricted"]},
              "metric": attacks["metric"], "higher_is_better": attacks["higher_is_better"],
              "original": {"metric": "original eps-MSE (uniform t)", **original_metrics(data, protected)},
              "attacks": rows,
              "schedule": {"timesteps": data.schedule.timesteps, "beta_start": data.schedule.beta_start,
                           "beta_end": data.schedule.beta_end},
              "pretrain": {k: v for k, v in data.pretrain.items() if k != "path"},
              "config": {"protect": config or {}, "quick": quick, "seed": seed, "threads": torch.get_num_threads(),
                         "sizes": SIZES[bool(quick)]},
              "timing": timing or {}}
    report["targets"] = step_targets(report, 0.10)
    return report
