"""Find the Chromium that the browser test drives, the same way for `make test` and pytest.

A Chromium installed on the system is used as it is (Debian's `chromium`, `chromium-browser`,
Google Chrome, or the path in the environment variable BOOK_CHROMIUM). Without one, `make test`
installs Playwright's own Chromium (`python -m playwright install chromium`), which Playwright
then finds by itself. Run as a script, it prints the path found and exits 1 when there is none.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MACOS_APPS = (
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
)

# Headless flags for a machine without a display or a network: no sandbox (CI runs as root),
# no GPU, and none of Chromium's own background connections (updates, sync, QUIC probes),
# which fail without a network and would otherwise crowd the logs with refused connections.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """Path of the system's Chromium or Chrome, or None to use Playwright's own."""
    if os.environ.get("BOOK_CHROMIUM"):
        return os.environ["BOOK_CHROMIUM"]
    for name in NAMES:
        if path := shutil.which(name):
            return path
    for path in MACOS_APPS:
        if Path(path).is_file():
            return path
    return None


if __name__ == "__main__":
    found = find_chromium()
    if found is None:
        sys.exit(1)
    print(found)
