"""The offline language-model demo, except protection: data, pre-training, attacks.

    prepared = prepare(quick, seed, cache_dir)   # tokenizer, pre-trained GPT-2 (cached), token blocks
    protected = protect(prepared.model, prepared.original_train, prepared.restricted_train,
                        sophon_fast.recipes.language_model(quick)).model
    report = attack_all(protected, prepared, quick, seed)

Original domain: English prose (Debian ``fortunes``); restricted domain: Python source (the standard
library). Sizes (:func:`sizes`) were chosen from the head-start measurement in docs/domains.md
("Language models") to fit 10 minutes (``quick``) and 45 minutes (full) on a 2-core machine.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

from sophon_fast.attacks.lm import LMAttack, default_attacks, evaluate_suite, run
from sophon_fast.data import text
from sophon_fast.models import lm as lm_models
from sophon_fast.tasks.lm import LanguageModelTask

DOMAINS = {"original": "english", "restricted": "python"}


@dataclass(frozen=True)
class DemoSizes:
    """Every size of the demo: tokenizer, model, data, pre-training and attacks."""

    vocab_size: int = 4096
    tokenizer_chars: int = 2_000_000  # training characters per corpus (English, German, Python)
    block_size: int = 128
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    pretrain_steps: int = 1500
    pretrain_batch: int = 8
    pretrain_lr: float = 2e-3
    train_blocks: int = 4000          # per domain
    test_blocks: int = 64             # per domain (held-out documents)
    attack_steps: int = 200
    attack_batch: int = 8
    attack_evals: int = 5


def sizes(quick: bool) -> DemoSizes:
    """The demo's sizes: ``quick`` fits prepare + protect + attacks in 10 minutes, full in 45."""
    if quick:
        return DemoSizes(pretrain_steps=400, train_blocks=2000, test_blocks=32, attack_steps=50, attack_evals=5)
    return DemoSizes()


@dataclass
class Prepared:
    """What :func:`prepare` returns: every tensor is ``(input_ids, labels)`` int64 (N, block_size)."""

    tokenizer: object
    model: nn.Module
    original_train: tuple
    original_test: tuple
    restricted_train: tuple
    restricted_test: tuple
    sizes: DemoSizes
    pretrain_curve: list
    original_loss: float


def _blocks(name: str, split: str, tok, s: DemoSizes):
    n = s.train_blocks if split == "train" else s.test_blocks
    return text.encode_blocks(text.texts(name, split), tok, s.block_size, n)


def pretrain(model: nn.Module, train, test, s: DemoSizes, seed: int = 0):
    """AdamW (warm-up + cosine) next-token training on ``train``: returns ``(test-loss curve, model)``."""
    recipe = LMAttack("pretrain", "full", lr=s.pretrain_lr, steps=s.pretrain_steps, batch_size=s.pretrain_batch,
                      evals=4)
    return run(model, train, test, recipe, seed=seed, return_model=True)


def prepare(quick: bool = False, seed: int = 0, cache_dir: str = "runs/lm_cache",
            say: Callable[[str], None] = print) -> Prepared:
    """Tokenizer (cached), token blocks of both domains, and GPT-2 pre-trained on English (cached).

    The pre-trained model is saved with ``save_pretrained`` under ``cache_dir`` keyed by the sizes,
    the seed and the tokenizer, and reloaded (offline) on the next call.
    """
    s = sizes(quick)
    tok = text.train_tokenizer(s.vocab_size, chars_per_corpus=s.tokenizer_chars, cache_dir=cache_dir)
    o_train, o_test = (_blocks(DOMAINS["original"], sp, tok, s) for sp in ("train", "test"))
    r_train, r_test = (_blocks(DOMAINS["restricted"], sp, tok, s) for sp in ("train", "test"))
    key = f"gpt2-{zlib.crc32((json.dumps(asdict(s), sort_keys=True) + tok.to_str()).encode()):08x}-s{seed}"
    path = os.path.join(cache_dir, key)
    task = LanguageModelTask()
    if os.path.exists(os.path.join(path, "curve.json")):
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel.from_pretrained(path)
        with open(os.path.join(path, "curve.json")) as f:
            curve = json.load(f)
        say(f"[lm demo] reusing the pre-trained model {path}")
    else:
        say(f"[lm demo] pre-training GPT-2 ({s.n_layer} layers, width {s.n_embd}, vocab {s.vocab_size}) on "
            f"{DOMAINS['original']} for {s.pretrain_steps} steps of {s.pretrain_batch}x{s.block_size} tokens")
        t0 = time.perf_counter()
        base = lm_models.gpt2(s.vocab_size, s.n_layer, s.n_embd, s.n_head, s.block_size, seed=seed)
        curve, model = pretrain(base, o_train, o_test, s, seed)
        model.save_pretrained(path)
        with open(os.path.join(path, "curve.json"), "w") as f:
            json.dump(curve, f)
        say(f"[lm demo] pre-trained in {time.perf_counter() - t0:.0f} s: English test loss "
            f"{curve[0]:.2f} -> {curve[-1]:.2f}")
    return Prepared(tok, model, o_train, o_test, r_train, r_test, s, curve, task.evaluate(model, o_test))


def demo_attacks(quick: bool) -> list:
    """Full fine-tuning (AdamW lr 1e-4, 5e-4, 2e-3) and LoRA r8/r16 (lr 2e-3) at the demo's sizes."""
    s = sizes(quick)
    return default_attacks(steps=s.attack_steps, batch_size=s.attack_batch, evals=s.attack_evals)


def attack_all(protected: nn.Module, prepared: Prepared, quick: bool = False, seed: int = 0,
               say: Optional[Callable[[str], None]] = print) -> Dict:
    """Every demo attack on ``protected``, the unprotected pre-trained model and scratch, plus the
    original-domain loss of both models: the report's ``metric``/``higher_is_better``/``attacks``
    (see :func:`sophon_fast.attacks.lm.evaluate_suite`), ``domains`` and ``original``."""
    out = evaluate_suite(protected, prepared.model, prepared.restricted_train, prepared.restricted_test,
                         demo_attacks(quick), seed=seed, say=say)
    task = LanguageModelTask()
    out["domains"] = dict(DOMAINS)
    out["original"] = {"metric": "original next-token loss", "unprotected": prepared.original_loss,
                       "protected": task.evaluate(protected, task.prepare(protected, prepared.original_test,
                                                                          "original test"))}
    return out


def restricted_head_start(prepared: Prepared, attack: LMAttack, seed: int = 0) -> Dict[str, list]:
    """The unprotected model's and scratch's restricted-loss curves under ``attack`` (the measurement
    behind the demo's sizes)."""
    scratch = lm_models.fresh_like(prepared.model, seed)
    return {who: run(m, prepared.restricted_train, prepared.restricted_test, attack, seed)
            for who, m in (("unprotected", prepared.model), ("scratch", scratch))}
