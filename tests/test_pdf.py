"""The PDF edition as a reader gets it: _build/pdf/cnn-blocks-book.pdf, read back.

Runs on the output of `make pdf` (which `make test` runs after the book build), and on the
report tools/pdf.py wrote of the page it printed. Checks: a plausible page count; an outline
with every chapter of `_toc.yml` and every heading; contents whose page numbers are the
outline's; every chapter's title in the text and no matplotlib placeholder ("<Figure size")
or TeX source left; each chapter's figures drawn on its pages; no code line or output cut at the margin; the exercises' solutions
there; the HTML book's link to the PDF. Every page is rendered to PNG under
`_build/screenshots/pdf/` (poppler's pdftoppm), to be looked at.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pypdf
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PDF = ROOT / "_build" / "pdf" / "cnn-blocks-book.pdf"
REPORT = ROOT / "_build" / "pdf" / "report.json"
SCREENSHOTS = ROOT / "_build" / "screenshots" / "pdf"
INTRO = ROOT / "_build" / "html" / "book" / "intro.html"

TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
FILES = [TOC["root"]] + [chapter["file"] for part in TOC["parts"] for chapter in part["chapters"]]
NUMBERED = [chapter["file"] for part in TOC["parts"] if part.get("numbered")
            for chapter in part["chapters"]]


def normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    if not PDF.is_file() or not REPORT.is_file():
        pytest.fail(f"{PDF.relative_to(ROOT)} is missing: run `make pdf`")
    return json.loads(REPORT.read_text())


@pytest.fixture(scope="module")
def reader(report: dict[str, Any]) -> Any:
    return pypdf.PdfReader(PDF)


@pytest.fixture(scope="module")
def outline(reader: Any) -> list[tuple[str, int, int]]:
    """(title, page, depth) of every outline entry, in order."""
    entries: list[tuple[str, int, int]] = []

    def walk(items: list[Any], depth: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, depth + 1)
            else:
                entries.append((item.title, reader.get_destination_page_number(item), depth))

    walk(reader.outline, 0)
    return entries


def poppler(tool: str) -> str:
    """Path of one of poppler's tools: pypdf extracts the text of 250 pages ten times slower."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"poppler's {tool} is missing (Debian: apt-get install poppler-utils)")
    return path


@pytest.fixture(scope="module")
def pages_text(report: dict[str, Any]) -> list[str]:
    text = subprocess.run([poppler("pdftotext"), str(PDF), "-"], check=True, timeout=300,
                          capture_output=True, text=True).stdout
    return text.split("\f")[:-1]


def chapter_ranges(report: dict[str, Any], outline: list[tuple[str, int, int]],
                   pages: int) -> dict[str, range]:
    """The pages (0-based) of each chapter, from its title's outline entry to the next's."""
    starts = {title: page for title, page, depth in outline if depth == 0}
    firsts = [starts[normal(chapter["title"])] for chapter in report["chapters"]]
    return {chapter["doc"]: range(first, end) for chapter, first, end
            in zip(report["chapters"], firsts, [*firsts[1:], pages], strict=True)}


def test_every_chapter_printed(report: dict[str, Any], reader: Any) -> None:
    assert [chapter["doc"] for chapter in report["chapters"]] == FILES
    assert report["missing"] == []
    # Nine chapters of several thousand words each, with code and figures: well over 100 pages
    # at A4, and nowhere near 1,000 (a page per line would be a broken layout).
    assert 100 < len(reader.pages) < 1000


def test_outline_lists_every_chapter(report: dict[str, Any],
                                     outline: list[tuple[str, int, int]]) -> None:
    top = [title for title, _, depth in outline if depth == 0]
    assert top == ["Contents"] + [normal(chapter["title"]) for chapter in report["chapters"]]
    sections = [title for title, _, depth in outline if depth == 1]
    assert len(sections) > 5 * len(report["chapters"]), "the outline has the chapters' sections"
    titles = {chapter["doc"]: normal(chapter["title"]) for chapter in report["chapters"]}
    for number, doc in enumerate(NUMBERED, start=1):
        assert titles[doc].startswith(f"{number}. "), "numbered as in the HTML book"


