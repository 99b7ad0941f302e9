"""The dashboard when things go wrong around it, each test on a service of
its own: a stream the service refused, a session that ended while its pages
were open, pages open and a button clicked while the service is down, a job
id as long as ids go on a phone."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from tests.conftest import Receiver
from tests.process import TetherProcess
from tests.ui.parts import FAIL, serve, sign_in, start_job, unique

ONE_STREAM = "import api.controllers\n\napi.controllers.LIST_STREAMS_MAX = 1\n"
"""A preamble for a service that keeps one job-list stream open at most."""


class OneStream(TetherProcess):
    preamble = ONE_STREAM


def begun(stream: Any) -> Iterator[str]:
    """Read a job-list stream until it names its page: it counts as open from
    its first message on, not from its answer's status. The lines' iterator
    is returned to be held: one dropped closes the connection."""
    assert stream.status_code == 200
    lines = stream.iter_lines()
    for line in lines:
        if line == "event: page":
            return lines
    raise AssertionError("the stream ended before it named its page")


def test_the_list_opens_its_stream_again_after_the_service_refused_it(
    tmp_path: Path, context: Any, hooks: Receiver
):
    """A 503 `too_many_streams` is an HTTP error, after which a browser's
    EventSource never reconnects: the page opens the stream again itself,
    once it looked whether the session ended (`GET /jobs?limit=1`). A
    service that stopped answering left that look waiting for good, and the
    page saying "live" (a QA pass): it says "reconnecting…" at once now, and
    gives the look up after 10 s (never answered here)."""
    service = OneStream(tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}).start()
    try:
        page = context.new_page()
        looks: list[Any] = []
        page.route(re.compile(r"/jobs\?limit=1$"), lambda route: looks.append(route))
        with service.client() as client:
            held = {"accept": "text/event-stream"}
            with client.stream("GET", "/jobs", headers=held) as stream:  # the one stream
                held_open = begun(stream)  # noqa: F841
                page.goto(f"{service.url}/ui")
                expect(page.locator("#live")).to_have_text("reconnecting…")
                assert looks, "the page did not look at its session"
            job_id = unique("after-503")
            start_job(client, hooks, job_id)
            expect(page.locator(f'tr[data-id="{job_id}"]')).to_be_visible(timeout=20_000)
            expect(page.locator("#live")).to_have_text("live")
    finally:
        service.kill()


TOKEN = "ui-faults-api-token-0d5b7e21"


def test_pages_whose_session_ended_say_so_and_how_to_go_on(
    tmp_path: Path, context: Any, hooks: Receiver
):
    env = {"TETHER_API_TOKEN": TOKEN}
    service = serve(tmp_path, env)
    try:
        with service.client(headers={"authorization": f"Bearer {TOKEN}"}) as api:
            job_id = unique("session")
            start_job(api, hooks, job_id)
        listed, one = context.new_page(), context.new_page()
        one.on("dialog", lambda dialog: dialog.accept())
        listed.goto(f"{service.url}/ui")
        sign_in(listed, TOKEN)
        expect(listed.locator("#live")).to_have_text("live")
        one.goto(f"{service.url}/ui/jobs/{job_id}")
        expect(one.locator("#live")).to_have_text("live")

        service.terminate()  # back with another token: the session's is gone
        service = serve(tmp_path, {"TETHER_API_TOKEN": "another-token"}, port=service.port)
        for page in (listed, one):
            expect(page.locator("#live")).to_have_text("signed out: sign in again")
        expect(one.locator("#cancel")).to_be_disabled()
        # a click the page let by before it heard (enabled again by hand) says so
        one.evaluate("document.getElementById('cancel').disabled = false")
        one.locator("#cancel").click()
        expect(one.locator("#message")).to_have_text(
            "Cancel refused: the session has ended: sign in again"
        )
        listed.get_by_role("link", name="sign in again").click()
        expect(listed.get_by_role("heading", name="Sign in")).to_be_visible()
    finally:
        service.kill()


def test_pages_say_when_the_service_is_down(tmp_path: Path, context: Any, hooks: Receiver):
    """A running job's page says so through its stream; an ended job's page,
    which has none, through the look it takes every 5 s (it said nothing:
    found by a QA pass of the dashboard). A button clicked meanwhile says
    its request got no answer."""
    service = serve(tmp_path)
    try:
        with service.client() as client:
            job_id, ended_id = unique("down"), unique("down-ended")
            start_job(client, hooks, job_id)
            start_job(client, hooks, ended_id, path=FAIL)
        page, ended = context.new_page(), context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{service.url}/ui/jobs/{job_id}")
        ended.clock.install()  # its looks, brought forward
        ended.goto(f"{service.url}/ui/jobs/{ended_id}")
        expect(page.locator("#live")).to_have_text("live")
        expect(ended.locator("#live")).to_be_hidden()
        service.kill()
        expect(page.locator("#live")).to_have_text("reconnecting…")
        ended.clock.fast_forward(5000)
        expect(ended.locator("#live")).to_have_text("reconnecting…")
        page.locator("#cancel").click()
        expect(page.locator("#message")).to_have_text(
            "Cancel: no answer from the service. Reload to see whether the job changed."
        )
        expect(page.locator('[data-field="state"]')).to_have_text("running")

        service = serve(tmp_path, port=service.port)  # back: the ended page says no more
        ended.clock.fast_forward(5000)
        expect(ended.locator("#live")).to_be_hidden()
    finally:
        service.kill()


SAID = """window.said = [];
const live = document.getElementById("live");
new MutationObserver(() => said.push(live.textContent))
  .observe(live, {childList: true, characterData: true, subtree: true});"""
"""Script that keeps what a page's "live" says from now on, in `window.said`."""


