"""The documentation: generated references current, every link resolving, a README that stays short."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README_LINES = 200


def generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_references_are_current():
    gen = generator()
    for name, text in gen.GENERATED.items():
        assert (ROOT / "docs" / name).read_text(encoding="utf-8") == text(), (
            f"docs/{name} is stale: run python docs/generate.py")


def test_the_references_list_every_column_and_format():
    from kernelscope.quant.formats import FORMATS
    from kernelscope.results.schema import COLUMNS

    columns = (ROOT / "docs" / "reference" / "columns.md").read_text(encoding="utf-8")
    formats = (ROOT / "docs" / "reference" / "formats.md").read_text(encoding="utf-8")
    assert all(f"`{c}`" in columns for c in COLUMNS if not c.startswith("kernel_") or c == "kernel_fraction")
    assert all(f"| `{name}` |" in formats for name in FORMATS)


def test_every_relative_link_resolves():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [f"{file.relative_to(ROOT)} -> {target}" for file in files
              for target in re.findall(r"\]\(([^)#\s]+)\)", file.read_text(encoding="utf-8"))
              if "://" not in target and not (file.parent / target).exists()]
    assert broken == []


def test_the_readme_stays_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_LINES
    blocks = [i for i, line in enumerate(lines) if line == "```bash"]
    first, second = lines[blocks[0] + 1], lines[blocks[1] + 1]
    assert first.startswith("python -m pip install") and "kernelscope profile demo" in first
    assert second.endswith("python -m pytest")
    assert (ROOT / ".ci" / "run").read_text().strip().endswith(second.split(">/dev/null && ", 1)[1])


def test_the_readme_s_target_figures_are_the_benchmark_s():
    """Each deployment target's row of the README's table is a row of benchmarks/targets.py's latest
    output (docs/benchmarks/targets-demo.txt): the same kernelscope and library-applied figures and CI."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z-]+:[A-Z0-9_]+)`[^|]*\| ([\d.]+) \| ([\d.]+) \| (.+?) \|$", readme, re.M)
    assert len(rows) >= 5
    bench = (ROOT / "docs" / "benchmarks" / "targets-demo.txt").read_text(encoding="utf-8")
    for scheme, ours, theirs, ci in rows:
        assert f"| {scheme} | {ours} | {theirs} | " in bench, scheme
        line = next(line for line in bench.splitlines() if line.startswith(f"| {scheme} |"))
        assert line.endswith(f"| {ci} |"), scheme
