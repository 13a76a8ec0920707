"""The SOPHON outer loop, as named phases (shared/docs/algorithm.md section 2):

    for it in range(iterations):
        plan = plan_trajectories(...)          which strategy simulates which restricted domain
        simulate_and_accumulate(...)           K inner steps per trajectory, meta-gradient accumulated
        fts_step(...)                          clip, fine-tuning suppression step
        ntr_steps(...)                         normal training reinforcement on the original domain
        evaluate_or_roll_back(...)             on schedule: original metric; rollback + stop on a large drop
        checkpoint(...)                        atomic, resumable

Non-finite values are caught before they reach the weights: a non-finite FTS loss or meta-gradient skips
the FTS step, a non-finite NTR loss or gradient skips that NTR step, and either rewinds the iteration
(weights and buffers as at its start); more than ``max_nonfinite`` skipped iterations in a row raise
``NonFiniteError`` carrying the last finite model. The run's state is one object, :class:`RunState`.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from sophon_fast.engine.config import ProtectConfig
from sophon_fast.distributed import World
from sophon_fast.engine.modes import FastMode, ReferenceMode, ShardedMode, is_sharded, select_params
from sophon_fast.engine.state import RunState, config_changes  # noqa: F401  (config_changes: public helper)
from sophon_fast.tasks import make_task

log = logging.getLogger("sophon_fast")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite iterations; ``.model`` holds the last finite weights."""

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
    original_metric: Optional[float] = None
    seconds: float = 0.0


def _task_for(cfg: ProtectConfig, task):
    """``task``, or ``cfg.task`` built with the config's task options; a given task must agree with the options
    the config sets (ValueError otherwise: they would be silently ignored)."""
    options = {k: getattr(cfg, k) for k in ("timestep", "suppression_tmax") if getattr(cfg, k) is not None}
    if task is None:
        return make_task(cfg.task, **options)
    wrong = [f"{k}={v!r} (the task has {getattr(task, k, None)!r})" for k, v in options.items()
             if getattr(task, k, None) != v]
    if wrong:
        raise ValueError(f"protect: the config sets {', '.join(wrong)}; set it on the task object or leave it "
                         f"out of the config")
    return task


def _progress(cfg: ProtectConfig, start: int, main: bool):
    show = main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.iterations, initial=start, desc=f"protect[{cfg.mode}]", unit="it", dynamic_ncols=True)


def plan_trajectories(run: RunState, it: int) -> List[tuple]:
    """[(strategy, restricted stream)] for iteration ``it``; host-side choices from ``run.plan_rng``."""
    cfg, plan = run.cfg, []
    for t in range(cfg.trajectories):
        if cfg.strategy_sampling == "cycle":
            strat = cfg.strategies[(it * cfg.trajectories + t) % len(cfg.strategies)]
        else:
            strat = run.plan_rng.choice(cfg.strategies)
        if cfg.restricted_sampling == "each":
            plan += [(strat, s) for s in run.r_streams]
        else:
            plan.append((strat, run.plan_rng.choice(run.r_streams)))
    return plan


def simulate_and_accumulate(run: RunState, plan: Sequence[tuple], rec: dict) -> torch.Tensor:
    """Every planned trajectory this rank runs, and every defence's loss, into the meta-gradient; returns this
    rank's query losses (K per trajectory, concatenated). Each step's loss weighs n_query / (sum of n_query
    over all steps of all trajectories), the reference's uniform average, times the strategy's query weighting
    (``Strategy.query_weights``: 1 for "uniform")."""
    cfg, mode, world = run.cfg, run.mode, run.world
    mode.begin_iteration()
    steps = [s.steps or cfg.inner_steps for s, _ in plan]
    norm = float(sum(s.query_size * k for (s, _), k in zip(plan, steps)))
    losses = []
    for i, ((s, stream), k) in enumerate(zip(plan, steps)):
        if world.mine(i):
            weights = [s.query_size * u / norm for u in s.query_weights(k)]
            losses.append(mode.trajectory(s, stream, cfg.loss, weights, run.gen, run.o_stream))
        else:
            mode.skip_trajectory(s, stream, k, run.gen, run.o_stream)
    if run.defences:   # every rank computes the same term; 1/world of it each adds up to one
        strat, stream = plan[0]
        restricted = stream.next(strat.batch_size)
        needs_o = any(getattr(d, "needs_original", False) for d in run.defences)
        original = run.o_stream.next(cfg.ntr_batch_size) if needs_o else None
        rec["defence_loss"] = mode.meta_backward(
            lambda m: sum(d.loss(m, restricted, original, run.gen) for d in run.defences) / world.size) * world.size
    return torch.cat(losses) if losses else torch.zeros(0, device=run.gen.device)


def fts_step(run: RunState, fts: torch.Tensor, rec: dict) -> bool:
    """Combine the ranks' meta-gradients, clip to ``clip_norm`` and take the FTS step, unless non-finite."""
    run.world.combine_(run.mode.meta_tensors(), "the meta-gradient")
    gnorm = run.mode.meta_grad_norm(run.cfg.clip_norm)
    rec["fts_loss"] = run.world.mean_loss(fts, "the FTS loss")             # host reads: once per iteration
    rec["grad_norm"] = float(gnorm)
    if "defence_loss" in rec:
        rec["defence_loss"] = float(rec["defence_loss"])
    if not (math.isfinite(rec["fts_loss"]) and math.isfinite(rec["grad_norm"])):
        return False
    run.mode.step(run.fts_opt, "meta")
    return True


