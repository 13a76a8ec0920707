"""Which part of the pre-trained LM carries its head start on Python (docs/domains.md, "Language models").

    .venv/bin/python scripts/lm_parts.py [--full] [--attacks full-adamw-lr0.002 lora-r8-adamw-lr0.002]

Hybrids of the LM demo's pre-trained GPT-2 (English) and scratch (the same configuration freshly initialised,
seed 0): "embeddings" = the pre-trained token and position embeddings (the head is tied to the token embedding)
with scratch's blocks and final LayerNorm; "blocks" = the reverse. Each model takes the demo's attacks (quick sizes
unless --full); one JSON line per attack with every model's restricted-loss curve and its gap to scratch
(model minus scratch; negative = a head start). What a protected model keeping English must at least keep is what
an English embedding gives: if the "embeddings" hybrid beats scratch, part of the head start comes with any
embedding that serves English. ``--rows`` adds two more hybrids that take the pre-trained position embedding and
only some rows of the token embedding (scratch's for the others, scratch's blocks): "shared rows", the tokens at
least 1/4 as frequent (relatively) in the English training blocks as in the Python ones (scripts/lm_head_start.py's
"shared" group), and "other rows", the rest. ``--protected PATH`` adds "protected embeddings": a protected model's
token and position embeddings with scratch's blocks. ``--controls`` adds models that know no English: the same
configuration pre-trained by the demo's recipe on structureless versions of the English training blocks: "shuffled
order" (each block's tokens randomly permuted: which tokens occur together, no order) and "unigram" (every token
drawn independently from the English token frequencies).
"""
import argparse
import copy
import json

import torch

from sophon_fast.apps import lm_demo
from sophon_fast.attacks.lm import run
from sophon_fast.models import lm as lm_models

EMBEDDINGS = ("transformer.wte.", "transformer.wpe.")


def hybrid(take_from, rest_from, prefixes):
    """``rest_from`` with every parameter whose name starts with one of ``prefixes`` copied from ``take_from``."""
    out = copy.deepcopy(rest_from)
    src = dict(take_from.named_parameters())
    with torch.no_grad():
        for n, p in out.named_parameters():
            if n.startswith(prefixes):
                p.copy_(src[n])
    return out


def structureless(kind, blocks, seed=0):
    """``(input_ids, labels)`` like ``blocks`` with the order taken out: ``shuffled`` permutes each block's tokens
    (padding stays at the tail), ``unigram`` draws every token from the blocks' token frequencies."""
    ids, labels = blocks
    gen = torch.Generator().manual_seed(seed)
    out = ids.clone()
    real = labels >= 0
    if kind == "shuffled":
        for i in range(ids.shape[0]):
            n = int(real[i].sum())
            out[i, :n] = ids[i, :n][torch.randperm(n, generator=gen)]
    elif kind == "unigram":
        freq = torch.bincount(ids[real]).double()
        out[real] = torch.multinomial(freq, int(real.sum()), replacement=True, generator=gen)
    else:
        raise ValueError(f"unknown control {kind!r} (shuffled, unigram)")
    return out, torch.where(real, out, labels)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--full", action="store_true")
    p.add_argument("--attacks", nargs="*", default=None, help="attack names (default: all the demo's)")
    p.add_argument("--cache", default="runs/lm_cache")
    p.add_argument("--rows", action="store_true", help="also the shared-rows / other-rows hybrids")
    p.add_argument("--controls", action="store_true", help="also GPT-2s pre-trained on order-free English")
    p.add_argument("--protected", default=None, help="a protected model (save_pretrained): its embeddings + scratch")
    a = p.parse_args()
    torch.set_num_threads(1)
    prep = lm_demo.prepare(not a.full, 0, a.cache)
    scratch = lm_models.fresh_like(prep.model, 0)
    blocks = tuple(n for n, _ in prep.model.named_parameters() if not n.startswith(EMBEDDINGS))
    models = {"unprotected": prep.model, "scratch": scratch,
              "embeddings": hybrid(prep.model, scratch, EMBEDDINGS),
              "blocks": hybrid(prep.model, scratch, blocks)}
    if a.protected:       # a protected model's embeddings with scratch's blocks: did protection touch the carrier?
        from transformers import GPT2LMHeadModel
        models["protected embeddings"] = hybrid(GPT2LMHeadModel.from_pretrained(a.protected), scratch, EMBEDDINGS)
    if a.rows:
        vocab = prep.model.config.vocab_size
        freq = [torch.bincount(t[1][t[1] >= 0], minlength=vocab).double() / (t[1] >= 0).sum()
                for t in (prep.original_train, prep.restricted_train)]
        shared = freq[0] / freq[1].clamp_min(1e-12) >= 0.25
        print(json.dumps({"shared_rows": int(shared.sum()), "vocab": vocab}), flush=True)
        for name, rows in (("shared rows", shared), ("other rows", ~shared)):
            m = hybrid(prep.model, scratch, ("transformer.wpe.",))
            with torch.no_grad():
                m.transformer.wte.weight[rows] = prep.model.transformer.wte.weight[rows]
            models[name] = m
    if a.controls:        # the demo's pre-training recipe on English with its order taken out
        for kind, name in (("shuffled", "shuffled order"), ("unigram", "unigram")):
            base = lm_models.fresh_like(prep.model, 0)
            curve, models[name] = lm_demo.pretrain(base, structureless(kind, prep.original_train),
                                                   prep.original_test, prep.sizes, 0)
            print(json.dumps({"control": name, "english_test_loss": [round(x, 3) for x in curve]}), flush=True)
    for atk in lm_demo.demo_attacks(not a.full):
        if a.attacks and atk.name not in a.attacks:
            continue
        curves = {who: run(m, prep.restricted_train, prep.restricted_test, atk, 0) for who, m in models.items()}
        gaps = {who: [round(x - s, 3) for x, s in zip(c, curves["scratch"])] for who, c in curves.items()
                if who != "scratch"}
        print(json.dumps({"attack": atk.name, "steps": atk.eval_steps(), "curves": curves, "gap_to_scratch": gaps}),
              flush=True)


if __name__ == "__main__":
    main()
