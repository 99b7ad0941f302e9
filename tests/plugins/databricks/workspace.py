"""A fake Databricks workspace: a real HTTP server on 127.0.0.1 speaking the part
of the Jobs 2.2 API that the databricks-sdk `WorkspaceClient` uses for Tether.

- `GET /.well-known/databricks-config` → 404 (the SDK warns and goes on);
- `POST /api/2.2/jobs/run-now`, `POST /api/2.2/jobs/runs/submit` → a new run,
  or the existing one for a known `idempotency_token`;
- `GET /api/2.2/jobs/runs/get` → the run with both `state` (deprecated) and
  `status`;
- `POST /api/2.2/jobs/runs/cancel` → the run ends `USER_CANCELED`;
- `GET /api/2.2/jobs/runs/list` → runs newest first, 25 a page, filtered by
  `job_id`, `active_only`, `run_type`, `start_time_from` (`expand_tasks`);
- `POST /api/2.0/notification-destinations` → a webhook destination (URL, basic
  auth); `POST /api/2.2/jobs/update` → a job's `webhook_notifications`. A run
  of such a job POSTs Databricks' job notifications (`jobs.on_start` when it
  starts, `jobs.on_success` / `jobs.on_failure` when it ends) to them, as the
  workspace does; `deliveries` records each one;
- each run has tasks (`Run.tasks`, `TaskRun`): `runs/get` lists them 100 a
  page (`next_page_token`), and with `include_history=true` the run's
  `repair_history`; `GET /api/2.2/jobs/runs/get-output` answers per task run
  (a task's exit value, `truncated`, its error), and refuses a run's own id;
- `POST /api/2.2/jobs/runs/repair` reruns an ended run's failed tasks with new
  parameters, as the workspace does (`latest_repair_id` checked, a run in
  progress refused); `repairable` marks runs it refuses;
- a run may wait `QUEUED` (with `queue_details`) or `BLOCKED` before it runs
  (`FakeWorkspace.hold_in`); `fail(path, 429, retry_after=N)` throttles.

Every `/api/` request needs `Authorization: Bearer <token>`. Faults are queued
per path: an error status (with `Retry-After`), a dropped answer (the run is
created, then the connection closes unanswered), a held answer (the run is
created, then the request hangs until released, then closes unanswered), a
late request (`late`: nothing is done until it is released, as a request
that reached the workspace but is acted on late: a `run-now` creates its run
only then; its answer is then sent once `respond` is set).

Each run is played by a *notebook*, a function run in a thread: by default the
repository's `examples/databricks_notebook.py`, executed with a stub `dbutils`
whose widgets are the run's parameters and a stub `spark`.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import runpy
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.conftest import POLL

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
    "UPSTREAM_FAILED": ("TERMINATED", "UPSTREAM_FAILED", "SUCCESS"),  # a code the SDK lacks
}


@dataclass
class TaskRun:
    """A task of a run, and what `runs/get-output` says of it. While `code`
    is None it follows its run: state, termination code and message, and the
    exit value the run's notebook gave (`FakeWorkspace.exits`)."""

    task_key: str
    run_id: int
    kind: str = "notebook_task"
    notebook_path: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    attempt: int = 0
    code: str | None = None
    message: str = ""
    output: str | None = None
    """Its `dbutils.notebook.exit` value."""
    truncated: bool = False
    error: str | None = None
    """What `runs/get-output` says went wrong."""