def ntr_steps(run: RunState, rec: dict) -> bool:
    """``ntr_steps`` training steps on original batches (each rank takes its rows of every batch); a
    non-finite loss or gradient stops before its step."""
    cfg, mode, world, losses = run.cfg, run.mode, run.world, []
    for _ in range(cfg.ntr_steps):
        rows, share = world.my_rows(run.o_stream.next(cfg.ntr_batch_size), run.task.loss_weight)
        loss = run.task.train_loss(mode.model, rows, run.gen) * share
        mode.plain_backward(loss)
        grads = mode.plain_tensors()
        world.combine_(grads, "the NTR gradient")
        gnorm = mode.grad_norm(grads)
        value, norm = world.sum_scalars([float(loss.detach()), 0.0], gnorm.device, "the NTR loss")[0], float(gnorm)
        losses.append(value)
        if not (math.isfinite(value) and math.isfinite(norm)):
            rec["ntr_loss"] = value
            return False
        mode.step(run.ntr_opt, "plain")
    rec["ntr_loss"] = sum(losses) / len(losses) if losses else None
    return True


def evaluate_or_roll_back(run: RunState, it: int, rec: dict) -> bool:
    """On schedule, the original-domain metric; True when it dropped too far (weights rolled back)."""
    cfg, ev = run.cfg, run.cfg.evaluation
    if run.test is None or not ((it + 1) % ev.every == 0 or it + 1 == cfg.iterations):
        return False
    te = time.perf_counter()
    rec["original_metric"] = run.task.evaluate(run.mode.model, run.test)
    rec["t_eval"] = time.perf_counter() - te
    if ev.max_drop is not None and run.degraded(rec["original_metric"]):
        run.mode.restore(run.last_good)
        run.stop_reason = (f"original {run.task.metric} {rec['original_metric']:.4f} worse than {run.start_metric:.4f} "
                           f"by more than {ev.max_drop:.0%} at iteration {it}: rolled back and stopped")
        log.warning("protect: %s", run.stop_reason)
        return True
    run.last_good = run.mode.snapshot()
    return False


def protect(model: nn.Module, original, restricted, config: Optional[ProtectConfig] = None, *, task=None,
            original_test=None, **overrides) -> ProtectResult:
    """Make ``model`` non-fine-tunable on ``restricted`` while it keeps its skill on ``original``.

    Inside an initialised torch.distributed process group, the iteration's trajectories are spread over the
    ranks and NTR batches are split between them (sophon_fast.distributed); every rank returns the same model.
    A model sharded with FSDP2 (``fully_shard``) is protected sharded and in place (``in_place=True``,
    ``mode="fast"``): every rank runs every trajectory on its rows of each batch and keeps only its shards.

    model: for the default classification task, a module returning (N, C) logits. original / restricted:
    what the task's ``prepare`` accepts (classification: Dataset, DataLoader or (X, Y) tuple); ``restricted``
    may be a list (several restricted domains). original_test: held-out original data for the scheduled
    evaluation and rollback (None: neither). config: a ProtectConfig; keyword overrides replace its fields
    (``protect(m, o, r, cfg, loss="klu")``: loss-dependent defaults follow the final loss). task: a Task
    object (default: ``config.task`` by name). The input model is left untouched unless ``in_place=True``;
    the caller's global RNG state is left as it was.
    Returns a ProtectResult. Raises ValueError on bad input or settings, NonFiniteError (see module doc).
    """
    config = config or ProtectConfig()
    cfg = (config.replace(**overrides) if overrides else config).resolved()
    t_start = time.perf_counter()
    task = _task_for(cfg, task)
    if task.losses and cfg.loss not in task.losses:
        raise ValueError(f"protect: loss {cfg.loss!r} is not one of the {task.name} task's {task.losses}")
    if cfg.meta_gradient == "unrolled" and not task.second_order:
        raise ValueError(f"protect: meta_gradient='unrolled' differentiates the attacker's loss twice, and the "
                         f"{task.name} task's loss has no second derivative; use meta_gradient='first_order'"
                         + (" or LanguageModelTask(second_order=True)" if task.name == "lm" else ""))
    sharded = is_sharded(model)
    if sharded:
        _check_sharded(cfg)
    if not cfg.in_place:
        model = copy.deepcopy(model)
    if cfg.device is not None:
        model.to(cfg.device)
    params = select_params(model, cfg.params)
    frozen = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for s in cfg.strategies:             # an attacker the task or model cannot serve: before any work
            s.attacker.check(task, model, params)
    except ValueError:
        for p in frozen:
            p.requires_grad_(True)
        raise
    domains = restricted if isinstance(restricted, list) else [restricted]
    if not domains:
        raise ValueError("protect: restricted is an empty list")
    prepared = dict(
        original=task.prepare(model, original, "original"),
        restricted=[task.prepare(model, d, f"restricted[{i}]") for i, d in enumerate(domains)],
        test=task.prepare(model, original_test, "original_test") if original_test is not None else None)
    device = next(iter(model.parameters())).device
    rng_devices = [device] if device.type == "cuda" else []
    restore_divide = None
    try:
        with torch.random.fork_rng(devices=rng_devices):            # the caller's global RNG is untouched
            torch.manual_seed(cfg.seed)                               # dropout and other global-RNG layers
            world = World(sharded=sharded)
            if sharded:
                mode = ShardedMode(model, task, params, world)
            elif cfg.mode == "reference":
                mode = ReferenceMode(model, task, params, unrolled=cfg.meta_gradient == "unrolled")
            else:
                mode = FastMode(model, task, params, unrolled=cfg.meta_gradient == "unrolled", unroll=cfg.unroll)
            restore_divide = _sum_reduction(model) if sharded else None
            run = RunState.start(cfg, task, mode, prepared, world)
            _iterate(run)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        if restore_divide is not None:
            restore_divide()
    out = run.mode.release()
    metric = task.evaluate(out, run.test) if run.test is not None else None
    return ProtectResult(out, run.history, cfg, bool(run.stop_reason), run.stop_reason, metric,
                         time.perf_counter() - t_start)


