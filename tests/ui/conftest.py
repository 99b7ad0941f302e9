"""The dashboard's tests drive headless Chromium (Debian's `chromium`, which
`.ci/run` installs) through Playwright against a real `tether serve`: one
browser and one service per module, a fresh browser context per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Receiver, _serve_receiver
from tests.ui.parts import CHROMIUM, answer


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, for the whole module (a launch costs about a second)."""
    if CHROMIUM is None:
        pytest.skip("no `chromium` on PATH: install Debian's package (`apt-get install chromium`)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    """A fresh browser profile (no cookies) for one test."""
    made = browser.new_context(viewport={"width": 1280, "height": 800})
    made.set_default_timeout(10_000)
    yield made
    made.close()


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    """A webhook receiver for the module: answers 202, or 400 under `FAIL`."""
    receiver = Receiver(respond=answer)
    server = _serve_receiver(receiver)
    yield receiver
    server.shutdown()
    server.server_close()
