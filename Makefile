# The two commands of README.md: `make demo` (the main job) and `make test` (the whole test suite).
PY := .venv/bin/python
OUT ?= runs/demo

.PHONY: setup demo demo-quick test test-fast test-triton test-cuda-sources bench bench-ci

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m sophon_fast demo --out $(OUT)

demo-quick: setup
	$(PY) -m sophon_fast demo --quick --out runs/demo-quick

# Unit/parity tests, the Triton kernels under the interpreter (a separate run: TRITON_INTERPRET must
# be set before triton is imported), and the benchmark code executed once (--benchmark-disable).
test: setup
	$(PY) -m pytest tests -q --ignore=tests/test_triton_kernels.py
	TRITON_INTERPRET=1 $(PY) -m pytest tests/test_triton_kernels.py -q
	$(PY) -m pytest benchmarks -q --benchmark-disable

bench: setup
	SOPHON_BENCH_THREADS=1 $(PY) -m pytest benchmarks -q --benchmark-timer=time.process_time \
		--benchmark-json=benchmarks/results/latest.json
	$(PY) benchmarks/render_results.py
