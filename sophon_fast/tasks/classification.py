"""Classification: models returning (N, C) logits, batches ``(inputs, labels)``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sophon_fast.data import as_tensors
from sophon_fast.functional import cross_entropy, suppression_loss
from sophon_fast.models import classifier_block, head_of, model_device
from sophon_fast.tasks.base import Batch, Task

LOSSES = ("ice", "ice_reference_code", "klu", "neg_entropy")


def find_head(model: nn.Module, name: Optional[str] = None) -> nn.Linear:
    """The classification head: the module ``name`` if given, else :func:`sophon_fast.models.head_of`
    (``model.head`` when it is an ``nn.Linear``, else the last ``nn.Linear``). Raises ValueError."""
    if name is None:
        return head_of(model)
    mod = dict(model.named_modules()).get(name)
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"head {name!r} is not an nn.Linear module of the model")
    return mod


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` in eval mode (its mode is restored) on a Dataset, DataLoader
    or (X, Y) tuple, computed on the model's device."""
    device = model_device(model)
    x, y = as_tensors(data)
    was = model.training
    model.eval()
    try:
        correct = torch.zeros((), dtype=torch.long, device=device)
        for i in range(0, len(x), batch_size):
            out = model(x[i:i + batch_size].to(device))
            correct += (out.argmax(1) == y[i:i + batch_size].to(device)).sum()
        return int(correct) / len(x)
    finally:
        model.train(was)


class ClassificationTask(Task):
    """Cross-entropy for the attacker and NTR, a logit suppression loss for FTS, top-1 accuracy.

    head: module name of the head (see :func:`find_head`)."""
    name = "classification"
    metric = "accuracy"
    higher_is_better = True
    losses = LOSSES

    def __init__(self, head: Optional[str] = None):
        self.head_name = head

    def prepare(self, model: nn.Module, data, what: str) -> Batch:
        x, y = as_tensors(data)
        if len(x) == 0:
            raise ValueError(f"protect: {what} is empty")
        device = model_device(model)
        dtype = find_head(model, self.head_name).weight.dtype
        x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
        y = y.long().to(device)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x[:2])
        except Exception as e:  # the model rejects this input shape
            raise ValueError(f"protect: the model rejected {what} inputs of shape {tuple(x.shape[1:])}: {e}") from e
        finally:
            model.train(was)
        if out.dim() != 2:
            raise ValueError(f"protect: the model must return (N, C) logits, got shape {tuple(out.shape)}")
        c = out.shape[1]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"protect: {what} labels span {lo}..{hi} but the model outputs {c} classes")
        return x, y

    def attacker_loss(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> Tensor:
        return cross_entropy(model(batch[0]), batch[1])

    train_loss = attacker_loss

    def suppression_loss(self, model: nn.Module, batch: Batch, loss: str, gen: torch.Generator) -> Tensor:
        return suppression_loss(loss, model(batch[0]), batch[1])

    def evaluate(self, model: nn.Module, data: Batch) -> float:
        return accuracy(model, data)

    def head(self, model: nn.Module) -> nn.Linear:
        return find_head(model, self.head_name)

    def block(self, model: nn.Module):
        """The classifier block the adaptive ``reinit_block`` attack resets (one finder for both)."""
        try:
            return classifier_block(model)
        except ValueError as e:
            raise ValueError(f"protect: the fresh_block attacker needs a classifier block (parameterised layers after the last "
                             f"convolution / pooling): {e}") from None
