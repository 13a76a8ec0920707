"""The public recipes: protection settings that were measured, as functions returning a :class:`ProtectConfig`.

    adaptive(model)          image classifiers, against attackers who adapt (the image demo's recipe)
    trap(model)              image classifiers, against attackers who fine-tune what was released (fast mode)
    language_model(quick)    Hugging Face causal language models (the language-model demo's recipe)
    diffusion(quick)         DDPM denoisers (the diffusion demo's recipe)

Each returns a ``ProtectConfig``; change any setting with ``.replace(...)`` (``iterations=``, ``seed=``,
``checkpoint=``...). ``RECIPES`` maps the names ``sophon-fast protect --config NAME`` accepts to these functions.
What each recipe holds against, and what it does not, is in docs/image-classification.md,
docs/language-models.md and docs/diffusion.md.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn

from sophon_fast.defences import TrapConfig
from sophon_fast.engine import Evaluation, ProtectConfig, Strategy

# The adaptive recipe's simulated attackers, taking turns: Adam 1e-3 and momentum 1e-2 (K = 40) from a freshly drawn
# classifier block, Adam 1e-3 on the model as it is, and two probe attackers that train only a fresh head
# (momentum 1e-2 for K = 40, Adam 1e-3).
ADAPTIVE_STRATEGIES = (Strategy("adam", lr=1e-3, attacker="fresh_block"),
                       Strategy("momentum", lr=1e-2, attacker="fresh_block", steps=40),
                       Strategy("adam", lr=1e-3, attacker="as_is"),
                       Strategy("momentum", lr=1e-2, attacker="probe", steps=40),
                       Strategy("adam", lr=1e-3, attacker="probe"))


def has_batchnorm(model: Optional[nn.Module]) -> bool:
    """Whether ``model`` holds a BatchNorm layer (False for None)."""
    return model is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _image_evaluation() -> Evaluation:
    # the original-domain test accuracy every 10 iterations on 2,000 samples; roll back after a 10% relative drop
    return Evaluation(every=10, size=2000, max_drop=0.1)


def adaptive(model: Optional[nn.Module] = None, iterations: Optional[int] = None) -> ProtectConfig:
    """Image classifiers against attackers who adapt: ICE (alpha 10, beta 5), K = 20, the five simulated attackers
    of ``ADAPTIVE_STRATEGIES`` with the meta-gradient unrolled through their steps (on the fast path: memory flat in K
    but for the snapshots), 3 NTR steps, no trap. ``iterations`` (None): 1,000, or 400 when ``model`` has BatchNorm (the count measured there).

    Measured (docs/image-classification.md): holds the paper's attack and the default fine-tuning suite and puts
    the re-initialised-block attacks near where a random initialisation is on a small CNN; part of the head start
    remains on a BatchNorm network and on other restricted datasets. In the reference mode it was measured at about
    1.6 s per iteration on a 0.1M-parameter CNN on 2 CPU cores.
    """
    default = 400 if has_batchnorm(model) else 1000
    return ProtectConfig(loss="ice", alpha=10.0, beta=5.0, inner_steps=20, mode="fast", meta_gradient="unrolled",
                         strategies=list(ADAPTIVE_STRATEGIES), ntr_steps=3,
                         iterations=default if iterations is None else iterations, evaluation=_image_evaluation())


def trap(model: Optional[nn.Module] = None, iterations: Optional[int] = None) -> ProtectConfig:
    """Image classifiers against attackers who fine-tune what was released: ICE (alpha 10, beta 5), K = 20, inner
    SGD 1e-3 / momentum 1e-2 / Adam 1e-3 taking turns (each re-initialising the head), 3 NTR steps (6 with BatchNorm),
    plus the dead-unit trap (:class:`sophon_fast.defences.TrapConfig`: the head-input ReLUs of restricted inputs kept
    off by a margin of 3, also under a 0.002 sign step and along the weight-decay path); fast mode; 400 iterations.

    It makes fine-tuning's gradient vanish below the head; an attacker who re-initialises the classifier block or
    fine-tunes on benign data first gets the head start back (docs/image-classification.md). Needs an ``nn.ReLU``
    right before the head and an ``nn.Linear`` before that.
    """
    strategies = [Strategy("sgd", lr=1e-3, attacker="reinit_head"), Strategy("momentum", lr=1e-2, attacker="reinit_head"),
                  Strategy("adam", lr=1e-3, attacker="reinit_head")]
    defence = TrapConfig(weight=0.05, margin=3.0, robust=0.002, decay=1.0, straight_through=True)
    return ProtectConfig(loss="ice", alpha=10.0, beta=5.0, inner_steps=20, strategies=strategies,
                         ntr_steps=6 if has_batchnorm(model) else 3, defences=[defence],
                         iterations=400 if iterations is None else iterations, evaluation=_image_evaluation())


def language_model(quick: bool = False) -> ProtectConfig:
    """Causal language models (``task="lm"``): ICE over the vocabulary against two simulated Adam attackers taking
    turns (lr 2e-3 and 5e-4; 6 support + 2 query blocks per step; K = 10; the head kept), alpha = beta = 10, 3 NTR
    steps (``quick``) or 4, NTR batches of 8, rollback when the original loss worsens by more than 5%; 120
    iterations (``quick``) or 200.

    Measured (docs/language-models.md): at the small demo sizes it holds full fine-tuning at lr 1e-4 and 5e-4 and
    keeps the original domain better than unprotected; AdamW at 2e-3 and LoRA pass a model trained from scratch
    within 20-30 steps, and at the larger sizes every attack does within 40-80 steps.
    """
    strategies = [Strategy("adam", lr=lr, batch_size=8, query_size=2, attacker="as_is") for lr in (2e-3, 5e-4)]
    return ProtectConfig(task="lm", loss="ice", inner_steps=10, strategies=strategies, alpha=10.0, beta=10.0,
                         ntr_steps=3 if quick else 4, ntr_batch_size=8, iterations=120 if quick else 200,
                         evaluation=Evaluation(every=10, size=None, max_drop=0.05))


def diffusion(quick: bool = False, evaluation_size: Optional[int] = None) -> ProtectConfig:
    """DDPM denoisers (``task="diffusion"``, uniform timesteps): negated eps-MSE suppression at t < 300 (where a
    restricted x_t still shows the image) over simulated attackers taking turns (momentum SGD 1e-2 and Adam 1e-3;
    32 support + 8 query images; K = 5), alpha 10, beta 2, NTR on batches of 64, rollback when the original eps-MSE
    worsens by more than 10% (measured on ``evaluation_size`` original test images, None: all); 60 iterations with
    10 NTR steps (``quick``) or 200 with 20.

    Measured (docs/diffusion.md): the released denoiser is useless on the restricted domain before fine-tuning and
    keeps the original within 10%, but 10 fine-tuning steps bring it below a denoiser trained from scratch.
    """
    strategies = [Strategy("momentum", lr=1e-2, batch_size=40, query_size=8),
                  Strategy("adam", lr=1e-3, batch_size=40, query_size=8)]
    return ProtectConfig(task="diffusion", loss="mse_neg", timestep="uniform", suppression_tmax=300,
                         iterations=60 if quick else 200, inner_steps=5, strategies=strategies, alpha=10.0, beta=2.0,
                         ntr_steps=10 if quick else 20, ntr_batch_size=64,
                         evaluation=Evaluation(every=10, size=evaluation_size, max_drop=0.10))


RECIPES: Dict[str, Callable[..., ProtectConfig]] = {
    "adaptive": lambda model=None: adaptive(model), "trap": lambda model=None: trap(model),
    "lm": lambda model=None: language_model(), "diffusion": lambda model=None: diffusion()}


def recipe(name: str, model: Optional[nn.Module] = None) -> ProtectConfig:
    """The recipe ``name`` (a key of ``RECIPES``) for ``model``; ``KeyError`` naming the recipes otherwise."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name](model)


__all__ = ["ADAPTIVE_STRATEGIES", "RECIPES", "adaptive", "diffusion", "has_batchnorm", "language_model", "recipe",
           "trap"]