def state_json(
    status: str, code: str | None, message: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`state` (deprecated) and `status` of a run, a task or a repair."""
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
    return state, run_status


@dataclass
class Run:
    run_id: int
    job_id: int | None
    run_name: str
    parameters: dict[str, str]
    notebook: str
    token: str | None
    webhooks: dict[str, list[str]] = field(default_factory=dict)
    """The job's `webhook_notifications` when the run started: event → destination ids."""
    status: str = "QUEUED"
    code: str | None = None
    message: str = ""
    ended: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    tasks: list[TaskRun] = field(default_factory=list)
    """Its tasks, the latest attempt of each (a repair replaces the ones it reruns)."""
    repairs: list[dict[str, Any]] = field(default_factory=list)
    """`repair_history`: the `ORIGINAL` entry, then each `REPAIR`."""
    repairable: bool = True
    queue: dict[str, str] | None = None
    """`status.queue_details` while it is `QUEUED`."""
    notebook_params: dict[str, str] | None = None
    """`overriding_parameters.notebook_params` of its latest repair."""
    end_time: int = 0
    """When it ended, in Unix milliseconds (`end_time`; 0 while it goes on)."""
    start_time: int = field(default_factory=lambda: int(time.time() * 1000))

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
            self.end_time = int(time.time() * 1000)
        self.ended.set()
        return True

    def as_json(self, base_url: str) -> dict[str, Any]:
        with self.lock:
            status, code, message = self.status, self.code, self.message
            end_time = self.end_time
        state, run_status = state_json(status, code, message)
        body: dict[str, Any] = {
            "run_id": self.run_id,
            "number_in_job": self.run_id,
            "run_name": self.run_name,
            "run_type": "JOB_RUN" if self.job_id else "SUBMIT_RUN",
            "run_page_url": f"{base_url}/?o=1#job/{self.job_id or 0}/run/{self.run_id}",
            "state": state,
            "status": run_status,
            "job_parameters": [{"name": k, "value": v} for k, v in self.parameters.items()],
            "start_time": self.start_time,
            "end_time": end_time,
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
    webhooks: dict[str, list[str]] = field(default_factory=dict)
    """`webhook_notifications`: `on_start`, ... → destination ids."""
    tasks: list[str] = field(default_factory=lambda: ["main"])
    """Its task keys: notebook tasks, all running `notebook`."""


@dataclass
class Fault:
    method: str
    path: str
    kind: str  # "status", "drop", "garble", "hold", "delay" or "late"
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
    respond: threading.Event = field(default_factory=threading.Event)
    """A `late` fault's answer, the work done, waits for this."""


@dataclass
class Delivery:
    """A job notification the workspace POSTed to a destination."""

    event_type: str
    run_id: int
    status: int
    """The destination's answer (0: no answer)."""
    answer: str


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
        self.destinations: dict[str, dict[str, Any]] = {}
        """Notification destinations by id: their `generic_webhook` config."""
        self.deliveries: list[Delivery] = []
        self.workspace_id = "1234567890123456"
        self.drops_unused_notebook_params = False
        """When set, a repair's `notebook_params` are kept only where the
        run has a notebook task (what Databricks does with them elsewhere
        is not documented): a wheel's repaired run then names no attempt."""
        self.echo_credentials = False
        """When set, an auth failure echoes the credentials it got (as a careless
        proxy might), to prove Tether scrubs them."""
        self.lock = threading.Lock()
        self._ids = itertools.count(1001)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(POLL,), daemon=True
        )

    def start(self) -> FakeWorkspace:
        self._thread.start()
        return self

    def stop(self) -> None:
        for fault in self.faults:
            fault.release.set()
            fault.respond.set()
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

    def garble(self, path: str, times: int = 1) -> Fault:
        """The work is done, and its answer a 200 cut short (not JSON)."""
        fault = Fault("POST", path, "garble", times)
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

    def late(self, path: str) -> Fault:
        """The next request on `path` is held undone (`reached` set) until
        `release`: only then is its work done (a `run-now`'s run created);
        its answer then waits for `respond`, and closes the connection (a
        client gone meanwhile gets nothing)."""
        fault = Fault("POST", path, "late", 1)
        self.faults.append(fault)
        return fault

    def calls(self, path: str, method: str = "POST") -> list[Seen]:
        return [s for s in self.seen if s.path == path and s.method == method]

    def only_run(self) -> Run:
        assert len(self.runs) == 1, f"expected one run, got {sorted(self.runs)}"
        return next(iter(self.runs.values()))

    def end(self, run_id: int, code: str, message: str = "") -> None:
        self.runs[run_id].end(code, message)

    # ── job notifications ───────────────────────────────────────────────────

    def notification(
        self, run: Run, event_type: str, task_key: str | None = None, task_run_id: int = 0
    ) -> dict[str, Any]:
        """The body Databricks POSTs for `event_type` (ids as strings, as the
        workspace sends them); with `task_key`, a task-level one."""
        body: dict[str, Any] = {
            "event_type": event_type,
            "workspace_id": self.workspace_id,
            "run": {"run_id": str(run.run_id)},
            "job": {"job_id": str(run.job_id or 0), "name": run.run_name},
        }
        if task_key is not None:
            body["run"] = {"run_id": str(task_run_id), "parent_run_id": str(run.run_id)}
            body["task"] = {"task_key": task_key}
        return body

    def deliver(self, run: Run, event: str) -> None:
        """POST the run's `event` (`on_start`, ...) notification to each
        destination the run's job names for it."""
        for destination_id in run.webhooks.get(event, []):
            config = self.destinations[destination_id]
            body = json.dumps(self.notification(run, f"jobs.{event}")).encode()
            request = urllib.request.Request(config["url"], data=body, method="POST")
            request.add_header("content-type", "application/json")
            if config.get("username"):
                pair = f"{config['username']}:{config.get('password', '')}".encode()
                request.add_header("authorization", "Basic " + base64.b64encode(pair).decode())
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    status, text = answer.status, answer.read().decode()
            except urllib.error.HTTPError as exc:
                status, text = exc.code, exc.read().decode()
            except OSError as exc:
                status, text = 0, type(exc).__name__
            self.deliveries.append(Delivery(f"jobs.{event}", run.run_id, status, text))

    def _play(self, play: Notebook, run: Run) -> None:
        """A run as the workspace plays it: its notebook, with its job's
        notifications when it starts and when it ends."""
        self.deliver(run, "on_start")
        play(self, run)
        run.ended.wait()
        with run.lock:
            code = run.code
        if code == "SUCCESS":
            self.deliver(run, "on_success")
        elif code not in ("USER_CANCELED", "SKIPPED"):
            self.deliver(run, "on_failure")

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
        tasks: list[dict[str, Any]] | None = None,
    ) -> tuple[Run, bool]:
        with self.lock:
            if token and token in self.tokens:
                return self.runs[self.tokens[token]], False
            run = Run(next(self._ids), job_id, name, parameters, notebook, token)
            job = self.jobs.get(job_id) if job_id else None
            run.webhooks = dict(job.webhooks) if job else {}
            self.runs[run.run_id] = run
            run.tasks = self._task_runs(run, tasks)
            if token:
                self.tokens[token] = run.run_id
        play = self.notebooks.get(notebook, hang)
        threading.Thread(target=self._play, args=(play, run), daemon=True).start()
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
            tasks=tasks,
        )
        return 200, {"run_id": run.run_id}

    def get_run(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        run_id = int(query.get("run_id", ["0"])[0])
        run = self.runs.get(run_id)
        if run is None:
            return 400, _error("INVALID_PARAMETER_VALUE", f"Run {run_id} does not exist.")
        return 200, self._paged(run, run.as_json(self.url), query)

    runs_page = 25
    """Runs `runs/list` answers per page, as Databricks does at most."""

    def list_runs(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """`runs/list`, newest first: by `job_id`, `active_only`, `run_type`,
        `start_time_from`; tasks with `expand_tasks`; a one-time run without
        `job_parameters` (Databricks gives them only for a job's runs)."""

        def flag(name: str) -> bool:
            return query.get(name, [""])[0].lower() == "true"

        job_id = int(query.get("job_id", ["0"])[0])
        since = int(query.get("start_time_from", ["0"])[0])
        kind = query.get("run_type", [""])[0]
        runs = [
            run
            for run in sorted(list(self.runs.values()), key=lambda r: -r.run_id)
            if (not job_id or run.job_id == job_id)
            and (not flag("active_only") or run.status != "TERMINATED")
            and (not kind or (kind == "SUBMIT_RUN") == (run.job_id is None))
            and run.start_time >= since
        ]
        start = int(query.get("page_token", ["0"])[0])
        page = []
        for run in runs[start : start + self.runs_page]:
            body = run.as_json(self.url)
            if run.job_id is None:
                body.pop("job_parameters")
            if flag("expand_tasks"):
                body["tasks"] = [self._task_json(run, t) for t in run.tasks]
            with run.lock:
                if run.notebook_params is not None:
                    body["overriding_parameters"] = {"notebook_params": dict(run.notebook_params)}
            page.append(body)
        answer: dict[str, Any] = {"runs": page, "has_more": start + self.runs_page < len(runs)}
        if answer["has_more"]:
            answer["next_page_token"] = str(start + self.runs_page)
        return 200, answer

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

    def create_destination(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """`notification_destinations.create`: a generic webhook only."""
        webhook = (body.get("config") or {}).get("generic_webhook")
        if not webhook or not webhook.get("url"):
            return 400, _error("INVALID_PARAMETER_VALUE", "config.generic_webhook.url is required")
        destination_id = f"dest-{len(self.destinations) + 1}"
        self.destinations[destination_id] = dict(webhook)
        shown = {f"{k}_set": True for k in ("url", "username", "password") if webhook.get(k)}
        return 200, {
            "id": destination_id,
            "display_name": body.get("display_name", ""),
            "destination_type": "WEBHOOK",
            "config": {"generic_webhook": shown},  # the workspace never shows them back
        }

    def update_job(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """`jobs.update`: only `webhook_notifications` is kept here."""
        job = self.jobs.get(body.get("job_id"))  # type: ignore[arg-type]
        if job is None:
            return 404, _error(
                "RESOURCE_DOES_NOT_EXIST", f"Job {body.get('job_id')} does not exist."
            )
        hooks = (body.get("new_settings") or {}).get("webhook_notifications")
        if hooks is not None:
            unknown = [
                h["id"] for v in hooks.values() for h in v if h["id"] not in self.destinations
            ]
            if unknown:
                return 400, _error("INVALID_PARAMETER_VALUE", f"No destination {unknown[0]}.")
            job.webhooks = {event: [h["id"] for h in v] for event, v in hooks.items()}
        return 200, {}

    # ── tasks, output, repair, queues ───────────────────────────────────────

    task_page = 100
    """Tasks `runs/get` lists per page, as Databricks does."""

    def _task_runs(self, run: Run, tasks: list[dict[str, Any]] | None) -> list[TaskRun]:
        """A new run's tasks: a one-time run's as submitted, else its job's."""
        if tasks is None:
            job = self.jobs.get(run.job_id) if run.job_id else None
            keys = job.tasks if job else ["main"]
            return [TaskRun(k, next(self._ids), notebook_path=run.notebook) for k in keys]
        made = []
        for task in tasks:
            kind = next((k for k in task if k.endswith("_task")), "notebook_task")
            spec = task.get(kind) or {}
            made.append(
                TaskRun(
                    task["task_key"],
                    next(self._ids),
                    kind=kind,
                    notebook_path=spec.get("notebook_path", ""),
                    parameters=dict(spec.get("base_parameters") or {}),
                )
            )
        return made

    def _task_json(self, run: Run, task: TaskRun) -> dict[str, Any]:
        with run.lock:
            ending = (run.status, run.code, run.message)
        if task.code is not None:
            ending = ("TERMINATED", task.code, task.message)
        state, status = state_json(*ending)
        body: dict[str, Any] = {
            "task_key": task.task_key,
            "run_id": task.run_id,
            "attempt_number": task.attempt,
            "state": state,
            "status": status,
        }
        if task.kind == "notebook_task":
            body["notebook_task"] = {"notebook_path": task.notebook_path}
            if task.parameters:
                body["notebook_task"]["base_parameters"] = task.parameters
        else:
            body[task.kind] = {}
        return body

    def _paged(self, run: Run, body: dict[str, Any], query: dict[str, list[str]]) -> dict[str, Any]:
        """`runs/get`'s tasks page by page; `repair_history` when asked for; a
        queued run's `queue_details`; a repair's notebook parameters."""
        start = int(query.get("page_token", ["0"])[0])
        tasks = run.tasks[start : start + self.task_page]
        body["tasks"] = [self._task_json(run, t) for t in tasks]
        if start + self.task_page < len(run.tasks):
            body["next_page_token"] = str(start + self.task_page)
        if start:  # later pages: the next tasks only
            body.pop("job_parameters", None)
            return body
        if query.get("include_history") == ["true"] and run.repairs:
            body["repair_history"] = [self._repair_json(run, r) for r in run.repairs]
        with run.lock:
            if run.status == "QUEUED" and run.queue:
                body["status"]["queue_details"] = dict(run.queue)
            if run.notebook_params is not None:
                body["overriding_parameters"] = {"notebook_params": dict(run.notebook_params)}
        return body

    def _repair_json(self, run: Run, item: dict[str, Any]) -> dict[str, Any]:
        ending = item.get("ended")
        if ending is None:  # the latest: as the run is now
            with run.lock:
                ending = (run.status, run.code, run.message)
        state, status = state_json(*ending)
        return {
            "id": item["id"],
            "type": item["type"],
            "task_run_ids": item["task_run_ids"],
            "start_time": item["start_time"],
            "state": state,
            "status": status,
        }

    def task(self, task_run_id: int) -> tuple[Run, TaskRun] | None:
        for run in list(self.runs.values()):
            for task in run.tasks:
                if task.run_id == task_run_id:
                    return run, task
        return None

    def get_output(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """`runs/get-output`: a task run's notebook output and error."""
        run_id = int(query.get("run_id", ["0"])[0])
        if run_id in self.runs:
            return 400, _error(
                "INVALID_PARAMETER_VALUE",
                "Retrieving the output of runs with multiple tasks is not supported. Please"
                " retrieve the output of each individual task run instead.",
            )
        found = self.task(run_id)
        if found is None:
            return 400, _error("INVALID_PARAMETER_VALUE", f"Run {run_id} does not exist.")
        run, task = found
        body: dict[str, Any] = {"metadata": self._task_json(run, task)}
        with run.lock:
            code, message = (run.code, run.message) if task.code is None else (task.code, "")
        if task.kind == "notebook_task":
            value = task.output
            if value is None and task.code is None:
                value = self.exits.get(run.run_id)
            notebook: dict[str, Any] = {}
            if value is not None:
                notebook = {"result": value, "truncated": task.truncated}
            body["notebook_output"] = notebook
        error = task.error
        if error is None and task.code is None and code not in (None, "SUCCESS"):
            error = message or None
        if error is not None:
            body["error"] = error
            body["error_trace"] = f"Traceback (most recent call last):\n  ...\n{error}"
        return 200, body

    def repair_run(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """`runs/repair`: rerun an ended run's failed tasks, as the workspace
        does: only an ended run, `latest_repair_id` naming its latest repair."""
        run_id = body.get("run_id")
        run = self.runs.get(run_id)  # type: ignore[arg-type]
        if run is None:
            return 400, _error("INVALID_PARAMETER_VALUE", f"Run {run_id} does not exist.")
        with self.lock, run.lock:
            if run.status != "TERMINATED":
                return 400, _error(
                    "INVALID_STATE", f"Run {run_id} is still active; wait for it to end."
                )
            if not run.repairable:
                return 400, _error("INVALID_PARAMETER_VALUE", f"Run {run_id} cannot be repaired.")
            latest = run.repairs[-1]["id"] if len(run.repairs) > 1 else None
            if body.get("latest_repair_id") != latest:
                return 400, _error(
                    "INVALID_PARAMETER_VALUE",
                    f"The latest repair of run {run_id} is {latest}, not"
                    f" {body.get('latest_repair_id')}.",
                )
            failed = [
                i
                for i, t in enumerate(run.tasks)
                if (t.code if t.code is not None else run.code)
                not in ("SUCCESS", "SUCCESS_WITH_FAILURES")
            ]
            if not body.get("rerun_all_failed_tasks") or not failed:
                return 400, _error("INVALID_PARAMETER_VALUE", f"Run {run_id} has no task to rerun.")
            now = int(time.time() * 1000)
            if not run.repairs:
                ids = [t.run_id for t in run.tasks]
                run.repairs.append(
                    {
                        "id": next(self._ids),
                        "type": "ORIGINAL",
                        "task_run_ids": ids,
                        "start_time": 0,
                    }
                )
            run.repairs[-1]["ended"] = (run.status, run.code, run.message)
            repair_id = next(self._ids)
            new = []
            notebook_params = body.get("notebook_params")
            if self.drops_unused_notebook_params and all(
                t.kind != "notebook_task" for t in run.tasks
            ):
                notebook_params = None
            for i in failed:
                old = run.tasks[i]
                task = TaskRun(
                    old.task_key,
                    next(self._ids),
                    kind=old.kind,
                    notebook_path=old.notebook_path,
                    parameters={**old.parameters, **(notebook_params or {})},
                    attempt=old.attempt + 1,
                )
                run.tasks[i] = task
                new.append(task.run_id)
            run.repairs.append(
                {"id": repair_id, "type": "REPAIR", "task_run_ids": new, "start_time": now}
            )
            run.parameters = {
                **run.parameters,
                **(body.get("job_parameters") or {}),
                **(notebook_params or {}),
            }
            if notebook_params is not None:
                run.notebook_params = dict(notebook_params)
            run.status, run.code, run.message = "QUEUED", None, ""
            run.ended = threading.Event()
        self.exits.pop(run.run_id, None)
        play = self.notebooks.get(run.notebook, hang)
        threading.Thread(target=self._play, args=(play, run), daemon=True).start()
        return 200, {"repair_id": repair_id}

    def hold_in(self, run_id: int, state: str, code: str | None = None, message: str = "") -> None:
        """Put a run that has not started in `state` (`QUEUED`, with
        `queue_details` when `code` is given; `BLOCKED`; `PENDING`)."""
        run = self.runs[run_id]
        with run.lock:
            run.status = state
            run.queue = {"code": code, "message": message} if code else None


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error_code": code, "message": message}


ROUTES = {
    ("POST", "/api/2.2/jobs/run-now"): "run_now",
    ("POST", "/api/2.2/jobs/runs/submit"): "submit",
    ("POST", "/api/2.2/jobs/runs/cancel"): "cancel_run",
    ("POST", "/api/2.2/jobs/runs/repair"): "repair_run",
    ("GET", "/api/2.0/preview/scim/v2/Me"): "me",
    ("POST", "/api/2.0/notification-destinations"): "create_destination",
    ("POST", "/api/2.2/jobs/update"): "update_job",
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
            if fault is not None and fault.kind == "late":  # nothing done until released
                fault.reached.set()
                fault.release.wait(60)
            if self.command == "GET" and parts.path == "/api/2.2/jobs/runs/get":
                status, answer = ws.get_run(parse_qs(parts.query))
            elif self.command == "GET" and parts.path == "/api/2.2/jobs/runs/get-output":
                status, answer = ws.get_output(parse_qs(parts.query))
            elif self.command == "GET" and parts.path == "/api/2.2/jobs/runs/list":
                status, answer = ws.list_runs(parse_qs(parts.query))
            elif (self.command, parts.path) in ROUTES:
                status, answer = getattr(ws, ROUTES[self.command, parts.path])(body)
            else:
                status, answer = 404, _error("ENDPOINT_NOT_FOUND", f"No API found for {parts.path}")
            if fault is not None and fault.kind == "late":
                fault.respond.wait(60)
                self.close_connection = True
                with contextlib.suppress(OSError):  # its client may be gone (killed) by now
                    self._answer(status, answer)
                    fault.answered.set()
                return
            if fault is not None:
                fault.reached.set()
                if fault.kind in ("hold", "delay"):
                    fault.release.wait(60)
                if fault.kind in ("drop", "hold"):  # the work is done, the answer is lost
                    self.close_connection = True
                    return
                if fault.kind == "garble":  # the work is done, the answer is cut short
                    data = json.dumps(answer).encode()
                    self.send_response(200)
                    self.send_header("content-length", str(len(data) // 2))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    return
            self._answer(status, answer)
            if fault is not None:
                fault.answered.set()

        do_GET = do_POST = _handle

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
