"""What the client verbs print when their output is not a terminal (a pipe, a
file, a CI log): every id and time whole, each row or change on one line,
whatever width Rich would assume there (`tether list | cat` once printed the
id `nightly-sales-2026-11-24` as `nightly-sales-20` and `26-11-24`).

The verbs run as the real `tether` command, its output a pipe and COLUMNS=80,
against a real `tether serve`; then on a narrow terminal, in this process."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from api.cli import cli as main_group
from tests.api.test_client_cli import ROOT, TETHER, settled, webhook
from tests.conftest import Receiver
from tests.process import TetherProcess

LONG_ID = "nightly-sales-2026-11-24-warehouse-eu-west-1-orders-and-refunds-rerun-07"
"""Wider than an 80-column table leaves an id, however the columns share it."""
IDS = (LONG_ID, "nightly-sales-2026-11-24")
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
"""A time as the tables show it, whole."""
MESSAGE = "the warehouse refused the load: " + "quota exceeded on eu-west-1 " * 5
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherProcess]:
    proc = TetherProcess(tmp_path_factory.mktemp("serve"), {"TETHER_STORE": "memory://"}).start()
    yield proc
    proc.kill()


def failed(service: TetherProcess, receiver: Receiver, job_id: str) -> dict[str, Any]:
    """A job that failed at once, with a long error message; as the service shows it."""
    receiver.callback = {"status": "failed", "error": {"message": MESSAGE}}
    args = ["submit", "http_webhook", "--id", job_id, "--params", webhook(receiver)]
    assert piped(service.url, *args).returncode == 0
    return settled(service, job_id, "failed")


def piped(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`tether ARGS | cat` on an 80-column terminal: the real command, its
    standard output a pipe."""
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_API_TOKEN", "TTY_COMPATIBLE")}
    env |= {"TETHER_URL": url, "COLUMNS": "80"}
    return subprocess.run(
        [TETHER, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def rows(output: str) -> list[list[str]]:
    """Each line's blank-separated fields, as awk reads them."""
    return [line.split() for line in output.splitlines() if line.strip()]


def test_list_into_a_pipe_has_each_job_whole_on_one_line(service, receiver):
    jobs = [failed(service, receiver, job_id) for job_id in IDS]
    done = piped(service.url, "list", "--state", "failed")
    assert done.returncode == 0, done.stderr
    found = {row[0]: row for row in rows(done.stdout)}
    assert found["id"] == ["id", "backend", "state", "created_at", "finished_at"]
    for job in jobs:
        row = found[job["id"]]
        assert row[1:3] == ["http_webhook", "failed"], done.stdout
        assert TIME.match(row[3]) and TIME.match(row[4]), done.stdout


def test_get_into_a_pipe_has_the_id_and_times_whole(service, receiver):
    job = failed(service, receiver, LONG_ID + "-get")
    done = piped(service.url, "get", job["id"])
    assert done.returncode == 0, done.stderr
    found = {row[0]: row[1:] for row in rows(done.stdout)}
    for name in ("id", "backend", "state", "created_at", "updated_at", "finished_at"):
        assert found[name] == [job[name]], done.stdout
    # no line is padded out to the widest one (the error's)
    assert all(line == line.rstrip() for line in done.stdout.splitlines()), done.stdout


def test_events_into_a_pipe_have_one_line_each(service, receiver):
    job = failed(service, receiver, LONG_ID + "-events")
    history = json.loads(piped(service.url, "events", job["id"], "--json").stdout)["items"]
    assert max(len(json.dumps(event)) for event in history) > 80  # a callback's digest
    done = piped(service.url, "events", job["id"])
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines[0].split() == ["seq", "at", "type", "attempt", "data"]
    assert len(lines) == 1 + len(history), done.stdout
    for line, event in zip(lines[1:], history, strict=False):
        assert line.split()[:4] == [str(event["seq"]), moment(event), event["type"], "1"]
        assert json.dumps(event["data"]) in line, done.stdout
    follow = piped(service.url, "events", job["id"], "--follow")  # it has ended: all, then done
    assert follow.returncode == 0, follow.stderr
    lines = follow.stdout.splitlines()
    assert len(lines) == len(history), follow.stdout
    for line, event in zip(lines, history, strict=True):
        assert line.split()[:4] == [str(event["seq"]), moment(event), event["type"], "1"]
        assert json.dumps(event["data"]) in line, follow.stdout


def moment(event: dict[str, Any]) -> str:
    """An event's time as the tables show it: to the second."""
    shown = event["at"][:19] + "Z"
    assert TIME.match(shown)
    return shown


def test_watch_into_a_pipe_prints_each_change_on_one_line(service, receiver):
    job = failed(service, receiver, LONG_ID + "-watch")
    done = piped(service.url, "watch", job["id"])
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:3] for line in lines if line.startswith("job ")] == [
        ["job", job["id"], "failed"]
    ]
    assert f"error: {MESSAGE.strip()}" in [line.strip() for line in lines], done.stdout


def test_a_narrow_terminal_folds_other_columns_never_an_id_or_a_time(service, receiver):
    job = failed(service, receiver, LONG_ID + "-terminal")
    env = {"TETHER_URL": service.url, "COLUMNS": "40", "TTY_COMPATIBLE": "1"}
    env |= {"TETHER_API_TOKEN": None}  # type: ignore[dict-item]
    runner = CliRunner()
    listed = runner.invoke(main_group, ["list", "--state", "failed"], env=env)
    assert listed.exit_code == 0, listed.stderr
    assert job["id"] in ANSI.sub("", listed.stdout)
    got = runner.invoke(main_group, ["get", job["id"]], env=env)
    assert got.exit_code == 0, got.stderr
    found = {row[0]: row[1:] for row in rows(ANSI.sub("", got.stdout)) if len(row) == 2}
    for name in ("id", "created_at", "finished_at"):
        assert found[name] == [job[name]], got.stdout
    events = runner.invoke(main_group, ["events", job["id"]], env=env)
    assert events.exit_code == 0, events.stderr
    seqs = [row[:2] for row in rows(ANSI.sub("", events.stdout)) if len(row) >= 4]
    assert seqs[0] == ["seq", "at"]
    assert seqs[1:] and all(TIME.match(at) for _, at in seqs[1:]), events.stdout
