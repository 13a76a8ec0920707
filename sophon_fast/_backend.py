"""Backend probes and selection.

A backend is a module-like object whose functions implement the reference in ``sophon_fast.reference``
exactly; an op a backend lacks is simply absent (the selector skips it and says why):

    row_losses_fwd(logits, target, weights, scale, ignore_index) -> (loss (N,), stats (N, 3))
    row_losses_bwd(grad_loss, logits, target, stats, weights, scale, ignore_index) -> grad_logits
    inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad)
    row_sq_mean(x, y) -> (B,)
    linear_loss(hidden, weight, target, bias, weights, ignore_index, reduction, chunk_size, compute_grad)
        -> (loss, grad_hidden, grad_weight, grad_bias)   optional: without it, sophon_fast/ops/linear_loss.py
        runs its chunk loop over the backend's row-loss kernels

A backend may also offer ``fused_loss`` (the lean eager path of the logits losses: one dispatcher op with its
autograd in C++, sophon_fast/ops/_cext.py); the public losses use it when the backend chosen for
``row_losses_fwd`` has it, and the custom ops otherwise.

Selection order is data (``PRIORITY``), per device type. ``SOPHON_FAST_BACKEND`` (read once, at import, or
again by ``reload_environment``) or ``set_backend`` / ``use_backend`` force one; forcing a backend that cannot
serve the tensors raises an error naming every backend and why it was rejected. An automatic fallback past a
preferred backend logs once. The choice is made once per (op, device type, dtype) and cached; the cache is
dropped when the forced backend changes. Nothing here reads the environment per call.

Layering: this module knows the reference (sophon_fast.reference) and the Triton kernels (sophon_fast.kernels),
which sit below it; the compiled extension's backends ("cpp", "cuda") are registered by sophon_fast/ops/_cext.py
with ``register_prober``, so nothing here imports sophon_fast.ops.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

log = logging.getLogger("sophon_fast")

NAMES = ("cuda", "triton", "cpp", "reference")
PRIORITY = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "triton", "reference"),
}


class BackendError(RuntimeError):
    pass


@dataclass
class Probe:
    name: str
    built: bool
    usable: Dict[str, bool]   # device type -> usable
    reason: Dict[str, str]    # device type -> why not (empty when usable)
    impl: Optional[object]


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_reference() -> Probe:
    from sophon_fast.reference import ops_impl
    return Probe("reference", True, {"cpu": True, "cuda": True}, {"cpu": "", "cuda": ""}, ops_impl)


def unusable(name: str, why: str) -> Probe:
    """A backend that cannot serve any device, for ``why``."""
    return Probe(name, False, {"cpu": False, "cuda": False}, {"cpu": why, "cuda": why}, None)


def _probe_triton() -> Probe:
    import torch
    try:
        import triton  # noqa: F401
        impl = importlib.import_module("sophon_fast.kernels")
    except Exception as e:  # ImportError, or a triton that fails on this platform
        why = f"triton unusable ({type(e).__name__}: {e})"
        return unusable("triton", why)
    interp = _triton_interpret()
    cpu_why = "" if interp else "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    cuda_why = "" if torch.cuda.is_available() else "no CUDA device available"
    return Probe("triton", True, {"cpu": interp, "cuda": not cuda_why}, {"cpu": cpu_why, "cuda": cuda_why}, impl)


_PROBERS: Dict[str, Callable[[], Probe]] = {"reference": _probe_reference, "triton": _probe_triton}
_cache: Dict[str, Probe] = {}
_forced: Optional[str] = None
_warned: set = set()
_chosen: Dict[Tuple[str, str, object], Tuple[str, object]] = {}   # (op, device type, dtype) -> (name, impl)


def register_prober(name: str, prober: Callable[[], Probe]) -> None:
    """Make backend ``name`` (one of NAMES) known: ``prober()`` says once whether it is built and usable."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; NAMES = {NAMES}")
    _PROBERS[name] = prober
    _cache.pop(name, None)
    _chosen.clear()


def probe(name: str) -> Probe:
    if name not in _cache:
        prober = _PROBERS.get(name)
        if prober is None:   # not cached: the registering module may be imported later
            return unusable(name, "not registered (importing sophon_fast.ops registers the compiled backends)")
        _cache[name] = prober()
    return _cache[name]


def _parse(name: Optional[str], source: str) -> Optional[str]:
    name = (name or "auto").strip().lower() or "auto"
    if name == "auto":
        return None
    if name not in NAMES:
        raise BackendError(f"{source}={name!r} is not one of {NAMES + ('auto',)}")
    return name


