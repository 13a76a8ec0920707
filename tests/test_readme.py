"""Every ```python snippet of README.md runs as written (in a temporary directory)."""
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_readme_snippet_runs(i, tmp_path, monkeypatch):
    import torch
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[i], f"README.md snippet {i}", "exec"), {"__name__": f"readme_{i}"})
    if "save_model" in SNIPPETS[i]:
        assert os.path.exists(tmp_path / "runs/readme/protected.safetensors")
