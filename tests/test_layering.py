"""The import graph of sophon_fast (and kernels/, installed as sophon_fast.kernels) is layered and has no cycle.

Layers, lowest first (docs style guide, "The front door and the back rooms"): kernels -> reference and checks ->
ops -> functional -> models and tasks -> engine -> attacks -> the package's public API -> apps. A module may
import its own layer or any lower one, never a higher one, and the graph has no cycle, even inside a layer.
Every import counts, wherever it is written: at module level, inside a function (a lazy import that closes a
cycle is still a cycle), under ``TYPE_CHECKING``, or as ``importlib.import_module("literal")``. The checker
reads the source with ``ast`` and imports nothing. Importing ``a.b.c`` is counted as an import of ``a.b.c``
only, not of its parent packages (as import-linter counts it).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]

# (layer name, module prefixes), lowest first. A prefix matches the module itself and its submodules.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("kernels", ("sophon_fast.kernels",)),
    ("reference and checks", ("sophon_fast.reference", "sophon_fast.checks", "sophon_fast._checks")),
    ("ops", ("sophon_fast.ops", "sophon_fast._backend")),
    ("functional", ("sophon_fast.functional", "sophon_fast.optim")),
    ("models and tasks", ("sophon_fast.models", "sophon_fast.tasks", "sophon_fast.data", "sophon_fast.io")),
    ("engine", ("sophon_fast.engine", "sophon_fast.defences", "sophon_fast.distributed")),
    ("attacks", ("sophon_fast.attacks", "sophon_fast.recipes", "sophon_fast.audit")),
    ("public API", ("sophon_fast",)),      # the package's __init__: everything public, nothing from apps
    ("apps", ("sophon_fast.apps", "sophon_fast.cli", "sophon_fast.__main__")),
]
# Leaf utilities any layer may use: they import nothing of the package.
SHARED = ("sophon_fast._atomic", "sophon_fast._C")


def discover(root: Path) -> Dict[str, Path]:
    """Module name -> source file for sophon_fast/ and kernels/ (as sophon_fast.kernels) under ``root``."""
    out = {}
    for top, prefix in (("sophon_fast", ["sophon_fast"]), ("kernels", ["sophon_fast", "kernels"])):
        for path in sorted((root / top).rglob("*.py")):
            parts = prefix + list(path.relative_to(root / top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known) -> Optional[str]:
    """The longest known module (or shared utility) that ``name`` names or lies inside."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in known or cand in SHARED:
            return cand
    return None


def imports(modules: Dict[str, Path]) -> Dict[str, Set[Tuple[str, int]]]:
    """Module -> {(imported package module, line)} for every import statement anywhere in its source."""
    graph: Dict[str, Set[Tuple[str, int]]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: Set[Tuple[str, int]] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" for a in node.names]     # `from pkg import sub` imports pkg.sub
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in \
                    ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != mod:
                    found.add((target, node.lineno))
        graph[mod] = found
    return graph


def layer_of(mod: str) -> Optional[int]:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def violations(graph) -> List[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        lm = layer_of(mod)
        for dep, line in sorted(deps):
            ld = None if dep in SHARED else layer_of(dep)
            if ld is not None and lm is not None and ld > lm:
                out.append(f"{mod} (line {line}, layer {LAYERS[lm][0]}) imports {dep} (layer {LAYERS[ld][0]})")
    return out


def cycles(graph) -> List[List[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    edges = {m: sorted({d for d, _ in deps if d in graph}) for m, deps in graph.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[List[str]] = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _graph():
    return imports(discover(ROOT))


def test_every_module_has_a_layer():
    unplaced = [m for m in discover(ROOT) if m not in SHARED and layer_of(m) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS in {__file__}): {unplaced}"


def test_no_module_imports_a_higher_layer():
    bad = violations(_graph())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(_graph())
    assert not found, "import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_lazy_imports_cycles_and_upward_imports(tmp_path):
    """The checker itself, on a made-up package: a lazy import closing a cycle and an upward import are found."""
    files = {"sophon_fast/__init__.py": "",
             "sophon_fast/ops/__init__.py": "from sophon_fast.ops import a\n",
             "sophon_fast/ops/a.py": "import sophon_fast.ops.b\n",
             "sophon_fast/ops/b.py": "def f():\n    from . import a\n",          # lazy, relative: still a cycle
             "sophon_fast/models/__init__.py": "",
             "sophon_fast/models/m.py": "from sophon_fast import _atomic\n",
             "sophon_fast/_atomic.py": "",
             "kernels/__init__.py": "import importlib\nimportlib.import_module('sophon_fast.models.m')\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = imports(discover(tmp_path))
    assert ("sophon_fast.ops.a", 2) in graph["sophon_fast.ops.b"]
    assert cycles(graph) == [["sophon_fast.ops.a", "sophon_fast.ops.b"]]
    assert violations(graph) == ["sophon_fast.kernels (line 2, layer kernels) imports sophon_fast.models.m "
                                 "(layer models and tasks)"]
    assert layer_of("sophon_fast.apps.demo") == len(LAYERS) - 1 and layer_of("sophon_fast") == len(LAYERS) - 2


if __name__ == "__main__":   # print the graph's problems without pytest
    g = _graph()
    print("\n".join(violations(g)) or "no layering violations")
    print("\n".join(" <-> ".join(c) for c in cycles(g)) or "no cycles")
    print(os.linesep.join(m for m in discover(ROOT) if layer_of(m) is None and m not in SHARED))
