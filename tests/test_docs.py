"""The project's own docs hold: generated tables match the code, links resolve, every
command and file they name exists, every route and error type is documented, and nothing
points outside the repository."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from chatd.app import create_app
from chatd.cli import build_parser
from chatd.errors import ChatdError
from tests.support import make_settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NAMED_FILE = re.compile(r"(?<![\w/.])((?:src|tests|scripts|bench|deploy|grafana)/[\w./*-]*\w)")
CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
MADE_BY_SCRIPTS = {"bench/.venv-litellm", "bench/portkey"}  # bench/run.sh installs them


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE_BLOCK.sub("", page.read_text())
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_generated_pages_match_the_code() -> None:
    gen = load_generator()
    stale = [
        page
        for page in gen.BLOCKS
        if gen.rendered(page, (ROOT / page).read_text()) != (ROOT / page).read_text()
    ]
    assert stale == [], "run .venv/bin/python scripts/gen_docs.py"


def test_every_config_key_and_log_field_has_a_meaning() -> None:
    assert load_generator().undocumented() == []


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_every_file_and_command_named_exists() -> None:
    missing = []
    for page in PAGES:
        for name in NAMED_FILE.findall(page.read_text()):
            if name not in MADE_BY_SCRIPTS and not any(ROOT.glob(name)):
                missing.append(f"{page.name}: {name}")
    assert missing == []


def test_every_chatd_subcommand_named_exists() -> None:
    choices = set(build_parser()._actions[1].choices or ())
    named = set()
    for page in PAGES:
        for language, block in CODE_BLOCK.findall(page.read_text()):
            if language in ("", "bash", "sh"):
                named.update(re.findall(r"^(?:\S+/)?chatd ([a-z][\w-]*)", block, re.M))
    assert named - choices == set()


def test_every_route_and_error_type_is_in_the_http_api_page() -> None:
    page = (ROOT / "docs" / "http-api.md").read_text()
    app = create_app(make_settings())
    routes = {route.path for route in app.routes}
    types = set()
    pending = list(ChatdError.__subclasses__())
    while pending:
        cls = pending.pop()
        types.add(cls.type)
        pending.extend(cls.__subclasses__())
    assert [r for r in sorted(routes) if f"`{r}`" not in page and f" {r}`" not in page] == []
    assert [t for t in sorted(types) if f"`{t}`" not in page] == []


def test_every_module_is_on_the_design_page() -> None:
    """The package plan names every module, so a new one is placed where a reader looks."""
    page = (ROOT / "docs" / "design.md").read_text()
    package = ROOT / "src" / "chatd"
    modules = {p.name for p in package.rglob("*.py") if p.name != "__init__.py"}
    assert [m for m in sorted(modules) if f"`{m}`" not in page] == []


@pytest.mark.parametrize("folder", ["src", "tests", "bench", "scripts", "grafana", "docs"])
def test_nothing_points_outside_the_project(folder: str) -> None:
    outside = re.compile("SP" + "EC|\u00a7|[Ii]ssue [0-9]|\\.\\./sha" + "red")
    found = []
    paths = [ROOT / "README.md"] if folder == "docs" else []
    paths += [p for p in (ROOT / folder).rglob("*") if p.is_file()]
    for path in paths:
        if "node_modules" in path.parts or any(x.startswith(".venv") for x in path.parts):
            continue  # what bench/run.sh installs (Portkey, LiteLLM) is not the project's
        if path.suffix not in {".py", ".md", ".sh", ".json", ".toml", ".js", ".html", ".css"}:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}")
    assert found == []
