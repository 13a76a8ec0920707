"""A small DDPM denoiser for 28x28 images and the DDPM noise schedule.

``DDPMUNet`` wraps ``diffusers.UNet2DModel`` (a well-kept UNet with GroupNorm and a sinusoidal timestep
embedding): ``model(x_t, t)`` maps noisy images ``x_t`` (N, C, H, W) float and integer timesteps ``t``
(N,) (or a scalar) to the predicted noise, a tensor of ``x_t``'s shape and dtype. The model is
unconditional and knows nothing of the schedule; ``diffusers`` is imported when a model is built, so
``import sophon_fast`` stays light.

``NoiseSchedule`` is the DDPM forward and reverse process (Ho et al. 2020) with the SOPHON reference
code's settings: linear beta from 1e-4 to 0.02 over T = 1000 steps, timesteps are indices 0..T-1 into
the tables (the reference's "t = 1" is index 1, noise std sqrt(1 - alphas_cumprod[1]) ~= 0.0148), and
the reverse process uses the posterior ("fixed small") variance and clips the predicted x_0 to
[-1, 1]. Its tables are buffers, so ``schedule.to(device)`` / ``.double()`` move or convert them, and
every tensor it creates lives on its tables' device. ``diffusers.DDPMScheduler`` is not used: it keeps
its tables on the host and steps with a Python timestep, where the losses need per-row device
timesteps without host synchronisation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn


class NoiseSchedule(nn.Module):
    """The DDPM noise schedule: ``T`` betas linear in [beta_start, beta_end] (computed in fp64, stored fp32).

    Buffers (all (T,), non-persistent: rebuilt from the three constructor arguments), index t = 0..T-1:
        betas, alphas = 1 - betas, alphas_cumprod = prod_{s<=t} alphas_s, alphas_cumprod_prev (1 at t=0),
        sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
        posterior_variance = betas (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)   (0 at t = 0),
        posterior_log_variance (log of posterior_variance clamped to >= 1e-20),
        posterior_mean_coef1 = betas sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
        posterior_mean_coef2 = (1 - alphas_cumprod_prev) sqrt(alphas) / (1 - alphas_cumprod).
    Raises ValueError unless T >= 2 and 0 < beta_start <= beta_end < 1.
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        if int(timesteps) < 2:
            raise ValueError(f"NoiseSchedule: timesteps must be >= 2, got {timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"NoiseSchedule: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.timesteps, self.beta_start, self.beta_end = int(timesteps), float(beta_start), float(beta_end)
        betas = torch.linspace(beta_start, beta_end, self.timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "betas": betas, "alphas": alphas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "posterior_variance": post_var, "posterior_log_variance": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    def extra_repr(self) -> str:
        return f"T={self.timesteps}, beta={self.beta_start:g}..{self.beta_end:g}"

    @staticmethod
    def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` shaped (N, 1, ..., 1) to broadcast against ``like`` (N, ...), in ``like``'s dtype."""
        return table[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) noise.

        x0, noise: (N, ...) floating, same shape; t: (N,) int64 in [0, T) on the tables' device.
        """
        if x0.shape != noise.shape:
            raise ValueError(f"q_sample: x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
        if t.shape != x0.shape[:1]:
            raise ValueError(f"q_sample: t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
        return (self._at(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The x0 that ``q_sample`` maps to ``x_t`` with noise ``eps``: (x_t - sqrt(1-ac) eps) / sqrt(ac)."""
        return (x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / self._at(
            self.sqrt_alphas_cumprod, t, x_t)

    def posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Mean of q(x_{t-1} | x_t, x0): coef1[t] x0 + coef2[t] x_t."""
        return self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t

    def p_step(self, eps: Tensor, x_t: Tensor, t: int, noise: Optional[Tensor], clip: bool = True) -> Tensor:
        """One ancestral step x_t -> x_{t-1} for a whole batch at Python timestep ``t``: the posterior mean
        at the predicted x0 (clipped to [-1, 1] when ``clip``) plus sqrt(posterior_variance[t]) ``noise``.
        ``eps`` is the predicted noise and ``noise`` fresh standard-normal noise, both shaped like ``x_t``;
        ``noise`` is required for t > 0 and must be None at t = 0 (the last step adds none)."""
        if not 0 <= t < self.timesteps:
            raise ValueError(f"p_step: t must be in [0, {self.timesteps}), got {t}")
        if (noise is None) != (t == 0):
            raise ValueError(f"p_step: noise must be given for t > 0 and None at t = 0 (t = {t})")
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x0 = self.predict_x0(x_t, tt, eps)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean = self.posterior_mean(x0, x_t, tt)
        if t == 0:
            return mean
        return mean + (0.5 * self.posterior_log_variance[t]).exp().to(x_t.dtype) * noise

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, shape: Sequence[int] = (1, 28, 28),
               generator: Optional[torch.Generator] = None, clip: bool = True) -> Tensor:
        """``n`` images (n, *shape) drawn with the full T-step ancestral reverse process of ``model``
        (called as ``model(x_t, t)`` with t (n,) int64, in eval mode; its mode is restored), on the
        tables' device and dtype, from ``generator`` (on that device; None: the global RNG). Values lie
        in about [-1, 1] (the data's range), not clipped at the end."""
        if n < 1:
            raise ValueError(f"sample: n must be >= 1, got {n}")
        device, dtype = self.betas.device, self.betas.dtype
        was = model.training
        model.eval()
        try:
            x = torch.randn((n, *shape), generator=generator, device=device, dtype=dtype)
            for t in reversed(range(self.timesteps)):
                eps = model(x, torch.full((n,), t, dtype=torch.long, device=device))
                noise = torch.randn(x.shape, generator=generator, device=device, dtype=dtype) if t else None
                x = self.p_step(eps, x, t, noise, clip)
        finally:
            model.train(was)
        return x


class DDPMUNet(nn.Module):
    """Epsilon-prediction UNet: ``forward(x_t (N, C, H, W) float, t (N,) int or scalar) -> eps (N, C, H, W)``.

    ``diffusers.UNet2DModel`` with ``len(widths)`` resolution levels (``DownBlock2D``/``UpBlock2D``, no
    attention), ``layers_per_block`` ResNet blocks per level, GroupNorm with ``norm_groups`` groups and
    a positional timestep embedding of width 4 * widths[0]. ``image_size`` must be divisible by
    2 ** (len(widths) - 1) and every width by ``norm_groups`` (ValueError otherwise).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, widths: Sequence[int] = (16, 32),
                 layers_per_block: int = 1, norm_groups: int = 8):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w % norm_groups for w in widths):
            raise ValueError(f"DDPMUNet: every width must be a multiple of norm_groups={norm_groups}, got {widths}")
        if image_size % 2 ** (len(widths) - 1):
            raise ValueError(f"DDPMUNet: image_size {image_size} is not divisible by 2**{len(widths) - 1}")
        from diffusers import UNet2DModel

        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.unet = UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                                block_out_channels=widths, layers_per_block=layers_per_block,
                                down_block_types=("DownBlock2D",) * len(widths),
                                up_block_types=("UpBlock2D",) * len(widths),
                                norm_num_groups=norm_groups, add_attention=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DDPMUNet: expected x of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.unet(x, t, return_dict=False)[0]


def ddpm_unet_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                    widths: Sequence[int] = (16, 32), layers_per_block: int = 1, norm_groups: int = 8) -> DDPMUNet:
    """The registry's ``ddpm_unet_small``: a :class:`DDPMUNet` of 0.16M parameters at the default widths (16, 32).

    ``num_classes`` is part of :func:`sophon_fast.models.build`'s signature and has no meaning for an
    unconditional denoiser: it is accepted and not used.
    """
    del num_classes
    return DDPMUNet(in_channels, image_size, widths, layers_per_block, norm_groups)
