"""The package's structure, as issue 16 states it: the import graph of vopd has no cycle, no
module that a CLI lives in is imported by another vopd module, library code does not exit the
process, and every document the code cites exists in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "vopd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every vopd module this file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in MODULES}
    return out - {_module_name(path)}


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _is_cli(path: Path) -> bool:
    text = path.read_text()
    return "argparse" in text or path.name == "__main__.py"


def test_import_graph_has_no_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue  # a package and its own submodules
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n) :], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_module_mixes_a_cli_with_library_code_others_import():
    clis = {m for m, p in MODULES.items() if _is_cli(p)}
    bad = sorted(
        f"{a} imports the CLI module {b}" for a, deps in GRAPH.items() for b in deps & clis
    )
    assert not bad, "\n".join(bad)


def test_library_code_does_not_exit():
    """A module another vopd module imports is library code: it raises, only CLIs exit."""
    imported = {b for deps in GRAPH.values() for b in deps}
    bad = []
    for m in sorted(imported):
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            exc = node.exc if isinstance(node, ast.Raise) else None
            if exc is not None and "SystemExit" in ast.unparse(exc):
                bad.append(f"{m}:{node.lineno}")
    assert not bad, f"library modules raising SystemExit (only CLIs should): {bad}"


CITED = re.compile(r"\b(docs/[\w./-]+\.md)\b")
FOREIGN = re.compile(
    r"reference-semantics|ref-sem|paper[- ]notes|anchors\.md|design\.md|style\.md"
    r"|slurm-local\.md|(?<!TRL )\bissue \d+"
)


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for p in [
            *PKG.rglob("*.py"),
            *ROOT.glob("workflow/**/*"),
            *ROOT.glob("docs/*.md"),
            *ROOT.glob("config/**/*.yaml"),
            *ROOT.glob("benchmarks/*.py"),
            *ROOT.glob("tests/**/*.py"),
            ROOT / "README.md",
        ]
        if p.is_file() and p.name != "test_structure.py"
    ),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_citations_point_into_the_repository(path):
    text = path.read_text(errors="replace")
    foreign = FOREIGN.findall(text)
    assert not foreign, (
        f"{path.name} cites documents outside the repository: {sorted(set(foreign))}"
    )
    for name in set(CITED.findall(text)):
        if name.startswith("docs/results/"):
            continue  # measured outputs that benchmarks and runs write, not documents
        assert (ROOT / name).exists(), f"{path.name} cites {name}, which does not exist"
