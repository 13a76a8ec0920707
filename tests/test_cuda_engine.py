"""protect() on a CUDA device: the engine's GPU path, which the CPU suite cannot reach.

Runs only where torch sees a CUDA device (benchmarks/run_gpu.sh runs it beside the kernel tests):

    .venv/bin/python -m pytest tests/test_cuda_engine.py -q

- fast vs reference parity in fp64 on the GPU, as tests/test_protect.py, test_lm.py and test_diffusion.py
  check it on the CPU (classification with BatchNorm and three inner optimisers, a tiny GPT-2, a tiny UNet);
- every parameter and buffer of the result lives on the GPU, from CPU data and a CPU model (``device="cuda"``);
- a bf16 GPT-2 protected in fast mode gives finite losses and keeps its dtype.
"""
import math
import os

import pytest
import torch
from torch import nn

# SOPHON_ENGINE_TEST_DEVICE=cpu runs the same checks on the CPU (a dry run of this file's own logic).
DEV = os.environ.get("SOPHON_ENGINE_TEST_DEVICE", "cuda")
if DEV == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device: the engine's GPU path cannot run here", allow_module_level=True)

import sophon_fast as sf  # noqa: E402
from sophon_fast.engine import ProtectConfig, Strategy  # noqa: E402
from sophon_fast.models import lm  # noqa: E402
from sophon_fast.tasks.lm import LanguageModelTask  # noqa: E402

V, T = 97, 12


def rel(a, b):
    return float((a - b).norm() / b.norm())


def flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]
                     + [b.detach().reshape(-1).double() for b in model.buffers()])


def cnn_bn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 5))


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (n, T), generator=g)
    labels = ids.clone()
    labels[-1, T - 3:] = -100          # one padded row
    return ids, labels


def _on_gpu(model):
    return all(t.device.type == DEV for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("inner", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("loss", ["ice", "klu"])
def test_classification_fast_matches_reference_on_cuda(loss, inner):
    out = {}
    for mode in ("reference", "fast"):
        torch.manual_seed(0)
        model = cnn_bn().double()
        strat = [Strategy(inner, lr=1e-2, batch_size=24, query_size=8, attacker="reinit_head" if loss == "ice" else "as_is")]
        res = sf.protect(model, images(120, 1), images(120, 2), mode=mode, loss=loss, iterations=3, inner_steps=3,
                         strategies=strat, alpha=30, beta=10, ntr_batch_size=16, progress=False, device=DEV)
        assert _on_gpu(res.model), mode
        out[mode] = flat(res.model)
        assert not torch.equal(out[mode].cpu(), flat(model).cpu())
    assert rel(out["fast"], out["reference"]) <= 1e-9


def _lm_protect(model, mode, loss="ice", dtype=torch.float64):
    cfg = ProtectConfig(task="lm", loss=loss, mode=mode, iterations=2, inner_steps=3, device=DEV,
                        strategies=[Strategy("adam", lr=1e-3, batch_size=6, query_size=2, attacker="as_is")],
                        ntr_batch_size=4, evaluation={"every": 1, "size": None, "max_drop": None}, progress=False)
    return sf.protect(model.to(dtype), tokens(16, 4), tokens(16, 5), cfg, task=LanguageModelTask(),
                      original_test=tokens(4, 6))


@pytest.mark.parametrize("loss", ["ice", "klu"])
def test_gpt2_fast_matches_reference_on_cuda(loss):
    build = lambda: lm.gpt2(V, n_layer=1, n_embd=16, n_head=2, n_positions=T, seed=0)  # noqa: E731
    fast, ref = (_lm_protect(build(), mode, loss) for mode in ("fast", "reference"))
    assert _on_gpu(fast.model) and _on_gpu(ref.model)
    assert len(fast.history) == len(ref.history) == 2
    assert rel(flat(fast.model), flat(ref.model)) <= 1e-9
    assert not torch.equal(flat(fast.model).cpu(), flat(build().double()).cpu())


def test_gpt2_bf16_fast_mode_on_cuda_is_finite_and_keeps_its_dtype():
    model = lm.gpt2(V, n_layer=1, n_embd=16, n_head=2, n_positions=T, seed=0)
    res = _lm_protect(model, "fast", dtype=torch.bfloat16)
    assert _on_gpu(res.model)
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    assert math.isfinite(res.original_metric)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


@pytest.mark.parametrize("timestep", ["fixed1", "uniform"])
def test_diffusion_fast_matches_reference_on_cuda(timestep):
    from sophon_fast.models import build
    from sophon_fast.tasks.diffusion import DiffusionTask

    def run(mode):
        gen = torch.Generator().manual_seed(0)
        original, restricted = (torch.rand(24, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2))
        unet = build("ddpm_unet_small", widths=(8, 16), norm_groups=4, seed=0).double()
        cfg = ProtectConfig(task="diffusion", loss="dos", mode=mode, iterations=2, inner_steps=2, ntr_steps=1,
                            ntr_batch_size=8, strategies=[Strategy("adam", lr=1e-3, batch_size=8, query_size=4)],
                            evaluation={"every": 2, "size": 8, "max_drop": None}, progress=False, device=DEV)
        return sf.protect(unet, (original,), (restricted,), cfg, task=DiffusionTask(timestep),
                          original_test=(original[:8],))
    fast, ref = run("fast"), run("reference")
    assert _on_gpu(fast.model)
    assert math.isfinite(fast.original_metric)
    assert rel(flat(fast.model), flat(ref.model)) <= 1e-9
