"""The PDF edition: `make pdf` writes _build/pdf/cnn-blocks-book.pdf.

The route: Sphinx builds the book once more as a single HTML page (the `singlehtml` builder,
with the book's own configuration) from the chapters the last `make book` executed, which the
execution cache (_build/.jupyter_cache) holds; a chapter missing from the cache stops the
build instead of being executed again. The headless Chromium that the page tests use opens the
page from a loopback server with the network cut off, waits until MathJax has typeset every
equation, lays the page out for print (book/_static/pdf.css, and a script that adds the title
page and the contents, opens the exercises' solutions and moves them to the end of their
chapter) and prints it once. Chromium marks the place of every heading (a named destination);
from those, pypdf adds the outline (bookmarks) and writes each contents entry's page number into
the space the entry keeps for it, without reading the pages' content.

The PDF is also copied into _build/html, where the introduction's download link finds it. A
report of what the page held before printing (_build/pdf/report.json: chapters, their figures,
anything wider than the page) is what tests/test_pdf.py checks besides the PDF itself.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import logging
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build"
CACHE = BUILD / ".jupyter_cache"
OUT = BUILD / "pdf"
SINGLE = OUT / "singlehtml"
PDF = OUT / "cnn-blocks-book.pdf"
REPORT = OUT / "report.json"
EXECUTIONS = OUT / "executions.txt"
HTML_COPY = BUILD / "html" / PDF.name
CSS = ROOT / "book" / "_static" / "pdf.css"
PREPARE = Path(__file__).with_name("pdf_prepare.js")
# A4 with the margins of book/_static/pdf.css: the width the page is measured at before it is
# printed, in CSS pixels (96 per inch), so that what overflows there overflows on paper.
PAGE_WIDTH_MM = 210
MARGIN_MM = 18
MM = 96 / 25.4
TIMEOUT_MS = 180_000
SUBTITLE = "Modern convolutional networks built block by block in PyTorch"

sys.path.insert(0, str(ROOT / "tests"))
from chromium import FLAGS, find_chromium  # noqa: E402


class NotExecuted(RuntimeError):
    """A chapter is not in the execution cache of the last `make book`."""


def refuse_execution(notebook: Any, *args: Any, **kwargs: Any) -> None:
    """Stand in for MyST-NB's executor: the PDF prints what `make book` executed."""
    raise NotExecuted(
        "a chapter is not in the execution cache of the last `make book` (it changed since, or "
        "the book build failed on it): run `make book` first")


def build_single_html() -> None:
    """Build the book as one HTML page into _build/pdf/singlehtml, from the executed cache."""
    from jupyter_book.config import get_final_config
    from jupyter_book.sphinx import build_sphinx
    from jupyter_cache import get_cache
    from myst_nb.core.execute import cache

    if not CACHE.is_dir():
        sys.exit(f"{CACHE.relative_to(ROOT)} is missing: run `make book` first")
    # Sphinx re-reads a chapter whose source changed, not one that `make book` executed again
    # (after a change to cnnbook, say): when the cache's executions differ from those this
    # build read, every chapter is read again, so that no output is older than the HTML book's.
    executions = "\n".join(sorted(f"{record.uri} {record.hashkey} {record.created}"
                                  for record in get_cache(CACHE).list_cache_records()))
    if not EXECUTIONS.is_file() or EXECUTIONS.read_text() != executions:
        shutil.rmtree(OUT / ".doctrees", ignore_errors=True)
    # MyST-NB executes a chapter that the cache does not hold: refuse, so that the PDF shows
    # the outputs of the build the HTML book comes from, and never runs a chapter twice.
    cache.single_nb_execution = refuse_execution
    # What `jupyter-book build` sets, the cache of `make book` (MyST-NB would look beside this
    # build's own folder), and this module as an extension (setup below).
    overrides: dict[str, Any] = {"external_toc_path": "_toc.yml", "latex_individualpages": False,
                                 "nb_execution_cache_path": str(CACHE)}
    config, _ = get_final_config(user_yaml=ROOT / "_config.yml", cli_config=dict(overrides),
                                 sourcedir=ROOT)
    overrides["extensions"] = [*config["extensions"], Path(__file__).stem]
    # Its own doctrees: the HTML build's saved environment stays as that build left it.
    status = build_sphinx(
        ROOT, SINGLE, doctreedir=OUT / ".doctrees", path_config=str(ROOT / "_config.yml"),
        noconfig=True, confoverrides=overrides, builder="singlehtml", quiet=True,
        keep_going=True)
    if status != 0:
        sys.exit(f"the single-page build failed ({status})")
    EXECUTIONS.write_text(executions)
    # The builder writes the page at the root document's path (book/intro.html) but links its
    # assets as if it were at the top: it is read from there.
    root = yaml.safe_load((ROOT / "_toc.yml").read_text())["root"]
    shutil.copyfile(SINGLE / f"{root}.html", SINGLE / "index.html")


