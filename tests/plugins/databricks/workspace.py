"""A fake Databricks workspace: a real HTTP server on 127.0.0.1 speaking the part
of the Jobs 2.2 API that the databricks-sdk `WorkspaceClient` uses for Tether.

- `GET /.well-known/databricks-config` → 404 (the SDK warns and goes on);
- `POST /api/2.2/jobs/run-now`, `POST /api/2.2/jobs/runs/submit` → a new run,
  or the existing one for a known `idempotency_token`;
- `GET /api/2.2/jobs/runs/get` → the run with both `state` (deprecated) and
  `status`;
- `POST /api/2.2/jobs/runs/cancel` → the run ends `USER_CANCELED`.

Every `/api/` request needs `Authorization: Bearer <token>`. Faults are queued
per path: an error status (with `Retry-After`), a dropped answer (the run is
created, then the connection closes unanswered), a held answer (the run is
created, then the request hangs until released, then closes unanswered).

Each run is played by a *notebook*, a function run in a thread: by default the
repository's `examples/databricks_notebook.py`, executed with a stub `dbutils`
whose widgets are the run's parameters and a stub `spark`.
"""

from __future__ import annotations

import itertools
import json
import runpy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_NOTEBOOK = ROOT / "examples" / "databricks_notebook.py"

TOKEN = "dapi0123456789abcdef0123456789abcdef"


# ── runs ─────────────────────────────────────────────────────────────────────

TERMINAL = {
    # termination code: (life_cycle_state, result_state, termination type)
    "SUCCESS": ("TERMINATED", "SUCCESS", "SUCCESS"),
    "USER_CANCELED": ("TERMINATED", "CANCELED", "SUCCESS"),
    "RUN_EXECUTION_ERROR": ("INTERNAL_ERROR", "FAILED", "CLIENT_ERROR"),
    "SKIPPED": ("SKIPPED", None, "SUCCESS"),
    "DRIVER_ERROR": ("INTERNAL_ERROR", "FAILED", "INTERNAL_ERROR"),
}


@dataclass
class Run:
    run_id: int
    job_id: int | None
    run_name: str
    parameters: dict[str, str]
    notebook: str
    token: str | None
    status: str = "QUEUED"
    code: str | None = None
    message: str = ""
    ended: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        with self.lock:
            if self.status in ("QUEUED", "PENDING"):
                self.status = "RUNNING"

    def end(self, code: str, message: str = "") -> bool:
        """End the run unless it already ended (the first ending stays)."""
        with self.lock:
            if self.status == "TERMINATED":
                return False
            self.status, self.code, self.message = "TERMINATED", code, message
        self.ended.set()
        return True

    def as_json(self, base_url: str) -> dict[str, Any]:
        with self.lock:
            status, code, message = self.status, self.code, self.message
        if status == "TERMINATED":
            life_cycle, result_state, kind = TERMINAL.get(
                code or "", ("TERMINATED", "FAILED", "CLIENT_ERROR")
            )
        else:
            life_cycle, result_state, kind = status, None, None
        state: dict[str, Any] = {"life_cycle_state": life_cycle, "state_message": message}
        if result_state:
            state["result_state"] = result_state
        run_status: dict[str, Any] = {"state": status}
        if status == "TERMINATED":
            run_status["termination_details"] = {"code": code, "type": kind, "message": message}
        body: dict[str, Any] = {
            "run_id": self.run_id,
            "number_in_job": self.run_id,
            "run_name": self.run_name,
            "run_type": "JOB_RUN" if self.job_id else "SUBMIT_RUN",
            "run_page_url": f"{base_url}/?o=1#job/{self.job_id or 0}/run/{self.run_id}",
            "state": state,
            "status": run_status,
            "job_parameters": [{"name": k, "value": v} for k, v in self.parameters.items()],
        }
        if self.job_id:
            body["job_id"] = self.job_id
        return body


@dataclass
class Job:
    job_id: int
    name: str
    parameters: dict[str, str]
    """Defined job parameters and their defaults."""
    notebook: str


@dataclass
class Fault:
    method: str
    path: str
    kind: str  # "status", "drop", "hold" or "delay"
    times: int = 1
    status: int = 500
    error_code: str = ""
    message: str = ""
    retry_after: int | None = None
    skip: int = 0
    """Let this many matching requests pass first."""
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    authorized: bool
    at: float = field(default_factory=time.monotonic)


# ── notebooks: what a run does ───────────────────────────────────────────────


class NotebookExit(BaseException):
    """What `dbutils.notebook.exit` raises here (Databricks also stops the cell by
    raising), so the notebook must call it outside `try/except Exception`."""

    def __init__(self, value: str) -> None:
        super().__init__(value)
        self.value = value


