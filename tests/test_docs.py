"""README.md and docs/*.md: figure blocks equal what scripts/render_docs.py writes, the README stays short,
every docs page is linked from it, and every relative link and anchor resolves."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def render_docs():
    """scripts/render_docs.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_docs"] = module
    spec.loader.exec_module(module)
    return module


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (commands and program output stay exact, however long)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return out


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_figure_blocks_match_the_results_files(render_docs):
    stale = [
        p.relative_to(REPO).as_posix()
        for p in render_docs.doc_files()
        if render_docs.render(p.read_text(encoding="utf-8"), p.name) != p.read_text(encoding="utf-8")
    ]
    assert not stale, f"stale figure blocks in {stale}: run python scripts/render_docs.py"


def test_every_renderer_is_used_and_a_changed_figure_is_caught(render_docs):
    texts = {p: p.read_text(encoding="utf-8") for p in render_docs.doc_files()}
    used = {m.group(2) for t in texts.values() for m in render_docs.BLOCK.finditer(t)}
    assert used == set(render_docs.RENDERERS)
    text = README.read_text(encoding="utf-8")
    tampered = text.replace("| Amazon_Fashion | T→I | R@5 | ", "| Amazon_Fashion | T→I | R@5 | 9", 1)
    assert tampered != text
    assert render_docs.render(tampered, "README.md") == text
    assert render_docs.main(["--check"]) == 0


def test_unknown_block_is_an_error(render_docs):
    with pytest.raises(SystemExit, match="unknown figures block 'nope'"):
        render_docs.render("<!-- figures:nope -->\n<!-- /figures -->", "x.md")


def test_readme_is_short_and_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    long = [line[:60] for line in _prose_lines(text) if len(line) > 200]
    assert not long, f"README lines over 200 characters: {long}"
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{page.name}" in text, f"README does not link docs/{page.name}"


@pytest.mark.parametrize("page", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    for target in LINK.findall("\n".join(_prose_lines(page.read_text(encoding="utf-8")))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to missing {target}"
        if anchor and file.suffix == ".md":
            headings = [
                line for line in file.read_text(encoding="utf-8").splitlines() if line.startswith("#")
            ]
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"
