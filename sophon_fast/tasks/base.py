"""What ``protect`` needs to know about one kind of model: the ``Task`` interface.

The engine (sophon_fast/engine) is generic: it draws batches (tuples of tensors sharing dim 0) from
the restricted and original data, splits each restricted batch into support (all rows but the last
``query_size``) and query (the last ``query_size`` rows), and asks the task for three losses:

    attacker_loss(model, batch, gen)         the simulated attacker's fine-tuning loss (support)
    suppression_loss(model, batch, loss, gen) the suppression loss at theta'_k (query); ``loss`` is
                                              "ice", "ice_reference_code", "klu", "neg_entropy", "dos", ...
    train_loss(model, batch, gen)            normal training reinforcement (original domain)

plus ``prepare`` (materialise and validate user data on the model's device), ``evaluate`` (the
original-domain metric), and ``head`` (what a strategy's head re-initialisation resets).

``gen`` is a ``torch.Generator`` on the model's device for any randomness a loss needs (diffusion
noise and timesteps); the losses must not synchronise with the host (no ``.item()``), so a loss
runs the same on CPU and GPU and can be compiled.

Implementations: ``classification.ClassificationTask`` (logits (N, C), labels), ``lm.LanguageModelTask``
(causal LMs, token-level), ``diffusion.DiffusionTask`` (denoisers, epsilon prediction).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

Batch = Tuple[Tensor, ...]


class Task:
    """Base class; subclasses implement every method below."""

    name: str = "task"
    metric: str = "metric"           # what ``evaluate`` returns, e.g. "accuracy", "next-token loss"
    higher_is_better: bool = True
    losses: Tuple[str, ...] = ()     # the suppression losses this task computes (empty: not checked)
    second_order: bool = True        # attacker_loss is twice differentiable (meta_gradient="unrolled")

    def prepare(self, model: nn.Module, data, what: str) -> Batch:
        """Materialise ``data`` (Dataset, DataLoader, or tuple of tensors) as a tuple of tensors on the
        model's device, validated against the model (raise ValueError naming ``what`` on bad input)."""
        raise NotImplementedError

    def attacker_loss(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> Tensor:
        raise NotImplementedError

    def suppression_loss(self, model: nn.Module, batch: Batch, loss: str, gen: torch.Generator) -> Tensor:
        raise NotImplementedError

    def train_loss(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> Tensor:
        raise NotImplementedError

    def loss_weight(self, batch: Batch):
        """What the task's mean losses average over in ``batch``: its rows (an int) here; a 0-d tensor where
        it depends on the data (the LM task: counted tokens). A rank's rows of a batch weigh its loss by
        their share of this, so the ranks' losses add up to the batch's loss exactly."""
        return len(batch[0])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Batch) -> float:
        """The original-domain metric of ``model`` on prepared ``data`` (eval mode; the mode is restored)."""
        raise NotImplementedError

    def head(self, model: nn.Module) -> Optional[nn.Module]:
        """The module a strategy's ``reinit_head`` re-initialises (None: the task has no head)."""
        return None

    def block(self, model: nn.Module) -> List[nn.Module]:
        """The modules a fresh_block or Probe(layers='block') attacker draws afresh (classification: the classifier block, every
        parameterised layer after the last convolution / pooling). Raises ValueError where none is defined."""
        raise ValueError(f"{self.name} task: no classifier block is defined for the fresh_block attacker")

    def lora_targets(self, model: nn.Module) -> List[Tuple[str, nn.Parameter, bool]]:
        """The weights a simulated LoRA attacker (``Strategy.lora``) adapts: :func:`linear_weights` of the model
        without the head, as peft's ``target_modules="all-linear"`` chooses them."""
        return linear_weights(model, exclude=self.head(model))

    def reinit_head(self, model: nn.Module, gen: torch.Generator) -> None:
        """Re-initialise ``head(model)`` in place from ``gen`` (see :func:`reinit_linear_`)."""
        head = self.head(model)
        if head is None:
            raise ValueError(f"{self.name} task: this model has no head to re-initialise")
        reinit_linear_(head.weight, getattr(head, "bias", None), gen)


@torch.no_grad()
def reinit_linear_(weight: Tensor, bias: Optional[Tensor], gen: Optional[torch.Generator]) -> None:
    """xavier_uniform_ ``weight`` and zero ``bias`` in place, drawing from ``gen`` (a generator on the
    weight's device; None: the global RNG): the reference ICE script's head re-initialisation."""
    nn.init.xavier_uniform_(weight, generator=gen)
    if bias is not None:
        bias.zero_()


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's linear layer, weight stored (in, out)), without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weights(model: nn.Module, exclude: Optional[nn.Module] = None) -> List[Tuple[str, nn.Parameter, bool]]:
    """[(name, weight, transposed)] of every ``nn.Linear`` and every transformers-style ``Conv1D`` (GPT-2's, weight
    stored (in, out): ``transposed=True``) in ``model`` except the module ``exclude`` (and any sharing its weight)."""
    skip = id(exclude.weight) if exclude is not None else None
    out = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) or _is_conv1d(m)) and id(m.weight) != skip:
            out.append((f"{name}.weight" if name else "weight", m.weight, _is_conv1d(m)))
    return out


