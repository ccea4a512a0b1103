"""Dependencies run one way: the CLI package ``bridge`` uses the libraries, never back.

``exporters/`` and ``runtime/`` are libraries; if either imported ``bridge`` (the click
layer and public API), the runtime would pull in the CLI and the two could import each
other in a cycle. Checked on the source with ``ast``, so no module has to be importable.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("exporters", "runtime")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every ``import a.b`` and ``from a.b import c`` in ``tree``,
    including imports inside functions; relative imports are skipped (they stay within
    their own package)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def imports_package(tree: ast.AST, package: str) -> list[str]:
    return [f"line {line}: {mod}" for line, mod in imported_modules(tree)
            if mod == package or mod.startswith(package + ".")]


@pytest.mark.parametrize("source, hits", [
    ("import bridge", 1),
    ("import bridge.cli as c", 1),
    ("from bridge import __version__", 1),
    ("from bridge.testmodels import fetch_gguf", 1),
    ("def f():\n    from bridge import load", 1),  # a lazy import counts too
    ("import bridges, bridge_x", 0),  # other names that merely start with "bridge"
    ("from exporters import bridge_keys", 0),
    ("from . import bridge", 0),  # relative: inside the library's own package
])
def test_detector(source, hits):
    assert len(imports_package(ast.parse(source), "bridge")) == hits


@pytest.mark.parametrize("library", LIBRARIES)
def test_libraries_never_import_the_cli_package(library):
    files = sorted((ROOT / library).rglob("*.py"))
    assert files, f"no Python files under {library}/"
    bad = {str(f.relative_to(ROOT)): hits for f in files
           if (hits := imports_package(ast.parse(f.read_text(), str(f)), "bridge"))}
    assert not bad, f"library modules import the CLI package 'bridge': {bad}"


def test_runtime_never_imports_the_exporter():
    # a user who only chats installs neither torch nor transformers
    bad = {}
    for f in sorted((ROOT / "runtime").rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        hits = [h for pkg in ("exporters", "torch", "transformers")
                for h in imports_package(tree, pkg)]
        if hits:
            bad[str(f.relative_to(ROOT))] = hits
    assert not bad, f"runtime modules import the exporter or torch: {bad}"


def test_only_the_server_imports_the_server():
    # the decode loop, the drafters and the engine work without the serve extra
    # (FastAPI, uvicorn): only runtime/serve/ itself may import runtime.serve
    bad = {}
    for f in sorted((ROOT / "runtime").rglob("*.py")):
        if (ROOT / "runtime" / "serve") in f.parents:
            continue
        if hits := imports_package(ast.parse(f.read_text(), str(f)), "runtime.serve"):
            bad[str(f.relative_to(ROOT))] = hits
    assert not bad, f"runtime modules outside runtime/serve/ import it: {bad}"


# -- no import circles -------------------------------------------------------------------

PACKAGES = ("bridge", "exporters", "runtime", "bench")


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (at the top or inside a function: a lazy
    import that closes a circle only hides it). ``from a import b`` names ``a.b`` when
    that is a module, else ``a``."""
    files = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names}
                targets |= (subs & files.keys()) or {node.module}
        graph[mod] = {t for t in targets if t in files and t != mod}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circle_detector():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    """Each pair of modules imports one way at most, through any chain: a circle means
    two modules are one design split in two (issue 36 found three)."""
    assert circles(import_graph(ROOT)) == []
