"""``audit``: an Optuna attack search on the protected model and its baselines, and the verdict.

One study per model, all in one SQLite file (``<out>/audit.db``): ``protected``, ``unprotected``, ``scratch``
(the architecture freshly initialised with ``seed``), ``null<s>`` (random initialisations, seeds ``seed + 100``
on, attacked as if each were the protected model: the distribution a body that knows nothing gives the same
search) and ``ref_<name>`` for each reference model. Every study gets the same trials budget, the same space, the
same attack seed (so the same parameters see the same batches on every model) and the same fixed first trials.

Determinism and resuming: trial k (counting finished trials) is proposed by a TPE sampler seeded with
``seed * 100003 + k`` from the finished trials before it, and a trial's value is a deterministic function of its
parameters (CPU runs are bit-reproducible). So a rerun continues a stored study where it stopped, and an audit
interrupted at any point and rerun ends with the same trials as one that was never interrupted: a trial that was
running (or queued) when the process died is marked failed and proposed again. A stored study made with another
space, budget, seed or model is an error (before any trial), not silently continued.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from sophon_fast.audit.spaces import DiffusionSpace, ImageSpace, LMSpace

BUDGETS = {"quick": {"trials": 12, "null_bodies": 2, "steps": 60},
           "full": {"trials": 60, "null_bodies": 5, "steps": 60}}
TASKS = ("image", "lm", "diffusion")
STARTUP_TRIALS = 8   # random (seeded) proposals before TPE models the finished trials
NULL_OFFSET = 100


def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameter and buffer values (names, shapes and float64 sums)."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in list(model.state_dict().items()):
            if torch.is_tensor(t):
                d = t.detach().double() if t.is_floating_point() else t.detach().to(torch.float64)
                h.update(f"{name}{tuple(t.shape)}{float(d.sum()):.10e}{float(d.abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def make_space(task: str, train, test, original=None, steps: int = 60, **options):
    """The search space of ``task`` ("image", "lm", "diffusion") with ``options`` (its dataclass fields)."""
    if task == "image":
        return ImageSpace(train, test, original, steps, **options)
    if task == "lm":
        return LMSpace(train, test, steps, **options)
    if task == "diffusion":
        return DiffusionSpace(train, test, steps, **options)
    raise ValueError(f"unknown audit task {task!r}; one of {TASKS}")


def _optuna():
    try:
        import optuna
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise ImportError("sophon_fast.audit needs optuna: pip install 'sophon_fast[audit]' (or pip install "
                          "optuna)") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def audit(protected: nn.Module, train, test, *, unprotected: Optional[nn.Module] = None,
          references: Optional[Dict[str, nn.Module]] = None, original=None, task: str = "image",
          budget: str = "quick", trials: Optional[int] = None, null_bodies: Optional[int] = None,
          steps: Optional[int] = None, out: str = "runs/audit", seed: int = 0,
          fixed: Sequence[dict] = (), space_options: Optional[dict] = None, progress: bool = True,
          say: Optional[Callable[[str], None]] = None, write: bool = True) -> dict:
    """Search for the strongest fine-tuning attack on ``protected`` and on its baselines; write the report.

    ``train``/``test``: restricted-domain data (image: (X, Y) / Dataset / DataLoader; lm: (input_ids, labels[,
    mask]) tensors; diffusion: images); ``original``: original-domain training data (image task: enables the
    benign-first steps). ``budget`` "quick" or "full" (:data:`BUDGETS`) sets ``trials`` per model, ``null_bodies``
    and the step budget per trial ``steps``; each may be given to override it. ``fixed``: trial parameters run
    first in every study (e.g. ``space.fixed_trials(model)``, today's fixed attacks), before the sampler's own.
    ``space_options``: fields of the task's space (e.g. ``{"methods": ["full"], "optimizers": ["adam"]}``).
    ``references``: name -> model, searched like the unprotected model. Returns the report dict of
    :func:`sophon_fast.audit.report.build_report` and, with ``write``, writes report.json, report.md and
    report.png into ``out``. Raises ValueError before any trial on bad input (a budget below 1, an unknown task,
    method or optimiser, restricted labels beyond the model's outputs, a stored study that does not match).
    """
    optuna = _optuna()
    if budget not in BUDGETS:
        raise ValueError(f"unknown audit budget {budget!r}; one of {tuple(BUDGETS)}")
    b = dict(BUDGETS[budget])
    b.update({k: v for k, v in (("trials", trials), ("null_bodies", null_bodies), ("steps", steps)) if v is not None})
    if b["trials"] < 1 or b["steps"] < 1 or b["null_bodies"] < 1:
        raise ValueError(f"the audit budget must have trials >= 1, steps >= 1 and null_bodies >= 1, got {b}")
    if task not in TASKS:
        raise ValueError(f"unknown audit task {task!r}; one of {TASKS}")
    space = make_space(task, train, test, original, b["steps"], **(space_options or {}))
    bad_refs = [n for n in (references or {}) if not n.replace("_", "").replace("-", "").isalnum()]
    if bad_refs:
        raise ValueError(f"reference names must be letters, digits, '-' and '_': {bad_refs}")
    for m in (protected, unprotected, *(references or {}).values()):
        if m is not None:
            space.validate(m)
    bodies = {"protected": ("protected", protected)}
    if unprotected is not None:
        bodies["unprotected"] = ("unprotected", unprotected)
    bodies["scratch"] = ("scratch", space.scratch(protected, seed))
    for i in range(b["null_bodies"]):
        bodies[f"null{seed + NULL_OFFSET + i}"] = ("null", space.scratch(protected, seed + NULL_OFFSET + i))
    for name, m in (references or {}).items():
        bodies[f"ref_{name}"] = ("reference", m)
    fixed = [dict(p) for p in fixed]
    cfg = {"space": space.config(), "seed": seed, "fixed": fixed, "startup_trials": STARTUP_TRIALS}

    os.makedirs(out, exist_ok=True)
    storage = _storage(optuna, out)
    direction = "maximize" if space.higher_is_better else "minimize"
    studies = {}
    for name, (role, m) in bodies.items():   # every check before the first trial
        study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True)
        want = {"config": json.loads(json.dumps(cfg)), "fingerprint": fingerprint(m), "role": role}
        have = study.user_attrs
        if have:
            diff = [k for k in want if have.get(k) != want[k]]
            if diff:
                raise ValueError(f"{out}/audit.db holds a study {name!r} made with another {', '.join(diff)}: use "
                                 "another output folder (or delete that file) to start a new audit")
        else:
            for k, v in want.items():
                study.set_user_attr(k, v)
        studies[name] = study
    t_all = time.perf_counter()
    for name, (role, m) in bodies.items():
        _search(optuna, studies[name], storage, m, space, b["trials"], seed, fixed, progress, say)
    from sophon_fast.audit.report import build_report, write_report
    report = build_report(studies, space, {**b, "budget": budget, "seed": seed, "fixed": len(fixed),
                                           "threads": torch.get_num_threads()},
                          seconds=time.perf_counter() - t_all)
    if write:
        paths = write_report(report, out)
        if say:
            say(f"[audit] wrote {', '.join(p for p in paths.values() if p)}")
    return report


def _storage(optuna, out: str):
    """Optuna's SQLite storage ``out/audit.db`` in WAL mode with ``synchronous=NORMAL``: a commit (Optuna makes about
    20 per trial) does not wait for the disk, and a killed process loses no committed trial (only a power cut can
    lose the last few, and the file stays consistent)."""
    from sqlalchemy import event
    storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(os.path.join(out, 'audit.db'))}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})

    def pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()   # connections opened before the listener are closed; new ones get the pragmas
    return storage


def _search(optuna, study, storage, model: nn.Module, space, trials: int, seed: int, fixed: List[dict],
            progress: bool, say: Optional[Callable[[str], None]]) -> None:
    """Run ``study`` until it has ``trials`` finished trials (see the module docstring for the seeding)."""
    TS = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(TS.RUNNING, TS.WAITING)):   # left by an interrupted run
        storage.set_trial_state_values(t._trial_id, TS.FAIL)

    def done() -> int:
        return len(study.get_trials(deepcopy=False, states=(TS.COMPLETE,)))

    def objective(trial) -> float:
        params = space.suggest(trial)
        t0 = time.perf_counter()
        res = space.evaluate(model, params, seed)
        trial.set_user_attr("result", {"curve": res["curve"], "steps": res["steps"], "stopped": res["stopped"],
                                        "seconds": time.perf_counter() - t0, "attack": space.describe(params),
                                        "fixed": trial.number in queued})   # one attribute: one database write
        return res["value"]

    queued = set()
    n = done()
    bar = None
    if progress and n < trials:
        from tqdm.auto import tqdm
        bar = tqdm(total=trials, initial=n, desc=study.study_name, leave=True)
    while n < trials:
        if n < len(fixed):
            study.enqueue_trial(fixed[n])
            queued.add(max(t.number for t in study.get_trials(deepcopy=False)))
        study.sampler = optuna.samplers.TPESampler(seed=seed * 100003 + n, n_startup_trials=STARTUP_TRIALS)
        study.optimize(objective, n_trials=1, catch=())
        n = done()
        last = study.get_trials(deepcopy=False)[-1]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(best=f"{study.best_value:.4g}", last=f"{last.value:.4g}")
        elif say:
            say(f"[audit] {study.study_name} trial {n}/{trials}: {last.value:.4g} "
                f"({last.user_attrs['result']['attack']}); best {study.best_value:.4g}")
    if bar is not None:
        bar.close()


def load_studies(out: str) -> Dict[str, object]:
    """The stored studies of the audit in ``out`` (name -> optuna Study), for reading them back."""
    optuna = _optuna()
    url = f"sqlite:///{os.path.abspath(os.path.join(out, 'audit.db'))}"
    if not os.path.exists(os.path.join(out, "audit.db")):
        raise FileNotFoundError(f"no audit.db in {out}")
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=url)
            for s in optuna.get_all_study_summaries(url)}
