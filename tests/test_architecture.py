"""The house rules of docs/ARCHITECTURE.md, held against the code: what imports what.

Every ``queue_worker`` import (module level or inside a function) is read from the
source with ``ast``; an import from an area the rules do not allow fails the test
with the file and the line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "queue_worker"

# area -> the areas it may import (the package root, for __version__, is always allowed).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "logs": set(),
    "config": {"errors"},
    "streams": {"errors"},
    "supervisor": {"streams"},
    "router": {"config", "errors", "streams", "supervisor"},
    "openapi": {"streams"},
    "http": {"config", "errors", "openapi", "router", "streams", "supervisor"},
    "devstack": {"config", "errors", "http", "logs", "streams"},
    "commands": {"config", "devstack", "errors", "http", "logs", "openapi", "streams"},
    "cli": {"commands", "config", "errors"},
    "__main__": {"cli"},
}


def area_of(path: Path) -> str:
    """``router`` for ``queue_worker/router/x.py``; ``config`` for ``config_reader.py``."""
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) > 1:
        return relative.parts[0]
    return relative.stem.split("_")[0] if relative.stem.startswith("config") else relative.stem


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, area) of every ``queue_worker`` import in ``path``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        modules: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "queue_worker":
                modules = [f"queue_worker.{alias.name}" for alias in node.names]
            else:
                modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "queue_worker" and len(parts) > 1 and parts[1] != "__version__":
                target = parts[1].split("_")[0] if parts[1].startswith("config") else parts[1]
                found.append((node.lineno, target))
    return found


def test_every_area_imports_only_what_the_rules_allow() -> None:
    broken: list[str] = []
    areas: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        area = area_of(path)
        areas.add(area)
        assert area in ALLOWED, f"{path}: no rule for the area {area!r}"
        for line, target in imports_of(path):
            if target != area and target not in ALLOWED[area]:
                broken.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {area} -> {target}")
    assert broken == [], "imports against docs/ARCHITECTURE.md:\n" + "\n".join(broken)
    assert areas == set(ALLOWED)  # no rule for an area that is gone


def test_the_rules_have_no_cycle() -> None:
    seen: set[str] = set()

    def visit(area: str, path: tuple[str, ...]) -> None:
        assert area not in path, f"cycle: {' -> '.join((*path, area))}"
        if area in seen:
            return
        for target in ALLOWED[area]:
            visit(target, (*path, area))
        seen.add(area)

    for area in ALLOWED:
        visit(area, ())


def test_the_command_line_loads_no_service_and_no_simulator_to_parse() -> None:
    """Building the parser (``--help``, or running ``tail``) imports neither the service
    (http, router) nor the devstack's simulators: each command imports what it runs."""
    probe = (
        "import sys\n"
        "from queue_worker.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted(m for m in sys.modules if m.startswith('queue_worker')))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    for heavy in ("http", "router", "devstack.executor", "devstack.queue", "devstack.demo"):
        assert f"'queue_worker.{heavy}" not in loaded, (heavy, loaded)
    assert "'queue_worker.commands.stream'" in loaded
