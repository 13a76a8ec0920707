"""Simulated attackers: what one trajectory of the suppression loop fine-tunes, and how.

A simulated attacker is a small frozen config (``Strategy.attacker``); before each trajectory its
:meth:`Attacker.setup` draws what the attacker starts from and returns a :class:`Setup` that tells both
engine modes (sophon_fast/engine/modes.py) four things:

    drawn       protected parameters whose trajectory starts from a freshly drawn value (a new head, a
                new classifier block), with those values
    constant    whether the drawn values are constants of the meta-gradient (a fresh layer: its slots get
                no meta-gradient, the layers below do) or stand in for the parameter (the reference code's
                head re-initialisation: the gradient at the drawn head is added to the head's)
    trains      "all" (every protected parameter takes the inner steps), "drawn" (only the drawn ones: a
                probe on a frozen body) or "lora" (only fresh low-rank factors; the model's weights stay)
    eval_body   the body runs in eval mode (BatchNorm with its running statistics, no dropout), as a
                last-layer attacker or probe sees it
    lora        [LoraTarget]: the fresh factors and the layers they adapt; the model reads
                ``W + LORA_SCALE * B @ A`` (the reference mode, weight side) or adds
                ``LORA_SCALE * (x A^T) B^T`` to the layer's output (the fast modes, as peft computes it)

Kinds (``Strategy(attacker=...)`` takes the object, its ``kind`` string, or ``{"kind": ..., **config}``):

    as_is        the model as it is (SOPHON's own attacker)
    reinit_head  the reference ICE script's head re-initialisation (xavier-uniform weight, zero bias)
    fresh_head   a fresh head with PyTorch's default initialisation, a constant
    fresh_block  a fresh classifier block (language models: fresh decoder blocks), a constant
    probe        only fresh layers (``layers="head"`` or ``"block"``) train, on the frozen body in eval mode
    lora         LoRA factors of rank ``rank`` on every linear layer but the head (peft's initialisation,
                 lora_alpha = 2 * rank)

A new kind is one class here with ``kind``, ``check`` and ``setup``, registered in ``KINDS``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from sophon_fast.tasks.base import _FRESH_ONES, _is_conv1d, fresh_parameters, lora_factors, reinit_linear_


@dataclass
class LoraTarget:
    """One adapted layer: its weight's name in the model, the module, whether the weight is stored (in, out)
    (GPT-2's Conv1D), and the fresh factors A (rank, in) and B (out, rank)."""
    name: str
    module: nn.Module
    transposed: bool
    a: Tensor
    b: Tensor


@dataclass
class Setup:
    """What one trajectory of an attacker trains and reads (see the module docstring)."""
    drawn: List[Tuple[nn.Parameter, Tensor]] = field(default_factory=list)
    constant: bool = True
    trains: str = "all"
    eval_body: bool = False
    lora: List[LoraTarget] = field(default_factory=list)


def _protected(what: str, pairs, params: Sequence[nn.Parameter]) -> None:
    ids = {id(p) for p in params}
    if any(id(p) not in ids for p, _ in pairs):
        raise ValueError(f"protect: the {what} attacker needs every parameter it draws among the protected params")


def _head(task, model, what: str) -> nn.Module:
    head = task.head(model)
    if head is None:
        raise ValueError(f"protect: the {what} attacker needs a head, and the {task.name} task has none in this model")
    return head


@dataclass(frozen=True)
class Attacker:
    """Base class of the simulated attacker kinds."""
    kind: ClassVar[str] = ""

    def check(self, task, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        """Raise ValueError, naming the attacker and the reason, when ``task`` and ``model`` cannot serve it
        (called by ``protect`` before any work; draws nothing)."""
        raise NotImplementedError

    def setup(self, task, model: nn.Module, params: Sequence[nn.Parameter], gen: torch.Generator) -> Setup:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class AsIs(Attacker):
    """Fine-tunes the model as it is."""
    kind: ClassVar[str] = "as_is"

    def check(self, task, model, params) -> None:
        pass

    def setup(self, task, model, params, gen) -> Setup:
        return Setup()


@dataclass(frozen=True)
class ReinitHead(Attacker):
    """The reference ICE script's head re-initialisation; the drawn head stands in for the head."""
    kind: ClassVar[str] = "reinit_head"

    def check(self, task, model, params) -> None:
        if task.head(model) is None:
            task.reinit_head(model, None)          # raises the task's own reason (e.g. a head tied to the embedding)
        head = _head(task, model, self.kind)
        if all(p is not head.weight for p in params):
            raise ValueError("protect: the reinit_head attacker needs the head's weight among the protected params")

    def setup(self, task, model, params, gen) -> Setup:
        head = _head(task, model, self.kind)
        like = dict(dtype=head.weight.dtype, device=head.weight.device)      # plain tensors, sharded weights too
        w = torch.empty(tuple(head.weight.shape), **like)
        reinit_linear_(w, None, gen)
        drawn = [(head.weight, w)]
        if getattr(head, "bias", None) is not None and any(p is head.bias for p in params):
            drawn.append((head.bias, torch.zeros(tuple(head.bias.shape), **like)))
        return Setup(drawn=drawn, constant=False)


def _fresh_modules(task, model, params, layers: str, what: str):
    """The modules a fresh head / block attacker draws, checked without drawing: each of a kind
    ``fresh_parameters`` can draw, every parameter protected."""
    modules = [_head(task, model, what)] if layers == "head" else task.block(model)
    for mod in modules:
        if not (isinstance(mod, (nn.Linear,) + _FRESH_ONES) or _is_conv1d(mod) or type(mod).__name__.endswith("RMSNorm")):
            raise ValueError(f"protect: the {what} attacker cannot draw a fresh {type(mod).__name__} (Linear, GPT-2's "
                             f"Conv1D and norm layers only)")
    _protected(what, [(p, None) for mod in modules for p in mod.parameters(recurse=False)], params)
    return modules


def _fresh(task, model, params, gen, layers: str, what: str):
    modules = _fresh_modules(task, model, params, layers, what)
    return [(p, v.detach()) for mod in modules for p, v in fresh_parameters(mod, gen)]


@dataclass(frozen=True)
class FreshHead(Attacker):
    """A fresh head (PyTorch's default initialisation), a constant of the meta-gradient."""
    kind: ClassVar[str] = "fresh_head"
    layers: ClassVar[str] = "head"

    def check(self, task, model, params) -> None:
        _fresh_modules(task, model, params, self.layers, self.kind)

    def setup(self, task, model, params, gen) -> Setup:
        return Setup(drawn=_fresh(task, model, params, gen, self.layers, self.kind))


@dataclass(frozen=True)
class FreshBlock(FreshHead):
    """A fresh classifier block (``Task.block``), a constant of the meta-gradient."""
    kind: ClassVar[str] = "fresh_block"
    layers: ClassVar[str] = "block"


@dataclass(frozen=True)
class Probe(Attacker):
    """Only fresh layers (the head, or the classifier block) train, on the frozen body in eval mode."""
    kind: ClassVar[str] = "probe"
    layers: str = "head"

    def __post_init__(self):
        if self.layers not in ("head", "block"):
            raise ValueError(f"Probe.layers must be 'head' or 'block', got {self.layers!r}")

    def check(self, task, model, params) -> None:
        _fresh_modules(task, model, params, self.layers, self.kind)

    def setup(self, task, model, params, gen) -> Setup:
        return Setup(drawn=_fresh(task, model, params, gen, self.layers, self.kind), trains="drawn", eval_body=True)


@dataclass(frozen=True)
class LoRA(Attacker):
    """Fresh LoRA factors of rank ``rank`` on every linear layer but the head (``Task.lora_targets``)."""
    kind: ClassVar[str] = "lora"
    rank: int = 8

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA.rank must be an int >= 1, got {self.rank!r}")

    def check(self, task, model, params) -> None:
        self._targets(task, model)

    def _targets(self, task, model):
        targets = task.lora_targets(model)
        if not targets:
            raise ValueError(f"protect: the lora attacker needs linear layers to adapt, and the {task.name} task names "
                             f"none in this model")
        return targets

    def setup(self, task, model, params, gen) -> Setup:
        out = []
        for name, w, transposed in self._targets(task, model):
            a, b = lora_factors(w, transposed, self.rank, gen)
            out.append(LoraTarget(name, model.get_submodule(name.rpartition(".")[0]), transposed, a.detach(), b.detach()))
        return Setup(trains="lora", lora=out)


KINDS: Dict[str, type] = {k.kind: k for k in (AsIs, ReinitHead, FreshHead, FreshBlock, Probe, LoRA)}


def attacker_from(spec) -> Optional[Attacker]:
    """An Attacker from itself, its kind string, or ``{"kind": ..., **config}``; None stays None (the loss's
    default, filled in by ``ProtectConfig.resolved``)."""
    if spec is None or isinstance(spec, Attacker):
        return spec
    if isinstance(spec, str):
        spec = {"kind": spec}
    if isinstance(spec, dict) and spec.get("kind") in KINDS:
        return KINDS[spec["kind"]](**{k: v for k, v in spec.items() if k != "kind"})
    raise ValueError(f"Strategy.attacker must be one of {tuple(KINDS)} (a name, an Attacker, or a dict with 'kind'), "
                     f"got {spec!r}")
