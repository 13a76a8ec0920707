#!/usr/bin/env bash
# One command on a CUDA machine: build, check, measure, render.
#   1. setup (venv, packages) and the extension with its CUDA sources (rebuilt when _C lacks them)
#   2. the CUDA and Triton tests: tests/test_cuda_backend.py, tests/test_triton_kernels.py (real GPU,
#      not the interpreter), tests/test_cuda_sources.py (nvcc/ptxas compiles)
#      and, with 2 GPUs or more, tests/test_distributed.py on NCCL (SOPHON_TEST_BACKEND=nccl)
#   3. the benchmark suite on the GPU -> benchmarks/results/gpu.json (kernel GB/s in extra_info, a
#      256 MiB device-to-device copy as the measured floor; engine cases on cuda, peak memory from
#      max_memory_allocated in a child process per case)
#   4. benchmarks/RESULTS.md re-rendered (CPU tables from results/latest.json when present + GPU tables)
#      and a short table printed last.
# Usage: bash benchmarks/run_gpu.sh [extra pytest args for the benchmark run, e.g. -k inner_step]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "run_gpu.sh: no CUDA device (nvidia-smi -L failed); this script is for a GPU machine" >&2
  exit 2
fi
nvidia-smi -L

bash scripts/setup.sh
if ! $PY -c "import sys, torch, sophon_fast._C as C; sys.exit(0 if torch.cuda.is_available() and C.has_cuda() else 1)"; then
  echo "[run_gpu] building sophon_fast with its CUDA sources"
  $PY -m pip install -q --disable-pip-version-check --no-build-isolation -e .
fi
$PY -c "import sophon_fast; sophon_fast.backend_report()"

echo "[run_gpu] CUDA and Triton tests"
env -u TRITON_INTERPRET $PY -m pytest -q tests/test_cuda_backend.py tests/test_triton_kernels.py tests/test_cuda_sources.py

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  echo "[run_gpu] torch.distributed on NCCL (2 ranks, one GPU each; data-parallel and FSDP2)"
  SOPHON_TEST_BACKEND=nccl $PY -m pytest -q tests/test_distributed.py -k "not settings"
else
  echo "[run_gpu] NCCL tests need 2 GPUs; this machine has 1: skipped"
fi

echo "[run_gpu] benchmark suite on the GPU"
mkdir -p benchmarks/results
env -u TRITON_INTERPRET SOPHON_BENCH_THREADS="${SOPHON_BENCH_THREADS:-1}" \
  $PY -m pytest benchmarks -q --benchmark-json=benchmarks/results/gpu.json "$@"

$PY benchmarks/render_results.py
$PY benchmarks/render_results.py benchmarks/results/gpu.json --short
