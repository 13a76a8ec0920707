"""Where the pre-trained LM's head start on Python lives (docs/domains.md): shared vs Python-only tokens.

    .venv/bin/python scripts/lm_head_start.py [--protected runs/demo-lm-quick/protected] [--steps 10 50]

At the LM demo's quick sizes, every Python test token is put in a group by how common its *target* token is in
the English training blocks relative to the Python ones (ratio of relative frequencies: "shared" >= 1/4,
"rare in English" 1/64..1/4, "Python-only" < 1/64). For the unprotected model, scratch (the same
configuration freshly initialised) and, if given, a protected model, the script prints the mean next-token loss
of each group before and after the demo's full fine-tuning attack at lr 2e-3 (AdamW, warm-up + cosine) of each
length in ``--steps``, and each group's share of the scratch-minus-unprotected gap.
"""
import argparse
import json

import torch
from torch.nn import functional as F

from sophon_fast.apps import lm_demo
from sophon_fast.attacks.lm import LMAttack, run
from sophon_fast.models import lm as lm_models

GROUPS = (("shared", 0.25, float("inf")), ("rare in English", 1 / 64, 0.25), ("Python-only", 0.0, 1 / 64))


def token_freq(labels, vocab):
    y = labels[labels >= 0]
    return torch.bincount(y, minlength=vocab).double() / y.numel()


@torch.no_grad()
def group_losses(model, test, group_of):
    model.eval()
    ids, labels = test[0], test[1]
    sums = torch.zeros(len(GROUPS), dtype=torch.float64)
    for i in range(0, ids.shape[0], 8):
        logits = model(input_ids=ids[i:i + 8]).logits[:, :-1].float()
        y = labels[i:i + 8, 1:]
        keep = y >= 0
        ce = F.cross_entropy(logits[keep], y[keep], reduction="none").double()
        sums += torch.zeros(len(GROUPS), dtype=torch.float64).index_add_(0, group_of[y[keep]], ce)
    return sums


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--protected", default=None)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = lm_demo.prepare(True, 0, say=lambda s: None)
    vocab = p.model.config.vocab_size
    f_en, f_py = token_freq(p.original_train[1], vocab), token_freq(p.restricted_train[1], vocab)
    ratio = f_en / f_py.clamp_min(1e-12)
    group_of = torch.full((vocab,), len(GROUPS) - 1, dtype=torch.long)
    for g in reversed(range(len(GROUPS))):
        group_of[(ratio >= GROUPS[g][1]) & (ratio < GROUPS[g][2])] = g
    y = p.restricted_test[1][:, 1:]
    counts = torch.bincount(group_of[y[y >= 0]], minlength=len(GROUPS)).double()
    models = {"unprotected": p.model, "scratch": lm_models.fresh_like(p.model, 0)}
    if args.protected:
        from transformers import GPT2LMHeadModel
        models["protected"] = GPT2LMHeadModel.from_pretrained(args.protected)
    out = {"groups": [g[0] for g in GROUPS], "share_of_test_tokens": (counts / counts.sum()).tolist(), "rows": {}}
    for steps in [0] + list(args.steps):
        for name, model in models.items():
            if steps:
                attack = LMAttack(method="full", lr=args.lr, steps=steps, batch_size=8, evals=1)
                _, model = run(model, p.restricted_train, p.restricted_test, attack, seed=0, return_model=True)
            sums = group_losses(model, p.restricted_test, group_of)
            out["rows"][f"{name}@{steps}"] = {"mean": (sums / counts).tolist(), "total": float(sums.sum() / counts.sum())}
        gap = [out["rows"][f"scratch@{steps}"]["mean"][g] - out["rows"][f"unprotected@{steps}"]["mean"][g]
               for g in range(len(GROUPS))]
        weighted = [gap[g] * float(counts[g] / counts.sum()) for g in range(len(GROUPS))]
        out["rows"][f"gap@{steps}"] = {"mean": gap, "weighted": weighted, "total": sum(weighted)}
        print(steps, json.dumps({k: v for k, v in out["rows"].items() if k.endswith(f"@{steps}")}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
