"""The offline language-model and diffusion demos: prepare, protect, attack, report (``sophon-fast demo --task``).

    sophon-fast demo --task lm [--quick]          GPT-2 pre-trained on English prose, protected against Python
    sophon-fast demo --task diffusion [--quick]   a DDPM UNet pre-trained on Fashion-MNIST, protected against MNIST

Each run writes into ``out``: ``report.json`` (the one schema of :mod:`sophon_fast.apps.report`), ``report.md``,
``curves.png``. Resumable: pre-trained
models are cached, protection resumes from its checkpoint, a finished protection is reused when it was made
with the same settings. The pieces are in :mod:`sophon_fast.apps.lm_demo` and :mod:`sophon_fast.apps.diffusion_demo`.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

from sophon_fast import recipes
from sophon_fast.apps.pipeline import protect_stage
from sophon_fast.apps.report import step_targets, write_report
from sophon_fast.engine import Checkpointing


def _write(report: dict, out: str, say: Callable[[str], None]) -> None:
    paths = write_report(report, out)
    say(f"[demo] wrote {', '.join(p for p in paths.values() if p)}")


def run_lm_demo(out: str = "runs/demo-lm", quick: bool = False, seed: int = 0, progress: bool = True,
                iterations: Optional[int] = None, say: Callable[[str], None] = print) -> dict:
    """The language-model demo (see the module docstring); returns the report dict."""
    from sophon_fast.apps import lm_demo
    from sophon_fast.tasks.lm import LanguageModelTask
    os.makedirs(out, exist_ok=True)
    timing = {}
    t0 = time.perf_counter()
    p = lm_demo.prepare(quick, seed, cache_dir=os.path.join(out, "cache"), say=say)
    timing["prepare"] = time.perf_counter() - t0
    cfg = recipes.language_model(quick).replace(
        seed=seed, progress=progress, checkpoint=Checkpointing(os.path.join(out, "checkpoints"), every=5, resume=True),
        **({"iterations": iterations} if iterations is not None else {}))
    path = os.path.join(out, "protected")

    def load():
        from transformers import GPT2LMHeadModel
        return GPT2LMHeadModel.from_pretrained(path)
    protected, history, timing["protect"] = protect_stage(
        out, cfg, p.model, p.original_train, p.restricted_train, p.original_test, LanguageModelTask(),
        lambda m: m.save_pretrained(path), load, say)
    t0 = time.perf_counter()
    res = lm_demo.attack_all(protected, p, quick, seed, say=say)
    timing["attacks"] = time.perf_counter() - t0
    report = {"task": "lm", "domains": res["domains"], "metric": res["metric"],
              "higher_is_better": res["higher_is_better"],
              "original": {k: res["original"][k] for k in ("metric", "unprotected", "protected")},
              "attacks": res["attacks"], "timing": timing,
              "config": {"protect": cfg.to_dict(), "quick": quick, "seed": seed, "threads": torch.get_num_threads()},
              "protect_history": [{k: h.get(k) for k in ("iteration", "fts_loss", "ntr_loss", "original_metric")}
                                  for h in history]}
    report["targets"] = step_targets(report, 0.05)
    _write(report, out, say)
    return report


def run_diffusion_demo(out: str = "runs/demo-diffusion", quick: bool = False, seed: int = 0, progress: bool = True,
                       iterations: Optional[int] = None, say: Callable[[str], None] = print) -> dict:
    """The diffusion demo (see the module docstring); returns the report dict."""
    from sophon_fast.apps import diffusion_demo as dd
    from sophon_fast.io import load_model, save_model
    os.makedirs(out, exist_ok=True)
    timing = {}
    t0 = time.perf_counter()
    data = dd.prepare(quick, seed, cache_dir=os.path.join(out, "cache"), say=say)
    timing["prepare"] = time.perf_counter() - t0
    cfg = dd.demo_config(quick, seed, progress, os.path.join(out, "checkpoints"))
    if iterations is not None:
        cfg = cfg.replace(iterations=iterations)
    path = os.path.join(out, "protected.safetensors")
    protected, history, timing["protect"] = protect_stage(
        out, cfg, data.unprotected, data.original_train, data.restricted_train, data.original_test,
        None, lambda m: save_model(m, path), lambda: load_model(path), say)
    t0 = time.perf_counter()
    attacks = dd.attack_all(protected, data, quick, seed, out_dir=out, say=say)
    timing["attacks"] = time.perf_counter() - t0
    report = dd.build_report(data, protected, attacks, cfg.to_dict(), timing, quick, seed)
    _write(report, out, say)
    return report
