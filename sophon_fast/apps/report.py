"""The demos' one report: report.json (one schema for every task), report.md (one renderer), curves.png.

The report dict (what ``report.json`` holds)::

    {"task": "image" | "lm" | "diffusion", "domains": {"original": name, "restricted": name},
     "metric": the attacks' metric, "higher_is_better": bool (for the attacker on the restricted domain, and for
     the model's owner on the original one),
     "original": {"metric": its name, "unprotected": float, "protected": float, ...},
     "attacks": [{"name", "steps": [x of each evaluation], "protected": [...], "unprotected": [...] or None,
                  "scratch": [...], ...}, ...],
     "targets": [{"target", "met", "detail"}], "config": {...}, "timing": {...}}

Image reports are accuracies in [0, 1] with one evaluation per epoch (``steps`` = epochs, 0 before fine-tuning)
and per attack ``method``, ``optimizer``, ``lr``, ``batch_size``, ``epochs``, ``overhead``, ``never_reached``,
``head_start_removed``, and optionally ``adaptive`` (the adaptive suite's report); diffusion attacks add the t = 1
curves (``*_t1``) and ``samples`` (a sample grid's file name).
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional

from sophon_fast._atomic import atomic_path
from sophon_fast.attacks.adaptive import BODIES as _BODIES
from sophon_fast.attacks.adaptive import render_markdown as adaptive_markdown

REQUIRED = ("task", "domains", "metric", "higher_is_better", "original", "attacks", "config", "timing")
CURVE_KEYS = ("name", "steps", "protected", "unprotected", "scratch")
IMAGE_KEYS = ("method", "optimizer", "lr", "batch_size", "epochs", "overhead", "never_reached", "head_start_removed")


def validate(report: dict) -> None:
    """Raise ValueError when the report lacks a required field."""
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise ValueError(f"report is missing {missing}")
    need = CURVE_KEYS + (IMAGE_KEYS if report["task"] == "image" else ())
    for i, a in enumerate(report["attacks"]):
        lost = [k for k in need if k not in a]
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


def _value(report: dict, x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–" if x is None or report["task"] != "diffusion" else "diverged"
    return _pct(x) if report["task"] == "image" else f"{x:.4f}"


def _original_section(report: dict) -> List[str]:
    o = report["original"]
    lines = ["## Original domain", "", f"| model | {o['metric']} |", "| --- | --- |",
             f"| unprotected | {_value(report, o['unprotected'])} |", f"| protected | {_value(report, o['protected'])} |"]
    if report["task"] == "image":
        lines.append(f"| change | {100 * (o['protected'] - o['unprotected']):+.1f} points |")
    return lines + [""]


def _image_attacks(report: dict) -> List[str]:
    lines = ["Final restricted test accuracy after each attack (epoch 0 = before fine-tuning). Overhead = "
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
    return lines


def _step_attacks(report: dict) -> List[str]:
    """One table per attack: the metric at every evaluation (and at t = 1 where the report has it), sample grids."""
    lines = ["![curves](curves.png)", ""]
    for a in report["attacks"]:
        lines += [f"### {a['name']}", ""]
        if "train_steps" in a and "optimizer" in a:
            lines += [f"{a['optimizer']} lr {a['lr']:g}, batch {a['batch_size']}, {a['train_steps']} steps"
                      + (f", timesteps {a['timestep']}" if "timestep" in a else "") + ".", ""]
        keys = [k for k in ("protected", "unprotected", "scratch")]
        keys += [f"{k}_t1" for k in keys if f"{k}_t1" in a]
        lines += ["| step | " + " | ".join(k.replace("_t1", " (t=1)") for k in keys) + " |",
                  "| --- |" + " --- |" * len(keys)]
        cols = [a.get(k) or [None] * len(a["steps"]) for k in keys]
        for i, step in enumerate(a["steps"]):
            lines.append(f"| {step} | " + " | ".join(_value(report, c[i]) for c in cols) + " |")
        if a.get("samples"):
            lines += ["", "Samples after the attack:", "", f"![samples after {a['name']}]({a['samples']})"]
        lines.append("")
    return lines


def render_markdown(report: dict) -> str:
    """report.md for any task's report: the original domain, the attacks, the targets, the adaptive suite (image
    reports that ran it), timing and configuration."""
    d = report["domains"]
    better = "higher" if report["higher_is_better"] else "lower"
    lines = [f"# SOPHON {report['task']} report: {d['original']} (original) → {d['restricted']} (restricted)", "",
             f"Metric: {report['metric']} ({better} is better for the model's owner on the original domain, and for "
             f"the attacker on the restricted one).", ""]
    lines += _original_section(report)
    lines += ["## Fine-tuning attacks on the restricted domain", ""]
    lines += _image_attacks(report) if report["task"] == "image" else _step_attacks(report)
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


def step_targets(report: dict, tolerance: float) -> list:
    """The language-model and diffusion demos' targets: the original metric within ``tolerance`` (relative) of the
    unprotected model's; the protected model at least as bad as scratch at every evaluation of every attack (an
    evaluation where either diverged, None, is skipped)."""
    o, sign = report["original"], (1 if report["higher_is_better"] else -1)
    out = [{"target": f"{o['metric']} within {tolerance:.0%} of unprotected",
            "met": sign * (o["protected"] - o["unprotected"]) >= -tolerance * abs(o["unprotected"]),
            "detail": f"{o['protected']:.4f} vs {o['unprotected']:.4f} ({o['protected'] / o['unprotected'] - 1:+.1%})"}]
    for a in report["attacks"]:
        gaps = [sign * (s - p) for p, s in zip(a["protected"], a["scratch"]) if p is not None and s is not None]
        out.append({"target": f"{a['name']}: protected at least as bad as scratch at every evaluation",
                    "met": bool(gaps) and min(gaps) >= 0,
                    "detail": f"smallest margin {min(gaps):+.4f}" if gaps else "no evaluation"})
    return out


def plot_curves(report: dict, path: str) -> Optional[str]:
    """One panel per attack, three lines each (protected, unprotected, scratch) against the attack's ``steps``; PNG.
    Image reports: accuracy (%) vs epoch; the others: their metric vs optimiser step."""
    image = report["task"] == "image"
    panels = [(a["name"], a["steps"], {k: a.get(k) for k in _BODIES}) for a in report["attacks"]]
    d = report["domains"]
    return _plot_panels(panels, path, f"Fine-tuning on {d['restricted']}: SOPHON-protected vs unprotected vs scratch",
                        "epoch" if image else "attack step",
                        "restricted test acc (%)" if image else f"restricted {report['metric']}", percent=image)


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
    _atomic_write(paths["json"], json.dumps(report, indent=1, allow_nan=False).encode())
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
