"""A cnn_small pre-trained on Fashion-MNIST images with the labels shuffled (docs/experiments.md a3): the demo's
pre-training recipe (Adam 1e-3, batch 128, 3 epochs, seed 0) on the same images, each given a random label. What
the adaptive suite recovers from a body trained this way is a head start that owes nothing to the labels.

    .venv/bin/python scripts/shuffled_pretrain.py runs/exp/cache/fashion_shuffled_cnn_small_p3_s0.safetensors
"""
import sys

import torch

from sophon_fast import data as sfdata
from sophon_fast.attacks import accuracy
from sophon_fast.apps.demo import pretrain
from sophon_fast.io import save_model

torch.set_num_threads(1)
x, y = sfdata.as_tensors(sfdata.load("fashion_mnist", "train"))
te = sfdata.load("fashion_mnist", "test")
y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
model = pretrain("cnn_small", 10, (x, y), te, 3, seed=0)
print(f"Fashion-MNIST test accuracy of the shuffled-label model: {100 * accuracy(model, te):.1f}%")
save_model(model, sys.argv[1])
