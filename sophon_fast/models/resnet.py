"""ResNets (basic blocks, BatchNorm) for small Nx{in_channels}xHxW inputs.

CIFAR-style stem: one 3x3 conv, stride 1, no max-pool; the first stage keeps the resolution and each
later stage halves it; global average pooling, then ``head``, the last Linear in module order.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``len(widths)`` stages of ``blocks[i]`` basic blocks of width ``widths[i]``."""

    def __init__(self, num_classes: int, in_channels: int, widths: Sequence[int], blocks: Sequence[int]):
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"widths {tuple(widths)} and blocks {tuple(blocks)} differ in length")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else w, w, 2 if (b == 0 and i > 0) else 1)
                                          for b in range(n)]))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet_narrow(num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64),
                  blocks: Sequence[int] = (3, 3, 3)) -> ResNet:
    """ResNet-20 layout (3 stages x 3 blocks, widths 16-32-64), ~0.27M parameters."""
    return ResNet(num_classes, in_channels, widths, blocks)


def resnet18_width(num_classes: int = 10, in_channels: int = 1, width: int = 64) -> ResNet:
    """ResNet-18 layout (4 stages x 2 blocks, widths width*(1, 2, 4, 8)); width 64 gives ~11.2M parameters."""
    return ResNet(num_classes, in_channels, [width * m for m in (1, 2, 4, 8)], (2, 2, 2, 2))
