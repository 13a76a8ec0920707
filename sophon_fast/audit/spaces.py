"""The attack-search spaces, one per task: what a trial may choose, and how it is run and scored.

Every space turns an Optuna trial into an attack of :mod:`sophon_fast.attacks` and runs it with that
package's runner (image classifiers: :func:`sophon_fast.attacks.compose.run_composed`; language models:
:func:`sophon_fast.attacks.lm.run`; denoisers: :func:`sophon_fast.attacks.diffusion.run`), for a fixed step
budget. A trial's value is the best restricted metric reached at any evaluation point within the budget
(highest accuracy; lowest next-token loss or eps-MSE). Learning rates are log-uniform over four decades, with
the range set per optimiser (or per LM method) so that every optimiser's useful rates are inside it.

Only one early stop exists, and it cannot hide a late riser (image task): a run stops when a parameter of the
model being trained has become NaN. NaN survives every update of these optimisers (``w (1 - lr wd) - lr u``
stays NaN), a NaN weight makes its unit's output NaN for every input, and NaN propagates through the
convolutions, ReLUs, poolings and linear layers of these models, so from then on ``argmax`` predicts the same
class (the first NaN logit) for every input: later accuracies are at most the test set's largest class share,
chance level. The trial keeps its best before the NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from sophon_fast.attacks.compose import ComposedAttack, eval_grid, run_composed
from sophon_fast.attacks.spec import METHODS, OPTIMIZERS, SCHEDULES, SIGN_OPTIMIZERS, Attack
from sophon_fast.data import as_tensors
from sophon_fast.models import classifier_block, head_of

IMAGE_METHODS = METHODS + ("fresh_block",)
IMAGE_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "adagrad", "sign_momentum", "signsgd")
# (low, high) of each optimiser's log-uniform rate range: four decades
LR_RANGES: Dict[str, Tuple[float, float]] = {
    "sgd": (1e-4, 1.0), "momentum": (1e-4, 1.0), "adam": (1e-5, 1e-1), "adamw": (1e-5, 1e-1),
    "adagrad": (1e-4, 1.0), "adadelta": (1e-2, 1e2), "rmsprop": (1e-6, 1e-2),
    "sign_momentum": (1e-6, 1e-2), "signsgd": (1e-6, 1e-2)}


def _check_choices(kind: str, given: Sequence, allowed: Sequence) -> tuple:
    given = tuple(given)
    bad = [g for g in given if g not in allowed]
    if not given or bad:
        raise ValueError(f"unknown {kind} {bad or 'list (empty)'}; choose among {tuple(allowed)}")
    return given


def _head_outputs(model: nn.Module) -> int:
    return head_of(model).out_features


def _any_nan(m: nn.Module) -> bool:
    return bool(torch.stack([p.isnan().any() for p in m.parameters()]).any())


@dataclass
class ImageSpace:
    """Classifier attacks on restricted ``train``/``test`` data ((X, Y), a Dataset or a DataLoader).

    A trial chooses ``method`` (full fine-tuning, ``last_layer`` = head only, ``reinit_head`` = fresh head,
    ``fresh_block`` = a fresh classifier block of the last ``depth`` parameterised modules, ``depths`` chosen
    from the model by :meth:`validate`), ``optimizer`` and its rate ``lr_<optimizer>`` (:data:`LR_RANGES`),
    ``batch_size``, ``weight_decay``, ``schedule`` (and ``warmup`` for warm-up + cosine), ``benign_steps``
    (only with ``original`` data) and, for ``full`` and ``fresh_block``, ``block_input_rms`` (None: none).
    """

    train: object
    test: object
    original: object = None
    steps: int = 60
    methods: Sequence[str] = IMAGE_METHODS
    optimizers: Sequence[str] = IMAGE_OPTIMIZERS
    batch_sizes: Sequence[int] = (32, 64, 128, 200, 256)
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2)
    schedules: Sequence[str] = SCHEDULES
    warmups: Sequence[float] = (0.05, 0.1, 0.3)
    benign_steps: Sequence[int] = (0, 20, 100)
    block_input_rms: Sequence[Optional[float]] = (None, 0.3, 1.0, 3.0)
    depths: Tuple[int, ...] = ()
    task: str = field(default="image", init=False)
    metric: str = field(default="restricted test accuracy", init=False)
    higher_is_better: bool = field(default=True, init=False)

    def __post_init__(self):
        self.methods = _check_choices("attack method", self.methods, IMAGE_METHODS)
        self.optimizers = _check_choices("optimizer", self.optimizers, OPTIMIZERS + SIGN_OPTIMIZERS)
        self.schedules = _check_choices("schedule", self.schedules, SCHEDULES)
        if self.steps < 1:
            raise ValueError(f"the step budget must be >= 1, got {self.steps}")
        self.train = tuple(as_tensors(self.train))
        self.test = tuple(as_tensors(self.test))
        if self.original is not None:
            self.original = tuple(as_tensors(self.original))
        self.eval_steps = eval_grid(self.steps)
        self.block_input_rms = tuple(self.block_input_rms)
        self._shaped = False

    def validate(self, model: nn.Module) -> None:
        """ValueError unless ``model`` covers the restricted labels. The first model validated shapes the space:
        ``depths`` (2 up to 4, below the model's count of parameterised modules; no ``fresh_block`` when none is
        left) and ``block_input_rms`` (None only, when the model has no convolution or pooling before its
        classifier block)."""
        labels = max(int(self.train[1].max()), int(self.test[1].max())) + 1
        outputs = _head_outputs(model)
        if labels > outputs:
            raise ValueError(f"the restricted set has labels 0..{labels - 1} ({labels} classes) but the model's head "
                             f"has {outputs} outputs: its classes do not cover the restricted set")
        leaves = [m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(False))]
        if not self._shaped:
            self._shaped = True
            if "fresh_block" in self.methods and not self.depths:
                self.depths = tuple(range(2, min(4, len(leaves) - 1) + 1))
                if not self.depths:
                    self.methods = tuple(m for m in self.methods if m != "fresh_block")
                    if not self.methods:
                        raise ValueError(f"fresh_block needs a model with at least 3 parameterised modules, "
                                         f"{type(model).__name__} has {len(leaves)}")
            try:
                classifier_block(model)
            except ValueError:
                self.block_input_rms = (None,)
        if self.depths and max(self.depths) >= len(leaves):
            raise ValueError(f"fresh_block depth {max(self.depths)} needs more than {len(leaves)} parameterised "
                             f"modules ({type(model).__name__})")

    def config(self) -> dict:
        return {"task": self.task, "steps": self.steps, "eval_steps": self.eval_steps,
                "methods": list(self.methods), "optimizers": list(self.optimizers),
                "batch_sizes": list(self.batch_sizes), "weight_decays": list(self.weight_decays),
                "schedules": list(self.schedules), "warmups": list(self.warmups),
                "benign_steps": list(self.benign_steps) if self.original is not None else [0],
                "block_input_rms": list(self.block_input_rms), "depths": list(self.depths),
                "lr_ranges": {o: LR_RANGES[o] for o in self.optimizers}}

    def suggest(self, trial) -> dict:
        p = {"method": trial.suggest_categorical("method", list(self.methods))}
        if p["method"] == "fresh_block":
            p["depth"] = trial.suggest_categorical("depth", list(self.depths))
        opt = p["optimizer"] = trial.suggest_categorical("optimizer", list(self.optimizers))
        p[f"lr_{opt}"] = trial.suggest_float(f"lr_{opt}", *LR_RANGES[opt], log=True)
        p["batch_size"] = trial.suggest_categorical("batch_size", list(self.batch_sizes))
        p["weight_decay"] = trial.suggest_categorical("weight_decay", list(self.weight_decays))
        p["schedule"] = trial.suggest_categorical("schedule", list(self.schedules))
        if p["schedule"] == "warmup_cosine":
            p["warmup"] = trial.suggest_categorical("warmup", list(self.warmups))
        if self.original is not None:
            p["benign_steps"] = trial.suggest_categorical("benign_steps", list(self.benign_steps))
        if p["method"] in ("full", "fresh_block"):
            p["block_input_rms"] = trial.suggest_categorical("block_input_rms", list(self.block_input_rms))
        return p

    def attack(self, p: dict) -> ComposedAttack:
        ft = Attack(name="trial", method="full" if p["method"] == "fresh_block" else p["method"],
                    optimizer=p["optimizer"], lr=p[f"lr_{p['optimizer']}"], batch_size=p["batch_size"],
                    epochs=1, weight_decay=p["weight_decay"], schedule=p.get("schedule", "constant"),
                    warmup=p.get("warmup", 0.1))
        return ComposedAttack(ft, self.steps, fresh_block=p.get("depth"), block_input_rms=p.get("block_input_rms"),
                              benign_steps=p.get("benign_steps", 0))

    def describe(self, p: dict) -> str:
        return self.attack(p).describe()

    def evaluate(self, model: nn.Module, p: dict, seed: int) -> dict:
        """Run trial parameters ``p`` on ``model``: ``{"value", "steps", "curve", "stopped"}``."""
        stopped = []

        def stop_if(m):
            if _any_nan(m):
                stopped.append(True)
                return True
            return False

        curve = run_composed(model, self.train, self.test, self.attack(p), seed, self.original, self.eval_steps,
                             stop_if)
        return {"value": max(curve), "steps": [0, *self.eval_steps[:len(curve) - 1]], "curve": curve,
                "stopped": "NaN weights" if stopped else None}

    def scratch(self, model: nn.Module, seed: int) -> nn.Module:
        from sophon_fast.attacks.run import scratch
        return scratch(model, seed)

    def fixed_trials(self, model: nn.Module, suites: Sequence[str] = ("default", "adaptive"),
                     only: Optional[Sequence[str]] = None) -> Tuple[List[dict], List[str]]:
        """Today's fixed attacks as trial parameters at this space's budget: the ``default`` suite's 12 attacks and
        the ``adaptive`` suite's fine-tuning attacks at each of their rates (``only``: just the attacks of these
        names, e.g. ``reinit_block-adam``). Returns ``(params, skipped)``: ``skipped`` names the attacks the space
        cannot express (zero_bias, noise; those whose optimiser, method, batch size or weight decay it excludes)."""
        from sophon_fast.attacks.adaptive import default_attacks
        from sophon_fast.attacks.spec import suite
        self.validate(model)
        out, skipped = [], []
        try:
            block = len(classifier_block(model))
        except ValueError:   # no convolution or pooling: no classifier block to redraw
            block = None

        def add(name, p):
            ok = (p["method"] in self.methods and p["optimizer"] in self.optimizers
                  and p["batch_size"] in self.batch_sizes and p["weight_decay"] in self.weight_decays
                  and (p.get("depth") is None or p["depth"] in self.depths)
                  and p.get("block_input_rms") in self.block_input_rms
                  and (p.get("benign_steps", 0) == 0 or (self.original is not None
                                                          and p["benign_steps"] in self.benign_steps)))
            if not ok:
                skipped.append(name)
                return
            p["schedule"] = "constant" if "constant" in self.schedules else self.schedules[0]
            p.setdefault("benign_steps", 0)
            if self.original is None:
                p.pop("benign_steps")
            if p["method"] in ("full", "fresh_block"):
                p.setdefault("block_input_rms", None)
            out.append(p)

        if "default" in suites:
            for a in suite("default"):
                if only is not None and a.name not in only:
                    continue
                add(a.name, {"method": a.method, "optimizer": a.optimizer, f"lr_{a.optimizer}": a.lr,
                             "batch_size": a.batch_size, "weight_decay": a.weight_decay})
        if "adaptive" in suites:
            for a in default_attacks():
                if only is not None and a.name not in only:
                    continue
                for lr in a.lrs:
                    p = {"optimizer": a.optimizer, f"lr_{a.optimizer}": lr, "batch_size": a.batch_size,
                         "weight_decay": a.weight_decay}
                    if a.prep == "none":
                        p["method"] = "full"
                    elif a.prep == "reinit_block" and (a.reinit_last or block):
                        p.update(method="fresh_block", depth=a.reinit_last or block,
                                 block_input_rms=a.block_input_rms)
                    elif a.prep == "benign_first":
                        p.update(method="full", benign_steps=a.benign_steps)
                    else:
                        skipped.append(f"{a.name}-lr{lr:g}")
                        continue
                    add(f"{a.name}-lr{lr:g}", p)
        return out, skipped


@dataclass
class LMSpace:
    """Causal-LM attacks (:class:`sophon_fast.attacks.lm.LMAttack`, AdamW with warm-up + cosine): ``method`` full
    or LoRA (``rank``), ``lr_<method>`` (full 1e-5..1e-1, LoRA 1e-4..1), ``batch_size``, ``weight_decay`` and the
    warm-up fraction ``warmup`` (0: cosine decay alone), ``steps`` optimiser steps evaluated at ``evals`` + 1
    points. Data: ``(input_ids, labels[, attention_mask])`` tensors; metric: restricted next-token loss."""

    train: tuple
    test: tuple
    steps: int = 200
    evals: int = 5
    methods: Sequence[str] = ("full", "lora")
    ranks: Sequence[int] = (4, 8, 16)
    batch_sizes: Sequence[int] = (4, 8, 16)
    weight_decays: Sequence[float] = (0.0, 0.01, 0.1)
    warmups: Sequence[float] = (0.0, 0.05, 0.1, 0.3)
    task_obj: object = None
    task: str = field(default="lm", init=False)
    metric: str = field(default="restricted next-token loss", init=False)
    higher_is_better: bool = field(default=False, init=False)
    LR = {"full": (1e-5, 1e-1), "lora": (1e-4, 1.0)}

    def __post_init__(self):
        from sophon_fast.attacks.lm import METHODS as LM_METHODS
        self.methods = _check_choices("attack method", self.methods, LM_METHODS)
        if self.steps < 1 or not 1 <= self.evals <= self.steps:
            raise ValueError(f"the step budget must be >= 1 and evals in [1, steps], got {self.steps}, {self.evals}")

    def validate(self, model: nn.Module) -> None:
        vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
        top = max(int(self.train[0].max()), int(self.test[0].max()))
        if vocab is not None and top >= vocab:
            raise ValueError(f"the restricted text has token ids up to {top} but the model's vocabulary has {vocab}")

    def config(self) -> dict:
        return {"task": self.task, "steps": self.steps, "evals": self.evals, "methods": list(self.methods),
                "ranks": list(self.ranks), "batch_sizes": list(self.batch_sizes),
                "weight_decays": list(self.weight_decays), "warmups": list(self.warmups),
                "lr_ranges": {m: self.LR[m] for m in self.methods}}

    def suggest(self, trial) -> dict:
        p = {"method": trial.suggest_categorical("method", list(self.methods))}
        if p["method"] == "lora":
            p["rank"] = trial.suggest_categorical("rank", list(self.ranks))
        p[f"lr_{p['method']}"] = trial.suggest_float(f"lr_{p['method']}", *self.LR[p["method"]], log=True)
        p["batch_size"] = trial.suggest_categorical("batch_size", list(self.batch_sizes))
        p["weight_decay"] = trial.suggest_categorical("weight_decay", list(self.weight_decays))
        p["warmup"] = trial.suggest_categorical("warmup", list(self.warmups))
        return p

    def attack(self, p: dict):
        from sophon_fast.attacks.lm import LMAttack
        return LMAttack(method=p["method"], lr=p[f"lr_{p['method']}"], steps=self.steps, batch_size=p["batch_size"],
                        warmup=p["warmup"], weight_decay=p["weight_decay"], rank=p.get("rank", 8), evals=self.evals)

    def describe(self, p: dict) -> str:
        a = self.attack(p)
        return (f"{'LoRA r' + str(a.rank) if a.method == 'lora' else 'full'}, AdamW lr {a.lr:.3g}, batch "
                f"{a.batch_size}, wd {a.weight_decay:g}, warm-up {a.warmup:g} + cosine, {a.steps} steps")

    def evaluate(self, model: nn.Module, p: dict, seed: int) -> dict:
        from sophon_fast.attacks.lm import run
        a = self.attack(p)
        curve = [float(v) for v in run(model, self.train, self.test, a, seed, self.task_obj)]
        return {"value": _finite_min(curve), "steps": a.eval_steps(), "curve": _finite_or_none(curve),
                "stopped": None}

    def scratch(self, model: nn.Module, seed: int) -> nn.Module:
        from sophon_fast.models.lm import fresh_like
        return fresh_like(model, seed)

    def fixed_trials(self, model, suites=()) -> Tuple[List[dict], List[str]]:
        from sophon_fast.attacks.lm import default_attacks
        out = []
        for a in default_attacks(steps=self.steps, evals=self.evals):
            if a.method in self.methods and a.batch_size in self.batch_sizes and a.weight_decay in self.weight_decays \
                    and a.warmup in self.warmups and (a.method == "full" or a.rank in self.ranks):
                p = {"method": a.method, f"lr_{a.method}": a.lr, "batch_size": a.batch_size,
                     "weight_decay": a.weight_decay, "warmup": a.warmup}
                if a.method == "lora":
                    p["rank"] = a.rank
                out.append(p)
        return out, []


@dataclass
class DiffusionSpace:
    """Denoiser fine-tuning (:class:`sophon_fast.attacks.diffusion.DiffusionAttack`): ``optimizer`` and its rate
    (:data:`LR_RANGES`), ``batch_size``, ``weight_decay`` and the attacker's ``timestep`` ("uniform" DDPM training or
    the reference's "fixed1"), ``steps`` steps evaluated every ``steps // evals``; metric: restricted eps-MSE over
    uniform timesteps (a diverged evaluation counts as infinitely bad)."""

    train: object
    test: object
    steps: int = 150
    evals: int = 5
    optimizers: Sequence[str] = ("sgd", "momentum", "adam", "adamw", "adagrad")
    batch_sizes: Sequence[int] = (16, 32, 64)
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-2)
    timesteps: Sequence[str] = ("uniform", "fixed1")
    task: str = field(default="diffusion", init=False)
    metric: str = field(default="restricted eps-MSE (uniform t)", init=False)
    higher_is_better: bool = field(default=False, init=False)

    def __post_init__(self):
        self.optimizers = _check_choices("optimizer", self.optimizers, OPTIMIZERS)
        if self.steps < 1 or not 1 <= self.evals <= self.steps:
            raise ValueError(f"the step budget must be >= 1 and evals in [1, steps], got {self.steps}, {self.evals}")

    def validate(self, model: nn.Module) -> None:
        from sophon_fast.tasks.diffusion import images_of
        images_of(self.train), images_of(self.test)

    def config(self) -> dict:
        return {"task": self.task, "steps": self.steps, "evals": self.evals, "optimizers": list(self.optimizers),
                "batch_sizes": list(self.batch_sizes), "weight_decays": list(self.weight_decays),
                "timesteps": list(self.timesteps), "lr_ranges": {o: LR_RANGES[o] for o in self.optimizers}}

    def suggest(self, trial) -> dict:
        opt = trial.suggest_categorical("optimizer", list(self.optimizers))
        return {"optimizer": opt, f"lr_{opt}": trial.suggest_float(f"lr_{opt}", *LR_RANGES[opt], log=True),
                "batch_size": trial.suggest_categorical("batch_size", list(self.batch_sizes)),
                "weight_decay": trial.suggest_categorical("weight_decay", list(self.weight_decays)),
                "timestep": trial.suggest_categorical("timestep", list(self.timesteps))}

    def attack(self, p: dict):
        from sophon_fast.attacks.diffusion import DiffusionAttack
        return DiffusionAttack(optimizer=p["optimizer"], lr=p[f"lr_{p['optimizer']}"], batch_size=p["batch_size"],
                               steps=self.steps, eval_every=max(1, self.steps // self.evals),
                               timestep=p["timestep"], weight_decay=p["weight_decay"])

    def describe(self, p: dict) -> str:
        a = self.attack(p)
        return (f"{a.optimizer} lr {a.lr:.3g}, batch {a.batch_size}, wd {a.weight_decay:g}, timesteps {a.timestep}, "
                f"{a.steps} steps")

    def evaluate(self, model: nn.Module, p: dict, seed: int) -> dict:
        from sophon_fast.attacks.diffusion import run
        curves = run(model, self.train, self.test, self.attack(p), seed)
        return {"value": _finite_min(curves["uniform"]), "steps": curves["steps"], "curve": curves["uniform"],
                "stopped": None}

    def scratch(self, model: nn.Module, seed: int) -> nn.Module:
        from sophon_fast.attacks.run import scratch
        return scratch(model, seed)

    def fixed_trials(self, model, suites=()) -> Tuple[List[dict], List[str]]:
        from sophon_fast.attacks.diffusion import suite
        out = [{"optimizer": a.optimizer, f"lr_{a.optimizer}": a.lr, "batch_size": a.batch_size,
                "weight_decay": a.weight_decay, "timestep": a.timestep} for a in suite()
               if a.optimizer in self.optimizers and a.batch_size in self.batch_sizes
               and a.weight_decay in self.weight_decays and a.timestep in self.timesteps]
        return out, []


WORST = 1e30   # the stored value of a trial whose every evaluation diverged (lower-is-better metrics)


def _finite_min(curve: Sequence[Optional[float]]) -> float:
    vals = [v for v in curve if v is not None and math.isfinite(v)]
    return min(vals) if vals else WORST


def _finite_or_none(curve: Sequence[float]) -> List[Optional[float]]:
    return [v if math.isfinite(v) else None for v in curve]
