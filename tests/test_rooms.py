"""search/ is three rooms with arrows one way: the rules import neither the training plane nor
the commands, the training plane never imports the commands, the commands never import the
CLI, and no module reaches itself through its imports. Every import counts, also the ones
inside a function (a lazy import is still an arrow)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SEARCH = Path(__file__).resolve().parent.parent / "search"
# A room may import the rooms listed for it (and itself); the CLI sits on top of all three.
MAY_IMPORT = {
    "rules": {"rules"},
    "training": {"rules", "training"},
    "commands": {"rules", "training", "commands"},
    "cli": {"rules", "training", "commands", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SEARCH.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """search.rules.space -> rules; search.cli -> cli; search (the package) -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else "cli"


def imports_of(path: Path) -> set[str]:
    """The search.* modules `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from search.rules import attrs` imports the module search.rules.attrs
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "search" and is_module(name)}


def is_module(name: str) -> bool:
    path = SEARCH.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in SEARCH.rglob("*.py")}
    return {name: imports_of(path) - {name} for name, path in modules.items()}


def test_the_rooms_import_one_way() -> None:
    graph = import_graph()
    assert {room(name) for name in graph} == set(MAY_IMPORT)  # all three rooms and the CLI
    wrong = [
        f"{name} ({room(name)}) imports {target} ({room(target)})"
        for name, targets in graph.items()
        for target in targets
        if room(target) not in MAY_IMPORT[room(name)] and target != "search"
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_reaches_itself_through_its_imports() -> None:
    graph = import_graph()
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            assert name != start, f"{start} imports itself through {sorted(seen)}"
            if name not in seen:
                seen.add(name)
                todo.extend(graph.get(name, ()))


@pytest.mark.slow
def test_the_rules_import_without_torch() -> None:
    rules = sorted(module_name(path) for path in (SEARCH / "rules").glob("*.py"))
    code = f"import json, sys, {', '.join(rules)}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert not {name.split(".")[0] for name in json.loads(done.stdout)} & {"torch", "torchvision"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from search.commands.status import study_status\n", "commands"),
        ("import search.training.trainer\n", "training"),
        ("def f():\n    from search.rules import attrs\n", "rules"),
    ],
)
def test_the_graph_sees_every_kind_of_import(tmp_path: Path, source: str, expected: str) -> None:
    """The check above is only as good as the parser: a lazy import and the `from package
    import module` form are arrows too."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert {room(name) for name in imports_of(path)} == {expected}
