"""Head-only attacks on a frozen BatchNorm body, with the body in eval mode (running statistics, as
``sf.attacks``' last-layer attacks and probes read it) and in train mode (each batch's statistics, as the simulated
probe attacker of ``protect`` read it before the fix of docs/experiments.md a9).

    .venv/bin/python scripts/bn_mode_probe.py PROTECTED UNPROTECTED OUT.json

Momentum SGD (0.9) at lr 1e-3 and 1e-2, batch 200, 400 steps on MNIST; the model's own head ("last") or a fresh
one ("fresh"); accuracy (%) on the MNIST test set at steps 0, 5, 10, 20, 40, 100, 200, 400, in the same mode as
training (train mode: batch statistics over test batches of 200). Scratch is ``sf.attacks.scratch(protected, 0)``.
"""
import argparse
import copy
import json

import torch
from torch.nn import functional as F

from sophon_fast import data as sfdata, models
from sophon_fast.attacks import scratch
from sophon_fast.io import load_model

STEPS = (0, 5, 10, 20, 40, 100, 200, 400)


def attack(model, X, Y, Xte, Yte, lr, train_mode, fresh, seed=0, bs=200):
    m = copy.deepcopy(model)
    head = models.head_of(m)
    torch.manual_seed(seed)
    if fresh:
        head.reset_parameters()
    for p in m.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    m.train(train_mode)
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def ev():
        hits = sum((m(Xte[i:i + bs]).argmax(1) == Yte[i:i + bs]).sum().item() for i in range(0, len(Xte), bs))
        return round(100 * hits / len(Xte), 1)

    curve, step = [ev()], 0
    while step < STEPS[-1]:
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(m(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step in STEPS:
                curve.append(ev())
            if step >= STEPS[-1]:
                break
    return curve


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("protected")
    ap.add_argument("unprotected")
    ap.add_argument("out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    X, Y = sfdata.as_tensors(sfdata.load("mnist", "train"))
    Xte, Yte = sfdata.as_tensors(sfdata.load("mnist", "test"))
    prot, unprot = load_model(a.protected), load_model(a.unprotected)
    bodies = {"protected": prot, "unprotected": unprot, "scratch": scratch(prot, 0)}
    out = {"steps": STEPS}
    for fresh in (False, True):
        for lr in (1e-3, 1e-2):
            for train_mode in (False, True):
                key = f"{'fresh' if fresh else 'last'} lr{lr} {'train' if train_mode else 'eval'}-BN"
                out[key] = {n: attack(m, X, Y, Xte, Yte, lr, train_mode, fresh) for n, m in bodies.items()}
                print(key, out[key], flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
