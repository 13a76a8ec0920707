"""GPU sources compile for sm_80 and sm_90 without a GPU.

* every csrc/**/*.cu with nvcc (found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin), warnings as
  errors, with the half/bf16 defines torch's extension build adds;
* the Triton kernels (sophon_fast.kernels) to cubin, for the exact launch configurations their host
  launchers choose (captured without running them), with Triton's bundled ptxas.

    .venv/bin/python -m pytest tests/test_cuda_sources.py -q
"""
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted(ROOT.glob("csrc/**/*.cu"))
ARCHS = (80, 90)
# What torch.utils.cpp_extension passes to nvcc, so the sources compile here as they do in setup.py.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


def find_nvcc():
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.mark.parametrize("source", CU_FILES, ids=[str(p.relative_to(ROOT)) for p in CU_FILES])
def test_nvcc_compiles(source, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin")
    procs = {arch: subprocess.Popen(
        [nvcc, "-c", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Werror", "all-warnings", *TORCH_NVCC_FLAGS,
         "-Xptxas", "-v", "-o", str(tmp_path / f"{source.stem}_sm{arch}.o"), str(source)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for arch in ARCHS}
    failures = []
    for arch, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"--- sm_{arch}: nvcc exited {proc.returncode}\n{out}")
        elif source.name == "row_losses.cu":
            failures += [f"sm_{arch}: {f}" for f in _backward_register_budget(out)]
    assert not failures, "\n".join(failures)


# Register budget of the row-loss backward kernels for 16- and 32-bit logits (issue 37: enough 16-byte loads in flight
# needs >= 6 blocks of 256 threads per SM): at most 40 registers and no spills, as __launch_bounds__ asks.
BWD_MAX_REGISTERS = 40


def _backward_register_budget(ptxas_out: str):
    """Violations of BWD_MAX_REGISTERS (or spills) among the non-fp64 row_losses_bwd_kernel instances."""
    import re
    pat = re.compile(r"Compiling entry function '(\w+)'.*?\n.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                     r"\n.*?Used (\d+) registers", re.S)
    found, bad = 0, []
    for name, stores, loads, regs in pat.findall(ptxas_out):
        # mangled template arguments: d = double; the backward kernel's name carries "row_losses_bwd_kernel"
        if "row_losses_bwd_kernel" not in name or name.split("row_losses_bwd_kernel")[1].startswith("IdL"):
            continue
        found += 1
        if int(regs) > BWD_MAX_REGISTERS or int(stores) or int(loads):
            bad.append(f"{name}: {regs} registers, {stores}/{loads} bytes spilled")
    return bad if found else ["no row_losses_bwd_kernel found in the ptxas report"]


def test_cuda_sources_present():
    names = {p.name for p in CU_FILES}
    assert {"row_losses.cu", "inner_step.cu", "sq_mean.cu"} <= names, \
        f"expected the CUDA launchers' sources, found {names}"


# ------------------------------------------------------------------------------------------------
# Triton kernels: ahead-of-time compilation of the launches the host code makes
# ------------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records instead of running."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _launches(monkeypatch):
    from sophon_fast.kernels import inner_step as IS
    from sophon_fast.kernels import row_losses as RL
    from sophon_fast.kernels import sq_mean as SM

    calls = []
    for mod, name in ((RL, "_row_losses_fwd_kernel"), (RL, "_row_losses_bwd_kernel"), (IS, "_inner_step_kernel"),
                      (SM, "_row_sq_mean_kernel")):
        monkeypatch.setattr(mod, name, _Recorder(getattr(mod, name), calls))
    y = torch.zeros(4, dtype=torch.long)
    fused = [0.5, 1.0, 0.25, 2.0]
    cases = [  # (dtype, C, target, weights, resident_max_c)
        (torch.float32, 10, y, fused, RL.RESIDENT_MAX_C),
        (torch.bfloat16, 1000, y, fused, RL.RESIDENT_MAX_C),
        (torch.float16, RL.RESIDENT_MAX_C, y, [0.0, 1.0, 0.0, 0.0], RL.RESIDENT_MAX_C),
        (torch.float32, 65536, y, fused, 65536),
        (torch.bfloat16, 70000, y, fused, RL.RESIDENT_MAX_C),
        (torch.float32, 5000, None, [0.0, 0.0, 1.0, 1.0], RL.RESIDENT_MAX_C),
        (torch.float64, 300, y, fused, RL.RESIDENT_MAX_C),
        (torch.float64, 70000, y, fused, RL.RESIDENT_MAX_C),
    ]
    for dtype, c, target, w, rmax in cases:
        z = torch.zeros(4, c, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        RL.row_losses_fwd(z, target, w, 1.0, -100, resident_max_c=rmax)
        RL.row_losses_bwd(torch.zeros(4, dtype=acc), z, target, torch.zeros(4, 3, dtype=acc), w, 1.0, -100,
                          resident_max_c=rmax)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for kind in (0, 1, 2):
            bufs = [torch.zeros(5000, dtype=dtype) for _ in range(4)]
            IS.inner_step_(*bufs, kind, 1e-3, 0.9, 0.999, 1e-8, 0.01, 1, True)
    for dtype, d in ((torch.float32, 37), (torch.bfloat16, 5000), (torch.float64, 300)):
        x = torch.zeros(3, d, dtype=dtype)
        SM.row_sq_mean(x, None)
        SM.row_sq_mean(x, x.clone())
    return calls


def test_triton_kernels_compile(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: kernels are interpreted, not compiled (run this file without it)")
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    calls = _launches(monkeypatch)
    assert len(calls) == 2 * 8 + 9 + 6
    failures = []
    for fn, args, kwargs in calls:
        params = [p for p in fn.params if not p.is_constexpr]
        constexprs = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr}
        signature = {p.name: mangle_type(a) for p, a in zip(params, args)}
        signature.update({name: "constexpr" for name in constexprs})
        for arch in ARCHS:
            try:
                triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": kwargs["num_warps"]})
            except Exception as e:  # report every configuration that fails, not only the first
                failures.append(f"{fn.__name__} sm_{arch} {signature} {constexprs}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
