"""Fine-tuning attacks on denoisers: the generation counterpart of :mod:`sophon_fast.attacks.run`.

An attack fine-tunes every parameter of a copy of the denoiser on restricted images with the DDPM
loss (eps-MSE at the attack's timesteps, noise and timesteps from a seeded generator) and a
``torch.optim`` optimiser at a constant learning rate. The metric is the eps-MSE on the restricted
test images (lower = better denoising = a more successful attack), measured before training (step 0)
and every ``eval_every`` steps, twice: averaged over uniform timesteps and at the reference code's t = 1.
:func:`evaluate_suite` runs each attack on the protected model, the unprotected model and ``scratch``
(the same architecture freshly initialised, trained by the same attack) on the same batches and draws,
and can save a PNG grid of samples from each attacked model (full T-step ancestral sampling).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sophon_fast.attacks.run import scratch
from sophon_fast.attacks.spec import OPTIMIZERS, Attack
from sophon_fast.models import model_device
from sophon_fast.models.diffusion import NoiseSchedule
from sophon_fast.tasks.diffusion import TIMESTEPS, eps_mse, images_of, noise_prediction

METRIC = "eps_mse"


@dataclass(frozen=True)
class DiffusionAttack:
    """One fine-tuning recipe for a denoiser. ``name`` defaults to ``optimizer-lr..-bs..-st..``.

    optimizer: one of :data:`sophon_fast.attacks.spec.OPTIMIZERS` (``momentum`` = SGD with ``momentum``).
    steps: optimiser steps (batches of ``batch_size`` drawn without replacement, reshuffled each pass).
    eval_every: steps between evaluations (step 0 and the last step are always evaluated).
    timestep: the attacker's training timesteps, "uniform" (DDPM training) or "fixed1" (the reference).
    """

    name: Optional[str] = None
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    steps: int = 500
    eval_every: int = 100
    timestep: str = "uniform"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; one of {OPTIMIZERS}")
        if self.timestep not in TIMESTEPS:
            raise ValueError(f"unknown attack timestep {self.timestep!r}; one of {TIMESTEPS}")
        if not (self.lr > 0 and self.batch_size >= 1 and self.steps >= 0 and self.eval_every >= 1
                and self.weight_decay >= 0):
            raise ValueError(f"invalid diffusion attack hyper-parameters: {self}")
        if self.name is None:
            object.__setattr__(self, "name", f"{self.optimizer}-lr{self.lr:g}-bs{self.batch_size}-st{self.steps}")

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The ``torch.optim`` optimiser of this attack (the classification attacks' construction)."""
        return Attack(optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                      weight_decay=self.weight_decay).make_optimizer(params)

    def eval_points(self) -> List[int]:
        """Steps after which the model is evaluated: 0, eval_every, 2 eval_every, ..., and ``steps``."""
        points = list(range(0, self.steps + 1, self.eval_every))
        return points if points[-1] == self.steps else points + [self.steps]


def suite(quick: bool = False) -> List[DiffusionAttack]:
    """The default attacks: momentum SGD (lr 1e-2, momentum 0.9) and Adam at lr 1e-4 and 1e-3, batch 32,
    800 steps (6.4 passes over the 4,000 MNIST training images), evaluated every 100 steps. ``quick``:
    momentum SGD lr 1e-2 and Adam lr 1e-3, batch 32, 150 steps, evaluated every 50."""
    if quick:
        return [DiffusionAttack(optimizer=o, lr=lr, batch_size=32, steps=150, eval_every=50)
                for o, lr in (("momentum", 1e-2), ("adam", 1e-3))]
    return [DiffusionAttack(optimizer=o, lr=lr, batch_size=32, steps=800, eval_every=100)
            for o, lr in (("momentum", 1e-2), ("adam", 1e-4), ("adam", 1e-3))]


def _finite_or_none(values: Tensor) -> List[Optional[float]]:
    return [v if math.isfinite(v) else None for v in values.tolist()]


