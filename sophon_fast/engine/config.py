"""Configuration of a protection run: ``ProtectConfig`` and the simulated fine-tuning ``Strategy``.

Defaults are the SOPHON reference code's (classification/inverse_loss.py, kl_uniform_loss.py):
FTS Adam lr alpha*1e-4, NTR Adam lr beta*1e-4 (ICE: alpha 3, beta 5, 1 NTR step, head re-init in the
simulated attacker; KLU: alpha 1, beta 1, 5 NTR steps), K = 50 inner steps of plain SGD lr 1e-4 on
fresh restricted batches of 150 (130 support / 20 query), meta-gradient clipped to norm 0.5,
rollback and stop when original accuracy <= 80%.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

LOSSES = ("ice", "ice_reference_code", "klu", "neg_entropy")
INNER_OPTIMIZERS = ("sgd", "momentum", "adam")
OUTER_OPTIMIZERS = ("adam", "sgd")
MODES = ("fast", "reference")


@dataclass
class Strategy:
    """One simulated fine-tuning environment (the paper's N environments; the code has one).

    optimizer: "sgd" | "momentum" | "adam" (torch semantics; momentum uses ``momentum`` as beta,
    dampening 0). lr: its learning rate. batch_size: restricted samples per inner step, of which the
    last ``query_size`` form the query batch. reinit_head: re-initialise the clone's final Linear
    (xavier_uniform weight, zero bias) before the trajectory. steps: inner steps K (None: the
    config's ``inner_steps``). warmup_steps: attacker steps taken before the suppressed window
    (their query losses are not used), so the suppression acts deeper into a fine-tuning run than K
    steps reach: a long horizon at the cost of support passes only.
    """
    optimizer: str = "sgd"
    lr: float = 1e-4
    batch_size: int = 150
    query_size: int = 20
    reinit_head: bool = False
    momentum: float = 0.9
    betas: Sequence[float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    steps: Optional[int] = None
    warmup_steps: int = 0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)

    def validate(self) -> None:
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"Strategy.optimizer must be one of {INNER_OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"Strategy.lr must be > 0, got {self.lr}")
        if not 0 < self.query_size < self.batch_size:
            raise ValueError(f"Strategy needs 0 < query_size < batch_size, got {self.query_size} / {self.batch_size}")
        if self.warmup_steps < 0:
            raise ValueError(f"Strategy.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Strategy.steps must be >= 1, got {self.steps}")


@dataclass
class ProtectConfig:
    """Everything in the reference loop, with the reference defaults (None = loss-dependent default)."""
    loss: str = "ice"
    mode: str = "fast"
    iterations: int = 1000
    inner_steps: int = 50
    base_lr: float = 1e-4
    alpha: Optional[float] = None          # FTS lr = alpha * base_lr  (ICE 3, KLU/neg_entropy 1)
    beta: Optional[float] = None           # NTR lr = beta * base_lr   (ICE 5, KLU/neg_entropy 1)
    fts_optimizer: str = "adam"
    ntr_optimizer: str = "adam"
    strategies: Optional[List[Strategy]] = None   # None: one SGD strategy with inner_lr / batch_size
    inner_lr: float = 1e-4
    batch_size: int = 150
    query_size: int = 20
    reinit_head: Optional[bool] = None     # default strategy only: ICE True (reference), else False
    trajectories: int = 1                  # simulated trajectories per outer iteration
    strategy_sampling: str = "cycle"       # "cycle" | "random"
    restricted_sampling: str = "each"      # several restricted domains: "each" | "random"
    step_weighting: str = "uniform"        # "uniform" (reference) | "linear" (late steps weigh more)
    feature_weight: float = 0.0            # + weight * a restricted-feature loss on the head's input (at theta)
    feature_loss: str = "collapse"         # "collapse": spread / size; "energy": size relative to original's;
                                           # "margin": hinge keeping the head-input ReLUs off by feature_margin
    feature_margin: float = 1.0            # "margin" only: how far below 0 the pre-activations are pushed
    feature_decay: float = 0.0             # "margin" only: also hinge at body weights soft-thresholded by
    feature_decay_samples: int = 1         #   s ~ U(0, feature_decay), this many s per iteration (the path of
                                           #   Adam/RMSprop with L2 weight decay on dead units)
    feature_decay_st: bool = False         #   straight-through gradient of the soft-threshold (else exact: 0
                                           #   for weights already decayed to 0)
    feature_robust: float = 0.0            # margin hinge: also survive a change of this size in every weight of
                                           #   the Linear producing the head's input (margin + robust*(|h|_1+1))
    feature_inner_weight: float = 0.0      # + this weight * the margin hinge on every query batch at theta'_k
                                           #   (inside the simulated fine-tuning; uses feature_margin)
    ntr_steps: Optional[int] = None        # ICE 1, KLU/neg_entropy 5
    ntr_batch_size: int = 150
    clip_norm: Optional[float] = 0.5
    original_acc_floor: Optional[float] = 0.8
    eval_every: int = 10
    eval_size: Optional[int] = 2000        # original-test samples per scheduled evaluation (None: all)
    max_nonfinite: int = 5                 # consecutive skipped iterations before stopping
    seed: int = 0
    device: str = "cpu"
    head: Optional[str] = None             # module name of the final Linear (None: the last nn.Linear)
    in_place: bool = False
    progress: Optional[bool] = None        # None: on when stderr is a TTY
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 10
    resume: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"ProtectConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.mode not in MODES:
            raise ValueError(f"ProtectConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("fts_optimizer", "ntr_optimizer"):
            if getattr(self, name) not in OUTER_OPTIMIZERS:
                raise ValueError(f"ProtectConfig.{name} must be one of {OUTER_OPTIMIZERS}")
        ice = self.loss.startswith("ice")
        if self.alpha is None:
            self.alpha = 3.0 if ice else 1.0
        if self.beta is None:
            self.beta = 5.0 if ice else 1.0
        if self.ntr_steps is None:
            self.ntr_steps = 1 if ice else 5
        if self.reinit_head is None:
            self.reinit_head = ice
        if self.strategies is None:
            self.strategies = [Strategy("sgd", self.inner_lr, self.batch_size, self.query_size, self.reinit_head)]
        self.strategies = [s if isinstance(s, Strategy) else Strategy(**s) for s in self.strategies]
        if not self.strategies:
            raise ValueError("ProtectConfig.strategies is empty")
        for s in self.strategies:
            s.validate()
        checks = [("iterations", self.iterations >= 0), ("inner_steps", self.inner_steps >= 1),
                  ("trajectories", self.trajectories >= 1), ("ntr_steps", self.ntr_steps >= 0),
                  ("eval_every", self.eval_every >= 1), ("checkpoint_every", self.checkpoint_every >= 1),
                  ("ntr_batch_size", self.ntr_batch_size >= 1), ("max_nonfinite", self.max_nonfinite >= 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"ProtectConfig.{name} has an invalid value {getattr(self, name)!r}")
        if self.strategy_sampling not in ("cycle", "random"):
            raise ValueError("ProtectConfig.strategy_sampling must be 'cycle' or 'random'")
        if self.restricted_sampling not in ("each", "random"):
            raise ValueError("ProtectConfig.restricted_sampling must be 'each' or 'random'")
        if self.step_weighting not in ("uniform", "linear"):
            raise ValueError("ProtectConfig.step_weighting must be 'uniform' or 'linear'")
        if self.feature_loss not in ("collapse", "energy", "margin"):
            raise ValueError("ProtectConfig.feature_loss must be 'collapse', 'energy' or 'margin'")
        if not self.feature_margin >= 0:
            raise ValueError("ProtectConfig.feature_margin must be >= 0")
        if not self.feature_robust >= 0:
            raise ValueError("ProtectConfig.feature_robust must be >= 0")
        if not self.feature_inner_weight >= 0:
            raise ValueError("ProtectConfig.feature_inner_weight must be >= 0")
        if not self.feature_decay >= 0 or self.feature_decay_samples < 1:
            raise ValueError("ProtectConfig.feature_decay must be >= 0 and feature_decay_samples >= 1")
        if self.feature_weight < 0:
            raise ValueError("ProtectConfig.feature_weight must be >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("ProtectConfig.clip_norm must be > 0 or None")

    @property
    def fts_lr(self) -> float:
        return self.alpha * self.base_lr

    @property
    def ntr_lr(self) -> float:
        return self.beta * self.base_lr

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strategies"] = [dataclasses.asdict(s) for s in self.strategies]
        for s in d["strategies"]:
            s["betas"] = list(s["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ProtectConfig":
        d = dict(d)
        d["strategies"] = [Strategy(**s) for s in d.get("strategies") or []] or None
        return cls(**d)

