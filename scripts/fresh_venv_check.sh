#!/usr/bin/env bash
# The README's promise for a new user: a fresh venv with `pip install -e ".[lm]"` runs its language-model snippet.
# Builds a copy of HEAD (git archive) in a temporary folder, so the working tree's extension is left alone.
# About 5 minutes on 2 cores (most of it compiling the C++ extension). Usage: bash scripts/fresh_venv_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git archive HEAD | tar -x -C "$work"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 numpy ninja setuptools wheel
(cd "$work" && "$work/venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --use-pep517 \
  -e ".[lm]" transformers==5.24.0 peft==0.21.2 tokenizers==0.23.3)
"$work/venv/bin/python" - "$work" <<'PY'
import os, re, sys
work = sys.argv[1]
readme = open(os.path.join(work, "README.md")).read()
snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "AutoModelForCausalLM" in b)
os.makedirs(os.path.join(work, "run"), exist_ok=True)
os.chdir(os.path.join(work, "run"))
exec(compile(snippet, "README.md language-model snippet", "exec"), {"__name__": "readme_lm"})
assert os.path.exists("runs/readme/protected-lm/config.json")
print("fresh venv with .[lm]: the README's language-model snippet ran")
PY
