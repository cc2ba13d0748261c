"""The package's shape: layers import in one direction, no module imports itself back through another,
and no command module reaches into another command's module."""

from __future__ import annotations

import ast
from pathlib import Path

import kernelscope

PACKAGE = Path(kernelscope.__file__).parent
LAYERS = {
    "quant": 0, "stats": 1, "capture": 1, "models": 2, "data": 2, "results": 2, "hub": 0, "errors": 0,
    "quiet": 0, "version": 0, "runs": 3, "reports": 3, "cli": 4, "__main__": 5,
}
"""Each top-level module or sub-package and its height: a module imports only modules of its own
sub-package or of lower layers (reports read run folders, never the runs that write them)."""


def module_names() -> dict[str, Path]:
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return names


def imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The kernelscope modules ``file`` imports anywhere in it (inside functions too)."""
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports(name, file, known) for name, file in known.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_import_downwards_only():
    wrong = []
    for module, targets in graph().items():
        own = layer(module)
        if own is None:
            continue
        assert own in LAYERS, f"{own} has no place in LAYERS"
        for target in targets:
            theirs = layer(target)
            if theirs is not None and theirs != own and LAYERS[theirs] >= LAYERS[own]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_command_module_imports_another():
    commands = {m for m in graph() if m.startswith("kernelscope.cli.") and m.endswith("_cmd")}
    crossing = [f"{m} -> {t}" for m in commands for t in graph()[m] if t in commands]
    assert crossing == []