LORA_SCALE = 2.0     # lora_alpha / rank of the simulated LoRA attacker: peft with lora_alpha = 2 * rank (sf.attacks.lm)


def lora_factors(weight: Tensor, transposed: bool, rank: int, gen: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """Fresh LoRA factors for ``weight`` as peft draws them: A (rank, in) kaiming-uniform (bound 1/sqrt(in)), B
    (out, rank) zeros, new leaves that require grad; the adapted weight is :func:`lora_weight`."""
    n_out, n_in = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
    bound = 1.0 / math.sqrt(n_in)
    a = (torch.rand((rank, n_in), generator=gen, device=weight.device, dtype=weight.dtype) * 2 - 1) * bound
    b = torch.zeros((n_out, rank), device=weight.device, dtype=weight.dtype)
    return a.requires_grad_(True), b.requires_grad_(True)


def lora_weight(weight: Tensor, a: Tensor, b: Tensor, transposed: bool) -> Tensor:
    """``weight + LORA_SCALE * B @ A`` (transposed for a Conv1D weight), differentiable in all three."""
    delta = LORA_SCALE * (b @ a)
    return weight + (delta.t() if transposed else delta)


_FRESH_ONES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def fresh_parameters(module: nn.Module, gen: torch.Generator) -> List[Tuple[nn.Parameter, Tensor]]:
    """[(parameter, fresh value)] of ``module`` as its ``reset_parameters()`` would draw them, from ``gen``:
    nn.Linear's default (weight and bias uniform in +-1/sqrt(fan_in)), GPT-2's Conv1D as transformers initialises it
    (weight normal(0, 0.02), bias zero), norm layers' ones and zeros (RMSNorm's included); the values are new leaf
    tensors that require grad. ValueError for any other module."""
    if isinstance(module, nn.Linear):
        w, b = module.weight, module.bias
        bound = 1.0 / math.sqrt(w.shape[1])
        out = [(w, (torch.rand(w.shape, generator=gen, device=w.device, dtype=w.dtype) * 2 - 1) * bound)]
        if b is not None:
            out.append((b, (torch.rand(b.shape, generator=gen, device=b.device, dtype=b.dtype) * 2 - 1) * bound))
    elif _is_conv1d(module):                                               # GPT-2's: transformers' normal(0, 0.02)
        w, b = module.weight, module.bias
        out = [(w, torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype) * 0.02)]
        if b is not None:
            out.append((b, torch.zeros_like(b)))
    elif isinstance(module, _FRESH_ONES) or type(module).__name__.endswith("RMSNorm"):
        out = [(p, torch.ones_like(p) if name == "weight" else torch.zeros_like(p))
               for name, p in module.named_parameters(recurse=False)]
    else:
        raise ValueError(f"fresh_parameters: cannot draw a fresh {type(module).__name__} (Linear, GPT-2's Conv1D and "
                         f"norm layers only)")
    return [(p, t.detach().requires_grad_(True)) for p, t in out]