def book_parts() -> dict[str, Any]:
    """The title page's lines and the book's parts with their documents, from the config."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = [{"caption": None, "chapters": [{"doc": toc["root"]}]}]
    for part in toc["parts"]:
        parts.append({"caption": part.get("caption"),
                      "chapters": [{"doc": chapter["file"]} for chapter in part["chapters"]]})
    return {"title": config["title"], "subtitle": SUBTITLE, "date": time.strftime("%B %Y"),
            "parts": parts}


def setup(app: Any) -> dict[str, bool]:
    """Sphinx extension for the single-page build (added by build_single_html only)."""
    app.connect("builder-inited", share_html_handlers)
    return {"parallel_read_safe": True}


def share_html_handlers(app: Any) -> None:
    """Give the singlehtml builder the HTML handlers of every extension's nodes.

    Sphinx looks a node's handlers up by builder name and falls back on the format (html)
    only when no extension registered any for the name; sphinx-exercise registers its
    nodes for singlehtml, and the nodes of the other extensions become unknown there.
    """
    handlers = app.registry.translation_handlers
    for node, pair in handlers.get("html", {}).items():
        handlers.setdefault("singlehtml", {}).setdefault(node, pair)


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve a folder on a loopback port, as a web server would; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def print_book(base: str) -> tuple[bytes, dict[str, Any]]:
    """Open the single page, lay it out for print and print it; the PDF and the page's report."""
    from playwright.sync_api import sync_playwright

    width = round((PAGE_WIDTH_MM - 2 * MARGIN_MM) * MM)
    blocked: list[str] = []
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=FLAGS)
        context = browser.new_context(
            viewport={"width": width, "height": 1000}, color_scheme="light")

        def route(request_route: Any) -> None:
            if request_route.request.url.startswith(base):
                request_route.continue_()
            else:
                blocked.append(request_route.request.url)
                request_route.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.emulate_media(media="print")
        page.goto(base + "index.html", wait_until="load")
        page.wait_for_function("() => window.MathJax?.startup?.promise")
        page.evaluate("() => MathJax.startup.promise")
        lap("typeset")
        page.add_style_tag(content=CSS.read_text())
        report = page.evaluate(PREPARE.read_text(), book_parts())
        lap("layout")
        # Untagged: Chromium's tagged PDF adds a structure element for every laid-out box
        # (MathJax draws an equation with dozens), 13 of the 18 MB and much of the time, and
        # its own outline repeats a title that a page break splits.
        printed = page.pdf(prefer_css_page_size=True, print_background=True, tagged=False,
                           outline=False)
        lap("print")
        browser.close()
    report["blocked"] = blocked
    report["errors"] = errors
    report["seconds"] = seconds
    return printed, report


# The contents' page numbers: Helvetica, one of the fonts every PDF reader has (its digits are
# all 0.556 em wide), at the size of the contents' lines (pdf.css), bold for a chapter.
NUMBER_FONTS = {0: ("/PdfNumberBold", "/Helvetica-Bold", 10.0),
                1: ("/PdfNumber", "/Helvetica", 9.0)}
DIGIT_EM = 0.556
LINE_HEIGHT = 1.45


