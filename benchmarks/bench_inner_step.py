"""Layer 2: the fused inner optimiser step ``sophon_fast.ops.inner_step_`` on flat fp32 buffers
(what fast mode runs once per inner step) vs the plain-PyTorch spec on the same flat buffers vs
``torch.optim`` (foreach) over the same parameters split into the model's own tensors.

Providers in each group:
    copy           ``copy_`` of the flat parameter buffer: the floor (1 read + 1 write)
    reference      sophon_fast.reference.inner_step_ on the flat buffers
    torch_foreach  torch.optim.SGD / SGD(momentum) / Adam with foreach=True over the split tensors
    cpp / cuda / triton   sophon_fast.ops.inner_step_ with that backend forced (those usable here)
    <backend>-capturable  sophon_fast.ops.inner_step_capturable_ (the step counter a device tensor) on the cpp or
                   cuda backend: what a CUDA-graphed inner step would replay (one extra 1-element add per call)

Kinds: sgd, momentum, adam with a constant gradient (zero_grad=False; no state decays to denormals),
and ``sgd+zero``: the step plus zeroing the gradient, fused in one pass (as fast mode calls it) vs
``optimizer.zero_grad(set_to_none=False)`` after torch's step. Bytes per element (GB/s in extra_info):
sgd 2R+1W, momentum 3R+2W, adam 4R+3W, sgd+zero 2R+2W, copy 1R+1W (4 bytes each).

A device-copy floor group (256 MiB ``copy_``) gives the machine's copy bandwidth for the GB/s columns.
Under --benchmark-disable: the ``cnn`` split only and a 4 MiB copy.
"""
import pytest
import torch

import sophon_fast
from conftest import DEVICES
from sophon_fast import _backend, models
from sophon_fast.ops.inner_step import inner_step_, inner_step_capturable_
from sophon_fast.reference.inner_step import KINDS
from sophon_fast.reference.inner_step import inner_step_ as reference_step

MODELS = ("cnn", "resnet18_width")
KIND_NAMES = ("sgd", "momentum", "adam", "sgd+zero")
TRAFFIC = {"sgd": 3, "momentum": 5, "adam": 7, "sgd+zero": 4, "copy": 2}   # 4-byte accesses per element
LR, BETA1, BETA2, EPS, STEP = 1e-4, 0.9, 0.999, 1e-8, 10
_shapes = {}


def _impls(device):
    fast = [b for b in ("cuda", "triton", "cpp") if _backend.probe(b).usable.get(device)]
    return ["copy", "reference", "torch_foreach", *fast, *(f"{b}-capturable" for b in fast if b != "triton")]


def _params():
    return [(d, i) for d in DEVICES for i in _impls(d)]


def shapes(name):
    if name not in _shapes:
        _shapes[name] = [tuple(p.shape) for p in models.build(name, num_classes=10, seed=0).parameters()]
    return _shapes[name]


def _case(impl, kind, shapes_, device):
    g = torch.Generator().manual_seed(0)
    n = sum(torch.Size(s).numel() for s in shapes_)
    flat = torch.randn(n, generator=g).to(device)
    grad = (torch.randn(n, generator=g) * 1e-2).to(device)
    if impl == "copy":
        dst = torch.empty_like(flat)
        return lambda: dst.copy_(flat)
    zero = kind == "sgd+zero"
    k = KINDS["sgd" if zero else kind]
    if impl == "torch_foreach":
        params, offset = [], 0
        for s in shapes_:
            m = torch.Size(s).numel()
            p = torch.nn.Parameter(flat[offset:offset + m].view(s).clone())
            p.grad = grad[offset:offset + m].view(s).clone()
            params.append(p)
            offset += m
        if kind == "adam":
            opt = torch.optim.Adam(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, foreach=True)
        else:
            opt = torch.optim.SGD(params, lr=LR, momentum=BETA1 if kind == "momentum" else 0.0, foreach=True)
        if zero:
            def step():
                opt.step()
                opt.zero_grad(set_to_none=False)
            return step
        return opt.step
    m, v = torch.zeros_like(flat), torch.zeros_like(flat)
    args = (k, LR, BETA1, BETA2, EPS, 0.0, STEP, zero)
    if impl == "reference":
        return lambda: reference_step(flat, grad, m, v, *args)
    if impl.endswith("-capturable"):
        counter = torch.full((), STEP, dtype=torch.long, device=device)

        def capturable():
            with sophon_fast.use_backend(impl.split("-")[0]):
                inner_step_capturable_(flat, grad, m, v, counter, k, LR, BETA1, BETA2, EPS, 0.0, zero)
        return capturable

    def fused():
        with sophon_fast.use_backend(impl):
            inner_step_(flat, grad, m, v, *args)
    return fused


@pytest.mark.parametrize("device,impl", _params(), ids=[f"{d}-{i}" for d, i in _params()])
@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("model", MODELS)
def bench_inner_step(measure, bench_disabled, model, kind, device, impl):
    if bench_disabled and model != MODELS[0]:
        pytest.skip("--benchmark-disable runs the smallest split only")
    shp = shapes(model)
    n = sum(torch.Size(s).numel() for s in shp)
    measure(_case(impl, kind, shp, device), group=f"inner step {kind} {model} {n / 1e6:.2f}M fp32 {device}",
            provider=impl, device=torch.device(device), nbytes=4 * n * TRAFFIC["copy" if impl == "copy" else kind],
            layer="inner_step", kind=kind, model=model, numel=n, tensors=len(shp), device_type=device)


@pytest.mark.parametrize("device", DEVICES)
def bench_device_copy_floor(measure, bench_disabled, device):
    n = (1 if bench_disabled else 64) * 2 ** 20        # fp32 elements: 4 MiB / 256 MiB
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    measure(lambda: dst.copy_(src), group=f"device copy floor {4 * n >> 20} MiB {device}", provider="copy",
            device=torch.device(device), nbytes=8 * n, layer="copy_floor", device_type=device)
