import json
import os

import pytest
import torch

from sophon_fast import models
from sophon_fast.io import load_model, read_record, save_model


def _perturb(model):
    """Non-default values in every parameter and buffer, BatchNorm statistics included."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.fill_(17)


@pytest.mark.parametrize("name", models.available())
def test_round_trip_exact(tmp_path, name):
    m = models.build(name, num_classes=5)
    _perturb(m)
    path = save_model(m, tmp_path / f"{name}.safetensors", metadata={"note": "x", "acc": 0.5})
    assert path.exists() and path.with_suffix(".json").exists()
    back = load_model(path)
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    assert back.sophon_arch == m.sophon_arch and not back.training
    x = torch.randn(2, 1, 28, 28)
    args = (x, torch.tensor([1, 500])) if name == "ddpm_unet_small" else (x,)   # a denoiser takes timesteps
    m.eval()
    assert torch.equal(m(*args), back(*args))
    assert read_record(path)["metadata"] == {"note": "x", "acc": 0.5}
    assert sorted(os.listdir(tmp_path)) == sorted([f"{name}.json", f"{name}.safetensors"])   # no temp file left


def test_record_contents_and_load_from_json_path(tmp_path):
    m = models.build("resnet_narrow", widths=(8, 16, 32), blocks=(1, 1, 1), num_classes=3)
    save_model(m, tmp_path / "r.safetensors")
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["arch"] == {"name": "resnet_narrow",
                           "kwargs": {"num_classes": 3, "in_channels": 1, "widths": [8, 16, 32], "blocks": [1, 1, 1]}}
    assert rec["weights"] == "r.safetensors" and len(rec["sha256"]) == 64
    assert models.num_parameters(load_model(tmp_path / "r.json")) == models.num_parameters(m)


def test_shared_and_noncontiguous_tensors(tmp_path):
    m = models.build("mlp")
    with torch.no_grad():
        m.head.weight = torch.nn.Parameter(torch.randn(m.head.weight.shape[1], 10).t())   # non-contiguous
    save_model(m, tmp_path / "m.safetensors")
    assert torch.equal(load_model(tmp_path / "m.safetensors").head.weight, m.head.weight)


def test_missing_arch_and_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="sophon_arch"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "a.safetensors")
    with pytest.raises(TypeError):
        save_model(models.build("mlp"), tmp_path / "b.safetensors", metadata={"bad": object()})
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_temp_and_keeps_old(tmp_path, monkeypatch):
    m = models.build("cnn_small")
    path = save_model(m, tmp_path / "c.safetensors")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("sophon_fast.io.save_file", boom)
    _perturb(m)
    with pytest.raises(OSError, match="disk full"):
        save_model(m, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.json", "c.safetensors"]


def test_corrupted_weights_detected(tmp_path):
    path = save_model(models.build("cnn_small"), tmp_path / "d.safetensors")
    other = save_model(models.build("cnn_small", seed=1), tmp_path / "e.safetensors")
    os.replace(other, path)
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(path)
    load_model(path, verify=False)
