"""Small reference architectures for 28x28 inputs, built by name.

``build(name, num_classes, in_channels, **kw)`` returns a model whose classifier is ``model.head``, the
last ``nn.Linear`` in module order, and which records how it was built in ``model.sophon_arch``
(``{"name": ..., "kwargs": {...}}``, JSON-serialisable), so that :func:`sophon_fast.io.load_model`
and the scratch baseline of :mod:`sophon_fast.attacks` can rebuild it.

| name           | layout                                               | BatchNorm | params (10 classes) |
| -------------- | ---------------------------------------------------- | --------- | ------------------- |
| cnn_small      | conv16-pool-conv32-pool-fc64-head                    | no        | 0.11M               |
| cnn            | conv32-pool-conv64-pool-fc128-head                   | no        | 0.42M               |
| cnn_bn         | ``cnn`` with BatchNorm2d after each conv             | yes       | 0.42M               |
| vgg            | (2x conv, pool) at widths 32-64-128, fc256-head      | no        | 0.58M               |
| mlp            | 784-256-128-head                                     | no        | 0.24M               |
| resnet_narrow  | ResNet-20 (3 stages x 3 basic blocks, widths 16-64)  | yes       | 0.27M               |
| resnet18_width | ResNet-18 (2-2-2-2 basic blocks, widths 64-512)      | yes       | 11.2M               |
| ddpm_unet_small| DDPM UNet (diffusers UNet2DModel), widths 16-32      | no (GN)   | 0.16M (no head)     |

``ddpm_unet_small`` (sophon_fast.models.diffusion) is a denoiser ``model(x_t, t) -> eps``, not a classifier.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from sophon_fast.models.convnets import cnn, cnn_bn, cnn_small, mlp, vgg
from sophon_fast.models.diffusion import ddpm_unet_small
from sophon_fast.models.resnet import resnet18_width, resnet_narrow

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    "cnn_small": cnn_small,
    "cnn": cnn,
    "cnn_bn": cnn_bn,
    "resnet_narrow": resnet_narrow,
    "vgg": vgg,
    "mlp": mlp,
    "resnet18_width": resnet18_width,
    "ddpm_unet_small": ddpm_unet_small,
}


def available() -> List[str]:
    """Names accepted by :func:`build`."""
    return list(_BUILDERS)


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def build(name: str, num_classes: int = 10, in_channels: int = 1, seed: Optional[int] = None, **kw) -> nn.Module:
    """A freshly initialised model ``name`` for inputs (N, in_channels, 28, 28) -> logits (N, num_classes).

    ``seed`` (not recorded) makes the initialisation reproducible without touching the global RNG;
    other keyword arguments go to the builder (e.g. ``widths``, ``hidden``, ``width``) and are recorded
    in ``model.sophon_arch``. Raises ``KeyError`` for an unknown name.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(_BUILDERS)}")
    kwargs = {"num_classes": int(num_classes), "in_channels": int(in_channels), **kw}
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        model = _BUILDERS[name](**kwargs)
    model.sophon_arch = {"name": name, "kwargs": {k: _jsonable(v) for k, v in kwargs.items()}}
    return model


def head_of(model: nn.Module) -> nn.Linear:
    """The classifier: ``model.head`` when it is an ``nn.Linear``, else the last ``nn.Linear`` in module order.

    Raises ``ValueError`` when the model has no ``nn.Linear``.
    """
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear to serve as the classification head")
    return linears[-1]


_BLOCK_ENDS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveMaxPool2d)


def classifier_block(model: nn.Module, last: Optional[int] = None) -> List[nn.Module]:
    """The leaf modules with parameters of the classifier block, in module order: those after the last
    convolution / pooling layer, or (``last``) the last ``last`` of all of them. ``ValueError`` when
    that is empty (e.g. a model with no convolution or pooling and ``last`` None)."""
    leaves = [m for m in model.modules() if not list(m.children())]
    with_params = [m for m in leaves if any(True for _ in m.parameters(recurse=False))]
    if last is not None:
        block = with_params[-last:]
    else:
        ends = [i for i, m in enumerate(leaves) if isinstance(m, _BLOCK_ENDS)]
        if not ends:
            raise ValueError(f"{type(model).__name__} has no convolution or pooling layer: pass reinit_last")
        block = [m for m in leaves[ends[-1] + 1:] if any(True for _ in m.parameters(recurse=False))]
    if not block:
        raise ValueError(f"{type(model).__name__}: the classifier block has no parameterised module")
    return block


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["available", "build", "classifier_block", "head_of", "model_device", "num_parameters"]
