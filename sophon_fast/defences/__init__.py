"""Optional defence components that ``protect`` adds to the fine-tuning suppression objective.

A defence is configured by a small dataclass with a ``kind`` name and ``build() -> component``; the
component has two methods the loop calls:

    attach(model, task)                                  once, before the first iteration
    loss(model, restricted_batch, original_batch, gen)   a scalar added to the FTS objective at theta
                                                         (its gradient joins the meta-gradient)

``original_batch`` is None unless the component sets ``needs_original = True``. Configs are recorded in
checkpoints through ``defence_to_dict`` / ``defence_from_dict`` (the ``kind`` key names the class).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Type

from sophon_fast.defences.trap import TrapConfig

REGISTRY: Dict[str, Type] = {"trap": TrapConfig}


def defence_to_dict(cfg) -> dict:
    if not dataclasses.is_dataclass(cfg) or getattr(cfg, "kind", None) not in REGISTRY:
        raise ValueError(f"defences: {cfg!r} is not a registered defence config (known: {sorted(REGISTRY)})")
    return {"kind": cfg.kind, **dataclasses.asdict(cfg)}


def defence_from_dict(d: dict):
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in REGISTRY:
        raise ValueError(f"defences: unknown kind {kind!r} (known: {sorted(REGISTRY)})")
    return REGISTRY[kind](**d)


__all__ = ["REGISTRY", "TrapConfig", "defence_from_dict", "defence_to_dict"]
