"""Sphinx extension: the checks that make a bad page fail the book's strict build.

Sphinx already warns about a broken internal link, a missing image file and (through
sphinxcontrib-bibtex) an unknown citation; ``make book`` builds with ``-W -n``, so each of those
is an error. This extension adds the book's own rules, as warnings of type ``book``:

- every label of a section, figure, table, equation or exercise is referenced somewhere in the
  book (an exercise is referenced by its solution; solutions need no label);
- every figure has a label referenced with ``{numref}``, a caption, and alt text written as
  full sentences (a sentence cut short usually means a multi-line option was parsed wrongly),
  and is vector graphics (SVG: a plot drawn after ``use_book_style()``, or a diagram drawn by
  ``figures/make_figures.py``);
- every image stands inside a figure, so that it has a caption and a number.

It also fixes two things readers would otherwise meet:

- duplicated inline scripts: sphinx-thebe and sphinx-togglebutton add theirs after the HTML
  builder is set up, and Sphinx 7 then writes them twice into every page, where the second
  ``const THEBE_JS_URL`` is a JavaScript error in the reader's console;
- a downloaded ``.ipynb`` without outputs: when myst-nb 1.4 takes a chapter's outputs from its
  execution cache, it renders them on the page but writes the chapter's notebook (the one the
  download button offers) without them; the outputs are merged back in from the cache;
- no ``.ipynb`` in the download menu: sphinx-book-theme copies a MyST chapter's executed
  notebook next to its sources only when a launch button is configured, and the book has none
  (the chapters' notebooks are not committed, so Binder and Colab would find nothing); the
  copy is made here instead.

Listed in ``_config.yml`` under ``sphinx.local_extensions``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import nbformat
from docutils import nodes
from jupyter_cache import get_cache
from myst_nb.ext.glue import extract_glue_data_cell
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

logger = logging.getLogger(__name__)

SENTENCE_END = (".", "!", "?")


def _warn(message: str, location: Any, subtype: str) -> None:
    logger.warning(message, location=location, type="book", subtype=subtype)


def _is_solution(node: nodes.Node) -> bool:
    """sphinx-exercise's solution nodes carry the label of the exercise they solve."""
    return isinstance(node, nodes.Element) and "target_label" in node.attributes


def _check_figure(figure: nodes.figure, numref_targets: set[str]) -> None:
    label = next(iter(figure["names"]), None)
    if label is None:
        _warn("figure has no label (`:name:`): give it one and reference it with {numref}",
              figure, "figure")
    elif label not in numref_targets:
        _warn(f"figure {label!r} is never referenced with {{numref}} from the prose",
              figure, "figure")
    captions = list(figure.findall(nodes.caption))
    caption = captions[0].astext().strip() if captions else ""
    if not caption:
        _warn(f"figure {label!r} has no caption", figure, "figure")
    elif caption[0].islower():
        _warn(f"caption of figure {label!r} starts in the middle of a sentence: "
              f"{caption[:40]!r}...", figure, "figure")
    for image in figure.findall(nodes.image):
        if not image.get("uri", "").endswith(".svg"):
            _warn(f"figure {label!r} is not SVG ({image.get('uri')}): draw plots after "
                  "use_book_style() and diagrams with figures/make_figures.py", figure, "figure")
        alt = " ".join(image.get("alt", "").split())
        if not alt:
            _warn(f"figure {label!r} has no alt text", figure, "figure")
        elif not alt.endswith(SENTENCE_END):
            _warn(f"alt text of figure {label!r} does not end a sentence (cut short?): "
                  f"...{alt[-40:]!r}", figure, "figure")


