"""The ``sophon-fast`` command (also ``python -m sophon_fast``).

    sophon-fast demo     [--task image|lm|diffusion] [--quick] [--out DIR]   pre-train, protect, attack, report
    sophon-fast protect  [--task image|lm|diffusion] --model PATH --original DATA --restricted DATA --out PATH
                         [--config adaptive|trap|lm|diffusion|FILE.json] [--iterations N ...]
    sophon-fast attack   [--task ...] --model PATH --restricted DATA [--unprotected PATH] [--out DIR]
    sophon-fast audit    [--task ...] --model PATH --restricted DATA [--unprotected PATH] [--quick|--full] [--out DIR]
    sophon-fast report   DIR_OR_JSON                         re-render report.md / curves.png (/ adaptive.png)
    sophon-fast backends                                     which kernel backends are usable
    sophon-fast bench                                        a one-minute speed check of this machine

``torchrun --nproc_per_node=N -m sophon_fast protect ...`` spreads the trajectories over N ranks (gloo on CPU,
NCCL with one GPU per rank); only rank 0 writes the model and checkpoints.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _threads(n: Optional[int]) -> None:
    if n is not None:
        if n < 1:
            raise SystemExit(f"sophon-fast: --threads must be >= 1, got {n}")
        import torch
        torch.set_num_threads(n)


def _cmd_demo(a) -> int:
    if a.task != "image":
        from sophon_fast.apps import task_demos
        run = task_demos.run_lm_demo if a.task == "lm" else task_demos.run_diffusion_demo
        run(out=a.out or f"runs/demo-{a.task}", quick=a.quick, seed=a.seed, progress=not a.no_progress,
            iterations=a.iterations)
        return 0
    from sophon_fast.apps.demo import run_demo
    a.out = a.out or "runs/demo"
    run_demo(out=a.out, quick=a.quick, seed=a.seed, original=a.original, restricted=a.restricted, arch=a.arch,
             iterations=a.iterations, attacks=a.suite, attack_epochs=a.attack_epochs, subset=a.subset,
             pretrain_epochs=a.pretrain_epochs, adaptive=not a.no_adaptive, progress=not a.no_progress, audit=a.audit)
    return 0


def load_config(spec: Optional[str], model=None):
    """A ProtectConfig: a public recipe by name (``sophon_fast.recipes.RECIPES``: adaptive, trap, lm, diffusion; for
    ``model``), or a JSON file of its fields (``ProtectConfig.to_dict`` form); None: the reference defaults."""
    import json

    from sophon_fast import recipes
    from sophon_fast.engine import ProtectConfig
    if spec is None:
        return ProtectConfig()
    if spec in recipes.RECIPES:
        return recipes.recipe(spec, model)
    try:
        with open(spec) as f:
            fields = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the config file {spec}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"the config file {spec} is not valid JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"the config file {spec} must hold a JSON object of ProtectConfig fields")
    return ProtectConfig.from_dict(fields)


def _model_arg(a) -> None:
    if (a.model is None) == (a.model_opt is None):
        raise ValueError("give the model once: MODEL or --model PATH")
    a.model = a.model if a.model is not None else a.model_opt


def _cmd_protect(a) -> int:
    import torch

    from sophon_fast.apps.user import load_for, protect_command
    from sophon_fast.distributed import init_from_env
    from sophon_fast.engine import Checkpointing
    _model_arg(a)
    flags = {k: v for k, v in (("loss", a.loss), ("mode", a.mode), ("iterations", a.iterations),
                               ("inner_steps", a.inner_steps), ("seed", a.seed)) if v is not None}
    if a.checkpoint_dir is not None:
        flags["checkpoint"] = Checkpointing(a.checkpoint_dir, resume=True)
    if init_from_env() and torch.cuda.is_available():     # under torchrun: one GPU per rank
        flags["device"] = f"cuda:{torch.cuda.current_device()}"
    cfg = None
    if a.config is not None:   # a recipe for this model (BatchNorm changes the image recipes) or a JSON file
        cfg = load_config(a.config, load_for(a.task, a.model)[0] if a.task == "image" else None)
    return protect_command(a, cfg, {"progress": not a.no_progress, **flags})


def _cmd_attack(a) -> int:
    from sophon_fast.apps.user import attack_command
    _model_arg(a)
    return attack_command(a)


def _cmd_audit(a) -> int:
    from sophon_fast.apps.audit import audit_command
    _model_arg(a)
    return audit_command(a)


def _cmd_report(a) -> int:
    import os

    from sophon_fast.apps.report import load_report, write_report
    report = load_report(a.path)
    out = a.path if os.path.isdir(a.path) else os.path.dirname(os.path.abspath(a.path))
    paths = write_report(report, out)
    print("\n".join(p for p in paths.values() if p))
    return 0


def _cmd_backends(a) -> int:
    from sophon_fast import backend_report
    backend_report(print_report=True)
    return 0


def _cmd_bench(a) -> int:
    from sophon_fast.apps.quickbench import main as bench_main
    return bench_main()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sophon-fast", description="SOPHON non-fine-tunable learning, fast.")
    p.add_argument("--threads", type=int, default=None, help="torch threads (fewer can be faster on a busy machine)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="pre-train, protect, attack and report on embedded offline data")
    d.add_argument("--task", default="image", choices=["image", "lm", "diffusion"],
                   help="image: classifiers (Fashion-MNIST -> MNIST); lm: GPT-2 (English -> Python); "
                        "diffusion: a DDPM UNet (Fashion-MNIST -> MNIST)")
    d.add_argument("--out", default=None, help="default runs/demo (image), runs/demo-lm, runs/demo-diffusion")
    d.add_argument("--quick", action="store_true", help="smaller budget (<= 10 minutes on 2 cores)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--original", default=None)
    d.add_argument("--restricted", default=None)
    d.add_argument("--arch", default=None)
    d.add_argument("--iterations", type=int, default=None, help="protection iterations")
    d.add_argument("--suite", default=None, help="attack suite: quick, paper, default, full")
    d.add_argument("--attack-epochs", type=int, default=None)
    d.add_argument("--pretrain-epochs", type=int, default=None)
    d.add_argument("--subset", type=int, default=None, help="limit every split to N samples (tests)")
    d.add_argument("--no-adaptive", action="store_true",
                   help="image task: skip the adaptive suite (attacks that know the model was protected)")
    d.add_argument("--audit", action="store_true", help="image task: also run the attack search (sophon-fast audit), "
                   "its first trials the adaptive stage's attacks; its verdict becomes a target (needs optuna)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)

    def inputs(q, what):
        q.add_argument("model", nargs="?", default=None, help=f"the model {what} (or --model)")
        q.add_argument("--model", dest="model_opt", default=None, metavar="PATH",
                       help="image/diffusion: a .safetensors saved by sophon_fast.save_model; lm: a Hugging Face "
                            "causal-LM directory with its tokenizer (save_pretrained)")
        q.add_argument("--task", default="image", choices=["image", "lm", "diffusion"])
        q.add_argument("--block-size", type=int, default=128, help="lm: tokens per block")
        q.add_argument("--image-size", type=int, default=28, help="image folders: resize to this many pixels square")
        q.add_argument("--no-progress", action="store_true")

    pr = sub.add_parser("protect", help="protect a model against a restricted domain, keeping the original one")
    inputs(pr, "to protect")
    pr.add_argument("--original", required=True, help="a built-in domain (fashion_mnist, mnist, digits...), an image "
                    "folder (one subfolder per class), an .npz of arrays, a text or JSON-lines file, or a Hugging Face "
                    "datasets directory")
    pr.add_argument("--restricted", required=True, nargs="+", help="one or more domains, as --original")
    pr.add_argument("--out", required=True, help="lm: a directory (from_pretrained loads it); otherwise a "
                                                 ".safetensors path. Written only once protection has succeeded")
    pr.add_argument("--config", default=None,
                    help="a recipe of sophon_fast.recipes (adaptive, trap, lm, diffusion) or a JSON file of "
                         "ProtectConfig fields; flags below override it. Default: the reference settings "
                         "(lm: the lm recipe)")
    pr.add_argument("--loss", default=None)
    pr.add_argument("--mode", default=None, choices=["fast", "reference"])
    pr.add_argument("--iterations", type=int, default=None)
    pr.add_argument("--inner-steps", type=int, default=None)
    pr.add_argument("--seed", type=int, default=None)
    pr.add_argument("--checkpoint-dir", default=None, help="checkpoints here; a rerun resumes")
    pr.set_defaults(fn=_cmd_protect)

    at = sub.add_parser("attack", help="fine-tune a model on restricted data, against an unprotected model and scratch")
    inputs(at, "to attack")
    at.add_argument("--restricted", required=True, help="a domain, as protect's --restricted")
    at.add_argument("--suite", default="default", help="image: the attack suite (quick, paper, default, full)")
    at.add_argument("--unprotected", default=None, help="the same model before protection, for comparison")
    at.add_argument("--epochs-scale", type=float, default=1.0, help="image: scale every attack's epochs")
    at.add_argument("--steps", type=int, default=200, help="lm: optimiser steps per attack")
    at.add_argument("--batch-size", type=int, default=8, help="lm: blocks per step")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--out", default=None, help="write attacks.json into this directory")
    at.set_defaults(fn=_cmd_attack)

    from sophon_fast.apps.audit import add_parser as audit_parser
    audit_parser(sub, inputs).set_defaults(fn=_cmd_audit)

    r = sub.add_parser("report", help="re-render report.md, curves.png (and adaptive.png) from report.json")
    r.add_argument("path")
    r.set_defaults(fn=_cmd_report)

    sub.add_parser("backends", help="which kernel backends are built and usable").set_defaults(fn=_cmd_backends)
    sub.add_parser("bench", help="quick speed check: fast vs reference ratios").set_defaults(fn=_cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _threads(args.threads)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\ninterrupted: checkpoints written so far are intact; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:   # bad input: one line, no traceback
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"sophon-fast: error: {msg}", file=sys.stderr)
        return 2
