"""The SOPHON outer loop: fine-tuning suppression (FTS) then normal training reinforcement (NTR).

    for it in range(iterations):
        FTS: for each simulated trajectory: K inner steps on fresh restricted batches; the weighted
             query losses' first-order meta-gradient; clip to clip_norm; FTS optimiser step
        NTR: ntr_steps cross-entropy steps on original batches
        on schedule: original-domain accuracy (rollback to the last good weights and stop when it
             falls to original_acc_floor), checkpoint
Non-finite losses or gradients skip the iteration (weights restored, counted in history); more than
``max_nonfinite`` in a row raise ``NonFiniteError`` carrying the last good model.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from sophon_fast.data import as_tensors
from sophon_fast.engine.checkpoint import load_checkpoint, save_checkpoint
from sophon_fast.engine.config import ProtectConfig
from sophon_fast.engine.modes import MODES
from sophon_fast.functional import cross_entropy

log = logging.getLogger("sophon_fast")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite iterations; ``.model`` holds the last good weights."""

    def __init__(self, msg, model):
        super().__init__(msg)
        self.model = model


@dataclass
class ProtectResult:
    model: nn.Module
    history: List[dict] = field(default_factory=list)
    config: Optional[ProtectConfig] = None
    stopped_early: bool = False
    stop_reason: str = ""
    original_acc: Optional[float] = None
    seconds: float = 0.0


