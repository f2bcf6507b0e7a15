"""The chapters as a reader opens them: in Jupyter from the clone, and as one downloaded notebook.

JupyterLab with Jupytext opens ``notebooks/NAME.md`` and its paired ``NAME.ipynb`` as one
notebook. Jupytext refuses both when the ``.ipynb`` is newer than the ``.md`` and the two
differ, which happens whenever the ``.md`` is not in the exact form Jupytext writes (the
``.ipynb`` is generated from it). So each ``.md`` must be in Jupytext's own form, and a
Jupyter server must open every chapter, both files, as a notebook with the ``.ipynb`` newer.

The other way to run a chapter, its ``.ipynb`` alone in an empty folder with only the
installed module, is what ``make test`` runs nbval on (``_build/standalone``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError
from urllib.request import Request, urlopen

import jupytext
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("*.md"))
VERSION_KEY = "jupytext.text_representation.jupytext_version"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_md_is_in_jupytext_form(chapter: Path) -> None:
    """Jupytext writes the chapter back unchanged, also through its .ipynb (which orders
    cell metadata keys its own way), else: `make format`."""
    text = chapter.read_text()
    # With its version in the header, each new Jupytext release would fail this test on every
    # chapter of a fresh clone; the header's filter leaves it out.
    header = jupytext.reads(text, fmt="md:myst").metadata["jupytext"]
    assert header.get("notebook_metadata_filter") == "-" + VERSION_KEY, (
        f"{chapter.name}: its header needs notebook_metadata_filter: -{VERSION_KEY}"
    )
    notebook = jupytext.reads(jupytext.writes(jupytext.reads(text, fmt="md:myst"), fmt="ipynb"),
                              fmt="ipynb")
    assert jupytext.writes(notebook, fmt="md:myst") == text, (
        f"{chapter.name} is not in the form Jupytext writes: run `make format`"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A Jupyter server with Jupytext on a copy of the clone's notebooks/ and jupytext.toml
    (which pairs each .md with an .ipynb), each .ipynb generated and newer than its .md."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copy(ROOT / "jupytext.toml", root)
    shutil.copytree(ROOT / "notebooks", root / "notebooks",
                    ignore=shutil.ignore_patterns("*.ipynb", "__pycache__", "*.egg-info"))
    for chapter in sorted((root / "notebooks").glob("*.md")):
        notebook = jupytext.read(chapter)
        jupytext.write(notebook, chapter.with_suffix(".ipynb"), fmt="ipynb")
        stamp = chapter.stat().st_mtime + 60  # the generated notebook is the newer file
        os.utime(chapter.with_suffix(".ipynb"), (stamp, stamp))
    port, token = free_port(), secrets.token_hex(16)
    home = tmp_path_factory.mktemp("home")
    log = home / "server.log"  # a file, not a pipe that could fill up and block the server
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
         "--ip=127.0.0.1", "--allow-root", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # a busy two-core machine starts it slowly
    try:
        while True:
            try:
                urlopen(Request(f"{base}/api/status", headers={"Authorization": f"token {token}"}),
                        timeout=5)
                break
            except (URLError, ConnectionError, TimeoutError) as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    message = f"jupyter server did not start: {log.read_text()}"
                    raise RuntimeError(message) from error
                time.sleep(0.5)
        yield base, token, root
    finally:
        process.terminate()
        process.wait(timeout=30)


def get_notebook(base: str, token: str, path: str) -> dict:
    request = Request(f"{base}/api/contents/{path}?type=notebook&content=1",
                      headers={"Authorization": f"token {token}"})
    with urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.mark.parametrize("suffix", [".md", ".ipynb"])
@pytest.mark.parametrize("chapter", [path.stem for path in CHAPTERS])
def test_jupyter_opens_chapter(server: tuple[str, str, Path], chapter: str, suffix: str) -> None:
    """The contents API gives the chapter as a notebook: Jupytext accepts the pair."""
    base, token, root = server
    model = get_notebook(base, token, f"notebooks/{chapter}{suffix}")
    assert model["type"] == "notebook"
    cells = model["content"]["cells"]
    expected = jupytext.read(root / "notebooks" / f"{chapter}.md").cells
    assert [cell["source"] for cell in cells] == [cell.source for cell in expected]
