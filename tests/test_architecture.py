"""The package's shape: layers import in one direction, no module imports itself back through another,
and no command module reaches into another command's module."""

from __future__ import annotations

import ast
from pathlib import Path

import kernelscope

PACKAGE = Path(kernelscope.__file__).parent
LAYERS = {
    "quant": 0, "element": 0.5,  # the per-element backends: above quant, below stats and runs
    "stats": 1, "capture": 1, "models": 2, "data": 2, "results": 2, "hub": 0, "errors": 0,
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


MAX_FUNCTION_LINES = 60
"""The longest a function or method may be, from its ``def`` line to its last line."""

HOOK_METHODS = {
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_backward_hook", "register_module_forward_hook",
    "register_module_forward_pre_hook",
}
"""torch's ways to attach a hook to a module: only ``kernelscope.capture`` calls them, so that every hook
is removed on exit, error or not."""


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method under ``root`` longer than ``limit`` lines (``end_lineno - lineno + 1``),
    as ``path:line name (N lines)``."""
    found = []
    for file in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{file.relative_to(root).as_posix()}:{node.lineno} {node.name} "
                                 f"({length} lines)")
    return found


def hook_registrations(root: Path) -> list[str]:
    """Every use of a hook-registering method in the modules under ``root`` outside its ``capture``
    sub-package, as ``path:line name``: an attribute (``m.register_forward_hook``), a bare name, or the
    name as a whole string (``getattr(m, "register_forward_hook")``); comments and docstrings that only
    mention one are not code and do not count."""
    found = []
    for file in sorted(root.rglob("*.py")):
        if file.relative_to(root).parts[0] == "capture":
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Name):
                name = node.id
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value
            else:
                continue
            if name in HOOK_METHODS:
                found.append(f"{file.relative_to(root).as_posix()}:{node.lineno} {name}")
    return found


def test_no_function_is_longer_than_the_limit():
    offenders = long_functions(PACKAGE)
    assert not offenders, f"longer than {MAX_FUNCTION_LINES} lines, split them: {'; '.join(offenders)}"


def test_the_length_check_names_a_long_function(tmp_path):
    def body(indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(58))

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.py").write_text(
        f"def fits():\n{body('    ')}    return 0\n\n\n"  # lines 1-60: 60 lines
        "class C:\n    @staticmethod\n"  # the decorator is not counted: from the def line on
        f"    def too_long():\n{body('        ')}        x = 1\n        return x\n",  # from line 65: 61 lines
        encoding="utf-8")
    assert long_functions(tmp_path) == ["sub/m.py:65 too_long (61 lines)"]


def test_only_capture_attaches_hooks():
    offenders = hook_registrations(PACKAGE)
    assert not offenders, ("attach hooks through kernelscope.capture (ForwardHooks), which removes them: "
                           + "; ".join(offenders))


def test_the_hook_check_names_each_registration_outside_capture(tmp_path):
    for folder in ("capture", "runs"):
        (tmp_path / folder).mkdir()
    (tmp_path / "capture" / "hooks.py").write_text(
        "def attach(m, f):\n    return m.register_forward_hook(f)\n", encoding="utf-8")
    (tmp_path / "runs" / "bad.py").write_text(
        '"""Not register_forward_hook itself: this docstring only names it."""\n'
        "# m.register_forward_pre_hook(f) in a comment is not code\n"
        "def run(m, f):\n"
        "    m.register_forward_pre_hook(f, with_kwargs=True)\n"
        '    return getattr(m, "register_full_backward_hook")(f)\n',
        encoding="utf-8")
    assert hook_registrations(tmp_path) == ["runs/bad.py:4 register_forward_pre_hook",
                                            "runs/bad.py:5 register_full_backward_hook"]
