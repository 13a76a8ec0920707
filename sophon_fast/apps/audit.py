"""``sophon-fast audit``: the attack-search release gate (:func:`sophon_fast.audit.audit`) on saved models.

    sophon-fast audit --model PROTECTED --restricted DATA [--original DATA] [--unprotected PATH]
                      [--reference NAME=PATH ...] [--quick | --full] [--trials N] [--steps N] [--null-bodies N]
                      [--fixed default,adaptive] [--methods ...] [--optimizers ...] [--out DIR] [--seed S]

Models and data are read as ``sophon-fast attack`` reads them (:mod:`sophon_fast.apps.user`). The studies live
in ``DIR/audit.db``: the same command again continues them (more ``--trials`` extend them); the report is
``DIR/report.json``, ``report.md`` and ``report.png``. Exit status 0 whatever the verdict, which is printed.
"""
from __future__ import annotations

import argparse


def add_parser(sub, inputs) -> argparse.ArgumentParser:
    """Register the ``audit`` subcommand on ``sub``; ``inputs(parser, what)`` adds the shared model/task flags."""
    au = sub.add_parser("audit", help="search for the strongest fine-tuning attack on a protected model and on its "
                                      "baselines (scratch, random null bodies, references); report a verdict")
    inputs(au, "to audit")
    au.add_argument("--restricted", required=True, help="the restricted domain, as protect's --restricted")
    au.add_argument("--original", default=None, help="image: original-domain data, enables benign-first steps")
    au.add_argument("--unprotected", default=None, help="the same model before protection (searched as well)")
    au.add_argument("--reference", action="append", default=[], metavar="NAME=PATH",
                    help="another model searched like the unprotected one (e.g. one pre-trained without the "
                         "restricted data); repeatable")
    budget = au.add_mutually_exclusive_group()
    budget.add_argument("--quick", dest="budget", action="store_const", const="quick",
                        help="12 trials per model, 2 null bodies, 60 steps (the default; cnn_small on MNIST: "
                             "docs/audit.md)")
    budget.add_argument("--full", dest="budget", action="store_const", const="full",
                        help="60 trials per model, 5 null bodies, 60 steps")
    au.set_defaults(budget="quick")
    au.add_argument("--trials", type=int, default=None, help="trials per model (overrides the budget's)")
    au.add_argument("--steps", type=int, default=None, help="optimiser steps per trial (overrides the budget's)")
    au.add_argument("--null-bodies", type=int, default=None, help="random initialisations searched (overrides)")
    au.add_argument("--fixed", default="", help="image: today's fixed attacks run as the first trials, "
                                                 "comma-separated suites among default, adaptive")
    au.add_argument("--methods", nargs="+", default=None, help="restrict the space's methods")
    au.add_argument("--optimizers", nargs="+", default=None, help="restrict the space's optimisers")
    au.add_argument("--seed", type=int, default=0)
    au.add_argument("--out", default="runs/audit", help="the output folder (audit.db, report.*)")
    return au


def audit_command(args) -> int:
    """Load the models and data of ``args``, run :func:`sophon_fast.audit.audit`, print the verdict."""
    from sophon_fast.apps.user import load_for, task_domains
    from sophon_fast.audit import audit, make_space
    refs = {}
    for spec in args.reference:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--reference must be NAME=PATH, got {spec!r}")
        refs[name] = path
    model, tokenizer = load_for(args.task, args.model)
    domains = task_domains(args.task, model, tokenizer, args.original if args.task == "image" else None,
                           [args.restricted], args)
    original = domains[0][0] if args.task == "image" and args.original else None
    train, test = domains[-1]
    unprotected = load_for(args.task, args.unprotected)[0] if args.unprotected else None
    references = {name: load_for(args.task, path)[0] for name, path in refs.items()}
    options = {k: v for k, v in (("methods", args.methods), ("optimizers", args.optimizers)) if v is not None}
    suites = [s for s in args.fixed.split(",") if s]
    fixed = []
    if suites:
        bad = [s for s in suites if s not in ("default", "adaptive")]
        if bad or args.task != "image":
            raise ValueError(f"--fixed takes the image task's suites default and adaptive, got {args.fixed!r}")
        from sophon_fast.audit.search import BUDGETS
        steps = args.steps if args.steps is not None else BUDGETS[args.budget]["steps"]
        fixed, skipped = make_space("image", train, test, original, steps, **options).fixed_trials(model, suites)
        if skipped:
            print(f"[audit] not expressible in the search space, left out: {', '.join(skipped)}")
    report = audit(model, train, test, unprotected=unprotected, references=references, original=original,
                   task=args.task, budget=args.budget, trials=args.trials, null_bodies=args.null_bodies,
                   steps=args.steps, out=args.out, seed=args.seed, fixed=fixed, space_options=options,
                   progress=not args.no_progress, say=print)
    v = report["verdict"]
    print(f"[audit] verdict: {v['state']}: {v['detail']}")
    return 0
