"""Backend probes and selection.

A backend is a module-like object whose functions implement the reference in ``sophon_fast.reference``
exactly; an op a backend lacks is simply absent (the selector skips it and says why):

    row_losses_fwd(logits, target, weights, scale, ignore_index) -> (loss (N,), stats (N, 3))
    row_losses_bwd(grad_loss, logits, target, stats, weights, scale, ignore_index) -> grad_logits
    inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad)
    linear_loss(hidden, weight, target, bias, weights, ignore_index, reduction, chunk_size, compute_grad)
        -> (loss, grad_hidden, grad_weight, grad_bias)

Selection order is data (``PRIORITY``), per device type. ``SOPHON_FAST_BACKEND`` (or
``set_backend`` / ``use_backend``) forces one; forcing a backend that cannot serve the tensors raises an
error naming every backend and why it was rejected. An automatic fallback past a preferred backend
logs once. The choice is made once per (op, device type, dtype) and cached; the cache is dropped when
the forced backend (``set_backend``, ``use_backend`` or the environment variable) changes.
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


def _probe_cpp() -> Probe:
    try:
        from sophon_fast import _C  # noqa: F401
    except ImportError as e:
        why = f"extension sophon_fast._C not built ({e}); run `pip install --no-build-isolation -e .`"
        return Probe("cpp", False, {"cpu": False, "cuda": False}, {"cpu": why, "cuda": why}, None)
    from sophon_fast.ops import _cext
    return Probe("cpp", True, {"cpu": True, "cuda": False},
                 {"cpu": "", "cuda": "the C++ backend serves CPU tensors (the CUDA one serves GPU tensors)"},
                 _cext.CPU)


def _probe_cuda() -> Probe:
    import torch
    try:
        from sophon_fast import _C
    except ImportError as e:
        why = f"extension sophon_fast._C not built ({e})"
        return Probe("cuda", False, {"cpu": False, "cuda": False}, {"cpu": why, "cuda": why}, None)
    built = bool(_C.has_cuda())
    from sophon_fast.ops import _cext
    cuda_why = ""
    if not built:
        cuda_why = "extension built without CUDA sources (torch has no CUDA or no nvcc at build time)"
    elif not torch.cuda.is_available():
        cuda_why = "no CUDA device available"
    return Probe("cuda", built, {"cpu": False, "cuda": not cuda_why},
                 {"cpu": "the CUDA backend serves GPU tensors only", "cuda": cuda_why}, _cext.CUDA)


def _probe_triton() -> Probe:
    import torch
    try:
        import triton  # noqa: F401
        impl = importlib.import_module("sophon_fast.kernels")
    except Exception as e:  # ImportError, or a triton that fails on this platform
        why = f"triton unusable ({type(e).__name__}: {e})"
        return Probe("triton", False, {"cpu": False, "cuda": False}, {"cpu": why, "cuda": why}, None)
    interp = _triton_interpret()
    cpu_why = "" if interp else "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    cuda_why = "" if torch.cuda.is_available() else "no CUDA device available"
    return Probe("triton", True, {"cpu": interp, "cuda": not cuda_why}, {"cpu": cpu_why, "cuda": cuda_why}, impl)


_PROBERS: Dict[str, Callable[[], Probe]] = {
    "reference": _probe_reference, "cpp": _probe_cpp, "cuda": _probe_cuda, "triton": _probe_triton,
}
_cache: Dict[str, Probe] = {}
_forced: Optional[str] = None
_warned: set = set()


def probe(name: str) -> Probe:
    if name not in _cache:
        _cache[name] = _PROBERS[name]()
    return _cache[name]


def forced_backend() -> Optional[str]:
    name = _forced or os.environ.get("SOPHON_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name == "auto":
        return None
    if name not in NAMES:
        raise BackendError(f"SOPHON_FAST_BACKEND={name!r} is not one of {NAMES + ('auto',)}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for this process (None or "auto" restores automatic selection)."""
    global _forced
    _forced = None if name in (None, "auto") else name
    forced_backend()  # validate


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Context manager form of ``set_backend``."""
    global _forced
    old = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = old


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


_chosen: Dict[Tuple[str, str, object], Tuple[str, Callable]] = {}
_chosen_under: Tuple[Optional[str], Optional[str]] = (None, None)


def select(op: str, device_type: str, dtype=None) -> Callable:
    """The function implementing ``op`` for tensors on ``device_type`` ("cpu", "cuda") of ``dtype``,
    chosen once and cached until the forced backend changes."""
    global _chosen_under
    under = (_forced, os.environ.get("SOPHON_FAST_BACKEND"))
    if under != _chosen_under:
        _chosen.clear()
        _chosen_under = under
    key = (op, device_type, dtype)
    hit = _chosen.get(key)
    if hit is None:
        name = _choose(op, device_type)
        hit = _chosen[key] = (name, getattr(probe(name).impl, op))
    return hit[1]


def selected_name(device_type: str, op: str = "row_losses_fwd", dtype=None) -> str:
    """Name of the backend ``select`` picks for ``op`` on ``device_type``."""
    select(op, device_type, dtype)
    return _chosen[(op, device_type, dtype)][0]


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
