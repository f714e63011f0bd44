"""The packages stack in one direction: zoo (library) < training, export < zoo_cli (the command line).

Read from the source with `ast`, so an import inside a function counts as much as one at the top: a lazy
import still ties the modules together. `SSL_ZOO_LAYERS_ROOT` points the checks at another checkout.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("SSL_ZOO_LAYERS_ROOT") or Path(__file__).resolve().parents[1])
PACKAGES = ("zoo", "training", "export", "zoo_cli")
# What each package may not import (anything not listed, e.g. torch, is not our concern here).
FORBIDDEN = {"zoo": ("training", "export", "zoo_cli"), "training": ("zoo_cli",), "export": ("zoo_cli",)}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _lazy_reexports(tree: ast.Module) -> set[ast.AST]:
    """Import nodes inside a package's module-level `__getattr__`: lazy re-exports, not dependencies."""
    return {node for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name == "__getattr__"
            for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}


def _imports(name: str, modules: dict[str, Path]) -> set[str]:
    """Every module `name` imports (dotted names; `from a import b` is a.b when that is a module)."""
    tree = ast.parse(modules[name].read_text(), str(modules[name]))
    skip = _lazy_reexports(tree) if _is_package(name, modules) else set()
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Call) and "import_module" in (getattr(node.func, "attr", None),
                                                                getattr(node.func, "id", None)):
            arg = node.args[0] if node.args else None  # importlib.import_module("zoo.x") ties modules too
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: climb from this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, modules) if m in modules and m != name} for name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_modules_are_found():
    modules = _modules()
    assert "zoo" in modules and "zoo.load" in modules and "training.trainer" in modules, ROOT


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_of_the_layers_above_it(package):
    modules = _modules()
    offending = sorted(f"{name} imports {target}" for name in modules if name.split(".")[0] == package
                       for target in _imports(name, modules)
                       if target.split(".")[0] in FORBIDDEN[package])
    assert not offending, "\n".join(offending)


def test_no_two_modules_import_each_other_even_through_others():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_three_module_cycle_and_ignores_a_chain():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_zoo_embed_is_callable_whether_the_function_or_a_submodule_import_comes_first():
    # A fresh process each: which of `zoo.embed` (the package's lazy attribute) or `import zoo.shards`
    # (which imports the zoo.embed module and binds it on the package) happens first decides what
    # `zoo.embed` is; calling it must embed either way.
    code = ("import zoo, torch; {first}; m = zoo.load('wmse-resnet18_narrow.fmnist', pretrained=False, device='cpu'); "
            "print(zoo.embed(m, torch.zeros(2, 28, 28, dtype=torch.uint8), progress=False).features.shape)")
    for first in ("zoo.embed", "import zoo.shards"):
        res = subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert res.returncode == 0 and "torch.Size([2, 256])" in res.stdout, res.stderr[-2000:]


def _python_m_entries() -> list[str]:
    """Modules named as `python -m X` / `python3 -m X` in the README, docs and our sources."""
    import re

    texts = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    texts += [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    found = set()
    for path in texts:
        found |= set(re.findall(r"python3? -m ((?:zoo_cli|zoo|training|export)(?:\.[a-z_]+)*)\b", path.read_text()))
    return sorted(found)


def test_every_python_m_entry_the_docs_mention_runs():
    entries = _python_m_entries()
    assert "training" in entries and "zoo_cli" in entries
    for module in entries:
        res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
        assert res.returncode == 0 and "usage:" in res.stdout, (module, res.stderr[-1000:])
