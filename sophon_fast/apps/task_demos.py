"""The offline language-model and diffusion demos: prepare, protect, attack, report (``sophon-fast demo --task``).

    sophon-fast demo --task lm [--quick]          GPT-2 pre-trained on English prose, protected against Python
    sophon-fast demo --task diffusion [--quick]   a DDPM UNet pre-trained on Fashion-MNIST, protected against MNIST

Each run writes into ``out``: ``report.json`` (``domains``, ``metric``, ``higher_is_better``, ``original``
with ``unprotected``/``protected``, ``attacks`` with per-evaluation lists ``protected``/``unprotected``/
``scratch``, ``targets``, ``config``, ``timing``), ``report.md``, ``curves.png``. Resumable: pre-trained
models are cached, protection resumes from its checkpoint, a finished protection is reused when it was made
with the same settings. The pieces are in :mod:`sophon_fast.apps.lm_demo` and :mod:`sophon_fast.apps.diffusion_demo`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import torch

from sophon_fast import recipes
from sophon_fast._atomic import atomic_path
from sophon_fast.apps.report import plot_curves
from sophon_fast.engine import Checkpointing, ProtectConfig, protect


def _protected(out: str, cfg: ProtectConfig, model, original, restricted, original_test, task, save, load,
               say: Callable[[str], None]):
    """The protected model: reused from ``out/protected*`` when made with ``cfg``, else protected (resuming
    its checkpoint); returns (model, history, seconds)."""
    record = os.path.join(out, "protected.config.json")
    if os.path.exists(record):
        with open(record) as f:
            if json.load(f) == json.loads(json.dumps(cfg.to_dict())):
                say(f"[demo] reusing the protected model in {out}")
                return load(), [], 0.0
    _drop_stale_checkpoint(cfg, say)
    say(f"[demo] protecting ({cfg.task}, loss {cfg.loss}, mode {cfg.mode}): {cfg.iterations} iterations, "
        f"K={cfg.inner_steps}")
    t0 = time.perf_counter()
    res = protect(model, original, restricted, cfg, task=task, original_test=original_test)
    if res.stop_reason:
        say(f"[demo] protection stopped early: {res.stop_reason}")
    save(res.model)
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps(cfg.to_dict()))
    return res.model, res.history, time.perf_counter() - t0


def _drop_stale_checkpoint(cfg: ProtectConfig, say: Callable[[str], None]) -> None:
    """Remove the run's checkpoint when it was written with other settings (an earlier recipe): resuming it
    would raise. A checkpoint of the same settings (a longer run included) is kept and resumed."""
    from sophon_fast.engine.state import config_changes, load_checkpoint
    path = os.path.join(cfg.checkpoint.dir, "protect.pt") if cfg.checkpoint.dir else None
    if path and os.path.exists(path):
        changed = config_changes(load_checkpoint(path).get("config", {}), cfg)
        if changed:
            say(f"[demo] discarding {path}: written with other settings ({', '.join(changed)})")
            os.remove(path)


def _original_label(report: dict) -> str:
    """The original-domain metric's name: the report's own (``original.metric``), else the attack metric's."""
    return report["original"].get("metric") or f"original-domain {report['metric']}"


def _targets(report: dict, tolerance: float) -> list:
    """Original metric within ``tolerance`` (relative) of unprotected; protected >= scratch at every evaluation."""
    o, sign = report["original"], (1 if report["higher_is_better"] else -1)
    out = [{"target": f"{_original_label(report)} within {tolerance:.0%} of unprotected",
            "met": sign * (o["protected"] - o["unprotected"]) >= -tolerance * abs(o["unprotected"]),
            "detail": f"{o['protected']:.4f} vs {o['unprotected']:.4f}"}]
    for a in report["attacks"]:
        gaps = [sign * (s - p) for p, s in zip(a["protected"], a["scratch"]) if p is not None and s is not None]
        out.append({"target": f"{a['name']}: protected at least as bad as scratch at every evaluation",
                    "met": bool(gaps) and min(gaps) >= 0,
                    "detail": f"smallest margin {min(gaps):+.4f}" if gaps else "no evaluation"})
    return out


def render_markdown(report: dict) -> str:
    d, o = report["domains"], report["original"]
    better = "higher" if report["higher_is_better"] else "lower"
    lines = [f"# SOPHON {report['task']} demo: {d['original']} (original) -> {d['restricted']} (restricted)", "",
             f"Metric: {report['metric']} ({better} is better for the model's owner on the original domain, and "
             f"for the attacker on the restricted one).", "", "| | unprotected | protected |", "| --- | --- | --- |",
             f"| {_original_label(report)} | {o['unprotected']:.4f} | {o['protected']:.4f} |", "",
             "## Attacks (restricted domain)", "", "![curves](curves.png)", ""]
    for a in report["attacks"]:
        lines += [f"### {a['name']}", "", "| step | protected | unprotected | scratch |", "| --- | --- | --- | --- |"]
        unp = a.get("unprotected") or [None] * len(a["steps"])
        for i, step in enumerate(a["steps"]):
            cells = [a["protected"][i], unp[i], a["scratch"][i]]
            lines.append(f"| {step} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in cells) + " |")
        lines.append("")
    lines += ["## Targets", "", "| target | met | detail |", "| --- | --- | --- |"]
    lines += [f"| {t['target']} | {'yes' if t['met'] else '**no**'} | {t['detail']} |" for t in report["targets"]]
    lines += ["", "## Timing (seconds)", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timing"].items()]
    return "\n".join(lines) + "\n"


def _write(report: dict, out: str, say: Callable[[str], None]) -> None:
    with atomic_path(os.path.join(out, "report.json")) as tmp:
        tmp.write_text(json.dumps(report, indent=1, allow_nan=False))
    plot_curves(report, os.path.join(out, "curves.png"))
    if report["task"] != "diffusion":   # the diffusion report keeps its own report.md (with sample grids)
        with atomic_path(os.path.join(out, "report.md")) as tmp:
            tmp.write_text(render_markdown(report))
    say(f"[demo] wrote {out}/report.json, report.md, curves.png")


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
    protected, history, timing["protect"] = _protected(
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
    report["targets"] = _targets(report, 0.05)
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
    protected, history, timing["protect"] = _protected(
        out, cfg, data.unprotected, data.original_train, data.restricted_train, data.original_test,
        None, lambda m: save_model(m, path), lambda: load_model(path), say)
    t0 = time.perf_counter()
    attacks = dd.attack_all(protected, data, quick, seed, out_dir=out, say=say)
    timing["attacks"] = time.perf_counter() - t0
    report = dd.build_report(data, protected, attacks, cfg.to_dict(), timing, quick, seed)
    report["task"] = "diffusion"
    dd.write_report(report, out)
    _write(report, out, say)
    return report
