"""Function-preserving rescale of a cnn_small's classifier-block input (docs/experiments.md a6): conv2's weight and
bias times c, fc64's weight divided by c. ReLU and max-pooling are positively homogeneous, so the model computes the
same function (same accuracy, same knowledge), but a re-initialised classifier block sees pool-2 features c times
their size.

    .venv/bin/python scripts/rescale_block_input.py MODEL OUT C
"""
import sys

import torch

from sophon_fast import data as sfdata
from sophon_fast.io import load_model, save_model

m = load_model(sys.argv[1]).eval()
c = float(sys.argv[3])
if c <= 0:
    raise SystemExit("C must be positive (ReLU is positively homogeneous only for c > 0)")
conv2, fc64 = m.features[3], m.features[7]
if not (isinstance(conv2, torch.nn.Conv2d) and isinstance(fc64, torch.nn.Linear)):
    raise SystemExit(f"expected cnn_small (features[3] Conv2d, features[7] Linear), got {conv2} / {fc64}")
x = sfdata.as_tensors(sfdata.load("mnist", "test"))[0][:1000]
with torch.no_grad():
    before_pool2, before_out = m.features[:6](x), m(x)
    conv2.weight.mul_(c)
    conv2.bias.mul_(c)
    fc64.weight.div_(c)
    after_pool2, after_out = m.features[:6](x), m(x)
rms = lambda t: t.pow(2).mean().sqrt().item()   # noqa: E731
print(f"pool-2 RMS on MNIST {rms(before_pool2):.3f} -> {rms(after_pool2):.3f}; "
      f"max |logit change| {(after_out - before_out).abs().max().item():.2e}")
save_model(m, sys.argv[2])
