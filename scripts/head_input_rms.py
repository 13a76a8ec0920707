"""RMS of the head's input features (``model.features(x)``, eval mode) per dataset, for saved models
(docs/experiments.md e92/e93: the feature scale that tells a protection seed that lost the head-only attacks).

    .venv/bin/python scripts/head_input_rms.py MODEL.safetensors [MODEL ...] [--datasets mnist fashion_mnist digits] [--n 1000]
"""
import argparse

import torch

from sophon_fast import data as sfdata
from sophon_fast.io import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist", "digits"])
    ap.add_argument("--n", type=int, default=1000, help="test images per dataset (the first n)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    xs = {d: sfdata.as_tensors(sfdata.load(d, "test"))[0][:a.n] for d in a.datasets}
    for path in a.models:
        model = load_model(path).eval()
        if not hasattr(model, "features"):
            raise SystemExit(f"{path}: the model has no .features (the body up to the head's input)")
        with torch.no_grad():
            rms = {d: model.features(x).pow(2).mean().sqrt().item() for d, x in xs.items()}
        print(path, " ".join(f"{d} {v:.3f}" for d, v in rms.items()), flush=True)


if __name__ == "__main__":
    main()
