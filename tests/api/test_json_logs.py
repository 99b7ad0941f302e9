"""`TETHER_LOG_FORMAT=json`: one JSON object per record, on one line, with the
job's ids from the record's extras; `text` stays the readable default."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from resonate.error import PlatformError, ServerError

import api.logs
from api.cli import log_config
from api.logs import TEXT_FORMAT, JsonFormatter, Repeats, StaleLeases, TextFormatter, formatter
from tests.core.parts import logs_of


def record(msg: str, *args: Any, exc: bool = False, **extra: Any) -> logging.LogRecord:
    """A record as `logging.getLogger("tether").warning(msg, *args, extra=extra)` makes it."""
    exc_info = None
    if exc:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            exc_info = sys.exc_info()
    return logging.getLogger("tether").makeRecord(
        "tether", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra
    )


def test_a_line_is_one_json_object_with_the_jobs_ids_first():
    started = time.time()
    text = JsonFormatter().format(
        record(
            "job %s: trigger attempt %d failed\n(again in 1 s)",
            "j1",
            2,
            backend="http_webhook",
            promise_id="j1:1",
            job_id="j1",
            attempt=2,
            external={"run_id": 7},
            client=object(),  # not JSON: left out
        )
    )
    assert "\n" not in text
    line = json.loads(text)
    assert list(line) == [
        "ts",
        "level",
        "logger",
        "msg",
        "job_id",
        "promise_id",
        "backend",
        "attempt",
        "external",
    ]
    assert line["level"] == "WARNING" and line["logger"] == "tether"
    assert line["msg"] == "job j1: trigger attempt 2 failed\n(again in 1 s)"
    assert (line["job_id"], line["promise_id"], line["backend"]) == ("j1", "j1:1", "http_webhook")
    assert line["attempt"] == 2 and line["external"] == {"run_id": 7}
    assert line["ts"].endswith("Z")
    ts = datetime.fromisoformat(line["ts"])
    assert ts.tzinfo is not None and ts.utcoffset() == UTC.utcoffset(None)
    assert started - 0.01 <= ts.timestamp() <= time.time()


def test_a_line_without_extras_has_the_four_keys_and_an_exception_its_traceback():
    plain = json.loads(JsonFormatter().format(record("store opened")))
    assert list(plain) == ["ts", "level", "logger", "msg"]
    failed = json.loads(JsonFormatter().format(record("close failed", exc=True, job_id="j2")))
    assert failed["job_id"] == "j2"
    assert failed["exc"].startswith("Traceback (most recent call last):")
    assert failed["exc"].rstrip().endswith("ZeroDivisionError: division by zero")


def test_extras_never_replace_the_lines_own_keys():
    line = json.loads(JsonFormatter().format(record("real", level="fake", _private="x")))
    assert line["level"] == "WARNING" and line["msg"] == "real"
    assert "_private" not in line


def test_the_time_written_once_a_second_is_the_time_each_record_has(monkeypatch):
    """The formatters write a second's text once and reuse it: each line's
    time is still its record's, to the millisecond, across seconds and back
    (a clock set back), the text as the standard formatter writes it and
    the JSON `ts` in UTC."""
    text, ours, as_json = logging.Formatter(TEXT_FORMAT), TextFormatter(), JsonFormatter()
    base = 1_764_901_800  # 2025-12-05 02:30:00 UTC
    for ms in (123, 987, 999, 1_000, 1_004, 2_500, 500, 61_000, 3_600_001):
        monkeypatch.setattr(time, "time", lambda ms=ms: base + ms / 1000)
        # a LogRecord's time comes from time_ns since Python 3.13
        monkeypatch.setattr(time, "time_ns", lambda ms=ms: (base * 1000 + ms) * 1_000_000)
        rec = record("job %s accepted", "j1")
        assert ours.format(rec) == text.format(rec)
        second = datetime.fromtimestamp(base + ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        # the record's milliseconds, as the text line has them (a float's
        # 0.123 may be 122 of them: the line and the JSON agree)
        assert abs(rec.msecs - ms % 1000) <= 1
        assert json.loads(as_json.format(rec))["ts"] == f"{second}.{int(rec.msecs):03d}Z"
        assert text.format(rec).split(" ")[1].endswith(f",{int(rec.msecs):03d}")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_formatter_plugs_into_dict_config(log_format):
    stream = io.StringIO()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": formatter(log_format)},
            "handlers": {
                "out": {"class": "logging.StreamHandler", "formatter": "plain", "stream": stream}
            },
            "loggers": {
                "tether.test_json_logs": {"handlers": ["out"], "level": "INFO", "propagate": False}
            },
        }
    )
    logger = logging.getLogger("tether.test_json_logs")
    try:
        logger.info("job %s accepted", "j3", extra={"job_id": "j3", "backend": "http_webhook"})
    finally:
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
    out = stream.getvalue()
    if log_format == "text":
        assert formatter("text") == {"()": TextFormatter}
        assert out.endswith(" INFO tether.test_json_logs: job j3 accepted\n")
    else:
        line = json.loads(out)
        assert line["msg"] == "job j3 accepted" and line["job_id"] == "j3"
        assert line["logger"] == "tether.test_json_logs" and line["level"] == "INFO"


def sdk_exception(error: Exception) -> logging.LogRecord:
    """The record resonate-sdk's core logs (`logger.exception`) when a durable
    op of a task fails with `error`, wrapped as the SDK wraps it."""
    try:
        try:
            raise error
        except ServerError as exc:
            raise PlatformError([exc]) from exc
    except PlatformError:
        info = sys.exc_info()
    message = "core: execution failed, releasing task task_id=%s promise_id=%s"
    return logging.getLogger("resonate.core").makeRecord(
        "resonate.core", logging.ERROR, __file__, 1, message, ("j", "j"), info
    )


def test_the_sdks_traceback_for_a_task_it_no_longer_holds_is_one_warning():
    # A process that stalled past the task's lease: another took the workflow over.
    stale = sdk_exception(ServerError(409, "conflict: task j is fulfilled, not acquired (100%)"))
    assert StaleLeases().filter(stale)
    assert (stale.levelno, stale.levelname, stale.exc_info) == (logging.WARNING, "WARNING", None)
    assert stale.getMessage() == (
        "core: execution failed, releasing task task_id=j promise_id=j (the task had passed"
        " to another process: server error (code=409): conflict: task j is fulfilled, not"
        " acquired (100%))"
    )
    assert "Traceback" not in logging.Formatter(TEXT_FORMAT).format(stale)

    # any other fault as it was: another error, a 409 beside another, another line
    both = sdk_exception(ServerError(409, "conflict"))
    assert both.exc_info is not None and isinstance(both.exc_info[1], PlatformError)
    both.exc_info[1].causes.append(ServerError(500, "boom"))
    elsewhere = sdk_exception(ServerError(409, "conflict"))
    elsewhere.msg = "core: something else task_id=%s promise_id=%s"
    for kept in (sdk_exception(ServerError(500, "boom")), record("x", exc=True), both, elsewhere):
        level, info = kept.levelno, kept.exc_info
        assert StaleLeases().filter(kept)
        assert (kept.levelno, kept.exc_info) == (level, info)

    # a release that failed otherwise while the 409 was handled: its own fault
    try:
        try:
            raise ServerError(409, "conflict")
        except ServerError:
            raise ConnectionRefusedError("the server is gone") from None
    except ConnectionRefusedError:
        info = sys.exc_info()
    release = logging.getLogger("resonate.core").makeRecord(
        "resonate.core", logging.ERROR, __file__, 1, "core: failed to release task", (), info
    )
    assert release.exc_info is not None and release.exc_info[1] is not None
    assert isinstance(release.exc_info[1].__context__, ServerError)
    assert StaleLeases().filter(release) and release.levelno == logging.ERROR


def test_the_service_logs_through_the_stale_lease_filter():
    config = log_config("INFO")
    assert config["filters"]["stale"] == {"()": StaleLeases}
    assert "stale" in config["handlers"]["stderr"]["filters"]


def test_the_sdks_background_409_is_a_warning_and_other_failures_stay_errors():
    def background(cause: Exception) -> logging.LogRecord:
        return logging.getLogger("resonate.observability").makeRecord(
            "resonate.observability",
            logging.ERROR,
            __file__,
            1,
            "background task failed: %s",
            (cause,),
            None,
        )

    stale = background(ServerError(409, "conflict: task h1 is acquired, not pending"))
    assert StaleLeases().filter(stale)
    assert (stale.levelno, stale.levelname) == (logging.WARNING, "WARNING")
    assert stale.getMessage().endswith("(the task had passed to another process)")
    other = background(ServerError(500, "boom"))
    assert StaleLeases().filter(other)
    assert other.levelno == logging.ERROR and other.getMessage().endswith("boom")
    # as the SDK itself logs it: the cause as text (a Postgres soak found it at ERROR)
    from resonate.observability import BackgroundTaskFailed, logging_observer

    for cause, level in [
        (ServerError(409, "conflict"), logging.WARNING),
        (ServerError(500, "x"), logging.ERROR),
    ]:
        with logs_of("resonate.observability") as logs:
            logging_observer(BackgroundTaskFailed(cause=str(cause)))
        [record] = logs.records
        assert StaleLeases().filter(record)
        assert record.levelno == level, record.getMessage()


def test_the_sdks_reconnect_warnings_are_shown_once_a_minute_with_a_count(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(api.logs.time, "monotonic", lambda: now[0])
    repeats = Repeats()

    def failed() -> logging.LogRecord:
        return logging.getLogger("resonate.connections.sse").makeRecord(
            "resonate.connections.sse",
            logging.WARNING,
            __file__,
            1,
            "SSE connection failed, retrying (backoff=%ss): %s",
            (5.0, "refused"),
            None,
        )

    shown = []
    for _ in range(13):  # every 5 s for a minute and a bit
        line = failed()
        if repeats.filter(line):
            shown.append(line.getMessage())
        now[0] += 5.0
    assert shown == [
        "SSE connection failed, retrying (backoff=5.0s): refused",
        "SSE connection failed, retrying (backoff=5.0s): refused"
        " (11 more like it in the last 60 s)",
    ]
    other = logging.getLogger("tether").makeRecord(
        "tether", logging.WARNING, __file__, 1, "x", (), None
    )
    assert all(repeats.filter(other) for _ in range(3))  # other lines pass as they are


def test_the_postgres_pumps_timer_failures_are_shown_once_a_minute_with_a_count(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(api.logs.time, "monotonic", lambda: now[0])
    repeats = Repeats()
    said = (
        "resonate.process_timeouts() failed (%s): task leases and promise timeouts"
        " wait for the next drain that runs it; messages are still delivered"
    )
    shown = []
    for n in range(250):  # four drains a second for a minute and a bit
        error = "AdminShutdown" if n == 0 else "QueryCanceled"
        line = record(said, error)
        if repeats.filter(line):
            shown.append(line.getMessage())
        now[0] += 0.25
    assert shown == [
        said % "AdminShutdown",
        said % "QueryCanceled" + " (239 more like it in the last 60 s)",
    ]


def test_a_postgres_pools_connection_attempts_are_shown_once_a_minute_with_a_count(monkeypatch):
    """While Postgres is down each pool tries to connect every few seconds
    (`core.store.postgres.RECONNECT_SPAN`), each try a psycopg_pool warning."""
    now = [1000.0]
    monkeypatch.setattr(api.logs.time, "monotonic", lambda: now[0])
    repeats = Repeats()
    pool = logging.getLogger("psycopg.pool")
    lines = [
        ("error connecting in %r: %s", ("pool-1", "connection refused")),
        ("reconnection attempt in pool %r failed after %s sec", ("pool-1", 10.0)),
    ]
    shown = []
    for _ in range(31):  # every 2 s for a minute and a bit
        for msg, args in lines:
            line = pool.makeRecord("psycopg.pool", logging.WARNING, __file__, 1, msg, args, None)
            if repeats.filter(line):
                shown.append(line.getMessage())
        now[0] += 2.0
    assert shown == [
        "error connecting in 'pool-1': connection refused",
        "reconnection attempt in pool 'pool-1' failed after 10.0 sec",
        "error connecting in 'pool-1': connection refused (29 more like it in the last 60 s)",
        "reconnection attempt in pool 'pool-1' failed after 10.0 sec"
        " (29 more like it in the last 60 s)",
    ]


def test_a_full_disks_store_errors_are_shown_once_a_minute_with_a_count(monkeypatch):
    """With the disk full, the embedded store's pump logged its failure 20
    times a second a worker, and the notifier each poll: over a thousand lines
    a minute, on a disk the log may share (found by a QA pass)."""
    now = [1000.0]
    monkeypatch.setattr(api.logs.time, "monotonic", lambda: now[0])
    repeats = Repeats()
    lines = [
        ("resonate_sqlite.connection", "sqlite store: pump failed: %s", "database or disk is full"),
        ("tether.notify", "notifications: the store did not answer: %s", "StoreUnavailable"),
    ]
    shown = []
    for n in range(1210):  # every 0.05 s for a minute and a bit
        now[0] = 1000.0 + n / 20
        for name, msg, arg in lines:
            line = logging.getLogger(name).makeRecord(
                name, logging.WARNING, __file__, 1, msg, (arg,), None
            )
            if repeats.filter(line):
                shown.append(line.getMessage())
    assert shown == [
        "sqlite store: pump failed: database or disk is full",
        "notifications: the store did not answer: StoreUnavailable",
        "sqlite store: pump failed: database or disk is full (1199 more like it in the last 60 s)",
        "notifications: the store did not answer: StoreUnavailable"
        " (1199 more like it in the last 60 s)",
    ]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_log_output_nobody_reads_holds_up_nothing_and_what_was_dropped_is_said(as_json):
    """A stream handler wrote from the event loop: with stderr a pipe nobody
    read, the service stopped answering once the pipe was full (found by a
    QA pass). Lines go through a bounded queue to a writer thread; past it
    they are dropped, and the writer says how many once it writes again, in
    the process's own format (it was plain text among JSON lines)."""
    import re
    import threading

    class Stuck(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.go = threading.Event()

        def write(self, text: str) -> int:
            self.go.wait(10)
            return super().write(text)

    out = Stuck()
    lines = api.logs.LogQueue(out, size=3)
    lines.setFormatter(JsonFormatter() if as_json else TextFormatter())
    logger = logging.getLogger("tether.test_log_queue")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(lines)
    try:
        began = time.monotonic()
        for n in range(10):
            logger.info("line %d", n)
        assert time.monotonic() - began < 1.0  # none waited for the stream
        assert lines.dropped >= 5
        out.go.set()
        for _ in range(100):  # the writer catches up
            if lines.held == 0:
                break
            time.sleep(0.01)
        logger.info("after")
        lines.flush_and_stop()
    finally:
        logger.removeHandler(lines)
    written = out.getvalue().splitlines()
    if as_json:
        written = [json.loads(line)["msg"] for line in written]
    assert any(line.endswith("line 0") for line in written)  # queued before it was full
    assert written[-1].endswith("after")
    # (one notice, or two: the writer may take line 0 only once some were dropped)
    told = [re.search(r"(\d+) log line\(s\) dropped", line) for line in written]
    counts = [int(found[1]) for found in told if found is not None]
    assert 1 <= len(counts) <= 2
    assert sum(counts) == 10 - sum("line " in line for line in written)


def test_logging_configured_again_does_not_wait_on_the_writer() -> None:
    """`logging.shutdown` (at exit, and when `dictConfig` replaces the
    handlers) flushes each handler holding its lock; the writer took that
    lock too, so each waited for the other's bound: every `tether serve`
    took 4 s more to start (found by a CI run)."""
    out = io.StringIO()
    lines = api.logs.LogQueue(out)
    lines.setFormatter(TextFormatter())
    record = logging.LogRecord("tether", logging.INFO, __file__, 0, "before", None, None)
    lines.handle(record)
    began = time.monotonic()
    lines.acquire()  # as logging.shutdown does
    try:
        lines.flush()
        lines.close()
    finally:
        lines.release()
    assert time.monotonic() - began < 1.0
    assert out.getvalue().endswith("tether: before\n")


@pytest.mark.parametrize("written", ["json", "JSON", "Json"])
def test_the_log_format_is_read_in_any_case_as_the_log_level_is(written: str):
    """`TETHER_LOG_FORMAT=JSON` was refused ("Invalid enum value 'JSON'"), where
    `TETHER_LOG_LEVEL` takes any case (a QA pass, 2026-12-06)."""
    from core.settings import Settings

    assert Settings.from_env({"TETHER_LOG_FORMAT": written}).log_format == "json"