def fit(model: nn.Module, images: Tensor, opt: torch.optim.Optimizer, steps: int, batch_size: int,
        timestep: str, schedule: NoiseSchedule, gen: torch.Generator,
        after_step: Optional[Callable[[int], None]] = None) -> None:
    """Train ``model`` in place (train mode) with the DDPM loss: ``steps`` optimiser steps on batches of
    ``batch_size`` rows of ``images`` drawn without replacement (a fresh permutation from ``gen`` when
    fewer than a batch remain), eps-MSE at ``timestep`` ("uniform" or "fixed1") with noise and
    timesteps from ``gen``; ``after_step(step)`` runs after step 1..steps. ``images``, ``schedule`` and
    ``gen`` must be on the model's device."""
    model.train()
    n, bs = images.shape[0], min(batch_size, images.shape[0])
    perm, pos = torch.randperm(n, generator=gen, device=images.device), 0
    for step in range(1, steps + 1):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen, device=images.device), 0
        pred, eps = noise_prediction(model, schedule, images[perm[pos:pos + bs]], timestep, gen)
        pos += bs
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(step)


def run(model: nn.Module, train, test, attack: DiffusionAttack, seed: int = 0,
        schedule: Optional[NoiseSchedule] = None, return_model: bool = False):
    """Fine-tune a copy of ``model`` on the images of ``train`` with ``attack``; restricted ``test`` eps-MSE.

    ``train``/``test``: images (N, C, H, W) as anything :func:`sophon_fast.tasks.diffusion.images_of`
    reads (labels ignored), moved to the model's device. ``schedule`` defaults to the DDPM schedule
    (linear beta 1e-4..0.02, T = 1000). Returns ``{"steps": [...], "uniform": [...], "t1": [...]}``:
    the evaluated steps (:meth:`DiffusionAttack.eval_points`) and the eps-MSE there, averaged over
    uniform timesteps and at t = 1, each from a generator seeded with ``seed`` (the same draws at every
    evaluation and for every model); a non-finite value (a diverged run) is reported as None. With
    ``return_model``, ``(curves, attacked_model)``. ``model`` is not modified; runs with the same
    ``seed`` see the same batches, noise and timesteps.
    """
    device = model_device(model)
    x_train, x_test = images_of(train).to(device), images_of(test).to(device)
    schedule = (schedule if schedule is not None else NoiseSchedule()).to(device)
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    opt = attack.make_optimizer(list(m.parameters()))
    gen = torch.Generator(device=device).manual_seed(seed)
    points, uniform, t1 = attack.eval_points(), [], []

    def evaluate():
        uniform.append(eps_mse(m, schedule, x_test, "uniform", seed))
        t1.append(eps_mse(m, schedule, x_test, 1, seed))

    evaluate()
    fit(m, x_train, opt, attack.steps, attack.batch_size, attack.timestep, schedule, gen,
        lambda step: evaluate() if step in points else None)
    curves = {"steps": points, "uniform": _finite_or_none(torch.stack(uniform)),
              "t1": _finite_or_none(torch.stack(t1))}
    return (curves, m) if return_model else curves


