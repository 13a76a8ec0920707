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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from sophon_fast.defences import defence_from_dict, defence_to_dict

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


@dataclass
class Strategy:
    """One simulated fine-tuning environment (the paper's N environments; the reference code has one).

    optimizer: "sgd" | "momentum" | "adam" (torch semantics; momentum uses ``momentum`` as beta, dampening 0).
    lr: its learning rate. batch_size: restricted samples per inner step, of which the last ``query_size``
    form the query batch. reinit_head: re-initialise the clone's head (xavier_uniform weight, zero bias)
    before the trajectory; None: the loss's default (ICE True, the reference ICE script). fresh: "head" or
    "block" starts the trajectory from a freshly drawn head (``Task.head``) or classifier block (``Task.block``:
    every parameterised layer after the last convolution / pooling, the head included), with PyTorch's default
    initialisation, as the adaptive attacks that re-initialise them do; unlike ``reinit_head`` (the reference
    code's), the fresh layers are constants, so the trajectory's meta-gradient reaches the layers below them only
    (mode="reference"; with meta_gradient="unrolled" through the attacker's steps, docs/experiments.md e44).
    train: "all" (every protected parameter takes the inner steps) or "fresh" (only the fresh layers do, the rest
    stays as it is: a probe or last-layer attacker; needs ``fresh``). steps: inner steps K (None: the config's
    ``inner_steps``). lora: a LoRA attacker of this rank: only fresh low-rank factors (peft's initialisation and
    scale, lora_alpha = 2 * rank) on every linear layer but the head (``Task.lora_targets``) take the inner steps,
    the model's own weights stay as they are; the meta-gradient is taken at the adapted weights (mode="reference").
    """
    optimizer: str = "sgd"
    lr: float = 1e-4
    batch_size: int = 150
    query_size: int = 20
    reinit_head: Optional[bool] = None
    momentum: float = 0.9
    betas: Sequence[float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    steps: Optional[int] = None
    fresh: Optional[str] = None
    train: str = "all"
    lora: Optional[int] = None

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.fresh not in (None, "head", "block"):
            raise ValueError(f"Strategy.fresh must be None, 'head' or 'block', got {self.fresh!r}")
        if self.train not in ("all", "fresh") or (self.train == "fresh" and not self.fresh):
            raise ValueError(f"Strategy.train must be 'all', or 'fresh' with fresh set; got train={self.train!r}, "
                             f"fresh={self.fresh!r}")
        if self.lora is not None and (isinstance(self.lora, bool) or not isinstance(self.lora, int) or self.lora < 1
                                      or self.fresh or self.reinit_head):
            raise ValueError(f"Strategy.lora must be a rank >= 1, without fresh or reinit_head; got lora={self.lora!r}, "
                             f"fresh={self.fresh!r}, reinit_head={self.reinit_head!r}")
        if self.fresh and self.reinit_head:
            raise ValueError("Strategy: fresh and reinit_head both re-initialise the head; set one of them")
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"Strategy.optimizer must be one of {INNER_OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"Strategy.lr must be > 0, got {self.lr}")
        if not 0 < self.query_size < self.batch_size:
            raise ValueError(f"Strategy needs 0 < query_size < batch_size, got {self.query_size} / {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Strategy.steps must be >= 1, got {self.steps}")


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
    "unrolled" (the exact derivative through the attacker's steps, second order; mode="reference" only, memory
    O(K); see ``sophon_fast.engine.modes.ReferenceMode``).
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
        if self.meta_gradient == "unrolled" and self.mode != "reference":
            raise ValueError("ProtectConfig.meta_gradient='unrolled' keeps every inner step's graph, which the fast "
                             "mode's flat arena exists to drop: use mode='reference'")
        for name in ("fts_optimizer", "ntr_optimizer"):
            if getattr(self, name) not in OUTER_OPTIMIZERS:
                raise ValueError(f"ProtectConfig.{name} must be one of {OUTER_OPTIMIZERS}, got {getattr(self, name)!r}")
        if self.strategies is not None:
            self.strategies = [s if isinstance(s, Strategy) else Strategy(**s) for s in self.strategies]
            if not self.strategies:
                raise ValueError("ProtectConfig.strategies is empty (None gives the reference strategy)")
            if self.mode != "reference" and any(s.fresh or s.lora for s in self.strategies):
                raise ValueError("ProtectConfig: a strategy with fresh layers or LoRA factors needs mode='reference' "
                                 "(the fast modes' flat buffers have no slot for tensors that are not the model's)")
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
        strategies = [dataclasses.replace(s, reinit_head=(False if s.fresh or s.lora else reinit) if s.reinit_head is None
                                          else s.reinit_head) for s in strategies]
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
            [{**dataclasses.asdict(s), "betas": list(s.betas)} for s in self.strategies]
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
