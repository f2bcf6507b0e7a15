"""The built book as readers meet it: every page opened in headless Chromium.

Runs on the output of the strict build (`make book`); `make test` runs it after the build, in
the same pytest run as the chapters. The pages are served from a loopback HTTP server, as a
web server serves them to a reader (the search page does not work from file:// URLs), and every
request that would leave the machine is blocked and reported: a page that needs the network to
render (MathJax from a CDN, a web font) fails here.

For every page: no console errors, no request outside the book, every image loaded, every
equation typeset with nothing of its TeX source left visible, every link within the book leads
somewhere, previous/next links in the order of `_toc.yml`. For every chapter: the executed
outputs, exercises with collapsed solutions, a download menu that gives the chapter's `.ipynb`
(with its outputs) and `.md`, and figures that stay readable in the dark theme. The search page
finds the book's terms. A full-page screenshot of every page is saved under
`_build/screenshots/light/`, and the first screen and every figure of each chapter in the dark
theme under `_build/screenshots/dark/`.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urljoin, urlsplit
from urllib.request import urlopen

import jupytext
import nbformat
import pytest
import yaml
from chromium import FLAGS, find_chromium
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
EXECUTED = ROOT / "_build" / "jupyter_execute"
SCREENSHOTS = ROOT / "_build" / "screenshots"
# The most common laptop width: code and outputs must fit the column without sideways scrolling.
VIEWPORT = {"width": 1280, "height": 900}
# Playwright's waits, generous enough for a busy two-core machine: a full-page screenshot of a
# long chapter (25,000 px and more) takes several seconds there while other tests run.
TIMEOUT_MS = 90_000

# Terms a reader searches for, each with a page that the search must list. Every term is in
# the book's text; add a chapter's key term when the chapter lands.
SEARCH_TERMS = {
    "bottleneck": "notebooks/basics.html",
    "receptive field": "notebooks/basics.html",
    "precise bn": "notebooks/batch_norm.html",
    "excitation": "notebooks/senet.html",
    "syncbatchnorm": "notebooks/scaling.html",
    "selective kernel": "notebooks/sknet.html",
    "split attention": "notebooks/resnest.html",
    "spatial attention": "notebooks/cbam.html",
    "notation": "book/notation.html",
    "choosing a block": "notebooks/comparison.html",
}


def toc_pages() -> list[str]:
    """The book's pages in reading order (root first), as paths of the built HTML files."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return [f"{Path(f).with_suffix('')}.html" for f in files]


def all_pages() -> list[str]:
    """Every HTML page of the build: the table of contents first, then search, index, others."""
    pages = toc_pages()
    built = sorted(path.relative_to(HTML).as_posix() for path in HTML.rglob("*.html")
                   if not path.relative_to(HTML).parts[0].startswith("_"))
    redirect = ["index.html"]  # the site root only redirects to the root page
    return pages + [page for page in built if page not in pages + redirect]


TOC = toc_pages()
PAGES = all_pages() if HTML.is_dir() else TOC
CHAPTERS = [page for page in TOC if page.startswith("notebooks/")]


def slug(page: str) -> str:
    return page.removesuffix(".html").replace("/", "--")


