import pytest
import torch
from torch import nn

from sophon_fast import models

PARAM_RANGES = {"cnn_small": (0.08e6, 0.15e6), "cnn": (0.3e6, 0.5e6), "cnn_bn": (0.3e6, 0.5e6),
                "resnet_narrow": (0.2e6, 0.7e6), "vgg": (0.4e6, 0.7e6), "mlp": (0.1e6, 0.4e6),
                "resnet18_width": (10.5e6, 11.5e6)}
HAS_BN = {"cnn_bn", "resnet_narrow", "resnet18_width"}


def test_available():
    assert set(models.available()) == set(PARAM_RANGES) | {"ddpm_unet_small"}   # the denoiser: tests/test_diffusion.py


@pytest.mark.parametrize("name", list(PARAM_RANGES))
def test_build_forward_params_head(name):
    m = models.build(name, num_classes=7)
    lo, hi = PARAM_RANGES[name]
    n = models.num_parameters(m)
    # the range is for 10 classes; 7 classes removes 3 head rows
    assert lo <= n + 3 * (m.head.in_features + 1) <= hi, n
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 7)
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert isinstance(m.head, nn.Linear) and linears[-1] is m.head and m.head.out_features == 7
    assert models.head_of(m) is m.head
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == (name in HAS_BN)
    assert m.sophon_arch == {"name": name, "kwargs": {"num_classes": 7, "in_channels": 1}}


@pytest.mark.parametrize("name", ["cnn_small", "resnet_narrow", "mlp", "vgg"])
def test_in_channels(name):
    m = models.build(name, num_classes=4, in_channels=3)
    assert m(torch.randn(2, 3, 28, 28)).shape == (2, 4)


def test_seed_reproducible_and_global_rng_untouched():
    state = torch.get_rng_state()
    a, b = models.build("cnn_bn", seed=3), models.build("cnn_bn", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    c = models.build("cnn_bn", seed=4)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_extra_kwargs_recorded_as_json_types():
    m = models.build("resnet_narrow", widths=(8, 16, 32), blocks=(1, 1, 1))
    assert m.sophon_arch["kwargs"]["widths"] == [8, 16, 32]
    assert models.num_parameters(m) < 0.1e6


def test_unknown_model_and_headless():
    with pytest.raises(KeyError, match="available"):
        models.build("transformer")
    with pytest.raises(ValueError, match="no nn.Linear"):
        models.head_of(nn.Conv2d(1, 1, 1))
    seq = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert models.head_of(seq) is seq[3]