def check_book(app: Sphinx, env: BuildEnvironment) -> None:
    """Check every page of the book, on every build (not only the pages just re-read)."""
    targets: set[str] = set()
    numref_targets: set[str] = set()
    solution_labels: set[str] = set()
    doctrees = {docname: env.get_doctree(docname) for docname in sorted(env.found_docs)}

    for doctree in doctrees.values():
        for xref in doctree.findall(pending_xref):
            target = xref.get("reftarget", "")
            targets.update({target, target.lower(), target.lstrip("#")})
            if xref.get("reftype") == "numref":
                numref_targets.add(target.lower())
        for node in doctree.findall(_is_solution):
            targets.add(node["target_label"])
            solution_labels.add(node.get("label", ""))

    for doctree in doctrees.values():
        for figure in doctree.findall(nodes.figure):
            _check_figure(figure, numref_targets)
        for image in doctree.findall(nodes.image):
            if not any(isinstance(ancestor, nodes.figure) for ancestor in _ancestors(image)):
                _warn(f"image {image.get('uri')!r} is not inside a figure: give it a caption, "
                      "a label and alt text", image, "figure")

    std_labels = env.get_domain("std").data["labels"]
    labels = [(name, docname, node_id) for name, (docname, node_id, _) in std_labels.items()
              if docname in doctrees and name not in solution_labels]
    labels += [(name, docname, f"equation-{name}")
               for name, (docname, _) in env.get_domain("math").data["objects"].items()
               if docname in doctrees]
    for name, docname, node_id in sorted(labels):
        if name in targets:
            continue
        node = doctrees[docname].ids.get(node_id)
        location = node if node is not None and node.source else docname
        _warn(f"label {name!r} is defined but never referenced: reference it from the prose "
              "({ref}, {numref} or {eq})", location, "unreferenced-label")


def _ancestors(node: nodes.Node) -> list[nodes.Node]:
    ancestors = []
    while node.parent is not None:
        node = node.parent
        ancestors.append(node)
    return ancestors


def drop_duplicate_scripts(app: Sphinx, pagename: str, templatename: str,
                           context: dict[str, Any], doctree: nodes.document | None) -> None:
    """Keep the first of identical ``<script>`` entries of a page."""
    seen: set[tuple[str, tuple[tuple[str, Any], ...]]] = set()
    unique = []
    for script in context.get("script_files", []):
        filename = str(getattr(script, "filename", script) or "")
        attributes = tuple(sorted(getattr(script, "attributes", {}).items()))
        if (filename, attributes) not in seen:
            seen.add((filename, attributes))
            unique.append(script)
    context["script_files"] = unique


def restore_cached_outputs(app: Sphinx, doctree: nodes.document) -> None:
    """Put the cached outputs into the chapter's notebook that myst-nb wrote without them."""
    config = getattr(app.env, "mystnb_config", None)
    if config is None or config.execution_mode != "cache":
        return
    path = Path(config.output_folder, f"{app.env.docname}.ipynb")
    if not path.is_file():
        return
    notebook = nbformat.read(path, as_version=4)
    if any(cell.get("outputs") for cell in notebook.cells):
        return  # executed in this build: myst-nb wrote the outputs itself
    try:
        _, notebook = get_cache(config.execution_cache_path).merge_match_into_notebook(notebook)
    except KeyError:
        return  # not in the cache: nothing was executed, so there is nothing to restore
    for cell in notebook.cells:
        if cell.cell_type == "code":
            extract_glue_data_cell(cell)  # drops glue(display=False) outputs, as myst-nb does
    nbformat.write(notebook, path)


def offer_ipynb_download(app: Sphinx, pagename: str, templatename: str,
                         context: dict[str, Any], doctree: Any) -> None:
    """Put a chapter's executed notebook in ``_sources`` and in the download menu."""
    if "kernelspec" not in app.env.metadata.get(pagename, {}):
        return
    executed = Path(app.outdir).parent / "jupyter_execute" / f"{pagename}.ipynb"
    if not executed.is_file():
        return
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(executed, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-read", restore_cached_outputs)
    app.connect("env-check-consistency", check_book)
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)
    # Before sphinx-book-theme builds its header buttons (priority 501).
    app.connect("html-page-context", offer_ipynb_download, priority=450)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
