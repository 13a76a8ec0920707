"""Plain convolutional nets and an MLP for Nx{in_channels}x28x28 inputs.

Every model is ``features`` (everything but the classifier) followed by ``head`` (an ``nn.Linear``,
the last Linear in module order). ``image_size`` must be divisible by 4 (by 8 for ``vgg``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """``head(features(x))``; subclasses only build ``features`` and call ``super().__init__``."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_block(cin: int, cout: int, batch_norm: bool) -> list:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    return layers + [nn.ReLU(inplace=True)]


def simple_cnn(num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64), hidden: int = 128,
               batch_norm: bool = False, image_size: int = 28) -> Classifier:
    """Two conv(3x3)-[BN]-ReLU-maxpool(2) stages, then Linear(hidden)-ReLU, then the head."""
    c1, c2 = widths
    side = image_size // 4
    features = nn.Sequential(
        *_conv_block(in_channels, c1, batch_norm), nn.MaxPool2d(2),
        *_conv_block(c1, c2, batch_norm), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(inplace=True))
    return Classifier(features, hidden, num_classes)


def cnn_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> Classifier:
    """16-32 channel CNN, no BatchNorm, ~0.1M parameters."""
    return simple_cnn(num_classes, in_channels, (16, 32), 64, False, image_size)


def cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> Classifier:
    """32-64 channel CNN, no BatchNorm, ~0.42M parameters."""
    return simple_cnn(num_classes, in_channels, (32, 64), 128, False, image_size)


def cnn_bn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> Classifier:
    """``cnn`` with BatchNorm after each convolution (convs lose their bias), ~0.42M parameters."""
    return simple_cnn(num_classes, in_channels, (32, 64), 128, True, image_size)


def vgg(num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128), hidden: int = 256,
        image_size: int = 28) -> Classifier:
    """VGG-style, no BatchNorm: three stages of two conv(3x3)-ReLU and a maxpool, one hidden Linear, ~0.58M."""
    layers, cin = [], in_channels
    for w in widths:
        layers += _conv_block(cin, w, False) + _conv_block(w, w, False) + [nn.MaxPool2d(2)]
        cin = w
    side = image_size // 2 ** len(widths)
    features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True))
    return Classifier(features, hidden, num_classes)


def mlp(num_classes: int = 10, in_channels: int = 1, hidden: Sequence[int] = (256, 128),
        image_size: int = 28) -> Classifier:
    """Flatten, then Linear-ReLU per hidden width, then the head, ~0.24M parameters."""
    layers, d = [nn.Flatten()], in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
        d = h
    return Classifier(nn.Sequential(*layers), d, num_classes)
