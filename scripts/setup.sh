#!/usr/bin/env bash
# Everything a fresh machine of this kind needs: Debian data package, a venv at .venv, the pinned
# Python packages, and the editable build of sophon_fast (C++ extension; CUDA too where torch has it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
    || echo "[setup] WARNING: could not install dataset-fashion-mnist (the fashion_mnist domain will be unavailable)"
fi
for pkg in fortunes fortunes-de; do   # English and German prose for the language-model demo
  if ! dpkg -s "$pkg" >/dev/null 2>&1; then
    echo "[setup] installing Debian package $pkg"
    (apt-get update -qq && apt-get install -y -qq "$pkg") >/dev/null \
      || echo "[setup] WARNING: could not install $pkg (its text domain will be unavailable)"
  fi
done
[ -x .venv/bin/python ] || python3 -m venv .venv
# What the build imports, pinned (an unpinned torch pulls a 5 GB CUDA build); the extras come from setup.py.
.venv/bin/python -m pip install -q --disable-pip-version-check \
  torch==2.13.0 triton==3.7.1 numpy ninja pybind11 setuptools wheel
stamp=.venv/.sophon_fast_build
if [ ! -f "$stamp" ] || [ -n "$(find setup.py csrc -newer "$stamp" 2>/dev/null | head -1)" ] \
   || ! .venv/bin/python -c "import sophon_fast._C, transformers, diffusers, pytest, optuna" 2>/dev/null; then
  echo "[setup] installing sophon_fast[lm,diffusion,triton,dev,audit] and building its C++ extension (~1 minute)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --use-pep517 \
    -e ".[lm,diffusion,triton,dev,audit]" \
    torch==2.13.0 triton==3.7.1 transformers==5.24.0 peft==0.21.2 tokenizers==0.23.3 diffusers==0.42.1
  touch "$stamp"
fi
