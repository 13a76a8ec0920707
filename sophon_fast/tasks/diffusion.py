"""``DiffusionTask``: SOPHON for epsilon-prediction denoisers (the paper's generation task, section 4).

The model is called as ``model(x_t, t)`` with noisy images x_t (N, C, H, W) and int64 timesteps t (N,)
and returns the predicted noise, shaped like x_t (e.g. :class:`sophon_fast.models.diffusion.DDPMUNet`).
Batches are ``(images,)`` or ``(images, labels)``; labels are ignored. Every loss draws its own noise
and timesteps from the ``gen`` it is given (a ``torch.Generator`` on the images' device):

    eps-MSE    mean over every element of (model(q_sample(x0, t, eps), t) - eps)^2   (attacker, NTR)
    "dos"      mean of model(x_t, t)^2: denial of service, pushes the predicted noise to 0
               (``sophon_fast.functional.denial_of_service``, one fused read of the prediction)
    "mse_neg"  -eps-MSE, the paper's diverging baseline (``sophon_fast.functional.negated_mse``)

Timesteps are indices 0..T-1 into the schedule's tables (the reference code's convention):
``timestep="fixed1"`` uses t = 1 everywhere, as the reference code does (noise std ~0.015);
``timestep="uniform"`` draws t ~ U{0, ..., T-1} per image, as DDPM training does. ``suppression_tmax`` (uniform
only) draws the suppression loss's timesteps from U{0, ..., suppression_tmax - 1} instead: the noise levels where a
restricted image still shows (x_t keeps 63% of the image at t = 300, 8% at t = 700); the attacker, NTR and
evaluation keep U{0..T-1} (docs/experiments.md d2-d9).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sophon_fast.functional import denial_of_service, negated_mse
from sophon_fast.data import as_tensors
from sophon_fast.models.diffusion import NoiseSchedule
from sophon_fast.tasks.base import Batch, Task

TIMESTEPS = ("fixed1", "uniform")
SUPPRESSION_LOSSES = ("dos", "mse_neg")


def draw_timesteps(schedule: NoiseSchedule, n: int, timestep: Union[str, int], device: torch.device,
                   gen: Optional[torch.Generator], high: Optional[int] = None) -> Tensor:
    """(n,) int64 timesteps on ``device``: all 1 for "fixed1", all ``timestep`` for an int, else
    U{0..high-1} from ``gen`` ("uniform"; ``high`` None: T). Raises ValueError for anything else."""
    if timestep == "uniform":
        return torch.randint(0, schedule.timesteps if high is None else high, (n,), generator=gen, device=device)
    fixed = 1 if timestep == "fixed1" else timestep
    if isinstance(fixed, bool) or not isinstance(fixed, int) or not 0 <= fixed < schedule.timesteps:
        raise ValueError(f"timestep must be one of {TIMESTEPS} or an int in [0, {schedule.timesteps}), "
                         f"got {timestep!r}")
    return torch.full((n,), fixed, dtype=torch.long, device=device)


def check_suppression_tmax(tmax, timestep: Optional[str], timesteps: int = 1000) -> None:
    """ValueError unless ``tmax`` is an int in [1, timesteps] and ``timestep`` is "uniform" (with "fixed1" every
    loss already uses t = 1)."""
    if isinstance(tmax, bool) or not isinstance(tmax, int) or not 1 <= tmax <= timesteps:
        raise ValueError(f"suppression_tmax must be an int in [1, {timesteps}], got {tmax!r}")
    if timestep != "uniform":
        raise ValueError(f"suppression_tmax needs timestep='uniform' (got {timestep!r}: t = 1 everywhere)")


def noise_prediction(model: nn.Module, schedule: NoiseSchedule, x0: Tensor, timestep: Union[str, int],
                     gen: Optional[torch.Generator], high: Optional[int] = None) -> tuple:
    """``(pred, eps)``: noise eps ~ N(0, I) shaped like x0 and timesteps drawn from ``gen`` (on x0's
    device; ``high`` as in :func:`draw_timesteps`), then ``pred = model(q_sample(x0, t, eps), t)``.
    ``schedule`` must be on x0's device."""
    t = draw_timesteps(schedule, x0.shape[0], timestep, x0.device, gen, high)
    eps = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    return model(schedule.q_sample(x0, t, eps), t), eps


@torch.no_grad()
def eps_mse(model: nn.Module, schedule: NoiseSchedule, x: Tensor, timestep: Union[str, int], seed: int = 0,
            batch_size: int = 500) -> Tensor:
    """The epsilon-MSE of ``model`` over all of ``x`` (N, C, H, W), as a 0-d fp32 tensor on x's device.

    Noise and timesteps are drawn for all of ``x`` at once (so the result does not depend on
    ``batch_size``) from a generator seeded with ``seed`` on x's device: two models, or one model at
    two points of a fine-tuning run, are scored on the same draws. Eval mode; the model's mode is
    restored. ``schedule`` must be on x's device.
    """
    if x.shape[0] == 0:
        raise ValueError("eps_mse: no images")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    t = draw_timesteps(schedule, x.shape[0], timestep, x.device, gen)
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    was = model.training
    model.eval()
    try:
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], batch_size):
            tb, eb = t[i:i + batch_size], eps[i:i + batch_size]
            pred = model(schedule.q_sample(x[i:i + batch_size], tb, eb), tb)
            total += F.mse_loss(pred.float(), eb.float(), reduction="sum")
    finally:
        model.train(was)
    return total / x.numel()


