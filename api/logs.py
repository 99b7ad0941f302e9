"""How log lines look: readable text by default, or with `TETHER_LOG_FORMAT=json`
one JSON object per line for log collectors.

A JSON line holds `ts` (ISO-8601, UTC, milliseconds), `level`, `logger`,
`msg`, then the record's extra attributes (`log.info(..., extra={"job_id":
...})`): `job_id`, `promise_id` and `backend` first where a call passes them,
others as long as they encode as JSON; then `exc` (the traceback) and `stack`
when the record has them. Nothing is taken out of the message: secrets are
never put in log messages in the first place.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec
from resonate.error import ResonateError, ServerError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

FIRST_EXTRAS = ("job_id", "promise_id", "backend")
"""Extras that tie a line to a job, shown right after the message."""

STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
"""A record's own attributes: what is not among them came as an extra."""

_encode = msgspec.json.encode


class _Seconds:
    """A record's time to the second, written once a second: `time.strftime`
    and the time-zone lookup behind it took about 3% of a served `GET
    /jobs/{id}` (py-spy, 2026-12-05), and a job writes seven lines. The
    milliseconds are the record's own (`msecs`). Formatters run under their
    handler's lock; the second and its text are kept as one tuple."""

    def __init__(self, write: Callable[[float], str]) -> None:
        self._write = write
        self._last: tuple[int, str] = (-1, "")

    def __call__(self, created: float) -> str:
        second = int(created)
        last = self._last
        if last[0] != second:
            last = self._last = (second, self._write(second))
        return last[1]


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, its time as the standard formatter writes it
    (`2026-12-05 02:30:00,123`, local time)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = _Seconds(
            lambda second: time.strftime(self.default_time_format, self.converter(second))
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        return f"{self._second(record.created)},{int(record.msecs):03d}"


def _utc(second: float) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._second = _Seconds(_utc)

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": f"{self._second(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extras = {k: v for k, v in record.__dict__.items() if k not in STANDARD}
        for name in (*(n for n in FIRST_EXTRAS if n in extras), *sorted(extras)):
            if name in line or name.startswith("_"):
                continue
            try:
                line[name] = msgspec.Raw(_encode(extras[name]))
            except (TypeError, ValueError, OverflowError):
                continue  # not JSON: left out rather than guessed at
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return _encode(line).decode()


class StaleLeases(logging.Filter):
    """The SDK's ERROR lines with a traceback for a task its server says this
    process no longer holds (409 conflict: a process that stalled past the
    task's lease while another took the workflow over) as one WARNING line:
    nothing failed, the work goes on elsewhere, and an operator reading four
    tracebacks a job would look for a fault."""

    MESSAGES = ("core: execution failed, releasing task", "core: failed to release task")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "resonate.observability" and record.levelno >= logging.ERROR:
            return self._background(record)
        if record.name != "resonate.core" or not record.exc_info or record.levelno < logging.ERROR:
            return True
        if not str(record.msg).startswith(self.MESSAGES):
            return True
        errors = [e for e in _causes(record.exc_info[1]) if isinstance(e, ResonateError)]
        conflict = errors[0] if errors and all(_is_conflict(e) for e in errors) else None
        if conflict is not None:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            said = str(conflict).replace("%", "%%")
            record.msg = f"{record.msg} (the task had passed to another process: {said})"
            record.exc_info = record.exc_text = None
        return True

    @staticmethod
    def _background(record: logging.LogRecord) -> bool:
        """The SDK's `background task failed: <cause>` for a task its server
        gave another process (409 conflict, after a stall or an outage longer
        than the lease), as a WARNING saying so."""
        cause = record.args[0] if isinstance(record.args, tuple) and record.args else None
        # resonate-sdk 0.8 hands the cause over as its text (`BackgroundTaskFailed`:
        # `server error (code=409): ...`), not the exception: a Postgres soak found
        # the 409 logged at ERROR all the same
        conflict = (isinstance(cause, BaseException) and _is_conflict(cause)) or (
            isinstance(cause, str) and cause.startswith(CONFLICT_SAID)
        )
        if conflict and str(record.msg).startswith("background task failed"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"{record.msg} (the task had passed to another process)"
        return True


class Repeats(logging.Filter):
    """Warnings that repeat while something outside stays broken: the SDK's
    each time its message stream from a Resonate server fails to connect
    again (every 5 s per worker while the server is down: thousands an
    hour), the Postgres store's each time its message pump's timers fail
    (four times a second, `core.store.postgres.PgConnection`), each time
    a pool fails to connect (`psycopg.pool`), and the embedded store's pump
    and the notifier while it cannot write (a full disk): the
    first, then at most one each `EVERY` seconds, saying how many like it
    were left out."""

    EVERY = 60.0
    MESSAGES: ClassVar[dict[str, tuple[str, ...]]] = {
        "resonate.connections.sse": ("SSE connection failed, retrying", "SSE endpoint returned"),
        "tether": ("resonate.process_timeouts() failed",),
        # A Postgres pool's each connection attempt while the server is down
        # (`core.store.postgres.RECONNECT_SPAN`: one every few seconds a pool).
        "psycopg.pool": ("error connecting in", "reconnection attempt in pool"),
        # While the embedded store cannot write (a full disk): the pump's each
        # round (20 a second a worker) and the notifier's each poll, which
        # filled the log (and a disk it shares) faster than anything else.
        "resonate_sqlite.connection": ("sqlite store: pump failed",),
        "tether.notify": ("notifications: the store did not answer",),
    }
    """The lines thinned: their logger, and how their message starts."""

    def __init__(self) -> None:
        super().__init__()
        self._shown: dict[str, float] = {}
        self._left: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if not message.startswith(self.MESSAGES.get(record.name, ())):
            return True
        now = time.monotonic()
        shown = self._shown.get(message)
        if shown is not None and now - shown < self.EVERY:
            self._left[message] = self._left.get(message, 0) + 1
            return False
        self._shown[message] = now
        left = self._left.pop(message, 0)
        if left:
            record.msg = f"{message} ({left} more like it in the last {self.EVERY:g} s)"
        return True


CONFLICT_SAID = str(ServerError(409, ""))[: -len(": ")]
"""How a 409 `ServerError` begins as text: `server error (code=409)`."""


def _is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ServerError) and exc.code == 409


def _causes(exc: BaseException | None) -> list[BaseException]:
    """`exc`, what it was raised from, and a platform error's causes (not what
    it was raised while handling: a release that failed otherwise while a 409
    was handled is a fault of its own)."""
    found: list[BaseException] = []
    todo = [exc]
    while todo:
        now = todo.pop()
        if now is None or any(now is seen for seen in found):
            continue
        found.append(now)
        todo += [now.__cause__, *getattr(now, "causes", [])]
    return found


def lean_records() -> None:
    """Make log records without what no format here shows: the caller's file
    and line (a walk up the stack for each line), the thread, process and
    asyncio task names. The logging HOWTO's "Optimization" section lists these
    switches. About 5 us a line, and a job logs 7 or so (access lines included).
    Called in each process that serves: a spawned worker does not inherit it."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # 3.12; typeshed lags


def formatter(log_format: str) -> dict[str, Any]:
    """The `logging.config.dictConfig` formatter for `TETHER_LOG_FORMAT`
    (`text` or `json`)."""
    if log_format == "json":
        return {"()": JsonFormatter}
    return {"()": TextFormatter}


LOG_QUEUE = 5000
"""Log lines a process holds for its writer thread at most; past that, lines
are dropped (and counted) rather than wait."""
LOG_FLUSH_WAIT = 2.0
"""Seconds a process that ends waits for its writer thread to write what it
holds."""


class LogQueue(logging.Handler):
    """The service's log handler: formats each line where it is logged and
    hands it to a writer thread, which writes what has gathered to `stream`
    (stderr) in one call. Past `size` lines not yet written, a line is
    dropped, and the writer says how many were once it writes again. (A
    plain stream handler wrote from the event loop: with stderr a pipe
    nobody read, a stuck log shipper, the first write past the pipe's 64 KB
    blocked the loop, and the service answered nothing until the reader came
    back; found by a QA pass.) At exit it waits `LOG_FLUSH_WAIT` at most for
    what it holds.

    Logging's own queue handler cost twice a stream handler's CPU a line (a
    copy of each record, a `queue.Queue`'s locks, a write a line): lines go
    as text through a `SimpleQueue`, counted by two counters each written
    by one side alone."""

    def __init__(self, stream: Any = None, size: int = LOG_QUEUE) -> None:
        super().__init__()
        self.stream = sys.stderr if stream is None else stream
        self.size = size
        self.dropped = 0
        """Lines dropped since the writer last said so."""
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._counting = threading.Lock()
        """`emit`'s and the writer's, for `dropped` and the formatter."""
        self._queued = 0  # lines handed to the writer (`emit`)
        self._written = 0  # lines it wrote, or gave up writing (the writer)
        self._thread: threading.Thread | None = threading.Thread(
            target=self._write, name="tether-log-writer", daemon=True
        )
        self._thread.start()
        atexit.register(self.flush_and_stop)

    @property
    def held(self) -> int:
        """Lines handed to the writer and not yet written."""
        return self._queued - self._written

    def emit(self, record: logging.LogRecord) -> None:
        with self._counting:
            if self.held >= self.size:
                self.dropped += 1
                return
            try:
                line = self.format(record)
            except Exception:
                self.handleError(record)
                return
            self._queued += 1
        self._lines.put(line)

    def _write(self) -> None:
        """The writer thread: what has gathered, in one write (a stream
        that fails drops it: nowhere to say anything), until `None`."""
        while True:
            batch = [self._wait()]
            while len(batch) < WRITE_BATCH:
                try:
                    batch.append(self._lines.get_nowait())
                except queue.Empty:
                    break
            ending = None in batch
            lines = [line for line in batch if line is not None]
            # Not the handler's own lock: `logging.shutdown` (at exit, and
            # when logging is configured again) holds it while it flushes,
            # and the flush waits for this thread (each start of `tether
            # serve` waited 4 s so: found by a CI run).
            with self._counting:  # (the count, and the formatter's cache)
                dropped, self.dropped = self.dropped, 0
                if dropped:  # in the process's own format (JSON with TETHER_LOG_FORMAT=json)
                    lines.insert(0, self.format(_dropped_notice(dropped)))
            if lines:
                try:
                    self.stream.write("\n".join(lines) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):  # a pipe gone
                    pass
            self._written += len(batch) - ending
            if ending:
                return

    def _wait(self) -> str | None:
        """The writer's wait for a line: a frame of its own, so that a
        sampling profiler (bench/_profile.py) can tell it from the writing."""
        return self._lines.get()

    def flush(self) -> None:
        """Wait until the writer has written what was handed to it before,
        for `LOG_FLUSH_WAIT` at most (a process that ends by its own signal,
        as uvicorn's does after a graceful stop, runs no exit handler)."""
        target = self._queued
        until = time.monotonic() + LOG_FLUSH_WAIT
        while (
            self._thread is not None
            and self._thread.is_alive()
            and self._written < target
            and time.monotonic() < until
        ):
            time.sleep(0.005)

    def close(self) -> None:  # logging configured again, or at exit
        self.flush_and_stop()
        super().close()

    def flush_and_stop(self) -> None:
        """Let the writer write what it holds, for `LOG_FLUSH_WAIT` at most."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._lines.put(None)
        thread.join(LOG_FLUSH_WAIT)


def flush_logs() -> None:
    """Write what the process's log handlers hold (a `LogQueue`'s writer
    thread), before the process ends in a way that runs no exit handler."""
    for handler in logging.getLogger().handlers:
        handler.flush()


WRITE_BATCH = 512
"""Lines the writer gathers into one write at most."""


def _dropped_notice(dropped: int) -> logging.LogRecord:
    return logging.LogRecord(
        "tether",
        logging.WARNING,
        __file__,
        0,
        "%d log line(s) dropped: the log output was not read (a full pipe?) and the"
        " service went on without them",
        (dropped,),
        None,
    )
