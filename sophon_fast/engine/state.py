"""The state of one protection run, in one object that saves and loads itself (atomic checkpoints)."""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from sophon_fast._atomic import atomic_path
from sophon_fast.distributed import World
from sophon_fast.engine.config import ProtectConfig
from sophon_fast.engine.streams import BatchStream
from sophon_fast.optim import make_optimizer

log = logging.getLogger("sophon_fast")

# Fields that may change between a checkpoint and its resumption (they do not change the computation).
RESUMABLE_FIELDS = ("iterations", "progress", "checkpoint", "in_place", "device")


def config_changes(saved: dict, cfg: ProtectConfig) -> List[str]:
    """Names of the fields of ``cfg`` that differ from a saved ``cfg.to_dict()`` (RESUMABLE_FIELDS aside)."""
    now = json.loads(json.dumps(cfg.to_dict()))      # tuples -> lists, as in a JSON record
    # a field added after the checkpoint was written counts as its default
    defaults = json.loads(json.dumps(ProtectConfig().to_dict()))
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **json.loads(json.dumps(saved))} if saved else {}
    return sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_FIELDS and saved.get(k) != now.get(k))


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (tensors and plain containers only: no pickle)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


@dataclass
class RunState:
    """Everything a protection run carries from one iteration to the next."""
    cfg: ProtectConfig
    task: Any
    mode: Any
    gen: torch.Generator                  # on the model's device: batches, head re-initialisation, defences
    plan_rng: random.Random               # host-side choices (which strategy, which domain)
    r_streams: List[BatchStream]
    o_stream: BatchStream
    test: Optional[tuple]
    fts_opt: torch.optim.Optimizer
    ntr_opt: torch.optim.Optimizer
    defences: list
    world: World = field(default_factory=World)
    last_good: Any = None
    start_metric: Optional[float] = None
    history: List[dict] = field(default_factory=list)
    iteration: int = 0
    streak: int = 0
    stop_reason: str = ""

    @classmethod
    def start(cls, cfg: ProtectConfig, task, mode, prepared: dict, world: Optional[World] = None) -> "RunState":
        """A fresh run, or the checkpointed one when ``cfg.checkpoint.resume`` and a checkpoint exists."""
        device = mode.optim_params[0].device
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        test = prepared["test"]
        if test is not None and cfg.evaluation.size is not None and len(test[0]) > cfg.evaluation.size:
            sel = torch.randperm(len(test[0]), generator=torch.Generator(device=device).manual_seed(cfg.seed),
                                 device=device)[:cfg.evaluation.size]
            test = tuple(t[sel.to(t.device)] for t in test)
        run = cls(cfg=cfg, task=task, mode=mode, gen=gen, plan_rng=random.Random(cfg.seed),
                  r_streams=[BatchStream(t, gen) for t in prepared["restricted"]],
                  o_stream=BatchStream(prepared["original"], gen), test=test,
                  fts_opt=make_optimizer(cfg.fts_optimizer, mode.optim_params, cfg.alpha * cfg.base_lr),
                  ntr_opt=make_optimizer(cfg.ntr_optimizer, mode.optim_params, cfg.beta * cfg.base_lr),
                  defences=[d.build() if hasattr(d, "build") else d for d in cfg.defences],
                  world=world if world is not None else World())
        run.last_good = mode.snapshot()
        path = run.path
        if cfg.checkpoint.resume and path and os.path.exists(path):
            run.load(path)
        elif test is not None:
            run.start_metric = task.evaluate(mode.model, test)
        return run

    @property
    def path(self) -> Optional[str]:
        d = self.cfg.checkpoint.dir
        if not d:
            return None
        w = self.world                      # sharded: each rank saves and resumes its own shards
        return os.path.join(d, f"protect.rank{w.rank}-of-{w.size}.pt" if w.sharded else "protect.pt")

    def degraded(self, metric: float) -> bool:
        """True when ``metric`` is worse than the starting one by more than ``evaluation.max_drop`` (relative)."""
        tol = self.cfg.evaluation.max_drop * abs(self.start_metric)
        if self.task.higher_is_better:
            return metric < self.start_metric - tol
        return metric > self.start_metric + tol

    def skip(self, it: int, rec: dict) -> None:
        """Record a non-finite iteration and rewind its weights and buffers."""
        self.mode.rewind()
        self.streak += 1
        rec["skipped"] = True
        self.history.append(rec)
        self.iteration = it + 1
        log.warning("protect: iteration %d non-finite (FTS loss %s, grad norm %s, NTR loss %s): skipped",
                    it, rec.get("fts_loss"), rec.get("grad_norm"), rec.get("ntr_loss"))

    def maybe_checkpoint(self, it: int) -> None:
        every = self.cfg.checkpoint.every
        if (self.world.is_main or self.world.sharded) and self.path and ((it + 1) % every == 0 or it + 1 == self.cfg.iterations or self.stop_reason):
            self.save(self.path)

    def state_dict(self) -> dict:
        device = self.gen.device
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        return _cpu({
            "iteration": self.iteration, "streak": self.streak, "history": self.history,
            "start_metric": self.start_metric, "stop_reason": self.stop_reason,
            "weights": self.mode.snapshot(), "last_good": self.last_good,
            "fts_opt": self.fts_opt.state_dict(), "ntr_opt": self.ntr_opt.state_dict(),
            "gen": self.gen.get_state(), "global_rng": rng, "plan_rng": list(self.plan_rng.getstate()[1]),
            "plan_rng_gauss": self.plan_rng.getstate()[2],
            "o_stream": self.o_stream.state_dict(), "r_streams": [s.state_dict() for s in self.r_streams],
            "config": self.cfg.to_dict()})

    def save(self, path: str) -> None:
        save_checkpoint(path, self.state_dict())

    def load(self, path: str) -> None:
        s = load_checkpoint(path)
        changed = config_changes(s.get("config", {}), self.cfg)
        if changed:
            raise ValueError(f"protect: the checkpoint {path} was written with a different config "
                             f"({', '.join(changed)}); resume with the same settings, or use a new checkpoint dir")
        device = self.gen.device
        self.mode.restore(_to(s["weights"], device))
        self.last_good = _to(s["last_good"], device)
        self.fts_opt.load_state_dict(s["fts_opt"])
        self.ntr_opt.load_state_dict(s["ntr_opt"])
        self.gen.set_state(s["gen"])
        torch.set_rng_state(s["global_rng"]["cpu"])
        if "cuda" in s["global_rng"]:
            torch.cuda.set_rng_state(s["global_rng"]["cuda"], device)
        self.plan_rng.setstate((3, tuple(s["plan_rng"]), s["plan_rng_gauss"]))
        self.o_stream.load_state_dict(s["o_stream"])
        for stream, st in zip(self.r_streams, s["r_streams"]):
            stream.load_state_dict(st)
        self.history, self.iteration, self.streak = s["history"], s["iteration"], s["streak"]
        self.start_metric, self.stop_reason = s["start_metric"], s["stop_reason"]
        log.info("protect: resumed from %s at iteration %d", path, self.iteration)
