"""The package's shape holds: packages form a stack, imports only point down it, no cycles.

Reads every module's imports with `ast` (function-level ones included), so nothing needs to
be imported to check them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent / "router_tune"
# Bottom to top: a package may import only packages listed before it (and itself).
STACK = [
    "errors",
    "io",
    "architectures",
    "model",
    "data",
    "losses",
    "routing",
    "export",
    "evaluation",
    "training",
    "commands",
]
# Top-level modules above the stack: the public API, the CLI dispatcher and `python -m router_tune`.
ENTRY_POINTS = {"__init__", "cli", "__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """router_tune modules imported by a file (`from router_tune.x import y` counts y when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("router_tune"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("router_tune"):
            for alias in node.names:
                candidate = ROOT.parent / f"{node.module}.{alias.name}".replace(".", "/")
                is_module = candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()
                found.add(f"{node.module}.{alias.name}" if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py")) if "assets" not in p.parts}


def package_of(module: str) -> str:
    """The stack entry of a module: router_tune.model.routers -> model; router_tune.errors -> errors."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def up_the_stack(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in edges.items():
        source = package_of(module)
        for target in targets:
            dest = package_of(target)
            if dest == "__init__" and target == "router_tune":
                bad.append(f"{module} imports the package root (import the defining module instead)")
            elif source in ENTRY_POINTS:
                continue
            elif dest in ENTRY_POINTS or dest not in STACK or source not in STACK:
                bad.append(f"{module} -> {target}: not in the stack {STACK}")
            elif STACK.index(dest) > STACK.index(source):
                bad.append(f"{module} ({source}) imports {target} ({dest}), which is above it")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of size > 1 (Tarjan), or self-loops."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
            if len(component) > 1 or v in edges.get(v, ()):
                result.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return result


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, targets in edges.items():
        out.setdefault(package_of(module), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(module)
        )
    return out


def test_every_package_is_in_the_stack():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert packages | modules - ENTRY_POINTS == set(STACK)


def test_imports_only_point_down_the_stack():
    assert up_the_stack(graph()) == []


def test_no_import_cycles_between_modules_or_packages():
    edges = graph()
    assert cycles(edges) == []
    assert cycles(package_edges(edges)) == []


def test_nothing_imports_the_commands_except_the_cli():
    importers = [m for m, targets in graph().items() if any(t.startswith("router_tune.commands") for t in targets)]
    assert [m for m in importers if not m.startswith("router_tune.commands")] == []


def test_each_package_says_what_it_owns_and_may_import():
    for package in STACK[1:]:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc, f"router_tune/{package}/__init__.py has no docstring"
        if package != "commands":
            assert "Imports:" in doc, f"router_tune/{package}/__init__.py does not say what it may import"


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"router_tune.io.a": {"router_tune.training.trainer"}}, 1),  # up the stack
        ({"router_tune.model.a": {"router_tune.io.checkpoint"}}, 0),  # down
        ({"router_tune.training.x": {"router_tune"}}, 1),  # the lazy package root
    ],
)
def test_the_checks_catch_what_they_claim(edges, expected):
    assert len(up_the_stack(edges)) == expected
    loop = {"router_tune.a.x": {"router_tune.a.y"}, "router_tune.a.y": {"router_tune.a.x"}}
    assert cycles(loop) == [["router_tune.a.x", "router_tune.a.y"]]
    assert cycles(
        package_edges({"router_tune.io.x": {"router_tune.model.y"}, "router_tune.model.y": {"router_tune.io.z"}})
    )


def imported_test_modules(source: str) -> list[str]:
    """The test modules (tests/test_*.py) a file imports, by any import form."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            names = [f"{module}.{a.name}" for a in node.names] if module == "tests" else [module]
        found.extend(n for n in names if n.startswith("tests.test_"))
    return found


def test_no_test_module_imports_another():
    """Shared test helpers live in helper modules (tests/factories.py, trainers.py, run_dirs.py, ...)."""
    offenders = {
        p.name: imported_test_modules(p.read_text())
        for p in sorted((ROOT.parent / "tests").glob("*.py"))
        if imported_test_modules(p.read_text())
    }
    assert offenders == {}
    assert imported_test_modules("from tests.test_trainer import make_trainer") == ["tests.test_trainer"]
    assert imported_test_modules("from tests import test_export") == ["tests.test_export"]


def documented_modules(internals: str) -> dict[str, set[str]]:
    """The stack block of docs/internals.md: package -> the modules its line (and continuation lines) lists."""
    block = internals.split("## The stack", 1)[1].split("```", 2)[1]
    listed: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            package, line = line.split(None, 1)[0], line.split(None, 1)[1]
        names = line.split(":", 1)[0]  # "inspect, train: argparse, ..." lists modules before a colon
        listed.setdefault(package, set()).update(n.split()[0] for n in names.split(",") if n.strip())
    return listed


def test_internals_lists_every_module():
    """docs/internals.md says it is kept true: its stack lists every module of every package."""
    listed = documented_modules((ROOT.parent / "docs" / "internals.md").read_text())
    for package in STACK:
        folder = ROOT / package
        if not folder.is_dir():
            continue
        modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        assert listed.get(package, set()) >= modules, f"docs/internals.md misses {package}: {modules - listed[package]}"


def test_make_test_and_test_slow_run_the_suite():
    """The README's `make test` (and CI's .ci/run, which calls it) once ran no test at all for a session: a
    Makefile edit had dropped the target while `.PHONY` still named it, and make exited 0."""
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    for target, command in (("test", "-m pytest -q"), ("test-slow", "-m pytest -q -m slow")):
        rule = re.search(rf"^{re.escape(target)}:[^\n]*\n\t([^\n]+)", makefile, re.M)
        assert rule and rule.group(1).endswith(command), f"make {target} must run `python {command}`"
    assert "make test" in ci.splitlines()
