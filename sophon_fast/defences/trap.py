"""The dead-unit trap (docs/experiments.md e10-e24): keep the ReLU units that feed the classification head
switched off for restricted inputs, so fine-tuning gets no gradient below the head.

    hinge(theta) = mean_i sum_j relu(z_j(x_i) + margin + robust * (|h(x_i)|_1 + 1))

z: the pre-activation of the last ``nn.ReLU`` module that runs before the head; h: the input of the
``nn.Linear`` producing z (``robust`` > 0 keeps the units off under any change of at most ``robust`` in
every weight and bias of that Linear: the worst case of one sign-like Adam step). ``decay`` > 0 also
takes the hinge at body weights soft-thresholded by one draw s ~ U(0, decay), the path Adam/RMSprop
with L2 weight decay take on dead units, and averages the two; ``straight_through`` passes the
hinge's gradient through the soft-threshold unchanged (its exact derivative is 0 for weights already
decayed to 0, so decayed biases would get no push).

On a model whose forward depends on its mode (BatchNorm, dropout) the hinge is averaged over train mode (what
full fine-tuning sees: each batch's statistics) and eval mode (what a last-layer attacker sees: the running
statistics), so the units are off for both (docs/experiments.md e74).

Limits (measured): it needs an nn.ReLU right before the head (and an nn.Linear before it for ``robust``);
an attacker who re-initialises the Linear under the head, or Adagrad at lr 0.1, gets through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call


_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


@dataclass
class TrapConfig:
    """The dead-unit trap's settings (the demo recipe: weight 0.05, margin 3, robust 0.002, decay 1, st)."""
    kind = "trap"
    weight: float = 0.05
    margin: float = 3.0
    robust: float = 0.0
    decay: float = 0.0
    straight_through: bool = False

    def __post_init__(self):
        if not self.weight > 0:
            raise ValueError(f"TrapConfig.weight must be > 0, got {self.weight}")
        if not self.margin >= 0:
            raise ValueError(f"TrapConfig.margin must be >= 0, got {self.margin}")
        if not self.robust >= 0:
            raise ValueError(f"TrapConfig.robust must be >= 0, got {self.robust}")
        if not self.decay >= 0:
            raise ValueError(f"TrapConfig.decay must be >= 0, got {self.decay}")

    def build(self) -> "DeadUnitTrap":
        return DeadUnitTrap(self)


def soft_threshold(p: Tensor, s) -> Tensor:
    """sign(p) * max(|p| - s, 0); ``s`` a float or a 0-dim tensor on p's device."""
    return torch.sign(p) * torch.relu(p.abs() - s)


class DeadUnitTrap:
    """The trap as a defence component: ``attach`` finds the layers, ``loss`` is weight * hinge."""
    needs_original = False

    def __init__(self, cfg: TrapConfig):
        self.cfg = cfg
        self.relu: Optional[nn.ReLU] = None
        self.linear: Optional[nn.Linear] = None

    def attach(self, model: nn.Module, task) -> None:
        self.model, self.head = model, task.head(model)
        if self.head is None:
            raise ValueError("trap: the task has no head")

    def _locate(self, model: nn.Module, x: Tensor) -> None:
        """One traced forward: the last nn.ReLU module run before the head and the last nn.Linear run
        before that ReLU. Only those two layers are hooked afterwards."""
        order = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: order.append(mod)) for m in model.modules()
                 if isinstance(m, (nn.ReLU, nn.Linear))]
        was = model.training
        try:
            with torch.no_grad():
                model.eval()                 # one row: no batch statistics, and the running ones stay as they are
                model(x[:1])
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        before = order[:next((i for i, m in enumerate(order) if m is self.head), len(order))]
        relus = [i for i, m in enumerate(before) if isinstance(m, nn.ReLU)]
        if not relus:
            raise ValueError("trap: needs the head's input to come from an nn.ReLU module (none runs before the head)")
        self.relu = before[relus[-1]]
        lins = [m for m in before[:relus[-1]] if isinstance(m, nn.Linear)]
        self.linear = lins[-1] if lins else None
        if self.cfg.robust and self.linear is None:
            raise ValueError("trap: robust > 0 needs an nn.Linear before the ReLU feeding the head")

    def preacts(self, call):
        """(output of ``call()``, z flattened to (N, -1), h or None) for one forward of the model."""
        got = {}

        def grab(mod, args):
            got["z"] = args[0]
            return (args[0].clone(),)        # the ReLU may be in place: keep z intact for the loss

        hooks = [self.relu.register_forward_pre_hook(grab)]
        if self.linear is not None:
            hooks.append(self.linear.register_forward_pre_hook(lambda mod, args: got.__setitem__("h", args[0])))
        try:
            out = call()
        finally:
            for h in hooks:
                h.remove()
        return out, got["z"].flatten(1), got.get("h")

    def hinge(self, call) -> Tensor:
        _, z, h = self.preacts(call)
        shift = self.cfg.margin
        if self.cfg.robust:
            shift = shift + self.cfg.robust * (h.flatten(1).abs().sum(1, keepdim=True) + 1)
        return torch.relu(z + shift).sum(1).mean()

    def loss(self, model: nn.Module, restricted, original, gen: torch.Generator) -> Tensor:
        if not any(isinstance(m, _MODE_DEPENDENT) for m in model.modules()):
            return self._loss(model, restricted, gen)
        was = model.training
        try:
            total = 0.0
            for mode in (False, True):       # eval first: the train-mode pass moves the running statistics
                model.train(mode)
                total = total + self._loss(model, restricted, gen)
            return total / 2
        finally:
            model.train(was)

    def _loss(self, model: nn.Module, restricted, gen: torch.Generator) -> Tensor:
        x = restricted[0]
        if self.relu is None:
            self._locate(model, x)
        loss = self.hinge(lambda: model(x))
        if self.cfg.decay > 0:
            head_ids = {id(p) for p in self.head.parameters()}
            named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
            draws = torch.rand(1, generator=gen, device=gen.device, dtype=x.dtype)
            for s in (self.cfg.decay * draws).unbind():
                params = {n: (p + (soft_threshold(p, s) - p).detach()) if self.cfg.straight_through
                          else soft_threshold(p, s) for n, p in named}
                loss = loss + self.hinge(lambda: functional_call(model, params, (x,)))
            loss = loss / 2
        return self.cfg.weight * loss


def head_preacts(model: nn.Module, head: nn.Module, x: Tensor, params: Optional[dict] = None) -> Tensor:
    """The pre-activation (N, units) of the ReLU feeding ``head`` for inputs ``x``; ``params``: a {name:
    tensor} replacement for some parameters (``torch.func.functional_call``). For analysis scripts."""
    trap = DeadUnitTrap(TrapConfig())
    trap.head = head
    trap._locate(model, x)
    call = (lambda: model(x)) if params is None else (lambda: functional_call(model, params, (x,)))
    return trap.preacts(call)[1]
