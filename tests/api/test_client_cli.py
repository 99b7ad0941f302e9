"""The `tether` client verbs (`api/client.py`) against a real `tether serve`.

Each verb runs through click's `CliRunner` on the main `tether` group (in this
process) or as the real `tether` command (a process), over real HTTP.

The tests named `test_standin_…` (at the end) talk to `EventsStandIn`, a small
server in this file that speaks the events contract of DESIGN.md ("Operator
surface") and breaks it on purpose, as the real service cannot be made to: a
stream cut by a TCP reset after some events, every stream cut, and a service
from before `/jobs/{id}/events`. What the real `tether serve` streams is
tested against it (`tests/api/test_cli_output.py`, `tests/api/test_events.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from click.testing import CliRunner, Result

from api import client as client_module
from api.cli import cli as main_group
from api.client import client
from tests.api.test_events import answering
from tests.conftest import POLL, Hit, Receiver, wait_until
from tests.process import TetherProcess, wait_for

ROOT = Path(__file__).resolve().parents[2]
TETHER = shutil.which("tether", path=str(Path(sys.executable).parent)) or "tether"
ENTRY = "from api.client import main; main()"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherProcess]:
    """One real `tether serve` for the module; each test uses its own job ids."""
    proc = TetherProcess(tmp_path_factory.mktemp("serve"), {"TETHER_STORE": "memory://"}).start()
    yield proc
    proc.kill()


def cli(url: str, *args: str, token: str | None = None, stdin: str | None = None) -> Result:
    """The verbs in this process, as `tether ARGS` with TETHER_URL=url."""
    env = {"TETHER_URL": url, "TETHER_API_TOKEN": token}
    return CliRunner().invoke(main_group, list(args), stdin, env=env, catch_exceptions=False)


def tether(url: str, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    """The verbs as a real process: the `tether` command."""
    env = {k: v for k, v in os.environ.items() if k != "TETHER_API_TOKEN"}
    env |= {"TETHER_URL": url, **({"TETHER_API_TOKEN": token} if token else {})}
    return subprocess.run(
        [TETHER, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def served(service: TetherProcess, path: str) -> Any:
    """What the service itself answers to GET path."""
    with service.client() as http:
        return http.get(path).json()


def settled(service: TetherProcess, job_id: str, *states: str) -> dict[str, Any]:
    with service.client() as http:
        return wait_for(http, job_id, *states)


def webhook(receiver: Receiver) -> str:
    return json.dumps({"url": receiver.url()})


def callback_url(receiver: Receiver, job_id: str) -> str:
    wait_until(lambda: [h for h in receiver.hits if h.body["job_id"] == job_id])
    [hit] = [h for h in receiver.hits if h.body["job_id"] == job_id]
    return str(hit.body["callback_url"])


# ── submit, get, list ─────────────────────────────────────────────────────────


def test_submit_prints_the_job_and_its_json_is_the_services_payload(service, receiver, tmp_path):
    receiver.callback = {"status": "succeeded", "result": {"rows": 42}}
    params = tmp_path / "params.json"
    params.write_text(webhook(receiver))
    args = ["submit", "http_webhook", "--id", "cli-submit", "--params", f"@{params}"]
    args += ["--timeout", "60", "--metadata", "@-"]
    shown = cli(service.url, *args, stdin='{"team": "sales"}')
    assert shown.exit_code == 0, shown.stderr
    assert shown.stderr == ""
    assert "cli-submit" in shown.stdout
    assert "pending" in shown.stdout or "running" in shown.stdout
    job = settled(service, "cli-submit", "succeeded")
    assert job["params"] == {"url": receiver.url()}  # read from the file
    assert job["metadata"] == {"team": "sales"}
    assert job["timeout"] == 60
    again = cli(service.url, *args, "--json", stdin='{"team": "sales"}')  # reattached: 200
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout) == served(service, "/jobs/cli-submit") == job
    assert len(receiver.hits) == 1  # nothing triggered again
    assert again.stderr == (
        "tether: job cli-submit already existed with this request: nothing new was started\n"
    )


def test_get_shows_the_job_as_a_table_or_as_the_services_json(service, receiver):
    receiver.callback = {"status": "succeeded"}
    cli(service.url, "submit", "http_webhook", "--id", "cli-get", "--params", webhook(receiver))
    settled(service, "cli-get", "succeeded")
    table = cli(service.url, "get", "cli-get")
    assert table.exit_code == 0, table.stderr
    assert "cli-get" in table.stdout
    assert "succeeded" in table.stdout
    as_json = tether(service.url, "get", "cli-get", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == served(service, "/jobs/cli-get")


def test_list_follows_pages_up_to_the_limit(service, receiver, monkeypatch):
    receiver.respond = lambda hit: (400, {"refused": True})  # the job fails at once
    for n in range(5):
        args = ["--id", f"cli-list-{n}", "--params", webhook(receiver)]
        assert cli(service.url, "submit", "http_webhook", *args).exit_code == 0
        settled(service, f"cli-list-{n}", "failed")
    monkeypatch.setattr(client_module, "PAGE", 2)  # so that 5 jobs take 3 pages
    found = cli(service.url, "list", "--json", "--limit", "5", "--state", "failed")
    assert found.exit_code == 0, found.stderr
    expected = served(service, "/jobs?limit=5&state=failed")
    assert json.loads(found.stdout) == expected
    ids = [job["id"] for job in expected["items"]]
    assert ids == [f"cli-list-{n}" for n in (4, 3, 2, 1, 0)]
    fewer = json.loads(
        cli(service.url, "list", "--json", "--limit", "3", "--state", "failed").stdout
    )
    assert fewer == served(service, "/jobs?limit=3&state=failed")
    assert fewer["next_cursor"]  # more remain past the limit
    table = cli(
        service.url, "list", "--limit", "2", "--state", "failed", "--backend", "http_webhook"
    )
    assert table.exit_code == 0, table.stderr
    assert "cli-list-4" in table.stdout and "cli-list-3" in table.stdout
    assert "cli-list-2" not in table.stdout
    assert "failed" in table.stdout
    assert "(more: --cursor " in table.stdout  # how to go on
    # going on where it stopped, and a time window: as the API lists them
    went_on = cli(
        service.url, "list", "--json", "--state", "failed", "--cursor", fewer["next_cursor"]
    )
    assert went_on.exit_code == 0, went_on.stderr
    cursor = fewer["next_cursor"]
    assert json.loads(went_on.stdout) == served(service, f"/jobs?state=failed&cursor={cursor}")
    assert [job["id"] for job in json.loads(went_on.stdout)["items"]][:2] == ids[3:]
    after = expected["items"][2]["created_at"]  # cli-list-2's
    window = cli(service.url, "list", "--json", "--state", "failed", "--created-after", after)
    assert [job["id"] for job in json.loads(window.stdout)["items"]] == ids[:2]
    assert window.stderr == ""
    refused = cli(service.url, "list", "--created-before", "yesterday")
    assert refused.exit_code == 4, refused.stderr
    # named as typed (it said "invalid query parameter 'created_before'": a QA pass)
    assert refused.stderr.startswith("tether: invalid --created-before: 'yesterday' is no ISO")


def test_list_names_a_backend_the_service_lacks_when_it_finds_no_job(service):
    typo = cli(service.url, "list", "--backend", "http-webhook")
    assert typo.exit_code == 0, typo.stderr
    assert "0 job(s)" in typo.stdout
    assert typo.stderr == (
        "tether: the service has no backend 'http-webhook'; did you mean http_webhook?\n"
    )
    as_json = cli(service.url, "list", "--json", "--backend", "nothing-near")
    assert json.loads(as_json.stdout) == {"items": [], "next_cursor": None}
    assert as_json.stderr == "tether: the service has no backend 'nothing-near'\n"
    installed = cli(service.url, "list", "--backend", "http_webhook", "--tag", "none-has-it")
    assert installed.stderr == ""


def test_list_ids_feed_another_command_through_xargs(service, receiver):
    """`tether list --ids`: the IDs alone, one a line, so that the jobs a
    filter finds are retried (or canceled) in one line of shell, as the
    dashboard's "Retry all on this page" does them."""
    receiver.respond = lambda hit: (400, {"refused": True})  # the job fails at once
    tag = "cli-ids"
    for n in range(3):
        args = ["--id", f"cli-ids-{n}", "--tag", tag, "--params", webhook(receiver)]
        assert cli(service.url, "submit", "http_webhook", *args).exit_code == 0
        settled(service, f"cli-ids-{n}", "failed")
    listed = cli(service.url, "list", "--state", "failed", "--tag", tag, "--ids")
    assert (listed.exit_code, listed.stdout, listed.stderr) == (
        0,
        "cli-ids-2\ncli-ids-1\ncli-ids-0\n",
        "",
    )
    fewer = cli(service.url, "list", "--tag", tag, "--ids", "--limit", "2")
    assert fewer.stdout == "cli-ids-2\ncli-ids-1\n"
    assert fewer.stderr.startswith("tether: more jobs match: --cursor "), fewer.stderr
    both = cli(service.url, "list", "--ids", "--json")
    assert both.exit_code == 2 and "give --ids or --json, not both" in both.stderr

    env = {**os.environ, "TETHER_URL": service.url}
    for tagged, retried in ((tag, 3), ("none-has-it", 0)):
        line = f"{TETHER} list --state failed --tag {tagged} --ids | xargs -r {TETHER} retry"
        done = subprocess.run(
            line, shell=True, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("cli-ids-") == retried, done.stdout
    for n in range(3):
        wait_until(lambda n=n: served(service, f"/jobs/cli-ids-{n}")["attempt"] == 2)
        assert settled(service, f"cli-ids-{n}", "failed")["attempt"] == 2


# ── watch and submit --wait: exit statuses ───────────────────────────────────


def test_submit_wait_exits_0_when_the_job_succeeds(service, receiver):
    receiver.callback = {"status": "succeeded", "result": [1]}
    args = ["submit", "http_webhook", "--id", "cli-wait-ok", "--params", webhook(receiver)]
    done = tether(service.url, *args, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == served(service, "/jobs/cli-wait-ok")
    assert json.loads(done.stdout)["state"] == "succeeded"


def test_submit_wait_and_watch_exit_1_when_the_job_fails(service, receiver):
    receiver.callback = {"status": "failed", "error": {"message": "disk full"}}
    args = ["submit", "http_webhook", "--id", "cli-wait-failed", "--params", webhook(receiver)]
    done = cli(service.url, *args, "--wait")
    assert done.exit_code == 1, done.stderr
    assert "cli-wait-failed" in done.stdout
    assert "failed" in done.stdout
    assert "disk full" in done.stdout
    again = cli(service.url, "watch", "cli-wait-failed")  # already ended: at once
    assert again.exit_code == 1
    assert "failed" in again.stdout


def test_an_error_message_with_escape_sequences_is_printed_escaped(service, receiver):
    # Whoever holds the callback URL writes the error message; a terminal
    # would obey its escapes (clear the line, recolour it, set the title).
    message = "real\r\x1b[2K\x1b[32mjob esc  succeeded\x1b[0m\x1b]0;pwned\x07 \x9b1A"
    receiver.callback = {"status": "failed", "error": {"message": message}}
    args = ["submit", "http_webhook", "--id", "cli-escapes", "--params", webhook(receiver)]
    done = cli(service.url, *args, "--wait")
    assert done.exit_code == 1, done.stderr
    for shown in (done.stdout, cli(service.url, "watch", "cli-escapes").stdout):
        assert not any(c in shown for c in "\x1b\x07\r\x9b"), repr(shown)
        assert "real\\x0d\\x1b[2K\\x1b[32mjob esc  succeeded" in shown
    got = cli(service.url, "get", "cli-escapes")  # the error as JSON, in a table
    assert "\x1b" not in got.stdout and "\x9b" not in got.stdout


def test_an_error_message_with_newlines_or_overrides_cannot_fake_a_line(service, receiver):
    """A newline would print a line of the sender's choosing, a bidirectional
    override text other than what is there, a zero-width space a name that
    looks like another: each is written as its escape (found by an
    exploratory QA pass; before, only controls but newline and tab were)."""
    message = "disk\nFAKE: job cli-fake succeeded\u202e.exe\u200b"
    receiver.callback = {"status": "failed", "error": {"message": message}}
    args = ["submit", "http_webhook", "--id", "cli-fake", "--params", webhook(receiver)]
    done = cli(service.url, *args, "--wait")
    assert done.exit_code == 1, done.stderr
    got = cli(service.url, "get", "cli-fake")
    for shown in (done.stdout, cli(service.url, "watch", "cli-fake").stdout, got.stdout):
        assert "\u202e" not in shown and "\u200b" not in shown, repr(shown)
        assert not any(line.startswith("FAKE") for line in shown.splitlines()), shown
    assert "disk\\x0aFAKE: job cli-fake succeeded\\u202e.exe\\u200b" in done.stdout


def test_watch_exits_1_when_the_job_times_out(service, receiver):
    args = ["submit", "http_webhook", "--id", "cli-timeout", "--timeout", "1"]
    cli(service.url, *args, "--params", webhook(receiver))
    done = tether(service.url, "watch", "cli-timeout")
    assert done.returncode == 1, done.stderr
    assert "timed_out" in done.stdout


@contextlib.contextmanager
def watching_running(service: TetherProcess, job_id: str) -> Iterator[subprocess.Popen[str]]:
    """A real `tether watch` of a running job, once it has printed its first
    line (as it happens, not when the watch ends); killed at the end."""
    env = {**os.environ, "TETHER_URL": service.url}
    watching = subprocess.Popen(
        [TETHER, "watch", job_id],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watching.stdout is not None
        assert select.select([watching.stdout], [], [], 30)[0], "the watch printed nothing"
        first = watching.stdout.readline()
        assert first.startswith(f"job {job_id}  running"), first
        yield watching
    finally:
        watching.kill()


def test_ctrl_c_ends_a_watch_with_status_130_and_the_job_goes_on(service, receiver):
    """Click said "Aborted!" and exited 1, the status of a failed job (a QA
    pass): a script could not tell an interrupted watch from a failure."""
    args = ["submit", "http_webhook", "--id", "cli-interrupted", "--params", webhook(receiver)]
    assert cli(service.url, *args).exit_code == 0
    settled(service, "cli-interrupted", "running")
    with watching_running(service, "cli-interrupted") as watching:
        watching.send_signal(signal.SIGINT)
        _, err = watching.communicate(timeout=20)
    assert watching.returncode == 130, err
    assert "Aborted" not in err and "Traceback" not in err, err
    assert served(service, "/jobs/cli-interrupted")["state"] == "running"


def test_watch_exits_3_when_the_job_is_canceled(service, receiver):
    args = ["submit", "http_webhook", "--id", "cli-cancel", "--params", webhook(receiver)]
    assert cli(service.url, *args).exit_code == 0
    settled(service, "cli-cancel", "running")
    with watching_running(service, "cli-cancel") as watching:
        canceled = cli(service.url, "cancel", "cli-cancel", "--reason", "not needed", "--json")
        assert canceled.exit_code == 0, canceled.stderr
        out, err = watching.communicate(timeout=20)
    assert watching.returncode == 3, err
    assert out.splitlines()[-2].startswith("job cli-cancel  canceled")
    assert "canceled by request: not needed" in out
    job = json.loads(canceled.stdout)
    assert job == served(service, "/jobs/cli-cancel")
    assert job["error"]["message"] == "canceled by request: not needed"


def test_cancel_and_retry_take_several_ids_each_whatever_the_others_did(service, receiver):
    """Cancelling what a filter lists took one `tether cancel` a job (found
    by an exploratory QA pass): several IDs now, each tried, the refused
    ones named on stderr, exit 4 if any was."""
    ids = [f"cli-many-{n}" for n in range(3)]
    for job_id in ids:
        args = ["--id", job_id, "--params", webhook(receiver)]
        assert cli(service.url, "submit", "http_webhook", *args).exit_code == 0
        settled(service, job_id, "running")
    done = cli(service.url, "cancel", ids[0], "cli-many-none", ids[1], "--reason", "bulk")
    assert done.exit_code == 4
    assert ids[0] in done.stdout and ids[1] in done.stdout and ids[2] not in done.stdout
    assert "2 canceled, 1 refused" in done.stdout
    assert done.stderr.startswith("tether: cli-many-none: no job 'cli-many-none'"), done.stderr
    for job_id in ids[:2]:
        assert served(service, f"/jobs/{job_id}")["state"] == "canceled"
    assert served(service, f"/jobs/{ids[2]}")["state"] == "running"

    retried = cli(service.url, "retry", *ids, "--json")  # the third is still waiting
    assert retried.exit_code == 4
    found = json.loads(retried.stdout)
    assert [job["id"] for job in found["items"]] == ids[:2]
    assert [job["attempt"] for job in found["items"]] == [2, 2]
    [refusal] = found["refused"]
    assert (refusal["id"], refusal["status"]) == (ids[2], 409)
    assert cli(service.url, "cancel", *ids, "--json").exit_code == 0  # all waiting: all canceled
    for option in ("--wait", "--attempt=2"):
        refused = cli(service.url, "retry", *ids, option)
        assert refused.exit_code == 2 and "names one job: give one ID" in refused.stderr
    stopped = cli("http://127.0.0.1:1", "cancel", *ids, "--json")  # nothing listens there
    assert stopped.exit_code == 4
    assert [r["status"] for r in json.loads(stopped.stdout)["refused"]] == [None] * 3
    assert "not tried: the service could not be reached" in stopped.stderr


def following(*args: str, url: str) -> subprocess.Popen[str]:
    """`tether ARGS` as a process, its output piped (a line per change)."""
    env = {**os.environ, "TETHER_URL": url}
    return subprocess.Popen(
        [TETHER, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ended(*watching: subprocess.Popen[str]) -> list[tuple[int, str, str]]:
    """Each process's exit status, stdout and stderr, once it exits by itself."""
    done = []
    try:
        for proc in watching:
            out, err = proc.communicate(timeout=30)
            done.append((proc.returncode, out, err))
    finally:
        for proc in watching:
            proc.kill()
    return done


def started_watching(service: TetherProcess, job_id: str) -> list[subprocess.Popen[str]]:
    """`events ID --follow --json` and `watch ID`, once each shows the job running."""
    watching = [
        following("events", job_id, "--follow", "--json", url=service.url),
        following("watch", job_id, url=service.url),
    ]
    for proc in watching:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 30)[0], "nothing printed"
        proc.stdout.readline()  # the first event, or the running job's line
    return watching


def test_follow_shows_the_notification_filed_after_finished_and_watch_ends_with_the_job(
    service, receiver
):
    """The completion notification's receiver answers a second late: `events
    --follow` prints `finished`, then `notified`, then exits 0; `watch` ends
    with the job (its status), not waiting for it."""
    receiver.respond = answering(notify=[(1.0, 200)])
    args = ["submit", "http_webhook", "--id", "cli-told", "--params", webhook(receiver)]
    assert cli(service.url, *args, "--notify", receiver.url("/notify")).exit_code == 0
    settled(service, "cli-told", "running")
    watching = started_watching(service, "cli-told")
    httpx.post(callback_url(receiver, "cli-told"), json={"status": "succeeded"}, trust_env=False)
    [(follow_status, follow_out, follow_err), (watch_status, watch_out, watch_err)] = ended(
        *watching
    )
    assert follow_status == 0, follow_err
    shown = [json.loads(line)["type"] for line in follow_out.splitlines()]
    assert shown[-2:] == ["finished", "notified"], follow_out  # (the first line was read)
    assert watch_status == 0, watch_err
    assert watch_out.splitlines()[-1].startswith("job cli-told  succeeded"), watch_out
    assert "notified" not in watch_out, watch_out
    assert json.loads(follow_out.splitlines()[-1])["data"]["status"] == 200


def test_follow_shows_that_a_canceled_jobs_run_could_not_be_stopped(service, receiver):
    receiver.respond = answering(cancel=[(1.0, 400)])
    params = json.dumps({"url": receiver.url(), "cancel_url": receiver.url("/cancel")})
    args = ["submit", "http_webhook", "--id", "cli-unstoppable", "--params", params]
    assert cli(service.url, *args).exit_code == 0
    settled(service, "cli-unstoppable", "running")
    watching = started_watching(service, "cli-unstoppable")
    assert cli(service.url, "cancel", "cli-unstoppable").exit_code == 0
    [(follow_status, follow_out, follow_err), (watch_status, watch_out, watch_err)] = ended(
        *watching
    )
    assert follow_status == 0, follow_err
    shown = [json.loads(line)["type"] for line in follow_out.splitlines()]
    assert shown[-2:] == ["finished", "cancel_failed"], follow_out
    assert watch_status == 3, watch_err
    assert "cancel_failed" not in watch_out, watch_out  # it ends with the job


def test_follow_reads_an_event_holding_characters_other_readers_end_lines_at(service, receiver):
    """U+2028, U+2029 and U+0085 in an event (here a cancel's reason): httpx's
    line reader ends a line at each, and `events --follow` said "not JSON",
    exit 4, for good (found by a QA pass, 2026-12-07). The service now sends
    them as JSON escapes, and the client ends lines where SSE does."""
    reason = "a\u2028b\u2029c\x85d"
    args = ["submit", "http_webhook", "--id", "cli-lines", "--params", webhook(receiver)]
    assert cli(service.url, *args).exit_code == 0
    settled(service, "cli-lines", "running")
    url = f"{service.url}/jobs/cli-lines/cancel"
    assert httpx.post(url, json={"reason": reason}, trust_env=False).status_code == 200
    events, stream = f"{service.url}/jobs/cli-lines/events", {"accept": "text/event-stream"}
    with httpx.stream("GET", events, headers=stream, trust_env=False) as raw:
        sent = b"".join(raw.iter_bytes())
    assert "\\u2028" in sent.decode() and not any(c in sent.decode() for c in "\u2028\u2029\x85")
    done = cli(service.url, "events", "cli-lines", "--follow", "--json")
    assert done.exit_code == 0, done.stderr
    [asked] = [
        e for e in map(json.loads, done.stdout.splitlines()) if e["type"] == "cancel_requested"
    ]
    assert asked["data"]["reason"] == reason


async def test_sse_lines_end_where_the_format_ends_them():
    """CR LF, CR or LF alone, a CR LF split between two chunks: never at
    the characters `str.splitlines` ends lines at too (an older service
    sends them raw)."""

    async def chunks(*parts: str) -> Any:
        for part in parts:
            yield part

    async def lines(*parts: str) -> list[str]:
        return [line async for line in client_module.sse_lines(chunks(*parts))]

    assert await lines('data: {"a": "x\u2028y\x85z"}\n\n') == ['data: {"a": "x\u2028y\x85z"}', ""]
    assert await lines("id: 1\r", "\ndata: 2\r\r", "\n", "x") == ["id: 1", "data: 2", "", "x"]
    assert await lines("a\r", "b\r") == ["a", "b"]
    assert await lines("a\r", "\r\n", "\n") == ["a", "", ""]
    assert await lines("x" * 10, "", "y\n") == ["x" * 10 + "y"]
    sent = 'event: ping\ndata: {"type": "ping"}\n\n: keep-alive\n\nid: 7\ndata: "\u2029"\n\n'
    items = client_module.sse_items(client_module.sse_lines(chunks(sent)))
    assert [item async for item in items] == [("7", "\u2029")]  # keep-alives are not items


def test_a_service_that_cannot_be_reached_is_exit_4_in_one_line(refused_url: str, monkeypatch):
    url = refused_url
    for args in (["get", "x"], ["list"], ["submit", "http_webhook"]):
        done = tether(url, *args)
        assert done.returncode == 4, (args, done.stderr)
        assert done.stderr == f"tether: cannot reach {url}: connection refused\n"
        assert done.stdout == ""
    # a watch waits an outage out (`OUTAGE_FOR`), saying so, then gives up so
    monkeypatch.setattr(client_module, "RECONNECT_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(client_module, "OUTAGE_FOR", 0.1)
    done = cli(url, "watch", "x")
    assert done.exit_code == 4
    refused = f"tether: cannot reach {url}: connection refused"
    assert done.stderr.splitlines() == [f"{refused}; trying again for up to 0.1s", refused]
    assert done.stdout == ""


def answering_json(answer: Any) -> tuple[ThreadingHTTPServer, str]:
    """A real HTTP server on 127.0.0.1 that is not Tether: 200 with `answer`
    as JSON to every GET and POST. Shut it down when done."""
    body = json.dumps(answer).encode()

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(POLL,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_another_service_answering_json_is_exit_4_in_one_line():
    """A wrong port or URL that reaches some other service answering 200 with
    JSON of its own: each command says so, no traceback (a KeyError before)."""

    server, url = answering_json({"ok": True})
    callback = f"{url}/callbacks/j:1?token=secret-t"
    cases = {
        ("list",): f"{url}/jobs",
        ("get", "x"): f"{url}/jobs/x",
        ("watch", "x"): f"{url}/jobs/x",
        ("events", "x"): f"{url}/jobs/x/events",
        ("cancel", "x"): f"{url}/jobs/x/cancel",
        ("retry", "x"): f"{url}/jobs/x/retry",
        ("submit", "http_webhook"): f"{url}/jobs",
        ("complete", callback, "--status", "succeeded"): f"{url}/callbacks/j:1",
        ("heartbeat", callback): f"{url}/callbacks/j:1/heartbeat",
    }
    try:
        for args, where in cases.items():
            done = cli(url, *args)
            assert done.exit_code == 4, (args, done.output)
            fields = {
                "list": "items",
                "events": "items",
                "complete": "outcome",
                "heartbeat": "state",
            }
            field = fields.get(args[0], "id")
            assert done.stderr == (
                f"tether: {where} answered 200 with JSON that is not Tether's (no {field!r}):"
                " is it a Tether service?\n"
            ), args
            assert "secret-t" not in done.output
    finally:
        server.shutdown()
        server.server_close()


def test_list_prints_a_cursor_and_ids_another_service_sent_escaped():
    """A proxy or a service that is not Tether may answer a page whose ids
    and cursor hold escape sequences: `tether list` printed them raw (an
    OSC 52 writes the terminal's clipboard; a QA pass, 2026-12-07)."""
    hostile = "x\x1b]52;c;aGk=\x07\u202e\x9b2J"
    job = {
        "id": hostile,
        "backend": "b",
        "state": "running",
        "attempt": 1,
        "created_at": "2026-12-07T00:00:00Z",
        "updated_at": "2026-12-07T00:00:00Z",
        "tags": [],
    }
    # and a state and a time that are neither: the state reached the terminal
    # raw, and the time made a traceback (a QA pass, 2026-12-08)
    odd = {**job, "state": hostile, "created_at": hostile}
    page = {"items": [job, odd], "next_cursor": hostile}

    server, url = answering_json(page)
    try:
        for args in (["list", "--limit", "2", "--ids"], ["list", "--limit", "2"]):
            done = cli(url, *args)
            assert done.exit_code == 0, (args, done.output)
            assert not any(c in done.output for c in "\x1b\x07\u202e\x9b"), (args, done.output)
            assert "\\x1b]52;c;aGk=\\x07\\u202e\\x9b2J" in done.output, (args, done.output)
    finally:
        server.shutdown()
        server.server_close()


def test_a_list_whose_reader_stops_reading_ends_with_0(tmp_path):
    """`tether list --ids | head -1` with more ids than a pipe holds: click
    exited 1 on the broken pipe, with nothing said, where fewer exited 0, so
    a `set -o pipefail` script failed by how many jobs there were (a QA
    pass)."""
    items = [
        {
            "id": f"job-{i:04d}-" + "x" * 100,
            "backend": "b",
            "state": "running",
            "attempt": 1,
            "created_at": "2026-12-08T00:00:00Z",
            "tags": [],
        }
        for i in range(2000)  # about 230 KB of ids, past any pipe's buffer
    ]
    server, url = answering_json({"items": items, "next_cursor": None})
    try:
        for args in ("list --ids --limit 2000", "list --limit 2000"):
            done = subprocess.run(
                ["bash", "-c", f"set -o pipefail; {TETHER} {args} | head -1"],
                env={**os.environ, "TETHER_URL": url},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, (args, done.stderr)
            assert done.stdout.count("\n") == 1 and done.stderr == "", (args, done.stderr)
    finally:
        server.shutdown()
        server.server_close()


def test_usage_errors_are_exit_2_naming_the_option(service):
    ids_before = [job["id"] for job in served(service, "/jobs")["items"]]
    cases = {
        ("watch",): "Missing argument 'ID'",
        ("submit", "http_webhook", "--id", "cli-bad", "--params", "{bad"): "'--params': not valid",
        ("submit", "http_webhook", "--id", "cli-bad", "--params", "[1]"): "must be a JSON object",
        ("submit", "http_webhook", "--id", "cli-bad", "--params", "@/nonexistent/p.json"): (
            "'--params': cannot read /nonexistent/p.json"
        ),
        ("submit", "http_webhook", "--id", "cli-bad", "--metadata", "3"): "'--metadata'",
        ("submit", "http_webhook", "--id", "cli-bad", "--timeout", "0"): "'--timeout'",
        ("submit", "http_webhook", "--id", "cli-bad", "--heartbeat-timeout", "0.5"): (
            "'--heartbeat-timeout': 0.5 is not in the range x>=1"
        ),
        ("list", "--state", "sleeping"): "'--state'",
        ("complete", "http://x/cb?token=t", "--status", "succeeded", "--error", "m"): "'--error'",
        # JSON has no NaN or Infinity: a traceback and exit 1 ("the job failed") before
        ("submit", "http_webhook", "--id", "cli-bad", "--timeout", "nan"): "'--timeout'",
        ("submit", "http_webhook", "--id", "cli-bad", "--timeout", "inf"): "not a finite",
        ("submit", "http_webhook", "--id", "cli-bad", "--heartbeat-timeout", "inf"): "finite",
        ("submit", "http_webhook", "--id", "cli-bad", "--params", '{"payload": NaN}'): (
            "'--params': not valid JSON: NaN is not a JSON value"
        ),
        ("submit", "http_webhook", "--id", "cli-bad", "--metadata", '{"x": -Infinity}'): (
            "-Infinity is not a JSON value"
        ),
        ("complete", "http://x/cb?token=t", "--status", "succeeded", "--result", "[NaN]"): (
            "'--result': not valid JSON"
        ),
        ("heartbeat", "http://x/cb?token=t", "--progress", "Infinity"): "'--progress'",
    }
    for args, expected in cases.items():
        done = cli(service.url, *args)
        assert done.exit_code == 2, (args, done.stderr)
        assert expected in done.stderr, (args, done.stderr)
    assert [job["id"] for job in served(service, "/jobs")["items"]] == ids_before


def test_bad_json_in_params_is_a_usage_error_as_a_process_too(service):
    done = tether(service.url, "submit", "http_webhook", "--params", "{bad")
    assert done.returncode == 2
    assert "Invalid value for '--params': not valid JSON" in done.stderr


# ── errors: the service's message, exit 4 ─────────────────────────────────────


def test_error_answers_print_the_services_message_and_exit_4(service, receiver):
    with service.client() as http:
        unknown = http.post("/jobs", json={"backend": "nope"}).json()["error"]["message"]
    done = cli(service.url, "submit", "nope")
    assert done.exit_code == 4
    assert done.stderr == f"tether: {unknown} (HTTP 422)\n"
    assert done.stdout == ""
    missing = tether(service.url, "get", "no-such-job", "--json")
    assert missing.returncode == 4
    assert missing.stderr == "tether: no job 'no-such-job' (HTTP 404)\n"
    assert missing.stdout == ""
    receiver.callback = {"status": "succeeded"}
    cli(service.url, "submit", "http_webhook", "--id", "cli-done", "--params", webhook(receiver))
    settled(service, "cli-done", "succeeded")
    late = cli(service.url, "cancel", "cli-done")
    assert late.exit_code == 4
    assert late.stderr == "tether: job 'cli-done' already finished (succeeded) (HTTP 409)\n"
    receiver.respond = lambda hit: (200, b"<html>not a Tether</html>")
    elsewhere = cli(receiver.url(""), "get", "x")
    assert elsewhere.exit_code == 4
    assert elsewhere.stderr == f"tether: {receiver.url('/jobs/x')} answered 200 without JSON\n"
    for verb in ("events", "watch"):
        done = cli(service.url, verb, "no-such-job")
        assert done.exit_code == 4
        assert done.stderr == "tether: no job 'no-such-job' (HTTP 404)\n"


def test_the_api_token_is_the_first_of_tether_api_token_and_never_shown(tmp_path):
    env = {"TETHER_STORE": "memory://", "TETHER_API_TOKEN": "tok-right"}
    guarded = TetherProcess(tmp_path, env).start()
    try:
        listed = cli(guarded.url, "list", token="tok-right, tok-other")
        assert listed.exit_code == 0, listed.stderr
        refused = cli(guarded.url, "list")
        assert refused.exit_code == 4
        assert refused.stderr == "tether: missing or invalid API token (HTTP 401)\n"
        wrong = tether(guarded.url, "get", "x", token="tok-wrong")
        assert wrong.returncode == 4
        assert "tok-wrong" not in wrong.stderr + wrong.stdout
    finally:
        guarded.kill()


# ── complete: a callback as the external system sends it ─────────────────────


def test_complete_settles_the_job_and_never_shows_the_token(service, receiver, refused_url):
    cli(
        service.url, "submit", "http_webhook", "--id", "cli-complete", "--params", webhook(receiver)
    )
    url = callback_url(receiver, "cli-complete")
    token = parse_qs(urlsplit(url).query)["token"][0]
    done = cli(service.url, "complete", url, "--status", "succeeded", "--result", '{"rows": 42}')
    assert done.exit_code == 0, done.stderr
    assert "accepted" in done.stdout
    assert "cli-complete" in done.stdout and "succeeded" in done.stdout
    job = served(service, "/jobs/cli-complete")
    assert (job["state"], job["result"]) == ("succeeded", {"rows": 42})
    again = tether(
        service.url, "complete", url, "--status", "succeeded", "--result", '{"rows": 42}'
    )
    assert again.returncode == 0, again.stderr
    assert "duplicate" in again.stdout
    as_json = cli(service.url, "complete", url, "--status", "succeeded", "--result", "{}", "--json")
    assert as_json.exit_code == 4  # a different outcome came first: 409
    with httpx.Client(trust_env=False) as http:
        conflict = http.post(url, json={"status": "succeeded", "result": {}}).json()
    assert as_json.stderr == f"tether: {conflict['error']['message']} (HTTP 409)\n"
    assert as_json.stdout == ""
    duplicate = cli(
        service.url, "complete", url, "--status", "succeeded", "--result", '{"rows": 42}', "--json"
    )
    with httpx.Client(trust_env=False) as http:
        expected = http.post(url, json={"status": "succeeded", "result": {"rows": 42}}).json()
    assert json.loads(duplicate.stdout) == expected
    forged = url.replace(token, "forged")
    refused = cli(service.url, "complete", forged, "--status", "failed", "--error", "x")
    assert refused.exit_code == 4
    assert refused.stderr == "tether: missing or invalid callback token (HTTP 401)\n"
    gone = url.replace(f"http://127.0.0.1:{service.port}/", f"{refused_url}/")
    unreachable = tether(service.url, "complete", gone, "--status", "failed", "--retry-for", "3")
    assert unreachable.returncode == 4
    said = f"tether: cannot reach {gone.split('?')[0]}: connection refused"
    lines = unreachable.stderr.splitlines()
    assert lines[0] == f"{said}; trying again in 0.5s" and lines[-1] == said, lines
    for bad in ("nan", "-1", "inf"):
        option = cli(service.url, "complete", gone, "--status", "failed", "--retry-for", bad)
        assert option.exit_code == 2 and "'--retry-for'" in option.stderr
    schemeless = cli(service.url, "complete", gone.split("://", 1)[1], "--status", "failed")
    assert schemeless.exit_code == 2, schemeless.stderr  # not tried for 120 s
    assert "not an http:// or https:// URL" in schemeless.stderr
    for result in (done, again, as_json, duplicate, refused):
        assert token not in result.stdout + result.stderr
        assert "forged" not in result.stderr
    assert token not in unreachable.stdout + unreachable.stderr


def test_complete_goes_on_through_a_restart_answered_503(receiver: Receiver):
    """A service (or its proxy) restarting answers 503: `complete` waits as
    `Retry-After` says and tries again; the outcome is delivered once."""

    def respond(hit: Hit) -> tuple[Any, ...]:
        if len(receiver.hits) <= 2:
            return 503, {"error": {"message": "down"}}, {"retry-after": "0"}
        job = {"id": "j", "backend": "http_webhook", "state": "succeeded"}
        return 200, {"outcome": "accepted", "message": "ok", "job": job}

    receiver.respond = respond
    url = receiver.url("/callbacks/j:1?token=secret-t")
    done = cli("http://unused", "complete", url, "--status", "succeeded", "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["outcome"] == "accepted"
    assert [hit.body for hit in receiver.hits] == [{"status": "succeeded"}] * 3
    assert done.stderr.count("down (HTTP 503); trying again in 0.5s") == 1
    assert "secret-t" not in done.stderr


def test_complete_failed_sends_the_error_and_not_the_api_token(service, receiver):
    cli(service.url, "submit", "http_webhook", "--id", "cli-fail", "--params", webhook(receiver))
    url = callback_url(receiver, "cli-fail")
    done = cli(
        service.url,
        "complete",
        url,
        "--status",
        "failed",
        "--error",
        "disk full",
        token="api-secret",
    )
    assert done.exit_code == 0, done.stderr
    job = served(service, "/jobs/cli-fail")
    assert (job["state"], job["error"]["message"]) == ("failed", "disk full")
    # The callback URL is another system's: it never gets the API token.
    receiver.respond = lambda hit: (200, {"outcome": "accepted", "job": job, "message": "ok"})
    cli(
        service.url,
        "complete",
        receiver.url("/cb?token=t"),
        "--status",
        "failed",
        "--json",
        token="api-secret",
    )
    [hit] = receiver.on("/cb?token=t")
    assert "authorization" not in hit.headers
    assert hit.body == {"status": "failed"}


# ── the entry point ───────────────────────────────────────────────────────────


def test_every_verb_and_option_has_help():
    for name, command in client.commands.items():
        assert command.help, name
        for param in command.params:
            if param.param_type_name == "option":
                assert getattr(param, "help", None), (name, param.name)
    alone = [sys.executable, "-c", ENTRY, "--help"]  # the verbs without the main group
    done = subprocess.run(alone, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    for verb in ("submit", "get", "list", "events", "watch", "cancel", "complete"):
        assert verb in done.stdout


# ── the events stand-in (switch these to `tether serve` once it has the route) ─


EVENTS = [
    {"seq": 1, "at": "2026-01-01T00:00:00Z", "type": "accepted", "attempt": 1, "data": {}},
    {"seq": 2, "at": "2026-01-01T00:00:01Z", "type": "triggered", "attempt": 1, "data": {"try": 1}},
    {
        "seq": 3,
        "at": "2026-01-01T00:00:02Z",
        "type": "callback",
        "attempt": 1,
        "data": {"verdict": "accepted"},
    },
    {
        "seq": 4,
        "at": "2026-01-01T00:00:02Z",
        "type": "finished",
        "attempt": 1,
        "data": {"state": "succeeded"},
    },
]


@dataclass
class EventsStandIn:
    """Speaks DESIGN.md's events contract for one job, `job-1`: `GET
    /jobs/job-1` (running until `finished` was streamed, then succeeded),
    `GET /jobs/job-1/events` as JSON pages (two events a page, `?cursor=`)
    and as a server-sent event stream that honours `Last-Event-ID`. The
    first `drops` streams are cut (a TCP reset) after `drop_after` events.
    Without `events_route` it is a service older than the events: 404 for the
    route, and the job ends at its `ends_at_read`th read. A stream that
    reached `finished` ends with `event: end`, unless not `says_end` (a
    service older than it, which just closed the stream)."""

    events_route: bool = True
    says_end: bool = True
    silent_streams: int = 0
    """The first this many streams close without `end` (a service stopping)."""
    refusals: dict[int, int] = field(default_factory=dict)
    """Stream number (1, 2, ...) → the status it is refused with instead."""
    refusal_code: str = "x"
    """The `error.code` of those refusals."""
    job_refusals: dict[int, int] = field(default_factory=dict)
    """Job read number (1, 2, ...) → the status it is refused with instead."""
    ends_at_read: int = 0
    drop_after: int = 2
    drops: int = 1
    pause: float = 0.0
    last_event_ids: list[str | None] = field(default_factory=list)
    job_reads: int = 0
    finished: bool = False
    url: str = ""

    def job(self) -> dict[str, Any]:
        state = "succeeded" if self.finished else "running"
        return {
            "id": "job-1",
            "backend": "http_webhook",
            "state": state,
            "error": None,
            "created_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:00:02Z" if self.finished else None,
        }


def serve_stand_in(stand_in: EventsStandIn) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/jobs/job-1":
                stand_in.job_reads += 1
                refused = stand_in.job_refusals.get(stand_in.job_reads)
                if refused is not None:
                    return self.answer(refused, {"error": {"code": "x", "message": "refused"}})
                if stand_in.job_reads == stand_in.ends_at_read:
                    stand_in.finished = True
                return self.answer(200, stand_in.job())
            if path != "/jobs/job-1/events" or not stand_in.events_route:
                return self.answer(404, {"error": {"code": "not_found", "message": "Not Found"}})
            if self.headers.get("accept") != "text/event-stream":
                second = parse_qs(query).get("cursor") == ["p2"]
                page = EVENTS[2:] if second else EVENTS[:2]
                return self.answer(
                    200, {"items": page, "next_cursor": None if second else "p2", "dropped": 0}
                )
            return self.stream(self.headers.get("last-event-id"))

        def answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def stream(self, last: str | None) -> None:
            stand_in.last_event_ids.append(last)
            refused = stand_in.refusals.get(len(stand_in.last_event_ids))
            if refused is not None:
                error = {"code": stand_in.refusal_code, "message": "refused"}
                return self.answer(refused, {"error": error})
            cut = len(stand_in.last_event_ids) <= stand_in.drops
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            if stand_in.says_end:
                self.send_header("tether-stream-ends", "end")
            self.end_headers()
            self.wfile.write(b": keep-alive\n\n")  # as a service older than `ping` sent
            self.wfile.write(b'event: ping\ndata: {"type": "ping"}\n\n')
            sent = 0
            for event in EVENTS:
                if last is not None and event["seq"] <= int(last):
                    continue
                if cut and sent == stand_in.drop_after:
                    self.reset()
                    return
                time.sleep(stand_in.pause)
                record = (
                    f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
                )
                self.wfile.write(record.encode())
                self.wfile.flush()
                sent += 1
                if event["type"] == "finished":
                    stand_in.finished = True
            if stand_in.says_end and len(stand_in.last_event_ids) > stand_in.silent_streams:
                self.wfile.write(b'event: end\ndata: {"type": "end"}\n\n')

        def reset(self) -> None:
            """Drop the connection as a crashed service or proxy would: RST."""
            self.wfile.flush()
            linger = struct.pack("ii", 1, 0)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.connection.close()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, args=(POLL,), daemon=True).start()
    return server


@pytest.fixture
def stand_in() -> Iterator[EventsStandIn]:
    events = EventsStandIn()
    server = serve_stand_in(events)
    yield events
    server.shutdown()
    server.server_close()


def test_standin_events_follows_pages(stand_in):
    as_json = cli(stand_in.url, "events", "job-1", "--json")
    assert as_json.exit_code == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {"items": EVENTS, "next_cursor": None, "dropped": 0}
    table = cli(stand_in.url, "events", "job-1")
    assert table.exit_code == 0, table.stderr
    for event in EVENTS:
        assert event["type"] in table.stdout


def test_standin_follow_resumes_a_dropped_stream_after_the_last_event(stand_in):
    done = tether(stand_in.url, "events", "job-1", "--follow", "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == EVENTS  # no gap, no repeat
    assert stand_in.last_event_ids == [None, "2"]  # cut after the second, resumed, `end`


def test_standin_follow_resumes_a_stream_closed_after_finished_without_its_end(stand_in):
    """A service that stops closes its streams without `end`, after
    `finished` too (a notification may still be due): the stream is resumed
    after the last event, until one says `end`."""
    stand_in.drops, stand_in.silent_streams = 0, 1
    done = tether(stand_in.url, "events", "job-1", "--follow", "--json")
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == EVENTS
    assert stand_in.last_event_ids == [None, "4"]


def test_standin_follow_of_a_service_that_does_not_say_end_ends_after_finished(stand_in):
    """A service older than `end` (no `Tether-Stream-Ends` header) closes the
    stream after `finished`: that is the end, exit 0."""
    stand_in.says_end, stand_in.drops = False, 0
    done = cli(stand_in.url, "events", "job-1", "--follow", "--json")
    assert done.exit_code == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == EVENTS
    assert stand_in.last_event_ids == [None]


@pytest.mark.parametrize("status", [502, 503, 504])
def test_standin_follow_resumes_after_a_restarting_answer(stand_in, monkeypatch, status):
    """A proxy (or the service without its store) answers 502-504 while a
    host restarts: tried again, as a refused connection is."""
    stand_in.drops, stand_in.silent_streams = 0, 1
    stand_in.refusals = {2: status, 3: status}
    monkeypatch.setattr(client_module, "RECONNECT_DELAYS", (0.01, 0.01, 0.01))
    done = cli(stand_in.url, "events", "job-1", "--follow", "--json")
    assert done.exit_code == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == EVENTS
    assert stand_in.last_event_ids == [None, "4", "4", "4"]


def test_standin_follow_of_a_job_deleted_after_its_end_ends_there(stand_in):
    stand_in.drops, stand_in.silent_streams, stand_in.refusals = 0, 1, {2: 404}
    done = cli(stand_in.url, "events", "job-1", "--follow", "--json")
    assert done.exit_code == 0, done.stderr
    assert [json.loads(line)["type"] for line in done.stdout.splitlines()][-1] == "finished"


def test_standin_follow_gives_up_with_exit_4_when_the_stream_keeps_breaking(stand_in, monkeypatch):
    stand_in.drops, stand_in.drop_after = 1000, 0  # every stream cut before an event
    monkeypatch.setattr(client_module, "RECONNECT_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(client_module, "OUTAGE_FOR", 0.0)
    done = cli(stand_in.url, "events", "job-1", "--follow")
    assert done.exit_code == 4
    assert done.stderr.startswith(f"tether: cannot reach {stand_in.url}: ")
    assert stand_in.last_event_ids == [None, None, None]  # the first try and two more


def test_standin_follow_and_a_watchs_reads_go_on_through_an_outage(stand_in, monkeypatch):
    """They gave up after `RECONNECT_DELAYS` (about 8 s), where `complete`
    goes on for two minutes: a slow deploy made a CI job's `submit --wait`
    report a service error for a job that then succeeded (found by an
    exploratory QA pass). Now they go on for `OUTAGE_FOR`."""
    monkeypatch.setattr(client_module, "RECONNECT_DELAYS", (0.01, 0.02))
    monkeypatch.setattr(client_module, "OUTAGE_FOR", 10.0)
    stand_in.drops, stand_in.silent_streams = 0, 1
    stand_in.refusals = dict.fromkeys(range(2, 22), 503)  # 20 tries, well past the two pauses
    done = cli(stand_in.url, "events", "job-1", "--follow", "--json")
    assert done.exit_code == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == EVENTS
    assert len(stand_in.last_event_ids) == 22
    # a watch's reads of the job, the same
    answers = iter([client_module.ServiceError("cannot reach", reached=False)] * 20)

    async def flaky() -> str:
        failure = next(answers, None)
        if failure is not None:
            raise failure
        return "read"

    assert asyncio.run(client_module.patiently(flaky)) == "read"


def test_standin_follow_waits_for_room_on_a_full_service(stand_in, monkeypatch):
    """A service that holds as many streams as it may (503
    `too_many_streams`) is up: `events --follow` gave it up after
    `OUTAGE_FOR` as an outage, where `watch` went on reading the job (a QA
    pass). It waits for room now, saying so once."""
    monkeypatch.setattr(client_module, "RECONNECT_DELAYS", (0.01,))
    monkeypatch.setattr(client_module, "OUTAGE_FOR", 0.0)
    monkeypatch.setattr(client_module, "FULL_PAUSE", 0.01)
    stand_in.drops, stand_in.silent_streams = 0, 1
    stand_in.refusals = dict.fromkeys(range(2, 12), 503)
    stand_in.refusal_code = "too_many_streams"
    done = cli(stand_in.url, "events", "job-1", "--follow", "--json")
    assert done.exit_code == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == EVENTS
    assert len(stand_in.last_event_ids) == 12
    assert done.stderr == "tether: refused (HTTP 503); waiting for room\n"


@pytest.mark.parametrize("status", [503, 429])
def test_standin_watch_waits_out_a_service_restarting_as_it_starts(stand_in, monkeypatch, status):
    """A watch begun while its service restarts (or behind an address
    another client's wrong tokens locked out: 429) waits it out as its later
    reads do, saying so once on stderr; it gave up at once, exit 4 (found
    by a QA pass, 2026-12-07). `submit --wait` and `retry --wait` read so."""
    monkeypatch.setattr(client_module, "RECONNECT_DELAYS", (0.01, 0.02))
    stand_in.job_refusals = {1: status, 2: status, 3: status}
    done = cli(stand_in.url, "watch", "job-1")
    assert done.exit_code == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("job job-1  succeeded")
    waits = [line for line in done.stderr.splitlines() if "trying again" in line]
    assert waits == [f"tether: refused (HTTP {status}); trying again for up to 120s"]


def test_standin_watch_says_once_that_it_waits_though_its_stream_and_reads_both_wait(
    stand_in, monkeypatch
):
    """A watch's event stream and its reads of the job meet the same outage:
    one line says so, not one each (found by a review, 2026-12-07)."""
    monkeypatch.setattr(client_module, "RECONNECT_DELAYS", (0.01, 0.02))
    stand_in.drops, stand_in.silent_streams = 0, 1
    stand_in.refusals = dict.fromkeys(range(2, 8), 503)
    stand_in.job_refusals = dict.fromkeys(range(2, 8), 503)
    done = cli(stand_in.url, "watch", "job-1")
    assert done.exit_code == 0, done.stderr
    # both met the outage and tried again (how far each got before the job's
    # end stops the watch varies: 8 and 7 of each in one CI run)
    assert stand_in.job_reads > 2 and len(stand_in.last_event_ids) > 2
    waits = [line for line in done.stderr.splitlines() if "trying again" in line]
    assert waits == ["tether: refused (HTTP 503); trying again for up to 120s"]


def test_an_answer_whose_encoding_cannot_be_undone_is_exit_4_in_one_line():
    """Another service answering 200 with `Content-Encoding: gzip` and a body
    that is not: a traceback and exit 1 before (found by a review)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-encoding", "gzip")
            self.send_header("content-length", "9")
            self.end_headers()
            self.wfile.write(b"not gzip!")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(POLL,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for args in (["get", "x"], ["watch", "x"], ["list"]):
            done = cli(url, *args)
            assert done.exit_code == 4, (args, done.output)
            assert done.stderr == (
                f"tether: {url} answered with a body its Content-Encoding cannot undo:"
                " is it a Tether service?\n"
            ), args
    finally:
        server.shutdown()
        server.server_close()


def test_standin_follow_says_once_that_it_waits_out_an_outage(stand_in, monkeypatch):
    """`events --follow` at a service that does not answer said nothing for
    the two minutes it waits (found by a QA pass, 2026-12-07): once an
    outage begins, one line on stderr; stdout stays the events alone."""
    monkeypatch.setattr(client_module, "RECONNECT_DELAYS", (0.01, 0.01))
    stand_in.drops, stand_in.silent_streams = 0, 1
    stand_in.refusals = {2: 503, 3: 503, 4: 503}
    done = cli(stand_in.url, "events", "job-1", "--follow", "--json")
    assert done.exit_code == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.splitlines()] == EVENTS
    assert done.stderr.splitlines() == ["tether: refused (HTTP 503); trying again for up to 120s"]


def test_a_retried_jobs_elapsed_time_is_its_attempts():
    """`watch` showed a retried job's elapsed time since its creation (a
    day at once for a job retried the next day: a QA pass, 2026-12-07):
    its attempt's, from the retry (`deadline` less `timeout`)."""
    first = {"id": "j", "attempt": 1, "created_at": "2026-01-01T00:00:00+00:00"}
    first |= {"finished_at": "2026-01-01T00:01:05+00:00", "timeout": 600.0}
    first |= {"deadline": "2026-01-01T00:10:00+00:00"}
    assert client_module.elapsed(first) == "1m05s"
    second = {**first, "attempt": 2, "deadline": "2026-01-02T00:10:00+00:00"}
    second |= {"finished_at": "2026-01-02T00:00:30+00:00"}
    assert client_module.elapsed(second) == "0m30s"


def test_a_bad_service_url_from_the_environment_is_named_so():
    done = cli("localhost:8000", "get", "j")
    assert done.exit_code == 2, done.output
    assert "'--url' (or $TETHER_URL)" in done.stderr, done.stderr


def test_a_cancel_reason_longer_than_the_service_keeps_is_a_usage_error(refused_url: str):
    """Refused before anything is sent (the service is not even reachable),
    naming the option; it was the service's words for its body field."""
    done = cli(refused_url, "cancel", "j", "--reason", "é" * 1001)
    assert done.exit_code == 2, done.output
    assert "'--reason'" in done.stderr and "at most 1000 characters, this one has 1001" in (
        done.stderr
    )
    assert cli(refused_url, "cancel", "j", "--reason", "é" * 1000).exit_code == 4  # sent


def test_standin_watch_prefers_the_event_stream(stand_in):
    stand_in.pause = 1.0  # 4 s of events: polling every 0.5 s would read the job ~9 times
    done = cli(stand_in.url, "watch", "job-1")
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any("running" in line for line in lines)
    assert any("succeeded" in line for line in lines)
    for event in EVENTS:
        assert any(event["type"] in line for line in lines)
    assert stand_in.job_reads <= 1 + len(EVENTS)  # read once, then again on each event


def test_standin_watch_reads_the_state_of_a_service_without_events(stand_in):
    stand_in.events_route, stand_in.ends_at_read = False, 4
    done = cli(stand_in.url, "watch", "job-1")
    assert done.exit_code == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("job job-1  running")
    assert done.stdout.splitlines()[-1].startswith("job job-1  succeeded")
    assert len(done.stdout.splitlines()) == 2  # no events, no error
    assert stand_in.job_reads == 4
    assert stand_in.last_event_ids == []


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:99999/callbacks/j%3A1?token=S3CRETTOKEN", "host or port cannot be"),
        ("http://[::1/callbacks/j%3A1?token=S3CRETTOKEN", "host or port cannot be read"),
        ("ftp://h/callbacks/j%3A1?token=S3CRETTOKEN", "not an http:// or https:// URL"),
        ("http:///callbacks/j%3A1?token=S3CRETTOKEN", "not an http:// or https:// URL"),
    ],
)
@pytest.mark.parametrize("verb", [["complete", "--status", "succeeded"], ["heartbeat"]])
def test_a_callback_url_that_cannot_be_sent_to_is_a_usage_error_without_its_token(
    url: str, said: str, verb: list[str]
):
    """A port out of range and a broken host raised from deep in the client
    with a traceback (found in an audit, 2026-12-04)."""
    done = cli("http://127.0.0.1:1", verb[0], url, *verb[1:])
    assert done.exit_code == 2, done.output
    assert "'CALLBACK_URL'" in done.stderr and said in done.stderr, done.stderr
    assert "S3CRET" not in done.stderr + done.stdout


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://[::1", "ftp://h"])
def test_a_service_url_that_cannot_be_sent_to_is_a_usage_error(url: str):
    done = cli(url, "get", "j")
    assert done.exit_code == 2, done.output
    assert "'--url'" in done.stderr, done.stderr


def test_an_events_table_marks_where_the_history_dropped_events():
    """`tether events` said the events dropped from the middle after the
    table, the seq jumping from 2 to 351 unmarked (found by a QA pass)."""
    from rich.console import Console

    from api.client import events_table

    def event(seq: int) -> dict[str, Any]:
        at = "2026-12-06T10:00:00Z"
        return {"seq": seq, "at": at, "type": "heartbeat", "attempt": 1, "data": {}}

    console = Console(width=120, record=True, color_system=None)
    console.print(events_table([event(1), event(2), event(351), event(352)]))
    lines = [line.strip() for line in console.export_text().splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["seq", "1", "2", "…", "351", "352"]
    assert "… 348 events no longer kept …" in lines[3]


@pytest.mark.parametrize(
    ("method", "exc", "repeatable", "said"),
    [
        ("GET", httpx.ReadTimeout("t"), False, "cannot reach http://h:1/x: no answer in time"),
        ("POST", httpx.ConnectTimeout("t"), True, "cannot reach http://h:1/x: no answer in time"),
        (
            "POST",
            httpx.ReadTimeout("t"),
            False,
            "http://h:1/x took the request and did not answer in time: it may have been made;"
            " look (tether get ID) before sending it again",
        ),
        (
            "POST",
            httpx.ReadTimeout("t"),
            True,
            "http://h:1/x took the request and did not answer in time: it may have been made;"
            " sending it again is safe (the same report again is a duplicate)",
        ),
    ],
)
def test_a_change_sent_and_not_answered_is_said_to_maybe_have_been_made(
    method, exc, repeatable, said
):
    """`tether cancel` against a service that took the request and never
    answered said "cannot reach", as if nothing had been sent (found by a QA
    pass); so did `tether complete` (`repeatable`: a report is safe to send
    again). A connection never made is still "cannot reach". The URL's query
    (a callback token) is never shown."""
    from api.client import unreachable

    error = unreachable("http://u:p@h:1/x?token=secret", exc, method, repeatable)
    assert error.message == said and error.reached is False
