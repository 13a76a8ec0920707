"""Reports of a protection + attack evaluation: report.json, report.md (tables), curves.png.

The report dict (what ``report.json`` holds) has at least::

    {"domains": {"original": name, "restricted": name},
     "original_domain": {"unprotected_acc": float, "protected_acc": float},
     "attacks": [{"name", "method", "optimizer", "lr", "batch_size", "epochs", "protected": [...],
                  "unprotected": [...], "scratch": [...], "overhead", "never_reached",
                  "head_start_removed"}, ...],
     "config": {...}, "timing": {...}}

Accuracies are fractions in [0, 1]; curves have one entry per epoch, index 0 before fine-tuning.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from sophon_fast._atomic import atomic_path
from sophon_fast.attacks.adaptive import BODIES as _BODIES
from sophon_fast.attacks.adaptive import render_markdown as adaptive_markdown

REQUIRED = ("domains", "original_domain", "attacks", "config", "timing")
ATTACK_KEYS = ("name", "method", "optimizer", "lr", "batch_size", "epochs", "protected", "unprotected",
               "scratch", "overhead", "never_reached", "head_start_removed")


def validate(report: dict) -> None:
    """Raise ValueError when the report lacks a required field."""
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise ValueError(f"report is missing {missing}")
    for i, a in enumerate(report["attacks"]):
        lost = [k for k in ATTACK_KEYS if k not in a]
        if lost:
            raise ValueError(f"report attack {i} is missing {lost}")


def _atomic_write(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _pct(x: Optional[float]) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _met(met: Optional[bool]) -> str:
    return "n/a" if met is None else "yes" if met else "**no**"


def _num(x: Optional[float], nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def render_markdown(report: dict) -> str:
    d, o = report["domains"], report["original_domain"]
    lines = [f"# SOPHON protection report: {d['original']} (original) → {d['restricted']} (restricted)", ""]
    lines += ["## Original domain", "", "| model | test accuracy |", "| --- | --- |",
              f"| unprotected | {_pct(o['unprotected_acc'])} |", f"| protected | {_pct(o['protected_acc'])} |",
              f"| change | {100 * (o['protected_acc'] - o['unprotected_acc']):+.1f} points |", ""]
    lines += ["## Fine-tuning attacks on the restricted domain", "",
              "Final restricted test accuracy after each attack (epoch 0 = before fine-tuning). Overhead = "
              "epochs the protected model needs to reach 90% of scratch's final accuracy / epochs scratch "
              "needs (∞: never within the budget; ≥ 1 means fine-tuning it is no faster than training from "
              "scratch). Head start removed = (unprotected − protected) / (unprotected − scratch) at the last "
              "epoch (– where the unprotected model has < 10 points of head start).", "",
              "| attack | method | optimizer | lr | batch | epochs | protected | unprotected | scratch "
              "| overhead | head start removed |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in report["attacks"]:
        ov = "∞" if a["never_reached"] else _num(a["overhead"])
        unp = a["unprotected"][-1] if a["unprotected"] else None
        lines.append(f"| {a['name']} | {a['method']} | {a['optimizer']} | {a['lr']:g} | {a['batch_size']} | "
                     f"{a['epochs']} | {_pct(a['protected'][-1])} | {_pct(unp)} | {_pct(a['scratch'][-1])} | "
                     f"{ov} | {_num(a['head_start_removed'])} |")
    checks = report.get("targets")
    if checks:
        lines += ["", "## Targets", "", "| target | met | detail |", "| --- | --- | --- |"]
        lines += [f"| {c['target']} | {_met(c['met'])} | {c['detail']} |" for c in checks]
    if report.get("adaptive"):
        lines += ["", "## Attacks that know the model was protected (the adaptive suite)", "",
                  "Re-initialise the classifier block and train everything, or fine-tune on benign original-domain "
                  "data first; probes on each block's frozen features (`sophon_fast.attacks.adaptive`). "
                  "adaptive.png shows every curve.", "", adaptive_markdown(report["adaptive"])]
    t = report["timing"]
    lines += ["", "## Timing (seconds)", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t.items() if isinstance(v, (int, float))]
    lines += ["", "## Configuration", "", "```json", json.dumps(report["config"], indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)


def plot_curves(report: dict, path: str) -> Optional[str]:
    """One panel per attack, three lines each (protected, unprotected, scratch); PNG. Image reports: accuracy
    vs epoch; reports with a ``metric`` (the LM and diffusion demos): that metric vs the attack's ``steps``."""
    metric = report.get("metric")
    panels = [(a["name"], a["steps"] if metric else list(range(len(a["protected"]))),
               {k: a.get(k) for k in _BODIES}) for a in report["attacks"]]
    d = report["domains"]
    return _plot_panels(panels, path, f"Fine-tuning on {d['restricted']}: SOPHON-protected vs unprotected vs scratch",
                        "attack step" if metric else "epoch",
                        f"restricted {metric}" if metric else "restricted test acc (%)", percent=not metric)


def plot_adaptive(report: dict, path: str) -> Optional[str]:
    """The adaptive suite's fine-tuning attacks (``report["adaptive"]``): one panel per (attack, rate, seed),
    restricted test accuracy vs optimiser step for the three models (and thin grey lines for the null bodies,
    random initialisations attacked as if protected); PNG."""
    rows = report["adaptive"]["finetune"]
    panels = [(f"{r['attack']} lr {r['lr']:g}" + (f" s{r['seed']}" if r.get("seed") else ""), r["steps"],
               {**{k: v for k, v in r["curves"].items() if k not in _BODIES},     # null bodies, drawn first
                **{k: r["curves"].get(k) for k in _BODIES}}) for r in rows]
    d = report["domains"]
    return _plot_panels(panels, path, f"Attacks that know the model was protected, on {d['restricted']}",
                        "optimiser step", "restricted test acc (%)", percent=True)


def _plot_panels(panels: list, path: str, title: str, xlabel: str, ylabel: str, percent: bool) -> Optional[str]:
    """``panels``: (title, xs, {body: ys}); None ys values are skipped; atomically written PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(panels)
    cols = min(4, max(n, 1))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    styles = dict(zip(_BODIES, (("tab:red", "-"), ("tab:blue", "--"), ("tab:gray", ":"))))
    for ax, (name, xs, curves) in zip(axes.flat, panels):
        labelled = False
        for key, ys in curves.items():
            if ys:
                pts = [(x, (100 * y if percent else y)) for x, y in zip(xs, ys) if y is not None]
                if key in styles:
                    (color, ls), lw, label = styles[key], 2, key
                else:       # another body (the adaptive suite's random initialisations attacked as if protected)
                    color, ls, lw, label = "silver", "-", 1, None if labelled else "random init, as protected"
                    labelled = True
                ax.plot([x for x, _ in pts], [y for _, y in pts], ls, color=color, label=label, lw=lw)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel, **({} if percent else {"fontsize": 8}))
        if percent:
            ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str) -> dict:
    """Write report.json, report.md and curves.png (and adaptive.png for a report with the adaptive suite)
    into ``out_dir``; returns their paths."""
    validate(report)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md"),
             "png": os.path.join(out_dir, "curves.png")}
    _atomic_write(paths["json"], json.dumps(report, indent=1).encode())
    _atomic_write(paths["md"], render_markdown(report).encode())
    paths["png"] = plot_curves(report, paths["png"])
    if report.get("adaptive", {}).get("finetune"):
        paths["adaptive_png"] = plot_adaptive(report, os.path.join(out_dir, "adaptive.png"))
    return paths


def load_report(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "report.json")
    with open(path) as f:
        report = json.load(f)
    validate(report)
    return report