def _check_sharded(cfg: ProtectConfig) -> None:
    """What an FSDP2-sharded model needs of the settings (ValueError otherwise)."""
    world = World(sharded=True)
    if cfg.mode != "fast":
        raise ValueError("protect: an FSDP2-sharded model runs in mode='fast' (the reference mode needs unsharded weights)")
    if not cfg.in_place:
        raise ValueError("protect: an FSDP2-sharded model is protected in place (a copy would double its memory); "
                         "pass in_place=True")
    if cfg.device is not None:
        raise ValueError("protect: an FSDP2-sharded model stays on its devices; leave device=None")
    if cfg.meta_gradient == "unrolled":
        raise ValueError("protect: meta_gradient='unrolled' does not run on an FSDP2-sharded model: its reverse sweep "
                         "calls the model with differentiable stand-ins for the parameters (functional_call), which "
                         "FSDP2's sharded parameters cannot take; use meta_gradient='first_order'")
    lora = [i for i, s in enumerate(cfg.strategies) if s.attacker.kind == "lora"]
    if lora:
        raise ValueError(f"protect: strategies {lora} use the lora attacker, which does not run on an FSDP2-sharded "
                         f"model (its factors' gradients would need an all-reduce outside FSDP2); use another attacker")
    rows = [("ntr_batch_size", cfg.ntr_batch_size)]
    for i, s in enumerate(cfg.strategies):
        rows += [(f"strategies[{i}] support rows", s.batch_size - s.query_size), (f"strategies[{i}].query_size", s.query_size)]
    small = [f"{n}={v}" for n, v in rows if v < world.size]
    if small:
        raise ValueError(f"protect: every rank needs rows of each batch; {', '.join(small)} < {world.size} ranks")


def _sum_reduction(model: nn.Module):
    """Make FSDP2's reduce-scatter a plain sum (each rank's loss carries its rows' share): divide factor 1 with
    sum-only collectives (gloo has no PREMUL_SUM); returns the undo."""
    from torch.distributed.fsdp import FSDPModule
    saved = []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            groups = m._get_fsdp_state()._fsdp_param_groups
            saved.append((m, [(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups]))
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)

    def undo():
        for m, settings in saved:
            for g, (factor, force) in zip(m._get_fsdp_state()._fsdp_param_groups, settings):
                g.gradient_divide_factor, g.force_sum_reduction_for_comms = factor, force
    return undo


def _iterate(run: RunState) -> None:
    cfg = run.cfg
    for d in run.defences:
        d.attach(run.mode.model, run.task)
    run.mode.model.train()
    bar = _progress(cfg, run.iteration, run.world.is_main)
    try:
        for it in range(run.iteration, cfg.iterations if not run.stop_reason else run.iteration):
            rec = {"iteration": it}
            t0 = time.perf_counter()
            fts = simulate_and_accumulate(run, plan_trajectories(run, it), rec)
            ok = fts_step(run, fts, rec)
            t1 = time.perf_counter()
            rec["t_fts"] = t1 - t0
            ok = ok and ntr_steps(run, rec)
            rec["t_ntr"] = time.perf_counter() - t1
            if not ok:
                run.skip(it, rec)
                if run.streak > cfg.max_nonfinite:
                    raise NonFiniteError(f"protect: {run.streak} consecutive non-finite iterations (last at {it}); "
                                         f"the error's .model holds the last finite weights", run.mode.release())
            else:
                run.streak = 0
                stop = evaluate_or_roll_back(run, it, rec)
                run.history.append(rec)
                run.iteration = it + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(fts=f"{rec['fts_loss']:.3f}", ntr=f"{rec.get('ntr_loss') or 0:.3f}")
                if stop:
                    break
            run.maybe_checkpoint(it)
    finally:
        if bar is not None:
            bar.close()