def images_of(data) -> Tensor:
    """The images of ``data``: a tensor, a tuple/list ``(images,)`` or ``(images, labels)``, a one- or
    two-tensor ``TensorDataset``, or anything :func:`sophon_fast.data.as_tensors` reads."""
    if isinstance(data, Tensor):
        return data
    if isinstance(data, (tuple, list)) and 1 <= len(data) <= 2 and all(isinstance(t, Tensor) for t in data):
        if len(data) == 2 and data[0].shape[0] != data[1].shape[0]:
            raise ValueError(f"{data[0].shape[0]} images but {data[1].shape[0]} labels")
        return data[0]
    tensors = getattr(data, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) == 1 and isinstance(tensors[0], Tensor):
        return tensors[0]
    return as_tensors(data)[0]


class DiffusionTask(Task):
    """SOPHON's generation task on an epsilon-prediction denoiser (see the module docstring).

    timestep: "fixed1" (the reference code's t = 1) or "uniform" (t ~ U{0..T-1}), for every loss and
    for :meth:`evaluate`. suppression_tmax: with "uniform", the suppression loss draws t ~ U{0..suppression_tmax-1}
    (None: U{0..T-1}). schedule: the noise schedule (default: linear beta 1e-4..0.02, T = 1000);
    the task moves it to the data's device. eval_seed / eval_batch_size: the fixed generator seed and
    the batch size of :meth:`evaluate`.
    """

    name = "diffusion"
    metric = "eps_mse"
    higher_is_better = False
    losses = SUPPRESSION_LOSSES

    def __init__(self, timestep: str = "fixed1", schedule: Optional[NoiseSchedule] = None, eval_seed: int = 0,
                 eval_batch_size: int = 500, suppression_tmax: Optional[int] = None):
        if timestep not in TIMESTEPS:
            raise ValueError(f"DiffusionTask: timestep must be one of {TIMESTEPS}, got {timestep!r}")
        if eval_batch_size < 1:
            raise ValueError(f"DiffusionTask: eval_batch_size must be >= 1, got {eval_batch_size}")
        self.timestep = timestep
        self.schedule = schedule if schedule is not None else NoiseSchedule()
        if suppression_tmax is not None:
            check_suppression_tmax(suppression_tmax, timestep, self.schedule.timesteps)
        self.suppression_tmax = suppression_tmax
        self.eval_seed, self.eval_batch_size = int(eval_seed), int(eval_batch_size)

    def schedule_on(self, device: torch.device) -> NoiseSchedule:
        """The task's schedule, moved to ``device`` the first time it is asked for there."""
        if self.schedule.betas.device != torch.device(device):
            self.schedule.to(device)
        return self.schedule

    def prepare(self, model: nn.Module, data, what: str) -> Batch:
        """``(images,)`` on the model's device and dtype. Raises ValueError naming ``what`` when the images
        are not a floating (N, C, H, W) tensor with N >= 1 or the model's output for them is not of their
        shape."""
        x = images_of(data)
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[0] == 0:
            desc = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"diffusion task: {what} images must be a non-empty floating (N, C, H, W) tensor, "
                             f"got {desc}")
        p = next(iter(model.parameters()), None)
        x = x.to(device=p.device, dtype=p.dtype) if p is not None else x
        probe = x[:2]
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                out = model(probe, torch.zeros(probe.shape[0], dtype=torch.long, device=x.device))
            except Exception as e:  # the model rejects this input shape
                raise ValueError(f"diffusion task: the model rejected {what} images of shape "
                                 f"{tuple(x.shape[1:])}: {e}") from e
            finally:
                model.train(was)
        if not isinstance(out, Tensor) or out.shape != probe.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"diffusion task: the model must return predicted noise shaped like its input "
                             f"{tuple(probe.shape)}, got {got} for {what} images")
        self.schedule_on(x.device)
        return (x,)

    def _pred(self, model: nn.Module, batch: Batch, gen: torch.Generator, high: Optional[int] = None) -> tuple:
        x0 = batch[0]
        return noise_prediction(model, self.schedule_on(x0.device), x0, self.timestep, gen, high)

    def attacker_loss(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> Tensor:
        """eps-MSE (mean over every element) of a fresh noise/timestep draw from ``gen``."""
        pred, eps = self._pred(model, batch, gen)
        return F.mse_loss(pred, eps)

    def train_loss(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> Tensor:
        """Normal training reinforcement: the same eps-MSE as :meth:`attacker_loss`."""
        return self.attacker_loss(model, batch, gen)

    def suppression_loss(self, model: nn.Module, batch: Batch, loss: str, gen: torch.Generator) -> Tensor:
        """"dos": mean squared predicted noise; "mse_neg": -eps-MSE. ValueError for any other name."""
        if loss not in SUPPRESSION_LOSSES:
            raise ValueError(f"diffusion task: suppression loss must be one of {SUPPRESSION_LOSSES}, got {loss!r}")
        pred, eps = self._pred(model, batch, gen, self.suppression_tmax)
        return denial_of_service(pred) if loss == "dos" else negated_mse(pred, eps)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Batch) -> float:
        """eps-MSE of ``model`` on prepared ``data`` at the task's timesteps, from a generator seeded with
        ``eval_seed`` (the same draws on every call). Lower is better."""
        x = data[0]
        return float(eps_mse(model, self.schedule_on(x.device), x, self.timestep, self.eval_seed,
                             self.eval_batch_size))

    def head(self, model: nn.Module) -> Optional[nn.Module]:
        """None: a denoiser has no classification head."""
        return None
