"""Causal language models as a SOPHON task: token-level suppression over the vocabulary.

Batches are ``(input_ids, labels)`` or ``(input_ids, labels, attention_mask)``: int64 (N, T) token
ids, int64 (N, T) labels in the Hugging Face convention (``labels[:, t]`` is the token at position t,
``ignore_index`` (-100) where the position does not count, e.g. padding) and an optional (N, T) mask
(1 = attend). Position t's hidden state predicts ``labels[:, t + 1]``: every loss flattens the
shifted pairs ``hidden[:, :-1]`` / ``labels[:, 1:]`` to (N * (T - 1), H) / (N * (T - 1),) rows and
averages over the counted rows (``labels != ignore_index``) of the whole batch.

    attacker_loss     next-token cross-entropy (the simulated attacker's fine-tuning on restricted text)
    suppression_loss  "ice" / "ice_reference_code" / "klu" / "neg_entropy" per counted token over the
                      vocabulary
    train_loss        next-token cross-entropy on original text (NTR)
    evaluate          mean next-token loss per counted token (lower is better)

The training losses go through ``sophon_fast.functional.linear_suppression_loss`` on (hidden, head
weight, bias) when that fused op exists and computes the loss ("ce", "ice", "klu", "neg_entropy": the
(rows, V) logits are never held at once), else through the materialised logits and
``sophon_fast.functional.fused_loss`` with the weights of ``functional.SUPPRESSION_LOSSES`` (which
also skips ignored rows for the label-free losses); "ice_reference_code" always takes the second path, and so
does every loss of a task built with ``second_order=True`` (the fused op has no second derivative).

Tied heads (GPT-2 ties its head to the token embedding): re-initialising such a head would also
re-initialise the embedding, so the task refuses: :meth:`head` returns None for a tied model (the
engine then has no head to re-initialise, and a strategy with ``reinit_head`` stops with a
ValueError; protection without head re-initialisation works as usual) and :meth:`reinit_head`
raises ``ValueError`` saying why. To re-initialise the head alone, untie it BEFORE ``protect``
(the engine chooses the parameters it protects before it asks the task anything):
``sophon_fast.models.lm.untie_head(model)`` gives the head its own Parameter, a copy of the embedding
(same function; the head and the embedding then train and re-initialise separately, and the model
gains V * H parameters).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from sophon_fast import functional
from sophon_fast.models.lm import CausalLMAdapter, adapter_for
from sophon_fast.tasks.base import Batch, Task, linear_weights

# loss name -> fused_loss weights (the mapping of functional.SUPPRESSION_LOSSES, plus CE)
_FUSED_WEIGHTS = {
    "ce": {"ce": 1.0},
    "ice": {"ice": 1.0},
    "ice_reference_code": {"ce": 1.0, "scale": -1.0},
    "klu": {"klu": 1.0},
    "neg_entropy": {"negent": 1.0},
}


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class LanguageModelTask(Task):
    """SOPHON for causal LMs (``transformers`` models, or any module through ``adapter``).

    adapter: a :class:`~sophon_fast.models.lm.CausalLMAdapter` (None: chosen per model by
    :func:`~sophon_fast.models.lm.adapter_for`). ignore_index: the label value that does not count.
    eval_batch_size: rows per forward in :meth:`evaluate`.
    """

    name = "lm"
    metric = "next-token loss"
    higher_is_better = False
    losses = ("ice", "ice_reference_code", "klu", "neg_entropy")

    def __init__(self, adapter: Optional[CausalLMAdapter] = None, ignore_index: int = -100,
                 eval_batch_size: int = 32, second_order: bool = False):
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.adapter, self.ignore_index, self.eval_batch_size = adapter, int(ignore_index), eval_batch_size
        # The fused linear loss forms its gradients in the forward: first derivatives only. second_order=True takes
        # every loss through the materialised (rows, V) logits and the twice-differentiable fused_loss instead, for
        # meta_gradient="unrolled" (the model's attention must have a double backward too: for transformers models,
        # attn_implementation="eager"; PyTorch's fused CPU/flash attention kernels have none).
        self.second_order = bool(second_order)

    def _adapter(self, model: nn.Module) -> CausalLMAdapter:
        return adapter_for(model, self.adapter)

    # ---- data ----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, data, what: str) -> Batch:
        """``(input_ids, labels[, attention_mask])`` on the model's device, checked.

        ``data``: a tuple/list of 2 or 3 tensors as in the module docstring, or one int tensor of ids
        (labels = ids). Raises ``ValueError`` naming ``what`` for non-integer or non-2-D ids, shape
        mismatches, T < 2, ids outside [0, V) or labels outside [0, V) other than ``ignore_index``.
        """
        adapter = self._adapter(model)
        if isinstance(data, Tensor):
            data = (data, data)
        if not (isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(isinstance(t, Tensor) for t in data)):
            raise ValueError(f"{what}: expected (input_ids, labels[, attention_mask]) tensors or an id tensor, "
                             f"got {type(data).__name__}")
        ids, labels = data[0], data[1]
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
            raise ValueError(f"{what}: input_ids must be an integer (N, T) tensor, got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] < 2:
            raise ValueError(f"{what}: sequences need T >= 2 tokens for a next-token loss, got T = {ids.shape[1]}")
        for name, t in zip(("labels", "attention_mask"), data[1:]):
            if t.shape != ids.shape:
                raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}, input_ids {tuple(ids.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{what}: labels must be an integer tensor, got {labels.dtype}")
        vocab = adapter.head(model).weight.shape[0]
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"{what}: input_ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        bad = ((labels < 0) | (labels >= vocab)) & (labels != self.ignore_index)
        if bool(bad.any()):
            raise ValueError(f"{what}: label {int(labels[bad][0])} is outside [0, {vocab}) and is not "
                             f"ignore_index={self.ignore_index}")
        if not bool((labels[:, 1:] != self.ignore_index).any()):
            raise ValueError(f"{what}: every next-token label is ignore_index (nothing to learn or measure)")
        device = _device(model)
        out = [ids.long().to(device), labels.long().to(device)]
        if len(data) == 3:
            out.append(data[2].to(device))
        return tuple(out)

    # ---- losses --------------------------------------------------------------------------------
    def _rows(self, model: nn.Module, batch: Batch):
        """Flattened shifted rows: hidden (M, H), target (M,) int64, head weight (V, H), bias or None."""
        adapter = self._adapter(model)
        ids, labels = batch[0], batch[1]
        mask = batch[2] if len(batch) > 2 else None
        hidden = adapter.hidden_states(model, ids, mask)[:, :-1]
        weight, bias = adapter.head_params(model, hidden.dtype)
        return hidden.reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1), weight, bias

    def _loss(self, model: nn.Module, batch: Batch, loss: str, reduction: str = "mean") -> Tensor:
        """``loss`` over the counted next-token rows of ``batch``, "mean" or "sum" (0-d, the hidden
        states' dtype; module docstring: which path)."""
        hidden, target, weight, bias = self._rows(model, batch)
        fused_linear = getattr(functional, "linear_suppression_loss", None)
        if fused_linear is not None and loss in getattr(functional, "LINEAR_LOSSES", ()) and not self.second_order:
            return fused_linear(hidden, weight, target, loss=loss, bias=bias, ignore_index=self.ignore_index,
                                reduction=reduction)
        logits = nn.functional.linear(hidden, weight, bias)
        return functional.fused_loss(logits, target, ignore_index=self.ignore_index, reduction=reduction,
                                     **_FUSED_WEIGHTS[loss])

    def loss_weight(self, batch: Batch) -> Tensor:
        """The counted next-token rows of ``batch`` (labels[:, 1:] != ignore_index), a 0-d tensor (no host sync)."""
        return (batch[1][:, 1:] != self.ignore_index).sum()

    def attacker_loss(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> Tensor:
        """Mean next-token cross-entropy over the counted tokens (scalar, the hidden states' dtype)."""
        return self._loss(model, batch, "ce")

    def train_loss(self, model: nn.Module, batch: Batch, gen: torch.Generator) -> Tensor:
        """Mean next-token cross-entropy over the counted tokens of original text."""
        return self._loss(model, batch, "ce")

    def suppression_loss(self, model: nn.Module, batch: Batch, loss: str, gen: torch.Generator) -> Tensor:
        """Mean of the suppression ``loss`` over the counted next-token rows (ignored rows excluded
        for every loss, also the label-free "klu" and "neg_entropy"). Raises ``ValueError`` for a
        ``loss`` outside ``losses``."""
        if loss not in self.losses:
            raise ValueError(f"LanguageModelTask: unknown suppression loss {loss!r}; one of {list(self.losses)}")
        return self._loss(model, batch, loss)

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Batch) -> float:
        """Mean next-token cross-entropy per counted token of prepared ``data`` (eval mode; restored),
        in ``eval_batch_size`` row chunks (through the same path as the training losses), summed in
        fp64. Lower is better."""
        was_training = model.training
        model.eval()
        try:
            total = torch.zeros((), dtype=torch.float64, device=data[0].device)
            count = torch.zeros((), dtype=torch.int64, device=data[0].device)
            for i in range(0, data[0].shape[0], self.eval_batch_size):
                chunk = tuple(t[i:i + self.eval_batch_size] for t in data)
                total += self._loss(model, chunk, "ce", reduction="sum").double()
                count += (chunk[1][:, 1:] != self.ignore_index).sum()
        finally:
            model.train(was_training)
        return float(total / count) if int(count) else math.nan

    # ---- head ----------------------------------------------------------------------------------
    def head(self, model: nn.Module) -> Optional[nn.Module]:
        """The output head (``.weight`` (V, H), ``.bias`` or None); None when it is tied to the input
        embedding (re-initialising it would re-initialise the embedding; see the module docstring)."""
        adapter = self._adapter(model)
        return None if adapter.is_tied(model) else adapter.head(model)

    def block(self, model: nn.Module):
        """What ``Strategy(attacker="fresh_block")`` draws afresh in a language model: every parameterised layer but the
        embeddings and the head (the decoder blocks and the final norm), so the simulated attacker keeps only the
        token and position embeddings (where the demo's head start lives: docs/domains.md)."""
        head = self._adapter(model).head(model)
        leaves = [m for m in model.modules() if not list(m.children()) and m is not head
                  and not isinstance(m, nn.Embedding) and any(True for _ in m.parameters(recurse=False))]
        if not leaves:
            raise ValueError("protect: the fresh_block attacker found no layer between the embeddings and the head")
        return leaves

    def lora_targets(self, model: nn.Module):
        """Every linear layer of the decoder (GPT-2's Conv1D included), never the output head, tied or not."""
        return linear_weights(model, exclude=self._adapter(model).head(model))

    def reinit_head(self, model: nn.Module, gen: torch.Generator) -> None:
        """Re-initialise the untied head (xavier_uniform weight from ``gen``, zero bias). Raises
        ``ValueError`` for a tied head instead of re-initialising the embedding with it."""
        if self._adapter(model).is_tied(model):
            raise ValueError("LanguageModelTask: the output head is tied to the input embedding, so re-initialising "
                             "it would re-initialise the embedding too; call sophon_fast.models.lm.untie_head(model) "
                             "before protect, or use strategies without reinit_head")
        super().reinit_head(model, gen)
