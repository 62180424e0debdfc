"""The shape of the house: imports flow one way between the pipeline's folders with no circle, the guest side is
standard library only, no module or function grows past its size, and the command table is the only place a
command is declared (the command line, the fab tasks and the setup package list all come from one place)."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO_ROOT
from harness.commands import COMMANDS, Request

HARNESS = REPO_ROOT / "harness"
# each folder (or top-level module) of harness/ and its floor: a module imports from its own folder or lower floors
FLOORS = {
    "__init__": 0,
    "errors": 0,
    "util": 0,
    "guest": 0,
    "hypotheses": 1,
    "config": 2,
    "commands": 2,
    "machine": 3,
    "results": 3,
    "kernel": 4,
    "analysis": 4,
    "run": 5,
    "report": 5,
    "bisect": 6,
    "tasks": 7,
    "lab": 8,
    "cli": 8,
    "__main__": 9,
}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_ON_PURPOSE = {("harness/guest/probe.py", "run")}  # the timed loop stays inline: call cost is its floor


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(HARNESS.rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """The harness modules a module imports, anywhere in it (a function's lazy import counts)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            # `from . import x` names x; the package itself is the one being imported, not a dependency
            found |= ({target} if node.module else set()) | {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("harness")}


def floor(module: str) -> tuple[int, str]:
    top = module.split(".")[1] if module != "harness" else "__init__"
    return FLOORS[top], top


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(name, path) if m in mods and m != name} for name, path in mods.items()}


def test_every_folder_has_a_floor():
    assert {floor(m)[1] for m in modules()} <= set(FLOORS)


def test_imports_run_down_the_floors_never_sideways_or_up():
    wrong = []
    for a, targets in graph().items():
        for b in targets:
            (fa, ta), (fb, tb) = floor(a), floor(b)
            if fb > fa or (fb == fa and ta != tb and tb not in ("__init__", "errors", "util", "guest")):
                wrong.append(f"{a} -> {b}")
    assert not wrong, wrong


def test_no_import_cycle():
    g, state, cycle = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1 and not cycle:
                cycle.extend(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycle, " -> ".join(cycle)


def test_the_guest_side_imports_the_standard_library_only():
    guest = HARNESS / "guest"
    for path in guest.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            for name in names:
                top = name.split(".")[0]
                local = (guest / f"{top}.py").exists() or (guest / top).is_dir()
                assert top in sys.stdlib_module_names or local, f"{path}: imports {name}"


def test_no_module_or_function_is_too_long():
    long_modules, long_functions = [], []
    for path in HARNESS.rglob("*.py"):
        rel = str(path.relative_to(REPO_ROOT))
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{rel}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in LONG_ON_PURPOSE:
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}: {node.name} {n}")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_every_command_is_a_task_a_subcommand_and_a_fab_task_with_the_same_options():
    from harness import tasks
    from harness.cli import parser
    from harness.lab.fabtasks import fab_tasks, param

    sub = next(a for a in parser()._actions if a.dest == "task")
    fab = fab_tasks()
    assert set(COMMANDS) == set(sub.choices) == set(fab)  # type: ignore[arg-type]
    for name, command in COMMANDS.items():
        assert callable(getattr(tasks, name))
        flags = {o.dest for o in sub.choices[name]._actions if o.dest != "help"}  # type: ignore[index]
        assert flags == {o.field for o in command.options}
        assert {param(o) for o in command.options} <= set(inspect.signature(fab[name].body).parameters)


def test_a_request_travels_as_the_argv_the_command_line_parses_back():
    from harness.cli import parser

    r = Request.of("experiment", {"config": "x.yaml", "sets": ["a=1", "b=[1, 2]"], "run_id": "r1", "yes": True})
    args = vars(parser().parse_args(r.argv()))
    assert Request.of(args.pop("task"), args) == r
    c = Request.of("compare", {"run_a": "A", "run_b": "B"})
    args = vars(parser().parse_args(c.argv()))
    assert Request.of(args.pop("task"), args) == c


def test_setup_has_one_package_list_that_bootstrap_and_the_tool_checks_use():
    from harness.tasks import harness_packages
    from harness.util import HEADER_PACKAGES, TOOL_PACKAGES

    listed = set(harness_packages())
    assert set(TOOL_PACKAGES.values()) | set(HEADER_PACKAGES.values()) <= listed
    assert "harness/setup.sh" in (REPO_ROOT / "bootstrap.sh").read_text()
    assert "packages.txt" in (HARNESS / "setup.sh").read_text()
    bad = subprocess.run(["bash", str(HARNESS / "setup.sh"), "evil;rm"], capture_output=True, text=True)
    assert bad.returncode != 0 and ("not a Debian package name" in bad.stderr or "run as root" in bad.stderr)


@pytest.mark.parametrize("names", [["ok-pkg", "no spaces"], ["$(id)"], ["-o"]])
def test_package_names_are_refused_unless_debian_allows_them(names):
    from harness.errors import HarnessError
    from harness.tasks import debian_packages

    with pytest.raises(HarnessError, match="not Debian package names"):
        debian_packages(names)
