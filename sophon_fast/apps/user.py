"""``sophon-fast protect`` and ``sophon-fast attack`` on the user's own model and data.

    --task image      MODEL: a .safetensors saved by sophon_fast.save_model; data: a built-in domain name, an image
                      folder (one subfolder per class), an .npz of arrays or a datasets directory
    --task lm         MODEL: a Hugging Face causal-LM directory (save_pretrained, with its tokenizer); data: text
                      files, JSON-lines files or datasets directories, tokenised by the model's own tokenizer
    --task diffusion  MODEL: a denoiser .safetensors (``ddpm_unet_small``); data: as for images (labels unused)

``protect`` writes the protected model to ``--out`` only once protection has finished: for ``lm`` a directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load (plus ``sophon_fast.json``, the
settings), built beside ``--out`` and renamed into place; for the other tasks a .safetensors (+ .json) written the
same way. Every problem with the input is a :class:`sophon_fast.data.user.UserDataError` naming the file.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

from torch import nn

from sophon_fast import data
from sophon_fast._atomic import atomic_dir, atomic_path
from sophon_fast.data.user import UserDataError, check_classes, read_images, text_blocks

TASKS = ("image", "lm", "diffusion")


# ---------------------------------------------------------------- models


def load_lm(path: str) -> Tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a Hugging Face model directory; ``UserDataError`` when it holds none."""
    if not os.path.isdir(path):
        raise UserDataError(f"{path}: no such directory (--task lm needs a Hugging Face model directory)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise UserDataError(f"{path}: holds no Hugging Face model (no config.json; write one with save_pretrained)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()      # the command prints its own lines
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise UserDataError(f"{path}: no tokenizer AutoTokenizer can load ({str(e).splitlines()[0]})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserDataError(f"{path}: not a causal language model ({str(e).splitlines()[0]})") from None
    return model, tokenizer


def load_saved(path: str) -> nn.Module:
    """A model saved by :func:`sophon_fast.save_model`; ``UserDataError`` naming ``path`` otherwise."""
    from sophon_fast.io import load_model
    if os.path.isdir(path):
        hint = " (a Hugging Face model directory: pass --task lm)" if os.path.exists(
            os.path.join(path, "config.json")) else ""
        raise UserDataError(f"{path}: a directory, not a model saved by sophon_fast.save_model (.safetensors){hint}")
    try:
        return load_model(path)
    except FileNotFoundError as e:
        raise UserDataError(f"{path}: {e}") from None


def load_for(task: str, path: str):
    """``(model, tokenizer or None)`` for ``task``."""
    return load_lm(path) if task == "lm" else (load_saved(path), None)


# ---------------------------------------------------------------- data


def _channels(model: nn.Module) -> int:
    return int(getattr(model, "sophon_arch", {}).get("kwargs", {}).get("in_channels", 1))


def image_domain(spec: str, model: nn.Module, size: int, seed: int = 0):
    """``(train, test, classes)`` of a built-in domain name (classes None: it has its own label space) or of a path
    (:func:`sophon_fast.data.user.read_images`; classes: the folder names or the labels that occur)."""
    if spec in data.available() and not os.path.exists(spec):
        return data.as_tensors(data.load(spec, "train")), data.as_tensors(data.load(spec, "test")), None
    images = read_images(spec, _channels(model), size, seed)
    return images.train, images.test, images.classes


def image_domains(model: nn.Module, original: str, restricted: List[str], size: int, seed: int = 0):
    """Every domain of an image task, checked: the model's head covers every label, and restricted data read from
    files carries the classes of original data read from files (``UserDataError`` naming the file otherwise)."""
    classes = int(getattr(model, "sophon_arch", {}).get("kwargs", {}).get("num_classes", 0)) or None
    domains = [(spec, image_domain(spec, model, size, seed)) for spec in [original, *restricted]]
    for spec, (train, test, _) in domains:
        top = int(max(train[1].max(), test[1].max()))
        if classes is not None and top >= classes:
            raise UserDataError(f"{spec}: label {top}, but the model has {classes} classes")
    o_classes = domains[0][1][2]
    for spec, (_, _, r_classes) in domains[1:]:
        if o_classes is not None and r_classes is not None:
            check_classes(o_classes, r_classes, original, spec)
    return [d for _, d in domains]


def task_domains(task: str, model: nn.Module, tokenizer, original: Optional[str], restricted: List[str], args):
    """``[(train, test)]`` of ``original`` (when given) then each restricted domain: token blocks (``lm``),
    (images, labels) (``image``) or images alone (``diffusion``)."""
    specs = ([original] if original else []) + list(restricted)
    if task == "lm":
        return [text_blocks(spec, tokenizer, args.block_size) for spec in specs]
    if task == "image":
        got = image_domains(model, specs[0], specs[1:], args.image_size, args.seed or 0)
        return [(train, test) for train, test, _ in got]
    return [(train[0], test[0]) for train, test, _ in
            (image_domain(spec, model, args.image_size, args.seed or 0) for spec in specs)]


# ---------------------------------------------------------------- commands


def protect_command(args, cfg, overrides: dict) -> int:
    """Protect ``args.model`` against ``args.restricted`` keeping ``args.original`` with ``cfg`` (None: the task's
    default) and ``overrides``; write ``args.out``."""
    from sophon_fast.distributed import World
    from sophon_fast.engine import ProtectConfig, protect
    from sophon_fast.io import save_model
    model, tokenizer = load_for(args.task, args.model)
    (o_train, o_test), *restricted = task_domains(args.task, model, tokenizer, args.original, args.restricted, args)
    if cfg is None:   # the default: the language-model recipe for lm (the reference defaults re-initialise the head)
        from sophon_fast import recipes
        cfg = recipes.language_model() if args.task == "lm" else ProtectConfig(task="diffusion") \
            if args.task == "diffusion" else ProtectConfig()
    res = protect(model, o_train, [train for train, _ in restricted], cfg.replace(**overrides),
                  original_test=o_test)
    if not World().is_main:
        return 0
    record = {"original": args.original, "restricted": args.restricted, "task": args.task,
              "protect_config": res.config.to_dict(), "original_metric": res.original_metric,
              "stop_reason": res.stop_reason}
    if args.task == "lm":
        with atomic_dir(args.out) as tmp:
            res.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "sophon_fast.json").write_text(json.dumps(record, indent=1, default=str))
    else:
        save_model(res.model, args.out, metadata=json.loads(json.dumps(record, default=str)))
    print(f"protected model written to {args.out}; original-domain metric {res.original_metric:.4g}; "
          f"{res.stop_reason or 'completed'}")
    return 0


def attack_command(args) -> int:
    """Fine-tune ``args.model`` (and ``args.unprotected``, and a scratch model) on ``args.restricted``; print one
    line per attack and write ``args.out/attacks.json``."""
    model, tokenizer = load_for(args.task, args.model)
    unprotected = load_for(args.task, args.unprotected)[0] if args.unprotected else None
    if args.task == "lm":
        from sophon_fast.attacks import lm
        train, test = text_blocks(args.restricted, tokenizer, args.block_size)
        attacks = lm.default_attacks(steps=args.steps, batch_size=args.batch_size, evals=min(5, args.steps))
        rows = lm.evaluate_suite(model, unprotected, train, test, attacks, seed=args.seed)["attacks"]
        for r in rows:
            print(f"{r['name']:<28} next-token loss: model {r['protected'][-1]:.3f}  unprotected "
                  + (f"{r['unprotected'][-1]:.3f}" if r["unprotected"] else "  –  ") + f"  scratch {r['scratch'][-1]:.3f}")
    elif args.task == "image":
        from sophon_fast.attacks import evaluate_suite, suite
        (train, test), = task_domains("image", model, None, None, [args.restricted], args)
        rows = evaluate_suite(model, unprotected, train, test, suite(args.suite), seed=args.seed,
                              epochs_scale=args.epochs_scale, progress=not args.no_progress)
        for r in rows:
            unp = f"{100 * r['unprotected'][-1]:5.1f}%" if r["unprotected"] else "  –  "
            print(f"{r['attack']:<40} model {100 * r['protected'][-1]:5.1f}%  unprotected {unp}  "
                  f"scratch {100 * r['scratch'][-1]:5.1f}%  overhead {r['overhead']}")
    else:
        from sophon_fast.attacks import diffusion
        (train, test), = task_domains("diffusion", model, None, None, [args.restricted], args)
        rows = diffusion.evaluate_suite(model, unprotected, train, test, diffusion.suite(True),
                                        seed=args.seed)["attacks"]
        for r in rows:
            print(f"{r['name']:<28} eps-MSE: model {r['protected'][-1]:.4f}  scratch {r['scratch'][-1]:.4f}")
    if args.out:
        with atomic_path(os.path.join(args.out, "attacks.json")) as tmp:
            tmp.write_text(json.dumps(rows, indent=1, default=str))
    return 0