class _Widgets:
    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self._defaults: dict[str, str] = {}

    def text(self, name: str, default: str = "", label: str | None = None) -> None:
        self._defaults[name] = default

    def get(self, name: str) -> str:
        if name in self._values:
            return self._values[name]
        if name in self._defaults:
            return self._defaults[name]
        raise ValueError(f"InputWidgetNotDefined: no widget named {name}")


class _Notebook:
    def exit(self, value: str) -> None:
        raise NotebookExit(value)


class StubDbutils:
    def __init__(self, parameters: dict[str, str]) -> None:
        self.widgets = _Widgets(parameters)
        self.notebook = _Notebook()


class AnalysisException(Exception):
    pass


class StubSpark:
    def __init__(self, tables: dict[str, int]) -> None:
        self.tables = tables

    def table(self, name: str) -> Any:
        if name not in self.tables:
            raise AnalysisException(
                f"[TABLE_OR_VIEW_NOT_FOUND] The table or view `{name}` cannot be found."
            )
        rows = self.tables[name]

        class _Frame:
            def count(self) -> int:
                return rows

        return _Frame()


Notebook = Callable[["FakeWorkspace", Run], None]


def example_notebook(ws: FakeWorkspace, run: Run) -> None:
    """Runs examples/databricks_notebook.py as Databricks would run its cell."""
    run.start()
    ws.exits[run.run_id] = None
    try:
        runpy.run_path(
            str(EXAMPLE_NOTEBOOK),
            init_globals={"dbutils": StubDbutils(run.parameters), "spark": StubSpark(ws.tables)},
        )
    except NotebookExit as done:
        ws.exits[run.run_id] = done.value
        run.end("SUCCESS")
    except Exception as exc:
        run.end("RUN_EXECUTION_ERROR", f"Workload failed: {type(exc).__name__}: {exc}")
    else:
        run.end("SUCCESS")


def silent(code: str = "SUCCESS", message: str = "", after: float = 0.2) -> Notebook:
    """A run that ends with `code` after `after` seconds and never calls back."""

    def play(ws: FakeWorkspace, run: Run) -> None:
        run.start()
        if not run.ended.wait(after):
            run.end(code, message)

    return play


def hang(ws: FakeWorkspace, run: Run) -> None:
    """A run that goes on until it is canceled or `FakeWorkspace.end` ends it."""
    run.start()
    run.ended.wait(120)


# ── the workspace ────────────────────────────────────────────────────────────


