"""`./dev screenshots`: the README's pictures of the dashboard. Starts a
`tether serve` on a temporary store with a few demo jobs (ended every way,
one still running with progress, one run twice) and saves docs/ui-jobs.png
and docs/ui-job.png, taken by headless Chromium. Not a test: the suite never
runs it, so CI never changes the tree."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
from playwright.sync_api import sync_playwright

from tests.conftest import Receiver, _serve_receiver, wait_until
from tests.process import wait_for
from tests.ui.parts import FAIL, answer, serve, settle, start_job

DOCS = Path(__file__).resolve().parents[2] / "docs"


def heartbeat(callback_url: str, progress: object) -> None:
    parts = urlsplit(callback_url)
    url = urlunsplit(parts._replace(path=parts.path + "/heartbeat"))
    httpx.post(url, json={"progress": progress}, timeout=5, trust_env=False).raise_for_status()


def demo_jobs(client: httpx.Client, hooks: Receiver) -> str:
    """Jobs in every state; the id of the one whose page is shown."""
    for day in ("2026-11-28", "2026-11-29"):
        url = start_job(client, hooks, f"nightly-sales-{day}", metadata={"team": "data"})
        settle(url, status="succeeded", result={"rows": 41_872, "table": "sales"})
    start_job(client, hooks, "invoice-export-eu", path=FAIL)
    url = start_job(client, hooks, "partner-sync-acme")
    settle(url, status="failed", error={"message": "partner API answered 503 three times"})
    client.post("/jobs/partner-sync-acme/retry", json={"attempt": 2}).raise_for_status()
    wait_until(lambda: len(hooks.on("/hook/partner-sync-acme")) == 2)
    wait_for(client, "partner-sync-acme", "running")
    url = hooks.on("/hook/partner-sync-acme")[-1].body["callback_url"]
    settle(url, status="succeeded", result={"records": 1204})
    start_job(client, hooks, "reindex-search")
    client.post("/jobs/reindex-search/cancel", json={"reason": "superseded"}).raise_for_status()
    url = start_job(client, hooks, "nightly-sales-2026-11-30", metadata={"team": "data"})
    heartbeat(url, {"step": "load", "done": 0.6})
    start_job(client, hooks, "ml-train-churn", timeout=86_400)
    return "partner-sync-acme"


def main() -> int:
    chromium = shutil.which("chromium")
    if chromium is None:
        print("no `chromium` on PATH: install Debian's package first", file=sys.stderr)
        return 2
    hooks = Receiver(respond=answer)
    server = _serve_receiver(hooks)
    with tempfile.TemporaryDirectory() as tmp:
        service = serve(Path(tmp))
        try:
            with service.client() as client:
                shown = demo_jobs(client, hooks)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(f"{service.url}/ui")
                page.locator("#live.live:not(.off)").wait_for()
                page.screenshot(path=DOCS / "ui-jobs.png", full_page=True)
                page.goto(f"{service.url}/ui/jobs/{shown}")
                page.locator("#events li").last.wait_for()
                page.screenshot(path=DOCS / "ui-job.png", full_page=True)
                browser.close()
        finally:
            service.kill()
            server.shutdown()
    print(f"saved {DOCS / 'ui-jobs.png'} and {DOCS / 'ui-job.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
