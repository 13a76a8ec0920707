"""A random cnn_small body with each conv layer's weight rescaled to the norm of the pre-trained model's
(docs/experiments.md a3): does the reinit_block head start come from the trained weights' scale alone?

    .venv/bin/python scripts/scaled_random_body.py PRETRAINED OUT [ANOTHER_MODEL_TO_MEASURE]
"""
import sys

import torch

from sophon_fast import data as sfdata
from sophon_fast.attacks.run import scratch
from sophon_fast.io import load_model, save_model

pre = load_model(sys.argv[1])
rand = scratch(pre, 0)
x = sfdata.as_tensors(sfdata.load("mnist", "test"))[0][:500]
with torch.no_grad():
    for (name, p), q in zip(rand.named_parameters(), pre.parameters()):
        if p.dim() == 4:                       # conv weights (and only those)
            print(f"{name}: norm random {p.norm():.3f}, pre-trained {q.norm():.3f}")
            p.mul_(q.norm() / p.norm())
    for tag, m in (("pre-trained", pre), ("scaled random", rand), ("random", scratch(pre, 0))):
        h = m.features(x) if hasattr(m, "features") else None
        if h is not None:
            print(f"head-input (model.features) RMS on MNIST, {tag}: {h.pow(2).mean().sqrt():.3f}")
    # then conv2's weight and bias by one factor (ReLU and max-pooling are positively homogeneous), so that the
    # head-input features (model.features: up to fc64's ReLU) on MNIST have the pre-trained model's RMS
    c = pre.features(x).pow(2).mean().sqrt() / rand.features(x).pow(2).mean().sqrt()
    rand.features[3].weight.mul_(c)
    rand.features[3].bias.mul_(c)
    print(f"conv2 scaled by {c:.2f}: head-input RMS now {rand.features(x).pow(2).mean().sqrt():.3f}")
    if len(sys.argv) > 3:
        sh = load_model(sys.argv[3])
        print(f"head-input RMS on MNIST, {sys.argv[3]}: {sh.features(x).pow(2).mean().sqrt():.3f}")
save_model(rand, sys.argv[2])