def write_pdf(printed: bytes, report: dict[str, Any]) -> None:
    """Write the PDF with its outline, the contents' page numbers and the book's metadata.

    Every heading has a named destination (its page and height) and every contents entry a
    link box for its number. report["outline"] gets each heading's page, for the test to
    compare with the outline it reads back.
    """
    from pypdf import PdfReader, PdfWriter
    from pypdf.generic import ArrayObject, DecodedStreamObject, DictionaryObject, Fit, NameObject

    # Skia's cross-reference table counts fewer objects than it holds, which pypdf reads
    # correctly but reports on every run.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    reader = PdfReader(io.BytesIO(printed))
    places = {name.lstrip("/"): (reader.get_destination_page_number(dest), dest.top)
              for name, dest in reader.named_destinations.items()}
    writer = PdfWriter(clone_from=reader)
    missing = [h["destination"] for h in report["headings"] if h["destination"] not in places]
    if missing:
        sys.exit(f"headings without a place in the PDF: {missing}")
    parents: dict[int, Any] = {}
    for heading in report["headings"]:
        index, top = places[heading["destination"]]
        parents = {depth: item for depth, item in parents.items() if depth < heading["depth"]}
        parents[heading["depth"]] = writer.add_outline_item(
            title=heading["title"], page_number=index, parent=parents.get(heading["depth"] - 1),
            fit=Fit.xyz(top=top), is_open=False)
    writer.page_mode = "/UseOutlines"

    # The number boxes: on the pages before the first chapter, the link boxes of each entry's
    # destination; the number's is the last (rightmost) of them.
    first_chapter = places[report["headings"][1]["destination"]][0]
    boxes: dict[str, tuple[int, list[float]]] = {}
    for index in range(first_chapter):
        for annotation in reader.pages[index].get("/Annots") or []:
            annotation = annotation.get_object()
            name = str(annotation.get("/Dest", "")).lstrip("/")
            rect = [float(value) for value in annotation["/Rect"]]
            if name and (name not in boxes or rect[2] >= boxes[name][1][2]):
                boxes[name] = (index, rect)
    stamps: dict[int, list[str]] = {}
    for entry in report["contents"]:
        index, (_, bottom, right, top) = boxes[entry["destination"]]
        font, _, size = NUMBER_FONTS[entry["depth"]]
        number = str(places[entry["destination"]][0] + 1)
        # Right-aligned in the box, on the line's baseline: the line box is 1.45 em high and
        # the baseline sits 0.38 em above its foot (Liberation Sans, the text's font).
        x = right - len(number) * DIGIT_EM * size
        y = bottom + (top - bottom - LINE_HEIGHT * size) / 2 + 0.38 * size
        stamps.setdefault(index, []).append(
            f"BT {font} {size:g} Tf {x:.2f} {y:.2f} Td ({number}) Tj ET")
    fonts = {font: writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject(base),
        NameObject("/Encoding"): NameObject("/WinAnsiEncoding")}))
        for font, base, _ in NUMBER_FONTS.values()}
    for index, lines in stamps.items():
        page = writer.pages[index]
        resources = page["/Resources"].get_object()
        page_fonts = resources.setdefault(NameObject("/Font"), DictionaryObject()).get_object()
        for name, font in fonts.items():
            page_fonts[NameObject(name)] = font
        # The page's own drawing runs in a saved graphics state, so the numbers are drawn in
        # the page's default coordinates (points from its lower left corner).
        streams = []
        for data in ("q", "Q\n0 g\n" + "\n".join(lines)):
            stream = DecodedStreamObject()
            stream.set_data(data.encode())
            streams.append(writer._add_object(stream))
        contents = page.raw_get("/Contents")
        contents = list(contents.get_object()) if isinstance(
            contents.get_object(), ArrayObject) else [contents]
        page[NameObject("/Contents")] = ArrayObject([streams[0], *contents, streams[1]])
    report["outline"] = [places[h["destination"]][0] + 1 for h in report["headings"]]

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    writer.add_metadata({"/Title": config["title"], "/Author": config["author"],
                         "/Subject": SUBTITLE})
    with PDF.open("wb") as file:
        writer.write(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print-only", action="store_true",
                        help="print the existing single page again, without building it")
    args = parser.parse_args()
    started = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.print_only:
        build_single_html()
    built = round(time.perf_counter() - started, 1)
    with serve(SINGLE) as base:
        printed, report = print_book(base)
    clock = time.perf_counter()
    write_pdf(printed, report)
    report["seconds"]["outline"] = round(time.perf_counter() - clock, 1)
    report["seconds"] = {"build": built, **report["seconds"]}
    REPORT.write_text(json.dumps(report, indent=1))
    if (BUILD / "html").is_dir():
        shutil.copyfile(PDF, HTML_COPY)
    print(f"{PDF.relative_to(ROOT)}: {report['seconds']} s")
    if report["blocked"] or report["errors"]:
        sys.exit(f"the page needed the network or failed: {report['blocked'] + report['errors']}")


if __name__ == "__main__":
    main()
