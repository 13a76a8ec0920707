"""How does an attack leave the dead-unit trap? (docs/experiments.md, e12-e15) Step an attack by hand on a protected model and log,
every few steps, the fraction of restricted training inputs with every head-input unit off, the
largest pre-activation, the body's gradient norm and the restricted test accuracy.

    .venv/bin/python scripts/trap_probe.py runs/exp/e12_margin3_w005/s0.safetensors --optimizer adam --lr 1e-3
"""
import argparse

import torch

from sophon_fast import data as sfdata
from sophon_fast.attacks import Attack
from sophon_fast.defences.trap import head_preacts, soft_threshold
from sophon_fast.io import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--restricted", default="mnist")
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--method", default="full")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true",
                    help="first print the all-off fraction along the soft-threshold path (body weights moved s towards 0)")
    ap.add_argument("--reinit-trap-layer", action="store_true",
                    help="an attacker who knows the trap: re-initialise the Linear that produces the head's input")
    ap.add_argument("--scratch", action="store_true", help="attack a fresh model of the same architecture instead")
    ap.add_argument("--wd", type=float, default=1e-4, help="weight decay (the suite's attacks use 1e-4)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    m = load_model(a.model)
    if a.scratch:
        from sophon_fast.attacks import scratch
        m = scratch(m, a.seed)
    if a.reinit_trap_layer:
        linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod is not m.head]
        linears[-1].reset_parameters()
    xtr, ytr = sfdata.as_tensors(sfdata.load(a.restricted, "train"))
    xte, yte = sfdata.as_tensors(sfdata.load(a.restricted, "test"))
    if a.sweep:
        named = [(n, p) for n, p in m.named_parameters() if not n.startswith("head.")]
        with torch.no_grad():
            for s_ in (0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0):
                z = head_preacts(m, m.head, xtr, {n: soft_threshold(p, s_) for n, p in named})
                print(f"soft-threshold s={s_:<6} all_off {float((z.max(1).values <= 0).float().mean()):.4f}"
                      f"  max_z {float(z.max()):.2f}")
    if a.method == "reinit_head":
        m.head.reset_parameters()
    atk = Attack(method=a.method, optimizer=a.optimizer, lr=a.lr, batch_size=200, epochs=1, weight_decay=a.wd)
    params = list(m.head.parameters()) if a.method == "last_layer" else list(m.parameters())
    opt = atk.make_optimizer(params)
    body = [p for n, p in m.named_parameters() if not n.startswith("head.")]
    g = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(len(xtr), generator=g)
    print(f"{'step':>5} {'all_off':>8} {'pairs_on':>9} {'max_z':>7} {'body_grad':>10} {'test_acc':>8}")
    for step in range(a.steps + 1):
        if step % a.every == 0:
            with torch.no_grad():
                m.eval()
                z = head_preacts(m, m.head, xtr)
                acc = float((m(xte).argmax(1) == yte).float().mean())
                m.train()
        i = (step * 200) % len(xtr)
        if i + 200 > len(xtr):
            perm = torch.randperm(len(xtr), generator=g)
            i = 0
        idx = perm[i:i + 200]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(xtr[idx]), ytr[idx]).backward()
        if step % a.every == 0:
            gb = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in body if p.grad is not None])))
            print(f"{step:5d} {float((z.max(1).values <= 0).float().mean()):8.4f} "
                  f"{float((z > 0).float().mean()):9.5f} {float(z.max()):7.2f} {gb:10.2e} {acc:8.3f}", flush=True)
        opt.step()


if __name__ == "__main__":
    main()