def _grid(images: Tensor, cols: int) -> Tensor:
    """(n, C, H, W) in about [-1, 1] -> one (rows*H, cols*W) or (rows*H, cols*W, C) image in [0, 1]."""
    n, c, h, w = images.shape
    rows = -(-n // cols)
    pad = images.new_full((rows * cols - n, c, h, w), -1.0)
    x = torch.cat([images, pad]).clamp(-1, 1).add(1).div(2)
    x = x.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return x[..., 0] if c == 1 else x


def sample_grid(models_by_name: Dict[str, nn.Module], schedule: NoiseSchedule, n: int, seed: int, path: str,
                title: str = "", shape: Sequence[int] = (1, 28, 28)) -> str:
    """Draw ``n`` samples from each model (full T-step ancestral sampling, a generator seeded with
    ``seed`` on the model's device, so every model starts from the same noise) and save one PNG at
    ``path`` with a labelled panel per model. Returns ``path``. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, inch = min(n, 8), 0.5
    rows = -(-n // cols)
    fig, axes = plt.subplots(1, len(models_by_name), squeeze=False,
                             figsize=(len(models_by_name) * (cols * inch + 0.2), rows * inch + 0.8))
    for ax, (label, model) in zip(axes.flat, models_by_name.items()):
        device = model_device(model)
        gen = torch.Generator(device=device).manual_seed(seed)
        images = schedule.to(device).sample(model, n, shape, gen)
        ax.imshow(_grid(images, cols).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def evaluate_suite(protected: nn.Module, unprotected: Optional[nn.Module], train, test,
                   attacks: Optional[Sequence[DiffusionAttack]] = None, seed: int = 0,
                   schedule: Optional[NoiseSchedule] = None, samples: int = 8, sample_dir: Optional[str] = None,
                   sample_attacks: Optional[int] = None, scratch_model: Optional[nn.Module] = None,
                   say: Optional[Callable[[str], None]] = None) -> dict:
    """Run every attack on ``protected``, ``unprotected`` (skipped when None) and a scratch model.

    ``attacks``: a list of :class:`DiffusionAttack` (None: the default :func:`suite`).
    The scratch model is ``scratch(protected, seed)`` (the same architecture, freshly initialised)
    unless given. All runs of an attack share ``seed``. With ``sample_dir`` and ``samples`` > 0, a PNG
    grid of ``samples`` samples from each attacked model is saved there for the first ``sample_attacks``
    attacks (None: all). ``say`` receives one progress line per attack. Returns (JSON-serialisable)::

        {"metric": "eps_mse", "higher_is_better": False, "attacks": [
            {"name", "optimizer", "lr", "batch_size", "train_steps", "eval_every", "timestep", "momentum",
             "weight_decay", "steps": [evaluated steps], "protected": [eps-MSE, uniform t], "unprotected",
             "scratch", "protected_t1": [eps-MSE at t = 1], "unprotected_t1", "scratch_t1",
             "samples": PNG file name in sample_dir or None, "seconds"}, ...]}

    ``unprotected`` and ``unprotected_t1`` are None when no unprotected model is given.
    """
    if attacks is None:
        attacks = suite()
    schedule = schedule if schedule is not None else NoiseSchedule()
    base = scratch_model if scratch_model is not None else scratch(protected, seed)
    shape = tuple(images_of(test).shape[1:])
    rows = []
    for i, attack in enumerate(attacks):
        t0 = time.perf_counter()
        row = {k: v for k, v in dataclasses.asdict(attack).items() if k != "steps"}
        row["train_steps"] = attack.steps
        attacked = {}
        for key, model in (("protected", protected), ("unprotected", unprotected), ("scratch", base)):
            if model is None:
                row[key] = row[f"{key}_t1"] = None
                continue
            curves, attacked[key] = run(model, train, test, attack, seed, schedule, return_model=True)
            row["steps"], row[key], row[f"{key}_t1"] = curves["steps"], curves["uniform"], curves["t1"]
        row["samples"] = None
        if sample_dir is not None and samples > 0 and (sample_attacks is None or i < sample_attacks):
            name = f"samples_{i:02d}_{attack.name}.png"
            sample_grid(attacked, schedule, samples, seed, os.path.join(sample_dir, name),
                        f"after {attack.name}", shape)
            row["samples"] = name
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if say is not None:
            fmt = lambda v: "diverged" if v is None else f"{v:.4f}"   # noqa: E731
            say(f"[attack] {attack.name}: final eps-MSE protected {fmt(row['protected'][-1])}, unprotected "
                f"{fmt(row['unprotected'][-1]) if row['unprotected'] else '-'}, scratch {fmt(row['scratch'][-1])} "
                f"({row['seconds']:.0f} s)")
    return {"metric": METRIC, "higher_is_better": False, "attacks": rows}
