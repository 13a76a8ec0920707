"""Small causal language models built in code, and adapters that expose their pieces to the LM task.

Builders (``transformers`` configs in code, random initialisation, no downloads, dropout 0):
``gpt2(vocab_size, ...)`` (GPT2LMHeadModel; head tied to the token embedding, the GPT-2 default) and
``llama(vocab_size, ...)`` (LlamaForCausalLM; head untied unless ``tie=True``).

An *adapter* says, for one causal LM, how to get
- ``hidden_states(model, input_ids, attention_mask)``: the last hidden states (N, T, H), i.e. the
  input of the output head (after the final norm);
- ``head(model)``: the output head module, with ``.weight`` (V, H) and ``.bias`` (V,) or None, so
  that ``logits = hidden @ weight.T + bias``;
- ``input_embedding(model)``: the token embedding module (None when unknown), which ``is_tied``
  compares with the head's weight.
:class:`HFCausalLMAdapter` serves ``transformers.PreTrainedModel`` causal LMs (GPT-2 and Llama
families, and others with a plain linear head); :class:`CallableAdapter` wraps user functions for
any other module; :func:`adapter_for` picks one.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

# config fields of transformers models that change the logits after the head -> their no-op values
# (Gemma 2/3 soft-capping, Cohere's logit scale, Granite's logit divisor)
_LOGIT_TRANSFORMS = {"final_logit_softcapping": (None,), "logit_scale": (None, 1.0), "logits_scaling": (None, 1.0)}


def _seeded(seed: Optional[int]):
    if seed is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    return ctx()


def gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 128, n_head: int = 4, n_positions: int = 128,
         seed: Optional[int] = None, attn_implementation: str = "sdpa", **config) -> nn.Module:
    """A GPT-2 causal LM (``GPT2LMHeadModel``) from a config in code; dropout 0, SDPA attention ("eager" for a
    model whose losses must be twice differentiable: ``meta_gradient="unrolled"``).

    ``seed`` makes the initialisation reproducible without touching the global RNG; ``config`` adds
    or overrides ``GPT2Config`` fields. The head is tied to the token embedding (GPT-2's default).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     **config)
    cfg._attn_implementation = attn_implementation
    with _seeded(seed):
        return GPT2LMHeadModel(cfg)


def llama(vocab_size: int, n_layer: int = 2, hidden: int = 128, n_head: int = 4, n_kv_head: int = 2,
          intermediate: Optional[int] = None, max_positions: int = 128, tie: bool = False,
          seed: Optional[int] = None, **config) -> nn.Module:
    """A Llama causal LM (``LlamaForCausalLM``) from a config in code (grouped-query attention with
    ``n_kv_head`` key/value heads, SwiGLU MLP of width ``intermediate`` (default 4 * hidden * 2/3
    rounded up to a multiple of 32), RMSNorm, rotary positions); head untied unless ``tie``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if intermediate is None:
        intermediate = -(-(8 * hidden // 3) // 32) * 32
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie, attention_dropout=0.0,
                      bos_token_id=0, eos_token_id=0, pad_token_id=1, **config)
    cfg._attn_implementation = "sdpa"
    with _seeded(seed):
        return LlamaForCausalLM(cfg)


def fresh_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same transformers architecture and config, freshly initialised with ``seed`` (global RNG
    untouched), on ``model``'s device and dtype. Raises ``ValueError`` for non-transformers models."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "post_init"):
        raise ValueError(f"fresh_like: {type(model).__name__} is not a transformers PreTrainedModel; "
                         "build the scratch model yourself")
    p = next(model.parameters())
    with _seeded(seed):
        fresh = type(model)(config.__class__.from_dict(config.to_dict()))
    return fresh.to(device=p.device, dtype=p.dtype)


class CausalLMAdapter:
    """How to read one kind of causal LM; subclass it (or use :class:`CallableAdapter`) for your own.

    Contract: ``logits(model, ids, mask)`` equals ``model``'s own next-token logits, (N, T, V).
    """

    def hidden_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Last hidden states (N, T, H), the head's input, for int64 ``input_ids`` (N, T)."""
        raise NotImplementedError

    def head(self, model: nn.Module) -> nn.Module:
        """The output head: a module with ``.weight`` (V, H) and ``.bias`` ((V,) or None)."""
        raise NotImplementedError

    def input_embedding(self, model: nn.Module) -> Optional[nn.Module]:
        """The token embedding (``.weight`` (V, H)), or None when unknown (then never "tied")."""
        return None

    def is_tied(self, model: nn.Module) -> bool:
        """Whether the head's weight IS the input embedding's weight (one Parameter)."""
        emb = self.input_embedding(model)
        return emb is not None and self.head(model).weight is emb.weight

    def head_params(self, model: nn.Module, dtype: Optional[torch.dtype] = None):
        """``(weight (V, H), bias (V,) or None)`` of the head. The losses use them outside the head's own
        forward, so under FSDP2 (DTensor weights) they are gathered here with partial-sum gradients (each
        rank's gradient, from its own rows, is reduce-scattered, summed, into the shards) and cast to
        ``dtype`` (the hidden states' dtype: FSDP2's ``param_dtype`` under a mixed-precision policy)."""
        head = self.head(model)
        return _gathered(head.weight, dtype), _gathered(getattr(head, "bias", None), dtype)

    def logits(self, model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """``hidden_states @ weight.T + bias``: (N, T, V) in the hidden states' dtype."""
        hidden = self.hidden_states(model, input_ids, attention_mask)
        return nn.functional.linear(hidden, *self.head_params(model, hidden.dtype))


def _gathered(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    if t is None or type(t).__name__ != "DTensor":
        return t
    from torch.distributed.tensor import Partial
    full = t.full_tensor(grad_placements=[Partial()] * len(t.placements))
    return full if dtype is None else full.to(dtype)


class HFCausalLMAdapter(CausalLMAdapter):
    """``transformers`` causal LMs: hidden states from ``model.base_model`` (the decoder without the
    head), the head from ``get_output_embeddings()``, the embedding from ``get_input_embeddings()``.

    Raises ``ValueError`` for a model without a separate base model or head, or one whose logits are
    transformed after the head (soft-capped or scaled logits).
    """

    def check(self, model: nn.Module) -> None:
        if getattr(model, "base_model", model) is model:
            raise ValueError(f"{type(model).__name__} has no base model separate from its head "
                             "(is it a bare decoder rather than a *ForCausalLM model?)")
        if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
            raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings() is None)")
        config = getattr(model, "config", None)
        for field, no_op in _LOGIT_TRANSFORMS.items():
            value = getattr(config, field, None)
            if value not in no_op:
                raise ValueError(f"{type(model).__name__}: config.{field}={value} transforms the logits after the "
                                 "head; the LM task needs logits = hidden @ W.T + b (write your own adapter)")

    def hidden_states(self, model, input_ids, attention_mask=None):
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def head(self, model):
        return model.get_output_embeddings()

    def input_embedding(self, model):
        return model.get_input_embeddings()


class CallableAdapter(CausalLMAdapter):
    """An adapter from functions: ``hidden(model, input_ids, attention_mask) -> (N, T, H)``,
    ``head(model) -> module with .weight/.bias`` and optionally ``embedding(model) -> module``."""

    def __init__(self, hidden: Callable, head: Callable, embedding: Optional[Callable] = None):
        self._hidden, self._head, self._embedding = hidden, head, embedding

    def hidden_states(self, model, input_ids, attention_mask=None):
        return self._hidden(model, input_ids, attention_mask)

    def head(self, model):
        return self._head(model)

    def input_embedding(self, model):
        return None if self._embedding is None else self._embedding(model)


def adapter_for(model: nn.Module, adapter: Optional[CausalLMAdapter] = None) -> CausalLMAdapter:
    """``adapter`` when given, else the model's ``sophon_lm_adapter`` attribute, else
    :class:`HFCausalLMAdapter` for ``transformers`` models (checked). Raises ``ValueError`` otherwise."""
    if adapter is None:
        adapter = getattr(model, "sophon_lm_adapter", None)
    if adapter is not None:
        if not isinstance(adapter, CausalLMAdapter):
            raise ValueError(f"adapter must be a CausalLMAdapter, got {type(adapter).__name__}")
        return adapter
    try:
        from transformers import PreTrainedModel
    except ImportError:   # transformers missing: only user adapters are possible
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        adapter = HFCausalLMAdapter()
        adapter.check(model)
        return adapter
    raise ValueError(f"no language-model adapter for {type(model).__name__}: pass adapter=CallableAdapter(...) "
                     "or set model.sophon_lm_adapter")


def untie_head(model: nn.Module, adapter: Optional[CausalLMAdapter] = None) -> bool:
    """Give a tied output head its own Parameter (a copy of the embedding), in place.

    The model computes the same function afterwards, but the head and the embedding then train (and
    re-initialise) separately; a ``transformers`` config gets ``tie_word_embeddings = False`` so that
    saving and loading keep them apart. Returns True when the head was tied (and now is not).
    """
    adapter = adapter_for(model, adapter)
    if not adapter.is_tied(model):
        return False
    head = adapter.head(model)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return True


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in model.parameters())
