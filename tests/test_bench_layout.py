"""The benchmarks are one package (issue 36): every command the docs and results name runs
today, no helper is written twice, nothing edits ``sys.path``, and every benchmark answers
``--help`` as ``python -m bench.<name>``.

Checked on the source and the Markdown, with the scanners themselves tried on hand-made
mutants first, so that a check that found nothing did look.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.test_layering import imports_package

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
               *(ROOT / "bench" / "results").glob("*.md")])
PROJECT = ("bench", "bridge", "exporters", "runtime")
# every runnable module defines one; the name says nothing about what it does
ENTRY_POINTS = {"main"}


def bench_files() -> list[Path]:
    return sorted((ROOT / "bench").rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# -- what the docs name ---------------------------------------------------------------------

# ``python -m a.b`` (after .venv/bin/ or not); the arguments run to the inline code span's
# closing backtick when the command opens one, else to the end of the line (a code block,
# ``\`` continuing it)
_COMMAND = re.compile(r"(`?)(?:\S*/)?python3? -m ([\w.]+)")
_PATH = re.compile(r"(?<![\w/.])((?:scripts|bench)/[\w./-]*\w)")


def named_commands(text: str) -> list[tuple[str, list[str]]]:
    """(module, its options) of every ``python -m MODULE ...`` in ``text`` whose module is
    one of the project's packages."""
    out = []
    for m in _COMMAND.finditer(text):
        if m.group(2).split(".")[0] not in PROJECT:
            continue
        rest = text[m.end():]
        if m.group(1):
            args = rest.split("`", 1)[0]
        else:
            args = re.split(r"(?<!\\)\n", rest, maxsplit=1)[0].replace("\\\n", " ")
        opts = [a.split("=", 1)[0] for a in args.split()
                if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", a)]
        out.append((m.group(2), opts))
    return out


def named_paths(text: str) -> list[str]:
    """Every ``scripts/...`` path, and every ``bench/...`` source or results file, in
    ``text`` (``bench/work/`` holds what benchmarks write, so it is not checked)."""
    return [p for p in _PATH.findall(text)
            if p.startswith("scripts/") or p.endswith((".py", ".md"))]


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package missing
        return False


@functools.cache
def help_text(module: str) -> subprocess.CompletedProcess:
    """``python -m MODULE --help`` from the repository root, this checkout's code first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def has_option(help_out: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_out) is not None


def missing_in(text: str) -> list[str]:
    """What ``text`` names that does not exist: modules and paths (options are checked
    against ``--help`` apart, since that runs the module)."""
    bad = [f"python -m {mod}" for mod, _ in named_commands(text) if not module_exists(mod)]
    return bad + [p for p in named_paths(text) if not (ROOT / p).exists()]


@pytest.mark.parametrize("text, missing", [
    ("run `python -m bench.serve MODEL --sessions`", []),
    ("run `.venv/bin/python -m bench.nope -n 3`", ["python -m bench.nope"]),  # a mutant
    ("`python -m bench.investigations.oracle_layers --drop 3`", []),
    ("`python -m pytest -q` and `python -m pip`", []),  # not ours: not checked
    ("see scripts/setup.sh and `scripts/bench_threads.py -n 64`.", ["scripts/bench_threads.py"]),
    ("(24, bench/workloads.py) and bench/results/none.md", ["bench/results/none.md"]),
    ("written to bench/work/synth.gguf", []),  # output of a run, not part of the tree
])
def test_missing_in_finds_mutants(text, missing):
    assert missing_in(text) == missing


def test_named_commands_read_options_to_the_span_end():
    text = ("(`python -m bench.predict_overhead --step-ms 3\n--overhead-us 274,96`, more)\n"
            "python -m bench.concurrency --model m.gguf \\\n    --clients 1,4 -n 48\n"
            "after `python -m bench.rpc --reps=5` the end")
    assert named_commands(text) == [
        ("bench.predict_overhead", ["--step-ms", "--overhead-us"]),
        ("bench.concurrency", ["--model", "--clients", "-n"]),
        ("bench.rpc", ["--reps"])]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_what_exists(doc):
    assert missing_in(doc.read_text()) == []


def test_named_options_exist():
    """Each option a doc passes to a benchmark is one its ``--help`` lists: a results file
    must name the command that reproduces it today, not one whose flags were renamed."""
    bad = []
    for doc in DOCS:
        for mod, opts in named_commands(doc.read_text()):
            if not mod.startswith("bench.") or not module_exists(mod):
                continue  # a missing module is test_docs_name_what_exists's finding
            out = help_text(mod).stdout
            bad += [f"{doc.name}: python -m {mod} {o}" for o in opts if not has_option(out, o)]
    assert bad == []


# -- one definition of each helper ----------------------------------------------------------

def top_level_defs(sources: dict[str, str]) -> dict[str, list[str]]:
    """Function or class name -> the modules that define it at top level."""
    found: dict[str, list[str]] = {}
    for mod, src in sources.items():
        for node in ast.parse(src).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.setdefault(node.name, []).append(mod)
    return found


def defined_twice(sources: dict[str, str], others: dict[str, str] | None = None
                  ) -> dict[str, list[str]]:
    """Names defined in two of ``sources``, or (public names only) in one of them and one
    of ``others``; the entry point ``main`` aside."""
    ours = top_level_defs(sources)
    theirs = top_level_defs(others or {})
    return {name: mods + [m for m in theirs.get(name, []) if not name.startswith("_")]
            for name, mods in ours.items()
            if name not in ENTRY_POINTS
            and (len(mods) > 1 or (not name.startswith("_") and name in theirs))}


def sources_of(files: Iterable[Path]) -> dict[str, str]:
    return {module_name(f): f.read_text() for f in files}


def test_defined_twice_finds_mutants():
    a = "def free_port():\n    pass\n\ndef main():\n    pass\n"
    b = "class Server:\n    def free_port(self):\n        pass\n\ndef main():\n    pass\n"
    assert defined_twice({"bench.a": a, "bench.b": b}) == {}  # a method, and main, are fine
    c = "import socket\n\ndef free_port():\n    return 0\n"
    assert defined_twice({"bench.a": a, "bench.c": c}) == {"free_port": ["bench.a", "bench.c"]}
    lib = "def cpu_facts():\n    pass\n\ndef _helper():\n    pass\n"
    mine = "def cpu_facts():\n    pass\n\ndef _helper():\n    pass\n"
    assert defined_twice({"bench.x": mine}, {"runtime.native": lib}) == {
        "cpu_facts": ["bench.x", "runtime.native"]}  # a private name may repeat across


def test_no_helper_defined_twice_across_bench():
    """No function or class is written in two bench modules, nor (publicly) both in a bench
    module and in a runtime or exporters module it could import instead."""
    libs = [f for pkg in ("runtime", "exporters") for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert defined_twice(sources_of(bench_files()), sources_of(libs)) == {}


# -- no sys.path edits ----------------------------------------------------------------------

def touches_sys_path(src: str) -> bool:
    """``sys.path`` read or written, or ``path`` imported from ``sys``."""
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Attribute) and node.attr == "path" and \
                isinstance(node.value, ast.Name) and node.value.id == "sys":
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "sys" and \
                any(a.name == "path" for a in node.names):
            return True
    return False


@pytest.mark.parametrize("src, hit", [
    ("import sys\nsys.path.insert(0, 'x')", True),
    ("import sys\ndef f():\n    sys.path.append('x')", True),
    ("from sys import path\npath.append('x')", True),
    ("import os\nos.path.join('a', 'b')", False),
    ("import sys\nsys.exit('no sys.path here')", False),  # a string is not an edit
])
def test_touches_sys_path_finds_mutants(src, hit):
    assert touches_sys_path(src) is hit


def test_no_sys_path_edits():
    files = [*bench_files(), *sorted((ROOT / "scripts").rglob("*.py")),
             *(f for pkg in ("bridge", "exporters", "runtime")
               for f in sorted((ROOT / pkg).rglob("*.py")))]
    assert [str(f.relative_to(ROOT)) for f in files if touches_sys_path(f.read_text())] == []


def test_scripts_holds_only_the_shell_entry_points():
    # benchmarks are bench modules; scripts/ is what setup and CI run by path
    assert sorted(p.name for p in (ROOT / "scripts").iterdir()) == [
        "constraints.txt", "quickstart.sh", "setup.sh", "test.sh"]


def test_libraries_never_import_bench():
    # bench may import runtime and exporters; an arrow back would make a benchmark part of
    # what a user installs
    bad = {str(f.relative_to(ROOT)): hits
           for pkg in ("bridge", "exporters", "runtime") for f in sorted((ROOT / pkg).rglob("*.py"))
           if (hits := imports_package(ast.parse(f.read_text()), "bench"))}
    assert bad == {}


# -- every benchmark runs as python -m bench.X ----------------------------------------------

def is_runnable(src: str) -> bool:
    """Whether a module has an ``if __name__ == "__main__":`` block."""
    return any(isinstance(n, ast.If) and isinstance(n.test, ast.Compare)
               and isinstance(n.test.left, ast.Name) and n.test.left.id == "__name__"
               for n in ast.parse(src).body)


RUNNABLE = [module_name(f) for f in bench_files() if is_runnable(f.read_text())]


def test_the_benchmarks_are_found():
    assert {"bench.serve", "bench.concurrency", "bench.llamacpp",
            "bench.investigations.oracle_layers"} <= set(RUNNABLE)
    assert "bench.common" not in RUNNABLE and "bench.workloads" not in RUNNABLE


@pytest.mark.parametrize("module", RUNNABLE)
def test_benchmark_answers_help(module):
    r = help_text(module)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: python -m {module} "), r.stdout[:200]