class BatchStream:
    """Endless reproducible batches from in-memory tensors: shuffled passes drawn from ``gen``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        self.x, self.y, self.gen = x, y, gen
        self.perm = torch.randperm(len(x), generator=gen)
        self.pos = 0

    def next(self, n: int):
        parts, need = [], n
        while need:
            if self.pos == len(self.perm):
                self.perm = torch.randperm(len(self.x), generator=self.gen)
                self.pos = 0
            take = min(need, len(self.perm) - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        idx = parts[0] if len(parts) == 1 else torch.cat(parts)
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def state_dict(self):
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, s):
        self.perm, self.pos = s["perm"].clone(), int(s["pos"])


def _find_head(model: nn.Module, name: Optional[str]) -> nn.Linear:
    if name is not None:
        mod = dict(model.named_modules()).get(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"protect: head {name!r} is not an nn.Linear module of the model")
        return mod
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("protect: the model has no nn.Linear to serve as the classification head; pass head=")
    return linears[-1]


def _prepare(data, what: str, device, dtype, model: nn.Module):
    x, y = as_tensors(data)
    if x.is_floating_point():
        x = x.to(dtype)
    y = y.long()
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            out = model(x[:2].to(device))
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
    return x.to(device), y.to(device)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(len(x), 1)


def _head_inputs(model: nn.Module, head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    feats = []
    hook = head.register_forward_pre_hook(lambda mod, args: feats.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return feats[0].flatten(1)


def _run_with_preacts(model: nn.Module, head: nn.Linear, call):
    """``call()`` (one forward of ``model``) with the input of the last ``nn.ReLU`` module that runs
    before ``head`` captured: returns (output, pre-activation z flattened to (N, -1), h) where h is the
    input of the last ``nn.Linear`` that ran before that ReLU (the layer producing z), or None.

    The ReLU gets a clone (it may be in place) so the pre-activation stays intact for a loss.
    """
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("protect: feature_loss='margin' needs the head's input to come from an nn.ReLU module")
    seen, lin_in, at_head = [], [], []

    def grab(mod, args):
        seen.append((args[0], len(lin_in)))
        return (args[0].clone(),)

    hooks = [m.register_forward_pre_hook(grab) for m in relus]
    hooks += [m.register_forward_pre_hook(lambda mod, args: lin_in.append(args[0]))
              for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    hooks.append(head.register_forward_pre_hook(lambda mod, args: at_head.append(len(seen))))
    try:
        out = call()
    finally:
        for h in hooks:
            h.remove()
    if not at_head or at_head[0] == 0:
        raise ValueError("protect: feature_loss='margin' found no nn.ReLU before the head")
    z, n_lin = seen[at_head[0] - 1]
    return out, z.flatten(1), (lin_in[n_lin - 1] if n_lin else None)


def _head_preacts(model: nn.Module, head: nn.Linear, x: torch.Tensor, params=None) -> torch.Tensor:
    """The pre-activation of the ReLU feeding ``head`` for inputs ``x``; ``params``: a {name: tensor}
    replacement for some parameters (``torch.func.functional_call``)."""
    call = (lambda: model(x)) if params is None else (lambda: torch.func.functional_call(model, params, (x,)))
    return _run_with_preacts(model, head, call)[1]


def _margin_run(model: nn.Module, head: nn.Linear, call, margin: float, robust: float = 0.0):
    """(output of ``call()``, margin hinge sum_j relu(z_j + margin + robust * (|h|_1 + 1)) averaged over the
    batch). ``robust`` > 0 asks the units to stay off under any change of at most ``robust`` in every weight
    and bias of the Linear layer producing z (the worst case of one sign-like Adam step of that size)."""
    out, z, h = _run_with_preacts(model, head, call)
    shift = margin
    if robust:
        if h is None:
            raise ValueError("protect: feature_robust needs an nn.Linear right before the ReLU feeding the head")
        shift = margin + robust * (h.flatten(1).abs().sum(1, keepdim=True) + 1)
    return out, torch.relu(z + shift).sum(1).mean()


def _soft_threshold(p: torch.Tensor, s: float) -> torch.Tensor:
    return torch.sign(p) * torch.relu(p.abs() - s)


def _feature_loss(kind: str, model: nn.Module, head: nn.Linear, x_r: torch.Tensor, x_o: torch.Tensor,
                  margin: float = 1.0, decays=(), robust: float = 0.0, straight_through: bool = False):
    """Restricted-domain feature suppression on the head's input h (both in [0, ~1]).

    collapse: spread of h over a restricted batch relative to its size; 0 when every restricted
              input maps to one feature vector, so no head can tell them apart.
    energy:   mean |h(x_r)|^2 relative to the original batch's (held constant); 0 when restricted
              inputs switch the (ReLU) features off, which also blocks fine-tuning gradients.
    margin:   hinge on the pre-activation z of the ReLU feeding the head, sum_j relu(z_j(x_r) + margin)
              averaged over the batch; 0 when every feature unit is off by at least ``margin`` for the
              restricted inputs. Dead units pass exactly zero gradient to everything below the head,
              so no gradient optimiser (Adam included) can move them; the margin keeps them dead
              while the attacker's head-bias updates act. ``decays``: the hinge is also taken (and
              averaged) at the body's parameters soft-thresholded by each s in ``decays``: the path that
              Adam/RMSprop with coupled (L2) weight decay take while no data gradient flows (every
              weight moves lr towards 0 per step), so the units stay off along the attacker's decay.
              The soft-threshold has zero derivative for |theta| <= s, so a bias that has decayed to 0
              gets no push; ``straight_through`` passes the hinge's gradient to theta unchanged.
    """
    if kind == "margin":
        loss = _margin_run(model, head, lambda: model(x_r), margin, robust)[1]
        if decays:
            head_ids = {id(p) for p in head.parameters()}
            named = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
            for s_ in decays:
                params = {n: (p + (_soft_threshold(p, s_) - p).detach()) if straight_through else
                          _soft_threshold(p, s_) for n, p in named}
                loss = loss + _margin_run(model, head, lambda: torch.func.functional_call(model, params, (x_r,)),
                                          margin, robust)[1]
            loss = loss / (1 + len(decays))
        return loss
    h = _head_inputs(model, head, x_r)
    if kind == "collapse":
        centred = h - h.mean(0, keepdim=True)
        return centred.pow(2).sum(1).mean() / (h.pow(2).sum(1).mean() + 1e-8)
    with torch.no_grad():
        ref = _head_inputs(model, head, x_o).pow(2).sum(1).mean()
    return h.pow(2).sum(1).mean() / (ref + 1e-8)


# Fields that may change between a checkpoint and its resumption (they do not change the computation).
RESUMABLE_FIELDS = ("iterations", "progress", "checkpoint_dir", "checkpoint_every", "resume", "in_place", "device")


def config_changes(saved: dict, cfg: ProtectConfig) -> List[str]:
    """Names of the fields of ``cfg`` that differ from a saved ``cfg.to_dict()`` (RESUMABLE_FIELDS aside)."""
    now = json.loads(json.dumps(cfg.to_dict()))      # tuples -> lists, as in a JSON record
    saved = json.loads(json.dumps(saved))
    return sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_FIELDS and saved.get(k) != now.get(k))


def _make_opt(name: str, params, lr: float):
    return torch.optim.Adam(params, lr=lr) if name == "adam" else torch.optim.SGD(params, lr=lr)


def _progress(cfg: ProtectConfig, total: int, start: int):
    show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, desc=f"protect[{cfg.mode}]", unit="it", dynamic_ncols=True)


def protect(model: nn.Module, original, restricted, config: Optional[ProtectConfig] = None, *,
            original_test=None, **overrides) -> ProtectResult:
    """Make ``model`` non-fine-tunable on ``restricted`` while it keeps its skill on ``original``.

    model: a classifier returning (N, C) logits. original / restricted: Dataset or DataLoader of
    (input, label); ``restricted`` may be a list of them (several restricted domains). original_test:
    held-out original data for the accuracy floor and the history (None: no floor check).
    config: ProtectConfig; keyword overrides set its fields (``protect(m, o, r, loss="klu")``).
    Returns a ProtectResult; the input model is left untouched unless ``in_place=True``.
    """
    if config is None:
        config = ProtectConfig(**overrides)
    elif overrides:
        config = ProtectConfig.from_dict({**config.to_dict(), **overrides})
    cfg = config
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    if not cfg.in_place:
        model = copy.deepcopy(model)
    model.to(device)
    head = _find_head(model, cfg.head)
    dtype = head.weight.dtype

    domains: Sequence = restricted if isinstance(restricted, list) else [restricted]
    if not domains:
        raise ValueError("protect: restricted is an empty list")
    xo, yo = _prepare(original, "original", device, dtype, model)
    restricted_xy = [_prepare(d, f"restricted[{i}]", device, dtype, model) for i, d in enumerate(domains)]
    test_xy = _prepare(original_test, "original_test", device, dtype, model) if original_test is not None else None
    if test_xy is not None and cfg.eval_size is not None and len(test_xy[0]) > cfg.eval_size:
        sel = torch.randperm(len(test_xy[0]), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.eval_size]
        test_xy = (test_xy[0][sel.to(device)], test_xy[1][sel.to(device)])

    torch.manual_seed(cfg.seed)                      # dropout and other global-RNG layers
    gen = torch.Generator().manual_seed(cfg.seed)    # batches, strategies, head re-initialisation
    r_streams = [BatchStream(x, y, gen) for x, y in restricted_xy]
    o_stream = BatchStream(xo, yo, gen)

    mode = MODES[cfg.mode](model, head)
    fts_opt = _make_opt(cfg.fts_optimizer, mode.optim_params, cfg.fts_lr)
    ntr_opt = _make_opt(cfg.ntr_optimizer, mode.optim_params, cfg.ntr_lr)
    model.train()

    history: List[dict] = []
    start, streak, stop_reason = 0, 0, ""
    last_good = mode.snapshot()
    ckpt = os.path.join(cfg.checkpoint_dir, "protect.pt") if cfg.checkpoint_dir else None
    if cfg.resume and ckpt and os.path.exists(ckpt):
        state = load_checkpoint(ckpt)
        changed = config_changes(state.get("config", {}), cfg)
        if changed:
            raise ValueError(f"protect: the checkpoint {ckpt} was written with a different config "
                             f"({', '.join(changed)}); resume with the same settings, or use a new checkpoint_dir")
        mode.restore(state["weights"])
        last_good = state["last_good"]
        fts_opt.load_state_dict(state["fts_opt"])
        ntr_opt.load_state_dict(state["ntr_opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        o_stream.load_state_dict(state["o_stream"])
        for s, st in zip(r_streams, state["r_streams"]):
            s.load_state_dict(st)
        history, start, streak = state["history"], state["iteration"], state["streak"]
        log.info("protect: resumed from %s at iteration %d", ckpt, start)

    def next_batch_for(stream):
        def next_batch(strategy):
            x, y = stream.next(strategy.batch_size)
            q = strategy.query_size
            return x[:-q], y[:-q], x[-q:], y[-q:]
        return next_batch

    query_extra = None
    if cfg.feature_inner_weight:
        # the margin hinge at every simulated attacker step theta'_k, from the query batch's own forward
        def query_extra(forward, xq):
            out, hinge = _margin_run(model, head, lambda: forward(xq), cfg.feature_margin, cfg.feature_robust)
            return out, cfg.feature_inner_weight * hinge

    bar = _progress(cfg, cfg.iterations, start)
    try:
        for it in range(start, cfg.iterations):
            rec = {"iteration": it}
            t0 = time.perf_counter()
            mode.begin_iteration()
            plan = []
            for t in range(cfg.trajectories):
                if cfg.strategy_sampling == "cycle":
                    strat = cfg.strategies[(it * cfg.trajectories + t) % len(cfg.strategies)]
                else:
                    strat = cfg.strategies[int(torch.randint(len(cfg.strategies), (1,), generator=gen))]
                if cfg.restricted_sampling == "each":
                    plan += [(strat, s) for s in r_streams]
                else:
                    plan.append((strat, r_streams[int(torch.randint(len(r_streams), (1,), generator=gen))]))
            # Uniform reference weighting n_q,k / sum n_q (or linear in k), over every trajectory.
            raw = [[s.query_size * ((k + 1) if cfg.step_weighting == "linear" else 1)
                    for k in range(s.steps or cfg.inner_steps)] for s, _ in plan]
            norm = float(sum(map(sum, raw)))
            fts = []
            for (strat, stream), w in zip(plan, raw):
                fts.append(mode.trajectory(strat, next_batch_for(stream), cfg.loss, [v / norm for v in w], gen,
                                           query_extra))
            fts = torch.cat(fts)
            if cfg.feature_weight:
                x_r = plan[0][1].next(plan[0][0].batch_size)[0]
                x_o = o_stream.next(cfg.ntr_batch_size)[0] if cfg.feature_loss == "energy" else None
                decays = [cfg.feature_decay * float(u) for u in torch.rand(cfg.feature_decay_samples, generator=gen)
                          ] if cfg.feature_loss == "margin" and cfg.feature_decay > 0 else []
                rec["feature_loss"] = float(mode.meta_backward(
                    lambda: cfg.feature_weight * _feature_loss(cfg.feature_loss, model, head, x_r, x_o,
                                                              cfg.feature_margin, decays, cfg.feature_robust,
                                                              cfg.feature_decay_st)))
            params = mode.use_meta_grad()
            if cfg.clip_norm is not None:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            else:
                gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            rec["fts_loss"] = float(fts.mean())
            rec["grad_norm"] = float(gnorm)
            ok = math.isfinite(rec["fts_loss"]) and math.isfinite(rec["grad_norm"])
            t1 = time.perf_counter()
            rec["t_fts"] = t1 - t0
            if ok:
                fts_opt.step()
                ntr_losses = []
                for _ in range(cfg.ntr_steps):
                    mode.use_plain_grad()
                    x, y = o_stream.next(cfg.ntr_batch_size)
                    loss = cross_entropy(model(x), y)
                    loss.backward()
                    ntr_losses.append(loss.detach())
                    ntr_opt.step()
                rec["ntr_loss"] = float(torch.stack(ntr_losses).mean()) if ntr_losses else None
                ok = rec["ntr_loss"] is None or math.isfinite(rec["ntr_loss"])
                rec["t_ntr"] = time.perf_counter() - t1
            if not ok:
                mode.rewind()                      # weights and buffers as at the iteration's start
                streak += 1
                rec["skipped"] = True
                history.append(rec)
                log.warning("protect: iteration %d non-finite (FTS loss %s, grad norm %s, NTR loss %s): skipped",
                            it, rec["fts_loss"], rec["grad_norm"], rec.get("ntr_loss"))
                if streak > cfg.max_nonfinite:
                    raise NonFiniteError(f"protect: {streak} consecutive non-finite iterations (last at {it}); "
                                         f"the error's .model holds the last finite weights", mode.release())
                continue
            streak = 0
            last_iter = it + 1 == cfg.iterations
            if test_xy is not None and ((it + 1) % cfg.eval_every == 0 or last_iter):
                te = time.perf_counter()
                rec["original_acc"] = accuracy(model, *test_xy)
                rec["t_eval"] = time.perf_counter() - te
                if cfg.original_acc_floor is not None and rec["original_acc"] <= cfg.original_acc_floor:
                    mode.restore(last_good)
                    stop_reason = (f"original accuracy {rec['original_acc']:.4f} <= floor "
                                   f"{cfg.original_acc_floor} at iteration {it}: rolled back and stopped")
                    history.append(rec)
                    log.warning("protect: %s", stop_reason)
                    break
                last_good = mode.snapshot()
            history.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(fts=f"{rec['fts_loss']:.3f}", ntr=f"{rec.get('ntr_loss') or 0:.3f}",
                                **({"acc": f"{rec['original_acc']:.3f}"} if "original_acc" in rec else {}))
            if ckpt and ((it + 1) % cfg.checkpoint_every == 0 or last_iter):
                save_checkpoint(ckpt, {
                    "iteration": it + 1, "weights": mode.snapshot(), "last_good": last_good,
                    "fts_opt": fts_opt.state_dict(), "ntr_opt": ntr_opt.state_dict(), "gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "o_stream": o_stream.state_dict(),
                    "r_streams": [s.state_dict() for s in r_streams], "history": history, "streak": streak,
                    "config": cfg.to_dict()})
    finally:
        if bar is not None:
            bar.close()
    out = mode.release()
    result = ProtectResult(out, history, cfg, bool(stop_reason), stop_reason,
                           accuracy(out, *test_xy) if test_xy is not None else None,
                           time.perf_counter() - t_start)
    return result