# Everything the checks need, read from the page in one pass once it has finished rendering.
COLLECT = """
() => {
  const article = document.querySelector('article') || document.body;
  const skip = 'pre, code, script, style, mjx-container, textarea, #search-results';
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest(skip)) continue;
    const match = node.textContent.match(/\\$\\$|\\\\\\(|\\\\\\)|\\\\\\[|\\\\\\]|\\\\begin\\{/);
    if (match) raw.push(node.textContent.trim().slice(0, 80));
  }
  const maths = [...document.querySelectorAll('span.math, div.math')];
  const overflow = [];
  for (const block of document.querySelectorAll('div.math')) {
    const math = block.querySelector('mjx-container > mjx-math');
    if (!math) continue;
    const box = block.getBoundingClientRect();
    const eqno = block.querySelector('.eqno');
    const right = eqno ? eqno.getBoundingClientRect().left : box.right;
    const rect = math.getBoundingClientRect();
    if (rect.right > right + 1 || rect.left < box.left - 1) {
      overflow.push((eqno ? eqno.firstChild.textContent.trim() + ' ' : '') + math.textContent.slice(0, 60));
    }
  }
  // Code cells, printed outputs and tables that need a sideways scroll in the column.
  const wide = [];
  for (const block of article.querySelectorAll('div.cell pre, div.cell table, div.highlight pre')) {
    if (block.scrollWidth > block.clientWidth + 1) {
      const longest = block.textContent.split('\\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      wide.push(`${block.scrollWidth} > ${block.clientWidth} px: ${longest.trim().slice(0, 90)}`);
    }
  }
  const link = selector => {
    const a = document.querySelector(selector);
    return a ? a.href : null;
  };
  return {
    title: document.title,
    theme: document.documentElement.dataset.theme,
    images: [...document.images].map(img => ({
      src: img.currentSrc || img.src,
      loaded: img.complete && img.naturalWidth > 0,
      alt: (img.getAttribute('alt') || '').trim(),
    })),
    math: {
      elements: maths.length,
      containers: document.querySelectorAll('mjx-container').length,
      untypeset: maths.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80)),
      errors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
      raw: raw,
      overflow: overflow,
    },
    outputs: document.querySelectorAll('div.cell_output').length,
    wide: wide,
    launch: [...document.querySelectorAll('.dropdown-launch-buttons a, a.btn-launch')]
      .map(a => a.href),
    unexpectedErrors: [...document.querySelectorAll('.cell_output .traceback')]
      .filter(e => !e.closest('.cell').classList.contains('tag_raises-exception'))
      .map(e => e.textContent.trim().split('\\n').pop()),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href)
      .filter(href => href.startsWith(location.origin)),
    prev: link('.prev-next-area a.left-prev'),
    next: link('.prev-next-area a.right-next'),
    exercises: [...document.querySelectorAll('div.exercise')].map(e => e.id),
    solutions: [...document.querySelectorAll('div.solution')].map(s => {
      const target = s.querySelector('.admonition-title a');
      return {
        id: s.id,
        exercise: target ? target.getAttribute('href').replace(/^#/, '') : null,
        dropdown: s.classList.contains('dropdown'),
      };
    }),
  };
}
"""

# Pixels around the border of every figure, drawn on a canvas at the image's natural size.
FIGURE_PIXELS = """
() => [...document.querySelectorAll('figure img')].map(img => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  // Two pixels in from the edge: a size in fractional points leaves the last pixel half covered.
  const l = 2, t = 2, r = canvas.width - 3, b = canvas.height - 3, x = r >> 1, y = b >> 1;
  const points = [[l, t], [r, t], [l, b], [r, b], [x, t], [x, b], [l, y], [r, y]];
  return {
    src: img.currentSrc || img.src,
    pixels: points.map(([px, py]) => Array.from(context.getImageData(px, py, 1, 1).data)),
  };
})
"""


@dataclass
class PageVisit:
    """What one page showed and did while a reader's browser loaded it."""

    page: str
    url: str
    console_errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    mathjax_ready: bool = True
    data: dict[str, Any] = field(default_factory=dict)


