"""The README and the documentation site stay connected and true to the set-up commands.

`mkdocs build --strict` (CI, `make docs`) catches broken links between pages of the site, but not links
from the README (which is not part of the site) and it needs MkDocs installed. These checks are cheap and
run in the default suite: every relative link in README.md and docs/*.md names a file that exists (and a
heading that exists when it carries an anchor), every page is in the site's navigation, and the README
still opens with exactly the two set-up commands a fresh clone needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _strip_code(text: str) -> str:
    """Markdown without fenced blocks and code spans: a `[x](y)` inside code is an example, not a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def heading_slug(title: str) -> str:
    """Anchor of a heading as GitHub and MkDocs' toc both make it for plain titles (lowercase, dashes)."""
    title = _CODE_SPAN.sub(lambda m: m.group(0).strip("`"), title.strip()).lower()
    title = re.sub(r"[^\w\- ]", "", title)
    return re.sub(r" ", "-", title)


def anchors(md_file: Path) -> set[str]:
    """The heading anchors of a Markdown file (ATX headings outside code blocks)."""
    text = _FENCE.sub("", md_file.read_text(encoding="utf-8"))
    return {heading_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def broken_links(md_file: Path) -> list[str]:
    """Relative links in ``md_file`` whose file (or heading anchor, for Markdown targets) does not exist."""
    problems = []
    for target in _LINK.findall(_strip_code(md_file.read_text(encoding="utf-8"))):
        if _SCHEME.match(target) or target.startswith("/"):
            continue  # web addresses are not checked here (no network); absolute paths are refused by mkdocs
        path_part, _, anchor = target.partition("#")
        dest = (md_file.parent / path_part).resolve() if path_part else md_file
        if not dest.exists():
            problems.append(f"{md_file.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{md_file.name}: {target} (no heading with anchor #{anchor} in {dest.name})")
    return problems


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


@pytest.mark.parametrize("md_file", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md_file: Path) -> None:
    assert broken_links(md_file) == []


def test_link_checker_reports_missing_files_and_anchors(tmp_path: Path) -> None:
    """The checker itself must catch what it is for (else the test above passes whatever happens)."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Performance (measured)\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok anchor](other.md#performance-measured) [self](#page)\n"
        "[gone](missing.md) [bad anchor](other.md#nope) [web](https://example.org/x.md)\n"
        "`[in code](missing-too.md)`\n\n```\n[in a block](missing-three.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#nope (no heading with anchor #nope in other.md)",
    ]


def test_every_docs_page_is_in_the_site_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs"
    nav = _nav_pages(config["nav"])
    assert sorted(nav) == sorted(p.name for p in DOCS.glob("*.md"))
    assert "ARCHITECTURE.md" in nav  # the structure authority keeps its name and place
    # Strict builds fail only on warnings: every link check must warn, not stay silent.
    assert set(config["validation"].values()) == {"warn"}
    assert {"omitted_files", "absolute_links", "unrecognized_links", "anchors", "not_found"} <= set(
        config["validation"]
    )


def test_readme_opens_with_exactly_the_two_setup_commands() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    assert start < 15, "the set-up commands must be the README's first code block, near the top"
    assert lines[start] == "```bash"
    commands = [line.split("#", 1)[0].strip() for line in lines[start + 1 : end]]
    assert [c for c in commands if c] == ["make demo", "make test"]
    # The demo's output table follows, so a reader sees what `make demo` prints.
    assert any("tastelab scores (biq2021-mobilenetv2)" in line for line in lines[end : end + 12])
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
