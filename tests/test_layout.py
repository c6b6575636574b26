"""The house's plan (docs/design.md): floors, imports only downward, no long rooms."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "chatd"

# Top to bottom. A module may import from its own floor or any floor below it.
FLOORS = [
    {"app", "cli", "check_config", "callers_cli", "replicas", "reloading", "server", "__main__"},
    {"ui"},
    {"surfaces"},
    {"state"},
    {"routing"},
    {"providers"},
    {"wire"},
    {"telemetry"},
    {"config", "builtin_providers", "errors", "types", "tasks", "web", "__init__"},
]
LONGEST = 400


def floor_of(module: str) -> int:
    head = module.split(".")[1] if "." in module else "__init__"
    for level, names in enumerate(FLOORS):
        if head in names:
            return level
    raise AssertionError(f"{module} is on no floor of the plan: add it to docs/design.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "chatd" or name.startswith("chatd.")}


def test_no_import_runs_up_a_floor() -> None:
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        for imported in imports(path):
            if imported != "chatd" and floor_of(imported) < floor_of(module):
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_no_relative_imports() -> None:
    """Absolute imports say which floor a name comes from."""
    relative = [
        f"{module_name(path)}: from {'.' * node.level}{node.module or ''}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []


def test_no_module_over_400_lines_unless_it_says_it_is_data() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > LONGEST and "data table" not in lines[0]:
            long.append(f"{module_name(path)}: {len(lines)}")
    assert long == []


def test_importing_chatd_imports_nothing_optional() -> None:
    optional = "{'redis', 'asyncpg', 'opentelemetry', 'watchfiles', 'fastapi', 'uvicorn'}"
    code = (
        f"import sys, chatd; print(sorted(m for m in sys.modules if m.split('.')[0] in {optional}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
