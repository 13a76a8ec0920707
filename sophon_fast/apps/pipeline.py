"""The demos' shared stages: a protection stage cached on its settings, and cached JSON results.

Every demo is the same staged pipeline: prepare (data and a pre-trained model, cached by the demo), protect
(:func:`protect_stage`), attack (the demo's attacks, each result cached), report (:mod:`sophon_fast.apps.report`).
A stage's output is reused on a rerun when it was made with the same settings, and made again otherwise.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

from sophon_fast._atomic import atomic_path
from sophon_fast.engine import ProtectConfig, protect
from sophon_fast.engine.state import config_changes, load_checkpoint

RECORD = "protected.config.json"


def write_json(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj))


def _drop_stale_checkpoint(cfg: ProtectConfig, say: Callable[[str], None]) -> None:
    """Remove the run's checkpoint when it was written with other settings (resuming it would raise). A checkpoint
    of the same settings (a longer run included) is kept and resumed."""
    path = os.path.join(cfg.checkpoint.dir, "protect.pt") if cfg.checkpoint.dir else None
    if path and os.path.exists(path):
        changed = config_changes(load_checkpoint(path).get("config", {}), cfg)
        if changed:
            say(f"[demo] discarding {path}: written with other settings ({', '.join(changed)})")
            os.remove(path)


def protect_stage(out: str, cfg: ProtectConfig, model, original, restricted, original_test, task,
                  save: Callable, load: Callable, say: Callable[[str], None], derived: Sequence[str] = ()):
    """The protected model: reused from ``out`` when ``out/protected.config.json`` records ``cfg``'s settings (the
    run settings, progress and checkpointing, aside); otherwise protected (resuming its checkpoint when only the
    iteration count changed), saved with ``save(model)`` and recorded, and the ``derived`` files (results computed
    from an older protected model) removed. Returns ``(model, history, seconds)``."""
    record = os.path.join(out, RECORD)
    if os.path.exists(record):
        with open(record) as f:
            saved = json.load(f)
        changed = config_changes(saved, cfg)
        stale = changed + (["iterations"] if saved.get("iterations") != cfg.iterations else [])
        if not stale:
            say(f"[demo] reusing the protected model in {out}")
            return load(), [], 0.0
        say(f"[demo] the protected model in {out} was made with other settings ({', '.join(stale)}): protecting "
            "again" + ("" if changed else " (resuming its checkpoint)"))
        for p in derived:
            if os.path.exists(p):
                os.remove(p)
    _drop_stale_checkpoint(cfg, say)
    say(f"[demo] protecting ({cfg.task}, loss {cfg.loss}, mode {cfg.mode}): {cfg.iterations} iterations, "
        f"K={cfg.inner_steps}")
    t0 = time.perf_counter()
    res = protect(model, original, restricted, cfg, task=task, original_test=original_test)
    if res.stop_reason:
        say(f"[demo] protection stopped early: {res.stop_reason}")
    save(res.model)
    write_json(record, cfg.to_dict())
    return res.model, res.history, time.perf_counter() - t0
