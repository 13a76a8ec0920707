#!/usr/bin/env bash
# One command on a CUDA machine: build, check, measure, render.
#   1. setup (venv, packages) and the extension with its CUDA sources (rebuilt when _C lacks them)
#   2. the CUDA and Triton tests: tests/test_cuda_backend.py, tests/test_cuda_engine.py (protect on the GPU),
#      tests/test_triton_kernels.py (real GPU, not the interpreter), tests/test_cuda_sources.py (nvcc/ptxas)
#      and, with 2 GPUs or more, tests/test_distributed.py on NCCL (SOPHON_TEST_BACKEND=nccl)
#   3. benchmarks/gpu_probe.py (issue 37, ../shared/docs/gpu_plan.md section 7): host overhead at 4096 x 1000, the
#      row kernels alone, the bf16 GEMM rate, the fused linear loss per chunk size and accumulation mode, the
#      capturable inner step replayed from a CUDA graph -> gpu_probe.json
#   4. the benchmark suite on the GPU, one pytest run (one JSON) per part so that finished parts survive a cut
#      later one: gpu_losses.json (row losses at LM vocabularies in bf16/fp32, Liger-Kernel's cross-entropy
#      as the peer where it imports), gpu_inner_step.json (with a 256 MiB device-to-device copy as the
#      measured floor), gpu_linear_loss.json (fused linear + loss, Liger's fused linear CE as the peer),
#      gpu_engine.json (protect on cuda; peak memory from max_memory_allocated in a child process per case)
#   5. benchmarks/RESULTS.md re-rendered (CPU tables from results/latest.json when present + GPU tables)
#      and a short table printed last.
# Usage: bash benchmarks/run_gpu.sh [extra pytest args for both benchmark runs, e.g. --benchmark-max-time=0.2]
# Environment:
#   PY=python3                 the interpreter (default .venv/bin/python, made by scripts/setup.sh)
#   SOPHON_GPU_SETUP=0         skip scripts/setup.sh (a machine whose python already has torch with CUDA)
#   SOPHON_GPU_BUILD=0         use sophon_fast as installed (no rebuild even when _C lacks the CUDA kernels)
#   SOPHON_GPU_BUILD=inplace   build with `setup.py build_ext --inplace` (no pip: a machine without a registry,
#                              where `pip install -e .` reaches for build dependencies); wheels in .whl/ are
#                              installed first (e.g. liger-kernel, diffusers: the peers and optional models)
#   SOPHON_GPU_OUT=DIR         where the JSON go (default benchmarks/results)
#   SOPHON_GPU_TEST_ARGS=...   extra pytest args for the tests (e.g. "-n 8" with pytest-xdist)
#   SOPHON_GPU_ENGINE_K=EXPR   a pytest -k expression limiting the engine run (default: every case)
#   SOPHON_GPU_STEPS="..."     the steps to run after the build (default: tests probe losses inner_step linear_loss engine)
# Time: every step after the build runs under its own `timeout` (seconds: SOPHON_GPU_T_TESTS=120, _PROBE=150,
# _LOSSES=90, _INNER=30, _LINEAR=150, _ENGINE=120: 11 minutes at most), so that set-up + build (about 2-3 minutes) and
# all of them stay inside a 15-minute lease; a step cut by its timeout says so and the next one runs. One device call
# may last 10 minutes: split the run in two calls with SOPHON_GPU_STEPS (docs/gpu_notes.md); the in-place build is
# incremental (ninja), so the second call's build step takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT_DIR="${SOPHON_GPU_OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "run_gpu.sh: no CUDA device (nvidia-smi -L failed); this script is for a GPU machine" >&2
  exit 2
fi
nvidia-smi -L

if [ "${SOPHON_GPU_SETUP:-1}" = 1 ]; then
  bash scripts/setup.sh