def test_outline_is_every_heading(report: dict[str, Any],
                                  outline: list[tuple[str, int, int]]) -> None:
    """The outline is the page's headings, each at the page Chromium placed it on."""
    assert [(title, depth) for title, _, depth in outline] == [
        (heading["title"], heading["depth"]) for heading in report["headings"]]
    assert [page + 1 for _, page, _ in outline] == report["outline"]
    pages = [page for _, page, _ in outline]
    assert pages == sorted(pages), "headings in the order of their pages"


def test_contents_page_numbers(report: dict[str, Any],
                               outline: list[tuple[str, int, int]]) -> None:
    """Each contents line ends with the page that its heading's outline entry opens."""
    pages = {heading["destination"]: page + 1
             for heading, (_, page, _) in zip(report["headings"], outline, strict=True)}
    titles = {heading["destination"]: normal(heading["title"]) for heading in report["headings"]}
    first_chapter = outline[1][1]
    text = subprocess.run(
        [poppler("pdftotext"), "-layout", "-l", str(first_chapter), str(PDF), "-"],
        check=True, timeout=60, capture_output=True, text=True).stdout
    lines = [normal(line) for line in text.splitlines() if line.strip()]
    position = 0
    for entry in report["contents"]:
        title, page = titles[entry["destination"]], pages[entry["destination"]]
        found = [index for index in range(position, len(lines))
                 if lines[index].startswith(title[:20]) and lines[index].endswith(f" {page}")]
        assert found, f"contents: {title} ... {page}"
        position = found[0] + 1


def test_text(report: dict[str, Any], pages_text: list[str]) -> None:
    text = normal(" ".join(pages_text))
    for chapter in report["chapters"]:
        assert normal(chapter["title"]) in text
    assert "<Figure size" not in text
    assert "$$" not in text
    assert "\\begin" not in text
    assert report["raw_tex"] == []
    assert report["math_errors"] == 0
    assert report["equations"] > 100


def test_figures_drawn(report: dict[str, Any], pages_text: list[str],
                       outline: list[tuple[str, int, int]]) -> None:
    """Each chapter's figures: vector images, loaded when printed, numbered on its pages.

    Chromium draws an SVG image into the page's own content as vector paths, so the PDF has
    no image object to count; the page reports each figure's image as loaded and laid out.
    """
    ranges = chapter_ranges(report, outline, len(pages_text))
    for chapter in report["chapters"]:
        text = normal(" ".join(pages_text[index] for index in ranges[chapter["doc"]]))
        assert chapter["images"] == chapter["svg_images"], f"{chapter['doc']}: vector images"
        for figure in chapter["figures"]:
            assert figure["drawn"], f"{chapter['doc']}: {figure['number']} not drawn"
            assert normal(figure["number"]) in text, f"{figure['number']} on its chapter's pages"
    assert sum(len(chapter["figures"]) for chapter in report["chapters"]) >= len(NUMBERED)


def test_nothing_cut_at_the_margin(report: dict[str, Any]) -> None:
    assert report["cut"] == [], "wider than the printable width"
    assert report["wrapped_code"] == [], "a code line of at most 84 columns wraps"


def test_solutions_and_links(report: dict[str, Any]) -> None:
    assert report["solutions"] >= report["exercises"] > 0
    assert report["broken_links"] == []
    assert report["blocked"] == [] and report["errors"] == []


def test_html_links_the_pdf() -> None:
    page = INTRO.read_text()
    links = re.findall(r'href="([^"]*cnn-blocks-book\.pdf)"', page)
    assert links, "the introduction links the PDF"
    for link in links:
        assert (INTRO.parent / link).resolve() == (ROOT / "_build" / "html" / PDF.name)
    assert (ROOT / "_build" / "html" / PDF.name).read_bytes() == PDF.read_bytes()


def test_pages_rendered() -> None:
    pdftoppm = poppler("pdftoppm")
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    subprocess.run([pdftoppm, "-r", "40", "-png", str(PDF), str(SCREENSHOTS / "page")],
                   check=True, timeout=600)
    assert len(list(SCREENSHOTS.glob("page-*.png"))) == len(pypdf.PdfReader(PDF).pages)