_env_value: Optional[str] = None   # SOPHON_FAST_BACKEND as read at import (validated when first used)


def reload_environment() -> None:
    """Read SOPHON_FAST_BACKEND again (it is read once, at import) and drop the cached choices."""
    global _env_value
    _env_value = os.environ.get("SOPHON_FAST_BACKEND")
    _chosen.clear()


reload_environment()


def forced_backend() -> Optional[str]:
    return _forced or _parse(_env_value, "SOPHON_FAST_BACKEND")


def set_backend(name: Optional[str]) -> None:
    """Force a backend for this process (None or "auto" restores automatic selection)."""
    global _forced
    new = _parse(name, "set_backend")
    if new != _forced:
        _chosen.clear()
    _forced = new


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Context manager form of ``set_backend``."""
    old = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _reason(name: str, op: str, device_type: str) -> str:
    """Why backend ``name`` cannot serve ``op`` on ``device_type`` ("" when it can)."""
    p = probe(name)
    if not p.usable.get(device_type):
        return p.reason.get(device_type, "unsupported device")
    if getattr(p.impl, op, None) is None:
        return f"does not implement {op}"
    return ""


def _rejections(op: str, device_type: str) -> str:
    lines = []
    for n in NAMES:
        why = _reason(n, op, device_type)
        lines.append(f"  {n}: {'usable' if not why else f'rejected: {why}'}")
    return "\n".join(lines)


def _choose(op: str, device_type: str) -> str:
    order = PRIORITY.get(device_type, ("reference",))
    forced = forced_backend()
    if forced is not None:
        if _reason(forced, op, device_type):
            raise BackendError(f"backend {forced!r} was forced but cannot serve {op} on {device_type} tensors.\n"
                               f"Backends for {device_type}:\n{_rejections(op, device_type)}")
        return forced
    for i, n in enumerate(order):
        if not _reason(n, op, device_type):
            if i > 0 and (device_type, op, n) not in _warned:
                _warned.add((device_type, op, n))
                log.info("sophon_fast: %s on %s tensors uses the %s backend; skipped:\n%s", op, device_type, n,
                         "\n".join(f"  {m}: {_reason(m, op, device_type)}" for m in order[:i]))
            return n
    raise BackendError(f"no backend serves {op} on {device_type} tensors:\n{_rejections(op, device_type)}")


def select_backend(op: str, device_type: str, dtype=None) -> Tuple[str, object]:
    """(name, implementation module) of the backend serving ``op`` for tensors on ``device_type`` ("cpu",
    "cuda") of ``dtype``, chosen once and cached until the forced backend changes."""
    key = (op, device_type, dtype)
    hit = _chosen.get(key)
    if hit is None:
        name = _choose(op, device_type)
        hit = _chosen[key] = (name, probe(name).impl)
    return hit


def select(op: str, device_type: str, dtype=None) -> Callable:
    """The function implementing ``op`` for tensors on ``device_type`` of ``dtype`` (see ``select_backend``)."""
    return getattr(select_backend(op, device_type, dtype)[1], op)


def selected_name(device_type: str, op: str = "row_losses_fwd", dtype=None) -> str:
    """Name of the backend ``select`` picks for ``op`` on ``device_type``."""
    return select_backend(op, device_type, dtype)[0]


def backend_report(print_report: bool = True) -> dict:
    """Which backends were built and are usable per device, with the reason for each that is not."""
    report = {}
    for n in NAMES:
        p = probe(n)
        report[n] = {"built": p.built,
                     **{f"usable_{d}": p.usable.get(d, False) for d in ("cpu", "cuda")},
                     **{f"why_not_{d}": p.reason.get(d, "") for d in ("cpu", "cuda") if not p.usable.get(d)}}
    for d in ("cpu", "cuda"):
        try:
            report[f"selected_{d}"] = selected_name(d)
        except BackendError as e:
            report[f"selected_{d}"] = None
            report[f"selected_{d}_error"] = str(e).splitlines()[0]
    if print_report:
        print("sophon_fast backends")
        for n in NAMES:
            r = report[n]
            print(f"  {n:<10} built={'yes' if r['built'] else 'no ':<3}  cpu={'yes' if r['usable_cpu'] else 'no':<3}"
                  f"  cuda={'yes' if r['usable_cuda'] else 'no'}")
            for d in ("cpu", "cuda"):
                if not r[f"usable_{d}"]:
                    print(f"      {d}: {r[f'why_not_{d}']}")
        print(f"  selected: cpu -> {report['selected_cpu']}, cuda -> {report['selected_cuda']}")
    return report