fi
if compgen -G ".whl/*.whl" >/dev/null; then   # wheels carried to a machine without a package registry
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sophon_whl .whl/*.whl
  export PYTHONPATH="/tmp/sophon_whl${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${SOPHON_GPU_BUILD:-1}" = inplace ]; then
  # No pip: setup.py builds _C next to the sources, and the package_dir mapping of sophon_fast.kernels becomes a link.
  echo "[run_gpu] building sophon_fast in place with its CUDA sources"
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY setup.py -q build_ext --inplace > "$OUT_DIR/build.log" 2>&1 \
    || { grep -n "error" "$OUT_DIR/build.log" | head -30; exit 3; }
  ln -sfn ../kernels sophon_fast/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif [ "${SOPHON_GPU_BUILD:-1}" = 1 ] && ! $PY -c "import sys, torch, sophon_fast._C as C; sys.exit(0 if torch.cuda.is_available() and C.has_cuda() else 1)" 2>/dev/null; then
  echo "[run_gpu] building sophon_fast with its CUDA sources"
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
fi
$PY -c "import sophon_fast; sophon_fast.backend_report()"

T0=$SECONDS
stamp() { echo "[run_gpu] +$((SECONDS - T0)) s: $*"; }
STEPS=" ${SOPHON_GPU_STEPS:-tests probe losses inner_step linear_loss engine} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
if want tests; then
  stamp "CUDA and Triton tests"
  # shellcheck disable=SC2086  # SOPHON_GPU_TEST_ARGS is a list of words
  timeout "${SOPHON_GPU_T_TESTS:-120}" env -u TRITON_INTERPRET $PY -m pytest -q ${SOPHON_GPU_TEST_ARGS:-} \
    tests/test_cuda_backend.py tests/test_cuda_engine.py tests/test_triton_kernels.py tests/test_cuda_sources.py \
    || echo "[run_gpu] TESTS FAILED or cut (benchmarks still run)"
fi

if want probe; then
  stamp "gpu_probe.py (issue 37's measurements)"
  timeout "${SOPHON_GPU_T_PROBE:-150}" env -u TRITON_INTERPRET $PY benchmarks/gpu_probe.py --out "$OUT_DIR/gpu_probe.json" \
    || echo "[run_gpu] gpu_probe: FAILED or cut (its JSON keeps the parts that finished)"
fi

if want tests && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  echo "[run_gpu] torch.distributed on NCCL (2 ranks, one GPU each; data-parallel and FSDP2)"
  SOPHON_TEST_BACKEND=nccl $PY -m pytest -q tests/test_distributed.py -k "not settings"
elif want tests; then
  echo "[run_gpu] NCCL tests need 2 GPUs; this machine has 1: skipped"
fi

BENCH="env -u TRITON_INTERPRET SOPHON_BENCH_THREADS=${SOPHON_BENCH_THREADS:-1} $PY -m pytest -q -p no:cacheprovider"
for part in losses:${SOPHON_GPU_T_LOSSES:-90} inner_step:${SOPHON_GPU_T_INNER:-30} linear_loss:${SOPHON_GPU_T_LINEAR:-150}; do
  name=${part%%:*}
  want "$name" || continue
  stamp "benchmarks on the GPU: $name"
  timeout "${part##*:}" $BENCH "benchmarks/bench_$name.py" -k cuda --benchmark-json="$OUT_DIR/gpu_$name.json" "$@" \
    || echo "[run_gpu] $name: FAILED or cut (the other parts still run)"
done
if want engine; then
  stamp "benchmarks on the GPU: engine (protect on cuda)"
  timeout "${SOPHON_GPU_T_ENGINE:-120}" $BENCH benchmarks/bench_engine.py benchmarks/bench_lm_engine.py \
    ${SOPHON_GPU_ENGINE_K:+-k "$SOPHON_GPU_ENGINE_K"} --benchmark-json="$OUT_DIR/gpu_engine.json" "$@" \
    || echo "[run_gpu] engine: FAILED or cut"
fi
stamp "done"

[ "$OUT_DIR" = benchmarks/results ] && $PY benchmarks/render_results.py
if compgen -G "$OUT_DIR/gpu_*.json" >/dev/null; then $PY benchmarks/render_results.py "$OUT_DIR"/gpu_*.json --short; fi