class Chatty(TetherProcess):
    preamble = "import core.events\n\ncore.events.KEEP_ALIVE = 1.0\n"
    """A service whose quiet streams send their `ping` every second."""


def test_pages_of_a_service_that_stops_answering_say_so(
    tmp_path: Path, context: Any, hooks: Receiver
):
    """A service that keeps its connections but answers nothing (paused
    here with SIGSTOP; a hung process) left the list and a running job's
    page saying "live" for good: a stream's keep-alives were comments, which
    a page cannot see (an exploratory QA pass). They are `ping` events now:
    a page whose stream is quiet longer than 35 s, ping included, says
    "reconnecting…" and opens it again, which says "live" once the service
    answers; a page of a quiet service that answers says "live" all along."""
    service = Chatty(tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}).start()
    try:
        with service.client() as client:
            job_id = unique("paused")
            start_job(client, hooks, job_id)
        pages = [context.new_page(), context.new_page()]
        for page, path in zip(pages, ("/ui", f"/ui/jobs/{job_id}"), strict=True):
            page.clock.install()  # the page's looks at its stream, brought forward
            page.goto(service.url + path)
            expect(page.locator("#live")).to_have_text("live")
            page.evaluate(SAID)
        for _ in range(4):  # 40 s of a quiet service, its pings heard
            for page in pages:
                page.clock.fast_forward(10_000)
            pages[0].wait_for_timeout(1_500)  # a ping comes every second
        for page in pages:
            assert page.evaluate("window.said") == [], "a page of a quiet service reconnected"
        assert service.proc is not None
        os.kill(service.proc.pid, signal.SIGSTOP)
        try:
            for page in pages:
                page.clock.fast_forward(40_000)  # no ping heard for 40 s
                expect(page.locator("#live")).to_have_text("reconnecting…")
        finally:
            os.kill(service.proc.pid, signal.SIGCONT)
        for page in pages:
            page.clock.fast_forward(1_000)  # the stream opened again
            expect(page.locator("#live")).to_have_text("live", timeout=15_000)
    finally:
        service.kill()


def test_the_longest_job_id_fits_a_phone(tmp_path: Path, context: Any, hooks: Receiver):
    """An id as long as ids go (128 characters, no break in it), on the list,
    in its summary of the jobs waiting longest, and on the error page of a
    long path."""
    service = serve(tmp_path)
    try:
        job_id = unique("w" * 100)[:128]
        with service.client() as client:
            start_job(client, hooks, job_id)
        phone = context.new_page()
        phone.set_viewport_size({"width": 375, "height": 800})
        phone.goto(f"{service.url}/ui")
        expect(phone.locator(".longest li")).to_contain_text(job_id)
        for width in (375, 320):  # a job's cards ran 12 px past a 320 px screen (a QA pass)
            phone.set_viewport_size({"width": width, "height": 800})
            for path in ("/ui", f"/ui/jobs/{job_id}", "/ui/jobs/" + "y" * 300 + "/x"):
                phone.goto(service.url + path)
                expect(phone.locator("main")).to_be_visible()
                wide = phone.evaluate("document.documentElement.scrollWidth")
                assert wide <= width, f"{path[:40]}… is {wide}px wide on a {width}px screen"
    finally:
        service.kill()


def test_a_refused_stream_is_answered_503(tmp_path: Path):
    """What the first test's page met: the stream past the limit is refused."""
    service = OneStream(tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}).start()
    try:
        with service.client() as client, service.client() as other:
            held = {"accept": "text/event-stream"}
            with client.stream("GET", "/jobs", headers=held) as stream:
                held_open = begun(stream)  # noqa: F841
                refused = other.get("/jobs", headers=held)
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "too_many_streams"
    finally:
        service.kill()