class FakeWorkspace:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.jobs: dict[int, Job] = {}
        self.runs: dict[int, Run] = {}
        self.tokens: dict[str, int] = {}
        self.notebooks: dict[str, Notebook] = {"example": example_notebook}
        self.tables: dict[str, int] = {"main.sales.orders": 42}
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self.exits: dict[int, str | None] = {}
        self.echo_credentials = False
        """When set, an auth failure echoes the credentials it got (as a careless
        proxy might), to prove Tether scrubs them."""
        self.lock = threading.Lock()
        self._ids = itertools.count(1001)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FakeWorkspace:
        self._thread.start()
        return self

    def stop(self) -> None:
        for fault in self.faults:
            fault.release.set()
        for run in list(self.runs.values()):
            run.end("USER_CANCELED", "the fake workspace stopped")
        self._server.shutdown()
        self._server.server_close()

    # ── set-up and inspection ───────────────────────────────────────────────

    def add_job(
        self,
        job_id: int,
        notebook: str = "example",
        parameters: dict[str, str] | None = None,
        tether_parameters: bool = True,
    ) -> Job:
        """A job whose one notebook task is `notebook`; with `tether_parameters`
        it defines Tether's parameters (as docs/databricks.md says to)."""
        defined = dict(parameters or {"table": ""})
        if tether_parameters:
            defined |= {"tether_callback_url": "", "tether_promise_id": "", "tether_job_id": ""}
        job = Job(job_id, f"job-{job_id}", defined, notebook)
        self.jobs[job_id] = job
        return job

    def fail(
        self,
        path: str,
        status: int,
        error_code: str = "",
        message: str = "",
        *,
        times: int = 1,
        retry_after: int | None = None,
        method: str = "POST",
    ) -> Fault:
        fault = Fault(method, path, "status", times, status, error_code, message, retry_after)
        self.faults.append(fault)
        return fault

    def drop(self, path: str, times: int = 1) -> Fault:
        fault = Fault("POST", path, "drop", times)
        self.faults.append(fault)
        return fault

    def hold(self, path: str) -> Fault:
        fault = Fault("POST", path, "hold", 1)
        self.faults.append(fault)
        return fault

    def delay(self, path: str, method: str = "GET") -> Fault:
        """The next answer on `path` is computed, then held until `release`."""
        fault = Fault(method, path, "delay", 1)
        self.faults.append(fault)
        return fault

    def calls(self, path: str, method: str = "POST") -> list[Seen]:
        return [s for s in self.seen if s.path == path and s.method == method]

    def only_run(self) -> Run:
        assert len(self.runs) == 1, f"expected one run, got {sorted(self.runs)}"
        return next(iter(self.runs.values()))

    def end(self, run_id: int, code: str, message: str = "") -> None:
        self.runs[run_id].end(code, message)

    # ── the API ─────────────────────────────────────────────────────────────

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.path == path and fault.times > 0:
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.times -= 1
                    return fault
        return None

    def _new_run(
        self,
        token: str | None,
        job_id: int | None,
        name: str,
        parameters: dict[str, str],
        notebook: str,
    ) -> tuple[Run, bool]:
        with self.lock:
            if token and token in self.tokens:
                return self.runs[self.tokens[token]], False
            run = Run(next(self._ids), job_id, name, parameters, notebook, token)
            self.runs[run.run_id] = run
            if token:
                self.tokens[token] = run.run_id
        play = self.notebooks.get(notebook, hang)
        threading.Thread(target=play, args=(self, run), daemon=True).start()
        return run, True

    def run_now(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        job = self.jobs.get(body.get("job_id"))  # type: ignore[arg-type]
        if job is None:
            return 404, _error(
                "RESOURCE_DOES_NOT_EXIST", f"Job {body.get('job_id')} does not exist."
            )
        given = body.get("job_parameters") or {}
        unknown = sorted(set(given) - set(job.parameters))
        if unknown:
            return 400, _error(
                "INVALID_PARAMETER_VALUE",
                f"Job parameters {unknown} are not defined in job {job.job_id}.",
            )
        parameters = {**job.parameters, **given}
        run, _ = self._new_run(
            body.get("idempotency_token"), job.job_id, job.name, parameters, job.notebook
        )
        return 200, {"run_id": run.run_id, "number_in_job": run.run_id}

    def submit(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        tasks = body.get("tasks") or []
        if not tasks:
            return 400, _error("INVALID_PARAMETER_VALUE", "A one-time run needs tasks.")
        notebook_task = tasks[0].get("notebook_task") or {}
        run, _ = self._new_run(
            body.get("idempotency_token"),
            None,
            body.get("run_name") or "Untitled",
            dict(notebook_task.get("base_parameters") or {}),
            notebook_task.get("notebook_path", ""),
        )
        return 200, {"run_id": run.run_id}

    def get_run(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        run_id = int(query.get("run_id", ["0"])[0])
        run = self.runs.get(run_id)
        if run is None:
            return 400, _error("INVALID_PARAMETER_VALUE", f"Run {run_id} does not exist.")
        return 200, run.as_json(self.url)

    def me(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """`current_user.me`: who the credentials belong to."""
        return 200, {"id": "1", "userName": "tether@example.com"}

    def cancel_run(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        run = self.runs.get(body.get("run_id"))  # type: ignore[arg-type]
        if run is None:
            return 400, _error(
                "INVALID_PARAMETER_VALUE", f"Run {body.get('run_id')} does not exist."
            )
        run.end("USER_CANCELED", "Run cancelled by user.")
        return 200, {}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error_code": code, "message": message}


ROUTES = {
    ("POST", "/api/2.2/jobs/run-now"): "run_now",
    ("POST", "/api/2.2/jobs/runs/submit"): "submit",
    ("POST", "/api/2.2/jobs/runs/cancel"): "cancel_run",
    ("GET", "/api/2.0/preview/scim/v2/Me"): "me",
}


def _handler(ws: FakeWorkspace) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else {}
            if parts.path == "/.well-known/databricks-config":
                self._answer(404, _error("NOT_FOUND", "no host metadata here"))
                return
            given = self.headers.get("authorization", "")
            authorized = given == f"Bearer {ws.token}"
            ws.seen.append(Seen(self.command, parts.path, body, authorized))
            if not authorized:
                message = "Invalid access token."
                if ws.echo_credentials:
                    message += f" (got {given!r} for {self.command} {self.path})"
                self._answer(403, _error("PERMISSION_DENIED", message))
                return
            fault = ws._take_fault(self.command, parts.path)
            if fault is not None and fault.kind == "status":
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = str(fault.retry_after)
                self._answer(fault.status, _error(fault.error_code, fault.message), headers)
                return
            if self.command == "GET" and parts.path == "/api/2.2/jobs/runs/get":
                status, answer = ws.get_run(parse_qs(parts.query))
            elif (self.command, parts.path) in ROUTES:
                status, answer = getattr(ws, ROUTES[self.command, parts.path])(body)
            else:
                status, answer = 404, _error("ENDPOINT_NOT_FOUND", f"No API found for {parts.path}")
            if fault is not None:
                fault.reached.set()
                if fault.kind in ("hold", "delay"):
                    fault.release.wait(60)
                if fault.kind in ("drop", "hold"):  # the work is done, the answer is lost
                    self.close_connection = True
                    return
            self._answer(status, answer)
            if fault is not None:
                fault.answered.set()

        do_GET = do_POST = _handle

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
