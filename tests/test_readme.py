"""The README is a map: short, opening with the two commands, linking every page under docs/, naming every
part of backend/; and no relative link of the documentation leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from backend.settings import Settings, environment_name

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README_MAX_LINES = 300
MAIN_JOB = "bash scripts/setup.sh && FREESEG_MODELS=tiny .venv/bin/freesegdiff serve --port 9090"
TESTS = "bash scripts/setup-tests.sh && .venv/bin/python -m pytest"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = ("http://", "https://", "mailto:")
# docs/page.md or README, and the heading quoted after it when there is one: (docs/jobs.md, "Workers on many machines")
MENTION = re.compile(r"""\b(README|docs/[\w-]+\.md)\b(?:,? \\?["']([^"'\\]+)\\?["'])?""")


def outside_code_blocks(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside a fenced code block (a `# comment` there is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a Markdown text, in order."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """The anchor GitHub makes for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a page's headings make (a repeated heading's anchor gets -1, -2, ... as on GitHub)."""
    made, seen = set(), {}
    for line in outside_code_blocks(page.read_text()):
        if match := re.match(r"#{1,6} (.+)", line):
            base = anchor(match.group(1))
            made.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return made


def relative_links(page: Path) -> list[str]:
    """The targets of a page's links that point inside this repository."""
    return [target for line in outside_code_blocks(page.read_text()) for target in LINK.findall(line)
            if not target.startswith(EXTERNAL)]


def test_readme_is_a_short_map():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines: move a topic to a page under docs/"


def test_readme_opens_with_the_two_commands():
    first_block = code_blocks(README.read_text())[0]
    assert MAIN_JOB in first_block.splitlines()
    assert TESTS in first_block.splitlines()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_page_is_linked_from_the_readme(page: Path):
    assert f"docs/{page.name}" in {target.split("#")[0] for target in relative_links(README)}


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda page: page.name)
def test_relative_links_lead_somewhere(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO_ROOT.parent)}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading of {linked.name} makes #{fragment}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_settings_page_has_a_row_for_every_setting():
    first_cells = re.findall(r"^\| ([^|]+) \|", (DOCS / "settings.md").read_text(), flags=re.MULTILINE)
    documented = {name for cell in first_cells for name in re.findall(r"`([A-Z_]+)`", cell)}
    missing = sorted(environment_name(field) for field in Settings.model_fields
                     if environment_name(field) not in documented)
    assert not missing, f"docs/settings.md has no row for {', '.join(missing)}"


def test_the_map_names_every_package_and_loose_module():
    map_block = next(block for block in code_blocks(README.read_text()) if block.startswith("backend/"))
    parts = [path.name + ("/" if path.is_dir() else "") for path in (REPO_ROOT / "backend").iterdir()
             if path.name != "__init__.py" and (path.suffix == ".py" or (path / "__init__.py").exists())]
    named = set(re.findall(r"[\w.]+/?", map_block))
    missing = sorted(part for part in parts if part not in named)
    assert not missing, f"README.md's map (How it fits together) does not name {', '.join(missing)}"


def code_mentions() -> list[tuple[Path, str, str]]:
    """Each `docs/page.md` (or `README`) that the code, tests and scripts name, with the heading quoted after it."""
    sources = [*(REPO_ROOT / "backend").rglob("*.py"), *(REPO_ROOT / "tests").rglob("*.py"),
               *(REPO_ROOT / "scripts").iterdir(), *(REPO_ROOT / ".ci").iterdir(),
               REPO_ROOT / "Dockerfile", REPO_ROOT / "docker-compose.yml"]
    return [(source, page, heading) for source in sources if source.is_file() and source != Path(__file__).resolve()
            for page, heading in MENTION.findall(source.read_text(errors="replace"))]


@pytest.mark.parametrize("source, page, heading", code_mentions(),
                         ids=lambda value: value.name if isinstance(value, Path) else value)
def test_what_the_code_cites_of_the_documentation_exists(source: Path, page: str, heading: str):
    cited = README if page == "README" else REPO_ROOT / page
    assert cited.exists(), f"{source.relative_to(REPO_ROOT)} cites {page}, which does not exist"
    if heading:
        assert anchor(heading) in anchors(cited), (
            f"{source.relative_to(REPO_ROOT)} cites {page}, \"{heading}\": no heading of {page} says that")
