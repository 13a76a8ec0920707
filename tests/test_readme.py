"""Every ```python snippet of README.md and docs/distributed.md runs as written (in a temporary directory), and every
`sophon-fast ...` line of their ```bash blocks is a command line the parser accepts."""
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "distributed.md"]
SNIPPETS = [(p.name, s) for p in PAGES for s in re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S)]
COMMANDS = [line.split("#")[0].strip() for p in PAGES for block in re.findall(r"```bash\n(.*?)```", p.read_text(), re.S)
            for line in block.splitlines() if line.strip().startswith("sophon-fast ")]


def test_readme_has_snippets_and_commands():
    assert sum(name == "README.md" for name, _ in SNIPPETS) >= 2 and len(COMMANDS) >= 3


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_snippet_runs(i, tmp_path, monkeypatch):
    import torch
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    name, code = SNIPPETS[i]
    exec(compile(code, f"{name} snippet {i}", "exec"), {"__name__": f"readme_{i}"})
    if "save_model" in code:
        assert os.path.exists(tmp_path / "runs/readme/protected.safetensors")
    if "save_pretrained" in code:
        assert os.path.exists(tmp_path / "runs/readme/protected-lm/config.json")


@pytest.mark.parametrize("line", COMMANDS)
def test_command_lines_parse(line):
    from sophon_fast import cli
    args = cli.build_parser().parse_args(shlex.split(line)[1:])
    assert callable(args.fn)
