"""Bad pages fail the build: each kind of mistake, built with the book's configuration.

Two small books are built with the book's own `_config.yml`, bibliography and Sphinx extension
(`tools/book_checks.py`), and the flags of `make book`: one whose pages are all correct, which
must build, and one with a page for each mistake a chapter can make, which must fail and name
every mistake. The good book shows that the failures come from the mistakes, not from the set-up.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JUPYTER_BOOK = Path(sys.executable).parent / "jupyter-book"
FLAGS = ["--warningiserror", "--nitpick", "--keep-going", "--builder", "html"]

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
       '<rect width="40" height="20" fill="white"/></svg>')
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4"
                       "AAAAAElFTkSuQmCC")  # one white pixel

BIBLIOGRAPHY = """# Bibliography

```{bibliography}
```
"""

GOOD = {
    "index": """# A correct page

A figure, an equation, a citation {cite}`he2016resnet` and an exercise, each referenced:
{numref}`fig-good`, {eq}`eq-good` and {ref}`sec-good`.

```{figure} picture.svg
---
name: fig-good
alt: A white rectangle. It stands for any diagram.
---
A white rectangle, drawn for this test.
```

$$
y = x
$$ (eq-good)

(sec-good)=
## Exercises

```{exercise}
:label: ex-good

Why?
```

```{solution} ex-good
:class: dropdown

Because.
```
""",
    "bibliography": BIBLIOGRAPHY,
}

BAD = {
    "index": """# Pages with mistakes

See {ref}`page-links`.
""",
    "links": """(page-links)=
# Broken internal links

A [missing page](missing.md), a [missing anchor](#no-such-anchor) and {ref}`no-such-label`.
The other pages: [figures](figures.md), [citations](citations.md), [labels](labels.md).
""",
    "figures": """# Figures

{numref}`fig-missing-file`, {numref}`fig-no-alt`, {numref}`fig-cut-alt`, {numref}`fig-raster`.

```{figure} missing.svg
---
name: fig-missing-file
alt: A figure whose file does not exist.
---
A missing figure.
```

```{figure} picture.svg
:name: fig-no-alt

A figure without alt text.
```

```{figure} picture.svg
:name: fig-cut-alt
:alt: A rectangle drawn (cut
  short) by a wrongly continued option.

A caption.
```

```{figure} picture.svg
---
name: fig-unreferenced
alt: A figure nobody refers to.
---
A figure that the prose never mentions.
```

```{figure} picture.svg
---
name: fig-only-ref
alt: A figure referred to without its number.
---
A figure referenced with ref, not numref.
```

See {ref}`fig-only-ref`.

```{figure} picture.png
---
name: fig-raster
alt: A raster image.
---
A figure that is not vector graphics.
```

![An image outside a figure.](picture.svg)
""",
    "citations": """# Citations

An unknown paper {cite}`nosuchkey2020`.
""",
    "labels": """# Labels

(sec-lonely)=
## A section nobody links to

$$
x = 1
$$ (eq-lonely)

```{exercise}
:label: ex-lonely

An exercise without a solution, never referenced.
```
""",
    "bibliography": BIBLIOGRAPHY,
}

EXPECTED_ERRORS = [
    r"links\.md:\d+: WARNING: 'myst' cross-reference target not found: 'missing\.md'",
    r"links\.md:\d+: WARNING: 'myst' cross-reference target not found: 'no-such-anchor'",
    r"links\.md:\d+: WARNING: undefined label: 'no-such-label'",
    r"figures\.md:\d+: WARNING: image file not readable: missing\.svg",
    r"figures\.md:\d+: WARNING: figure 'fig-no-alt' has no alt text",
    r"figures\.md:\d+: WARNING: alt text of figure 'fig-cut-alt' does not end a sentence",
    r"figures\.md:\d+: WARNING: caption of figure 'fig-cut-alt' starts in the middle",
    r"figures\.md:\d+: WARNING: figure 'fig-unreferenced' is never referenced with \{numref\}",
    r"figures\.md:\d+: WARNING: figure 'fig-only-ref' is never referenced with \{numref\}",
    r"figures\.md:\d+: WARNING: image 'picture\.svg' is not inside a figure",
    r"figures\.md:\d+: WARNING: figure 'fig-raster' is not SVG \(picture\.png\)",
    r"citations\.md:\d+: WARNING: could not find bibtex key \"nosuchkey2020\"",
    r"labels\.md:\d+: WARNING: label 'sec-lonely' is defined but never referenced",
    r"labels\.md:\d+: WARNING: label 'eq-lonely' is defined but never referenced",
    r"labels\.md:\d+: WARNING: label 'ex-lonely' is defined but never referenced",
]


def build(folder: Path, pages: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Build a book of `pages` with the book's configuration, as `make book` does."""
    (folder / "book").mkdir(parents=True)
    (folder / "tools").mkdir()
    shutil.copy(ROOT / "_config.yml", folder)
    shutil.copy(ROOT / "book" / "references.bib", folder / "book")
    shutil.copy(ROOT / "tools" / "book_checks.py", folder / "tools")
    shutil.copytree(ROOT / "book" / "_static", folder / "book" / "_static")
    (folder / "picture.svg").write_text(SVG)
    (folder / "picture.png").write_bytes(PNG)
    for name, text in pages.items():
        (folder / f"{name}.md").write_text(text)
    chapters = "".join(f"  - file: {name}\n" for name in pages if name != "index")
    (folder / "_toc.yml").write_text("format: jb-book\nroot: index\n"
                                     + (f"chapters:\n{chapters}" if chapters else ""))
    return subprocess.run([str(JUPYTER_BOOK), "build", str(folder), *FLAGS],
                          capture_output=True, text=True, timeout=300)


def test_make_book_uses_these_flags() -> None:
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    assert f"jupyter-book build . {' '.join(FLAGS)} " in makefile


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    return build(tmp_path_factory.mktemp("bad"), BAD)


def test_correct_pages_build(tmp_path: Path) -> None:
    result = build(tmp_path, GOOD)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WARNING" not in result.stdout + result.stderr


def test_bad_pages_fail_the_build(bad_build: subprocess.CompletedProcess[str]) -> None:
    assert bad_build.returncode != 0


@pytest.mark.parametrize("error", EXPECTED_ERRORS)
def test_each_mistake_is_reported(bad_build: subprocess.CompletedProcess[str], error: str) -> None:
    log = re.sub(r"\x1b\[[0-9;]*m", "", bad_build.stdout + bad_build.stderr)
    assert re.search(error, log), f"no error matching {error!r} in:\n{log[-4000:]}"
