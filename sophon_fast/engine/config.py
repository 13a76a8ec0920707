"""Configuration of a protection run: ``ProtectConfig``, the simulated attacker ``Strategy`` and the
grouped settings ``Evaluation`` and ``Checkpointing``.

Defaults are the SOPHON reference code's (classification/inverse_loss.py, kl_uniform_loss.py,
generation/denial_service_loss.py): FTS Adam lr alpha*1e-4, NTR Adam lr beta*1e-4, K = 50 inner steps of
plain SGD lr 1e-4 on fresh restricted batches of 150 (130 support / 20 query), meta-gradient clipped to
norm 0.5. Loss-dependent defaults (``LOSS_DEFAULTS``) are left as None in the config and resolved once,
from the final settings, by :meth:`ProtectConfig.resolved`, so overriding ``loss`` never keeps the
defaults of the old loss.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from sophon_fast.defences import defence_from_dict, defence_to_dict
from sophon_fast.engine.attackers import attacker_from

INNER_OPTIMIZERS = ("sgd", "momentum", "adam")
OUTER_OPTIMIZERS = ("adam", "sgd")
MODES = ("fast", "reference")
META_GRADIENTS = ("first_order", "unrolled")

# loss -> (alpha, beta, ntr_steps, head re-initialisation in the default strategy)
LOSS_DEFAULTS: Dict[str, tuple] = {
    "ice": (3.0, 5.0, 1, True),                # inverse_loss.py (the ICE script re-initialises the head)
    "ice_reference_code": (3.0, 5.0, 1, True),
    "klu": (1.0, 1.0, 5, False),               # kl_uniform_loss.py
    "neg_entropy": (1.0, 1.0, 5, False),
    "dos": (0.05, 2.0, 10, False),             # denial_service_loss.py: FTS lr 5e-6, NTR lr 2e-4, 10 NTR steps
    "mse_neg": (0.05, 2.0, 10, False),
}


_OLD_SPELLINGS = {"reinit_head": "attacker='reinit_head' (or 'as_is' for reinit_head=False)",
                  "fresh": "attacker='fresh_head' / 'fresh_block'",
                  "train": "attacker=Probe(layers='head' | 'block') for train='fresh'",
                  "lora": "attacker=LoRA(rank=r)"}
SCHEDULES = ("constant", "warmup_cosine")
QUERY_WEIGHTINGS = ("uniform", "late")


@dataclass
class _StrategyFields:
    optimizer: str = "sgd"
    lr: float = 1e-4
    batch_size: int = 150
    query_size: int = 20
    momentum: float = 0.9
    betas: Sequence[float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    steps: Optional[int] = None
    attacker: Any = None
    schedule: str = "constant"
    warmup: int = 0
    benign_steps: int = 0
    query_weighting: str = "uniform"


class Strategy(_StrategyFields):
    """One simulated fine-tuning environment (the paper's N environments; the reference code has one).

    optimizer: "sgd" | "momentum" | "adam" (torch semantics; momentum uses ``momentum`` as beta, dampening 0).
    lr: its (peak) learning rate. batch_size: restricted samples per inner step, of which the last ``query_size``
    form the query batch. steps: restricted inner steps K (None: the config's ``inner_steps``).
    attacker: what the trajectory fine-tunes (sophon_fast.engine.attackers: "as_is", "reinit_head", "fresh_head",
    "fresh_block", "probe", "lora", an Attacker object such as ``LoRA(rank=8)``, or ``{"kind": ..., ...}``);
    None: the loss's default (ICE: "reinit_head", the reference ICE script; otherwise "as_is").
    schedule: the inner learning rate over the trajectory's steps, "constant" or "warmup_cosine" (linear warm-up
    over ``warmup`` steps to ``lr``, then cosine decay towards 0; step i of n, 0-based: ``lr (i + 1) / warmup``
    for i < warmup, else ``lr (1 + cos(pi (i - warmup) / (n - warmup))) / 2``). benign_steps: steps on original
    data (support rows only, no query) before the K restricted ones, the optimiser state carried over (Qi et al.
    2024's benign-first attack). query_weighting: how the K query losses are weighted, "uniform" (SOPHON's) or
    "late" (TAR's exp(0.0625 (k - K + 1)), rescaled to the same total weight).
    """

    def __init__(self, *args, **kw):
        old = [k for k in _OLD_SPELLINGS if k in kw]
        if old:
            raise ValueError(f"Strategy: {', '.join(old)} is gone; use " + "; ".join(_OLD_SPELLINGS[k] for k in old)
                             + " (see CHANGELOG.md, 0.2.0)")
        super().__init__(*args, **kw)
        self.betas = tuple(float(b) for b in self.betas)
        self.attacker = attacker_from(self.attacker)
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"Strategy.optimizer must be one of {INNER_OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"Strategy.lr must be > 0, got {self.lr}")
        if not 0 < self.query_size < self.batch_size:
            raise ValueError(f"Strategy needs 0 < query_size < batch_size, got {self.query_size} / {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Strategy.steps must be >= 1, got {self.steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Strategy.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0 \
                or (self.warmup and self.schedule != "warmup_cosine"):
            raise ValueError(f"Strategy.warmup must be an int >= 0, set only with schedule='warmup_cosine'; got "
                             f"{self.warmup!r} with schedule={self.schedule!r}")
        if isinstance(self.benign_steps, bool) or not isinstance(self.benign_steps, int) or self.benign_steps < 0:
            raise ValueError(f"Strategy.benign_steps must be an int >= 0, got {self.benign_steps!r}")
        if self.query_weighting not in QUERY_WEIGHTINGS:
            raise ValueError(f"Strategy.query_weighting must be one of {QUERY_WEIGHTINGS}, got {self.query_weighting!r}")

    @property
    def name(self) -> str:
        kind = self.attacker.kind if self.attacker is not None else "default"
        return f"{kind}/{self.optimizer}@{self.lr:g}"

    def check_steps(self, k: int) -> None:
        """ValueError when the warm-up is longer than the trajectory (``benign_steps + k`` steps)."""
        if self.warmup > self.benign_steps + k:
            raise ValueError(f"Strategy {self.name}: warmup={self.warmup} is longer than its {self.benign_steps + k} "
                             f"steps")

    def lrs(self, k: int) -> List[float]:
        """The learning rate of each of the trajectory's ``benign_steps + k`` steps (host floats)."""
        n = self.benign_steps + k
        if self.schedule == "constant":
            return [self.lr] * n
        w = self.warmup
        return [self.lr * (i + 1) / w if i < w else self.lr * 0.5 * (1 + math.cos(math.pi * (i - w) / (n - w)))
                for i in range(n)]

    def query_weights(self, k: int) -> List[float]:
        """Relative weights of the ``k`` query losses, summing to ``k``."""
        if self.query_weighting == "uniform":
            return [1.0] * k
        e = [math.exp(0.0625 * (i - k + 1)) for i in range(k)]
        return [k * x / sum(e) for x in e]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["betas"] = list(self.betas)
        d["attacker"] = None if self.attacker is None else self.attacker.to_dict()
        return d


@dataclass
class Unroll:
    """The fast mode's unrolled meta-gradient (``meta_gradient="unrolled"``): the forward sweep keeps each step's
    trained tensors and optimiser state every ``snapshot_every`` steps (1: every step; c > 1: every c-th, the
    steps between recomputed in the reverse sweep, the same numbers bit for bit); ``offload``: on a GPU, keep the
    snapshots in pinned host memory (no effect on the CPU)."""
    snapshot_every: int = 1
    offload: bool = False

    def __post_init__(self):
        if isinstance(self.snapshot_every, bool) or not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
            raise ValueError(f"Unroll.snapshot_every must be an int >= 1, got {self.snapshot_every!r}")


@dataclass
class Evaluation:
    """Scheduled original-domain evaluation and rollback.

    every: evaluate every this many iterations (and after the last). size: original-test samples used (None:
    all). max_drop: roll back to the last evaluated weights and stop when the metric worsens by more than this
    fraction of its value before protection (accuracy 0.9 -> below 0.72 at 0.2; a loss 2.0 -> above 2.4);
    None: never. The reference code stops at an absolute 80% accuracy, which stops any model that starts
    below it; a relative drop keeps its intent for every model.
    """
    every: int = 10
    size: Optional[int] = 2000
    max_drop: Optional[float] = 0.2

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Evaluation.every must be >= 1, got {self.every}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"Evaluation.size must be >= 1 or None, got {self.size}")
        if self.max_drop is not None and not 0 <= self.max_drop:
            raise ValueError(f"Evaluation.max_drop must be >= 0 or None, got {self.max_drop}")


@dataclass
class Checkpointing:
    """Atomic checkpoints in ``dir`` every ``every`` iterations (and after the last); ``resume`` continues a
    run from its checkpoint (refused when it was written with other settings)."""
    dir: Optional[str] = None
    every: int = 10
    resume: bool = False

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Checkpointing.every must be >= 1, got {self.every}")


@dataclass
class ProtectConfig:
    """Everything in the reference loop (None = loss-dependent default, see ``LOSS_DEFAULTS``).

    task: "classification" | "lm" | "diffusion" (or pass a Task object to ``protect(task=...)``); timestep: the
    diffusion task's timesteps, "fixed1" (the reference code's t = 1 everywhere) or "uniform" (None: "fixed1");
    suppression_tmax: with timestep="uniform", the diffusion suppression loss draws t from U{0..n-1} (None: all T).
    loss: the suppression loss ("ice", "ice_reference_code", "klu", "neg_entropy"; "dos", "mse_neg" for
    diffusion). strategies: the simulated attackers, taking turns ("cycle") or drawn ("random") per
    trajectory; None: one reference SGD strategy. trajectories: simulated trajectories per iteration (each
    restricted domain gets every trajectory with restricted_sampling="each", one random domain with "random").
    params: names (fnmatch patterns) of the parameters to protect; the others stay frozen (None: all
    trainable ones). defences: optional defence components' configs (e.g. ``sophon_fast.defences.TrapConfig``).
    meta_gradient: "first_order" (SOPHON's: each attacker step is a constant, d theta'_k / d theta = I) or
    "unrolled" (the exact derivative through the attacker's steps, second order; the reference mode keeps K graphs,
    memory O(K); the fast mode snapshots each step and re-runs one step at a time in a reverse sweep, see
    ``unroll`` and ``sophon_fast.engine.unroll``).
    device: None = the model's device.
    """
    task: str = "classification"
    loss: str = "ice"
    timestep: Optional[str] = None         # diffusion only: "fixed1" (the reference code's t = 1) | "uniform"
    suppression_tmax: Optional[int] = None  # diffusion, uniform timesteps only: suppress at t < suppression_tmax
    mode: str = "fast"
    meta_gradient: str = "first_order"    # "first_order" (SOPHON's) | "unrolled" (through the attacker's steps)
    iterations: int = 1000
    inner_steps: int = 50
    strategies: Optional[List[Strategy]] = None
    trajectories: int = 1
    strategy_sampling: str = "cycle"
    restricted_sampling: str = "each"
    alpha: Optional[float] = None          # FTS lr = alpha * base_lr
    beta: Optional[float] = None           # NTR lr = beta * base_lr
    base_lr: float = 1e-4
    fts_optimizer: str = "adam"
    ntr_optimizer: str = "adam"
    ntr_steps: Optional[int] = None
    ntr_batch_size: int = 150
    clip_norm: Optional[float] = 0.5
    params: Optional[List[str]] = None
    defences: List[Any] = field(default_factory=list)
    unroll: Unroll = field(default_factory=Unroll)
    evaluation: Evaluation = field(default_factory=Evaluation)
    checkpoint: Checkpointing = field(default_factory=Checkpointing)
    max_nonfinite: int = 5
    seed: int = 0
    device: Optional[str] = None
    in_place: bool = False
    progress: Optional[bool] = None        # None: on when stderr is a TTY

    def __post_init__(self):
        if self.loss not in LOSS_DEFAULTS:
            raise ValueError(f"ProtectConfig.loss must be one of {tuple(LOSS_DEFAULTS)}, got {self.loss!r}")
        if self.mode not in MODES:
            raise ValueError(f"ProtectConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.meta_gradient not in META_GRADIENTS:
            raise ValueError(f"ProtectConfig.meta_gradient must be one of {META_GRADIENTS}, got {self.meta_gradient!r}")
        for name in ("fts_optimizer", "ntr_optimizer"):
            if getattr(self, name) not in OUTER_OPTIMIZERS:
                raise ValueError(f"ProtectConfig.{name} must be one of {OUTER_OPTIMIZERS}, got {getattr(self, name)!r}")
        if self.strategies is not None:
            self.strategies = [s if isinstance(s, Strategy) else Strategy(**s) for s in self.strategies]
            if not self.strategies:
                raise ValueError("ProtectConfig.strategies is empty (None gives the reference strategy)")
            for s in self.strategies:
                s.check_steps(s.steps or self.inner_steps)
        if isinstance(self.unroll, dict):
            self.unroll = Unroll(**self.unroll)
        if isinstance(self.evaluation, dict):
            self.evaluation = Evaluation(**self.evaluation)
        if isinstance(self.checkpoint, dict):
            self.checkpoint = Checkpointing(**self.checkpoint)
        self.defences = [defence_from_dict(d) if isinstance(d, dict) else d for d in self.defences]
        checks = [("timestep", self.timestep is None or (self.task == "diffusion" and self.timestep in ("fixed1", "uniform"))),
                  ("suppression_tmax", self.suppression_tmax is None or (
                      self.task == "diffusion" and self.timestep == "uniform" and not isinstance(self.suppression_tmax, bool)
                      and isinstance(self.suppression_tmax, int) and self.suppression_tmax >= 1)),
                  ("iterations", self.iterations >= 0), ("inner_steps", self.inner_steps >= 1),
                  ("trajectories", self.trajectories >= 1), ("ntr_steps", self.ntr_steps is None or self.ntr_steps >= 0),
                  ("ntr_batch_size", self.ntr_batch_size >= 1), ("max_nonfinite", self.max_nonfinite >= 0),
                  ("base_lr", self.base_lr > 0), ("alpha", self.alpha is None or self.alpha > 0),
                  ("beta", self.beta is None or self.beta > 0),
                  ("clip_norm", self.clip_norm is None or self.clip_norm > 0),
                  ("strategy_sampling", self.strategy_sampling in ("cycle", "random")),
                  ("restricted_sampling", self.restricted_sampling in ("each", "random"))]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"ProtectConfig.{name} has an invalid value {getattr(self, name)!r}")

    def resolved(self) -> "ProtectConfig":
        """A copy with every loss-dependent default filled in from the final settings."""
        alpha, beta, ntr_steps, reinit = LOSS_DEFAULTS[self.loss]
        strategies = self.strategies or [Strategy()]
        default = "reinit_head" if reinit else "as_is"
        strategies = [s if s.attacker is not None else dataclasses.replace(s, attacker=default) for s in strategies]
        return dataclasses.replace(
            self, strategies=strategies, alpha=alpha if self.alpha is None else self.alpha,
            beta=beta if self.beta is None else self.beta,
            ntr_steps=ntr_steps if self.ntr_steps is None else self.ntr_steps)

    @property
    def fts_lr(self) -> float:
        return self.resolved().alpha * self.base_lr

    @property
    def ntr_lr(self) -> float:
        return self.resolved().beta * self.base_lr

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["strategies"] = None if self.strategies is None else \
            [s.to_dict() for s in self.strategies]
        d["unroll"] = dataclasses.asdict(self.unroll)
        d["evaluation"] = dataclasses.asdict(self.evaluation)
        d["checkpoint"] = dataclasses.asdict(self.checkpoint)
        d["defences"] = [defence_to_dict(x) for x in self.defences]
        d["params"] = None if self.params is None else list(self.params)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ProtectConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"ProtectConfig: unknown settings {unknown}")
        return cls(**d)

    def replace(self, **overrides) -> "ProtectConfig":
        """This config with ``overrides`` applied (loss-dependent defaults are re-resolved afterwards)."""
        return ProtectConfig.from_dict({**self.to_dict(), **overrides})
