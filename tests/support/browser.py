"""Headless Chromium for the tests: Debian's `chromium` (installed by tests/run) driven by
Playwright through `executable_path`. Playwright's own browser downloads are never used.

Without Chromium or Playwright the browser tests skip; under CI (`CI` set) they fail instead,
since tests/run installs both there.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.async_api import Browser

CHROMIUM = os.environ.get("HEALTHAGENT_TEST_CHROMIUM", "/usr/bin/chromium")
# as root, offline, in a container: no sandbox, no GPU, nothing fetched in the background
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (tests/run installs it; under CI the browser tests must run)")
    pytest.skip(message)


def require_chromium() -> str:
    """Chromium's path, once Chromium and Playwright are both here (else skip, or fail in CI)."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("the playwright package is missing: pip install -e '.[test]'")
    return CHROMIUM


def chromium_version() -> str:
    """What `chromium --version` says, e.g. 'Chromium 156.0.8078.129 built on Debian ...'."""
    done = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Chromium; Playwright gives it a fresh user-data directory of its own."""
    executable = require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield browser
        finally:
            await browser.close()
