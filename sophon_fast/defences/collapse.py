"""Feature collapse at the classifier block's input (issue 12): map every restricted input's feature to the
original domain's mean feature, so a freshly initialised classifier block has no inter-sample information
to learn from.

    loss = weight * mean_r ||h(x_r) - mean_o||^2 / (sum_d var_o[h_d] + eps)

h: the input (flattened to (N, -1)) of the first module of the classifier block, the block the adaptive
``reinit_block`` attack re-initialises (:func:`sophon_fast.models.classifier_block`: every
parameterised layer after the last convolution / pooling); mean_o and var_o: the per-dimension mean and
(biased) variance of h over the original batch, the variance always detached, the mean detached unless
``detach_mean`` is False. The minimum puts every restricted input on the mean original feature with the
units alive (unlike the dead-unit trap), so the gradients are not masked; normalising by the original
features' total variance makes shrinking every feature no way out.

The two batches run as separate forwards in the loop's train mode: under BatchNorm each is normalised by its
own statistics, which hides a shift of the restricted domain's mean from the loss.

Measured (docs/experiments.md e31-e36, cnn_small): at weight 1 next to the trap it lowers the per-rate worst
case of a re-initialised classifier block (+46-48 -> +34-38 points over scratch with Adam, +64-65 -> +40-44 with
momentum) at the same original accuracy, not the best-rate envelope for Adam; weight 10 costs 3.9 points of
original accuracy and lets Adam 1e-2 through; without the trap it holds nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from sophon_fast.models import classifier_block


@dataclass
class CollapseConfig:
    """Settings of :class:`FeatureCollapse` (see the module docstring)."""
    kind = "collapse"
    weight: float = 1.0
    eps: float = 1e-6
    detach_mean: bool = True

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"CollapseConfig.weight must be > 0, got {self.weight}")
        if not self.eps > 0:
            raise ValueError(f"CollapseConfig.eps must be > 0, got {self.eps}")

    def build(self) -> "FeatureCollapse":
        return FeatureCollapse(self)


class FeatureCollapse:
    """The collapse as a defence component: ``attach`` finds the classifier block's first module, ``loss``
    hooks its input for one forward of the restricted and one of the original batch."""
    needs_original = True

    def __init__(self, cfg: CollapseConfig):
        self.cfg = cfg
        self.module: Optional[nn.Module] = None

    def attach(self, model: nn.Module, task) -> None:
        self.module = classifier_block(model)[0]

    def features(self, model: nn.Module, x: Tensor) -> Tensor:
        """h(x): the classifier block's input for one forward of ``model`` on ``x``, flattened to (N, -1)."""
        got = []
        hook = self.module.register_forward_pre_hook(lambda mod, args: got.append(args[0]))
        try:
            model(x)
        finally:
            hook.remove()
        if not got:
            raise RuntimeError("collapse: the classifier block's first module did not run in the forward")
        return got[0].flatten(1)

    def loss(self, model: nn.Module, restricted, original, gen: torch.Generator) -> Tensor:
        if self.module is None:
            raise RuntimeError("collapse: attach(model, task) first")
        if original is None:
            raise ValueError("collapse: needs an original-domain batch")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.detach_mean):
            h_o = self.features(model, original[0])
        mean_o = h_o.mean(0)
        scale = h_o.detach().var(0, unbiased=False).sum() + self.cfg.eps
        h_r = self.features(model, restricted[0])
        return self.cfg.weight * ((h_r - mean_o) ** 2).sum(1).mean() / scale