class Site:
    """The built book on a loopback server, and a Chromium that visits its pages once each."""

    def __init__(self) -> None:
        shutil.rmtree(SCREENSHOTS, ignore_errors=True)  # only this run's pages, none from before
        handler = functools.partial(QuietHandler, directory=str(HTML))
        self.server = Server(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        host, port = self.server.server_address[:2]
        self.base = f"http://{host}:{port}/"
        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(executable_path=find_chromium(), args=FLAGS)
        self.contexts = {scheme: self.browser.new_context(viewport=VIEWPORT, color_scheme=scheme)
                         for scheme in ("light", "dark")}
        for context in self.contexts.values():
            context.set_default_timeout(TIMEOUT_MS)
            context.set_default_navigation_timeout(TIMEOUT_MS)
        self.visits: dict[tuple[str, str], PageVisit] = {}

    def close(self) -> None:
        self.browser.close()
        self.playwright.stop()
        self.server.shutdown()
        self.server.server_close()

    def is_local(self, url: str) -> bool:
        return url.startswith(self.base) or urlsplit(url).scheme in ("data", "blob", "about")

    def open(self, page: str, scheme: str = "light", query: str = "") -> tuple[Any, PageVisit]:
        """Open a page in a new tab, recording console errors and every request it makes."""
        tab = self.contexts[scheme].new_page()
        visit = PageVisit(page, urljoin(self.base, page) + query)

        def route(route: Any) -> None:
            if self.is_local(route.request.url):
                route.continue_()
            else:
                visit.outside_requests.append(route.request.url)
                route.abort("blockedbyclient")

        tab.route("**/*", route)
        tab.on("console", lambda message: message.type == "error"
               and visit.console_errors.append(f"{message.text} ({message.location.get('url')})"))
        tab.on("pageerror", lambda error: visit.console_errors.append(f"uncaught: {error}"))
        tab.on("requestfailed", lambda request: self.is_local(request.url)
               and visit.failed_requests.append(f"{request.url}: {request.failure}"))
        tab.on("response", lambda response: response.status >= 400
               and visit.failed_requests.append(f"{response.url}: HTTP {response.status}"))
        tab.goto(visit.url, wait_until="load")
        try:  # MathJax is deferred; its startup promise resolves once the page is typeset
            tab.wait_for_function("() => !document.querySelector('.math') || "
                                  "(window.MathJax && MathJax.startup && MathJax.startup.promise)",
                                  timeout=TIMEOUT_MS)
            tab.evaluate("async () => { if (window.MathJax && MathJax.startup) "
                         "await MathJax.startup.promise; await document.fonts.ready; }")
        except PlaywrightError:  # reported by test_equations_rendered
            visit.mathjax_ready = False
        return tab, visit

    def visit(self, page: str, scheme: str = "light") -> PageVisit:
        """Load a page once, collect what it shows, save its screenshots, try its controls."""
        if (page, scheme) in self.visits:
            return self.visits[page, scheme]
        tab, visit = self.open(page, scheme)
        tab.set_default_timeout(TIMEOUT_MS)
        visit.data = tab.evaluate(COLLECT)
        path = SCREENSHOTS / scheme / f"{slug(page)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if scheme == "light":
            tab.screenshot(path=path, full_page=True)
            if page in CHAPTERS:  # after the screenshot: these open a solution and a menu
                visit.data["solutions_hidden"] = solutions_hidden(tab)
                visit.data["solution_opens"] = solution_opens(tab)
                visit.data["download_menu"] = download_menu(tab)
        else:  # the first screen of the dark theme, and each figure alone to look at closely
            tab.screenshot(path=path)
            visit.data["figures"] = tab.evaluate(FIGURE_PIXELS)
            figures = tab.locator("figure[id]")
            for index in range(figures.count()):
                name = figures.nth(index).get_attribute("id")
                figures.nth(index).screenshot(path=path.with_name(f"{slug(page)}--{name}.png"))
        tab.close()
        self.visits[page, scheme] = visit
        return visit


def solutions_hidden(tab: Any) -> list[bool]:
    """For each solution: is everything but its title hidden?"""
    hidden = []
    solutions = tab.locator("div.solution")
    for index in range(solutions.count()):
        body = solutions.nth(index).locator(":scope > :not(.admonition-title)")
        hidden.append(body.count() > 0
                      and not any(body.nth(i).is_visible() for i in range(body.count())))
    return hidden


def solution_opens(tab: Any) -> bool:
    """Does a click on the first solution's title show the solution?"""
    solution = tab.locator("div.solution").first
    try:
        solution.locator(".admonition-title").click()
        solution.locator(":scope > :not(.admonition-title)").first.wait_for(state="visible")
    except PlaywrightError:
        return False
    return True


def download_menu(tab: Any) -> list[str]:
    """The links that the download button's menu shows once clicked."""
    menu = tab.locator(".dropdown-download-buttons .dropdown-menu a")
    try:
        tab.locator(".dropdown-download-buttons button.dropdown-toggle").click()
        menu.first.wait_for(state="visible")
    except PlaywrightError:
        return []
    return [menu.nth(i).evaluate("a => a.href") for i in range(menu.count())
            if menu.nth(i).is_visible()]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A tab closed while a file was still on its way is not an error of the book."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    if not (HTML / "index.html").is_file():
        pytest.fail(f"no built book in {HTML}: run `make book` first")
    site = Site()
    yield site
    site.close()


@pytest.fixture(scope="module")
def visit(site: Site) -> Callable[..., PageVisit]:
    return site.visit


# Every page -----------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_no_console_errors(visit: Callable[..., PageVisit], page: str) -> None:
    seen = visit(page)
    assert seen.console_errors == []
    assert seen.failed_requests == []


@pytest.mark.parametrize("page", PAGES)
def test_works_offline(visit: Callable[..., PageVisit], page: str) -> None:
    """Nothing on the page is fetched from outside the book (links may point anywhere)."""
    assert visit(page).outside_requests == []


@pytest.mark.parametrize("page", PAGES)
def test_images_loaded(visit: Callable[..., PageVisit], page: str) -> None:
    images = visit(page).data["images"]
    assert [image["src"] for image in images if not image["loaded"]] == []
    assert [image["src"] for image in images if not image["alt"]] == []


@pytest.mark.parametrize("page", PAGES)
def test_equations_rendered(visit: Callable[..., PageVisit], page: str) -> None:
    seen = visit(page)
    math = seen.data["math"]
    assert seen.mathjax_ready, "MathJax did not load"
    assert math["containers"] >= math["elements"]
    assert math["untypeset"] == []
    assert math["errors"] == []
    assert math["raw"] == [], "TeX source left visible in the text"
    assert math["overflow"] == [], "display equations wider than the column"


@pytest.mark.parametrize("page", PAGES)
def test_internal_links_resolve(visit: Callable[..., PageVisit], page: str) -> None:
    """Every link within the book leads to a page of the build and to an anchor on it."""
    broken = []
    for url in sorted(set(visit(page).data["links"])):
        parts = urlsplit(url)
        target = HTML / unquote(parts.path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(url)
        elif parts.fragment and f'id="{unquote(parts.fragment)}"' not in target.read_text("utf-8"):
            broken.append(url)
    assert broken == []


@pytest.mark.parametrize("page", TOC)
def test_previous_and_next_follow_the_toc(visit: Callable[..., PageVisit], site: Site,
                                          page: str) -> None:
    index = TOC.index(page)
    data = visit(page).data
    expected_prev = urljoin(site.base, TOC[index - 1]) if index > 0 else None
    expected_next = urljoin(site.base, TOC[index + 1]) if index + 1 < len(TOC) else None
    assert (data["prev"], data["next"]) == (expected_prev, expected_next)


def test_site_root_opens_the_first_page(site: Site) -> None:
    tab, seen = site.open("index.html")
    tab.wait_for_url(urljoin(site.base, TOC[0]), timeout=TIMEOUT_MS)  # the root only redirects
    tab.close()
    assert seen.console_errors == [] and seen.outside_requests == []


# Every chapter --------------------------------------------------------------------------------

def executed_notebook(page: str) -> nbformat.NotebookNode:
    path = EXECUTED / Path(page).with_suffix(".ipynb")
    return nbformat.read(path, as_version=4)


def cells_with_outputs(notebook: nbformat.NotebookNode) -> int:
    hidden = {"remove-output", "remove-cell"}
    return sum(1 for cell in notebook.cells if cell.cell_type == "code" and cell.outputs
               and not hidden & set(cell.metadata.get("tags", [])))


@pytest.mark.parametrize("page", PAGES)
def test_code_fits_the_column(visit: Callable[..., PageVisit], page: str) -> None:
    """At 1280 px no code cell, printed output or output table scrolls sideways."""
    assert visit(page).data["wide"] == []


@pytest.mark.parametrize("page", CHAPTERS)
def test_no_launch_buttons(visit: Callable[..., PageVisit], page: str) -> None:
    """No button sends a reader to a service that cannot open the chapter: the paired .ipynb
    is generated, not committed, so Binder and Colab would find no notebook at its path."""
    assert visit(page).data["launch"] == []


@pytest.mark.parametrize("page", CHAPTERS)
def test_executed_outputs_present(visit: Callable[..., PageVisit], page: str) -> None:
    """Every code cell that printed or drew something shows it; errors only where expected."""
    data = visit(page).data
    assert data["outputs"] > 0
    assert data["outputs"] == cells_with_outputs(executed_notebook(page))
    assert data["unexpectedErrors"] == []


@pytest.mark.parametrize("page", CHAPTERS)
def test_exercises_with_hidden_solutions(visit: Callable[..., PageVisit], page: str) -> None:
    data = visit(page).data
    assert data["exercises"], "a chapter ends with exercises"
    solved = {solution["exercise"] for solution in data["solutions"]}
    assert set(data["exercises"]) <= solved, "every exercise has a solution"
    assert all(solution["dropdown"] for solution in data["solutions"])
    assert all(data["solutions_hidden"]), "a solution is shown before the reader asks for it"
    assert data["solution_opens"], "a click on a solution's title does not show it"


@pytest.mark.parametrize("page", CHAPTERS)
def test_download_menu_gives_ipynb_and_md(visit: Callable[..., PageVisit], page: str) -> None:
    data = visit(page).data
    links = {Path(urlsplit(href).path).suffix: href for href in data["download_menu"]}
    assert {".ipynb", ".md"} <= set(links), f"download menu offers {data['download_menu']}"
    with urlopen(links[".md"]) as response:
        markdown = response.read()
    with urlopen(links[".ipynb"]) as response:
        notebook = nbformat.reads(response.read().decode("utf-8"), as_version=4)

    source = ROOT / Path(page).with_suffix(".md")
    assert markdown == source.read_bytes(), "the .md is the chapter's source"
    nbformat.validate(notebook)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    source_code = [cell.source for cell in jupytext.read(source).cells if cell.cell_type == "code"]
    assert code == source_code, "the .ipynb holds the chapter's code cells"
    assert cells_with_outputs(notebook) == data["outputs"], "the .ipynb holds the outputs shown"


@pytest.mark.parametrize("page", CHAPTERS)
def test_figures_readable_in_dark_mode(visit: Callable[..., PageVisit], page: str) -> None:
    """Figures keep an opaque light background, so their dark text and lines stay visible."""
    seen = visit(page, "dark")
    assert seen.data["theme"] == "dark"
    assert seen.console_errors == [] and seen.outside_requests == []
    assert seen.data["figures"], "a chapter has at least one figure"
    for figure in seen.data["figures"]:
        for red, green, blue, alpha in figure["pixels"]:
            assert alpha == 255, f"transparent edge in {figure['src']}"
            assert min(red, green, blue) >= 200, f"dark edge in {figure['src']}"


# Search ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("term", SEARCH_TERMS)
def test_search_finds(site: Site, term: str) -> None:
    tab, seen = site.open("search.html", query="?" + urlencode({"q": term}))
    tab.wait_for_selector("#search-results p.search-summary", timeout=TIMEOUT_MS)
    found = tab.locator("#search-results ul.search li a").evaluate_all(
        "links => links.map(a => a.href)")
    path = SCREENSHOTS / "light" / f"search--{term.replace(' ', '-')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=path)
    tab.close()
    assert seen.console_errors == [] and seen.outside_requests == []
    pages = {urlsplit(url).path.lstrip("/") for url in found}
    assert SEARCH_TERMS[term] in pages, f"search for {term!r} found {sorted(pages)}"

