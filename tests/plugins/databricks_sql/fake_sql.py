"""A fake Databricks SQL Statement Execution API: a real HTTP server on
127.0.0.1 that the databricks-sdk `WorkspaceClient` talks to.

- `GET /.well-known/databricks-config` → 404 (the SDK warns and goes on);
- `POST /api/2.0/sql/statements` → a new statement, `PENDING`, on a
  warehouse that exists (404 otherwise);
- `GET /api/2.0/sql/statements/{id}` → its status; once `SUCCEEDED`, the
  manifest and the first chunk of rows (`row_limit` applied, as the API does);
  404 for a statement it never had or has forgotten;
- `POST /api/2.0/sql/statements/{id}/cancel` → a live statement is `CANCELED`;
- `GET /api/2.0/sql/warehouses/{id}` → the warehouse, or 404;
- `GET /api/2.0/preview/scim/v2/Me` → who the token belongs to;
- `GET /api/2.0/sql/history/queries` → the statements, newest first, with
  their query tags, filtered by `filter_by.warehouse_ids`,
  `filter_by.user_ids` and `filter_by.query_start_time_range`, in pages of
  `max_results`; a `page_token` stands for its filter, and a request giving
  both is refused, as Databricks has; a statement is listed
  `history_delay` seconds after it was made.

Faults, on the next matching request: `drop` (a statement is made, then the
connection closes unanswered), `hold` (made, then the request hangs until
released, then closes unanswered), `refuse` (an error status, nothing done).

Every `/api/` request needs `Authorization: Bearer <token>`. Statements move
only on the test's command: `run` (→ `RUNNING`), `succeed`, `fail`,
`cancel`, `forget`.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.conftest import POLL

TOKEN = "dapi5e1ec7f00dba11c0ffee5e1ec7f00dba11"
WAREHOUSE = "abcdef1234567890"
STATEMENTS = "/api/2.0/sql/statements"
HISTORY = "/api/2.0/sql/history/queries"
USER_ID = 1
"""Who the token belongs to, and whom every statement runs as."""
LIVE = ("PENDING", "RUNNING")


@dataclass
class Statement:
    statement_id: str
    request: dict[str, Any]
    state: str = "PENDING"
    columns: list[tuple[str, str]] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    chunks: int = 1
    error: dict[str, str] | None = None
    sql_state: str | None = None
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    drop_tags: bool = False

    def as_query(self) -> dict[str, Any]:
        """The statement as the query history lists it."""
        status = {"PENDING": "QUEUED", "SUCCEEDED": "FINISHED"}.get(self.state, self.state)
        query: dict[str, Any] = {
            "query_id": self.statement_id,
            "warehouse_id": self.request.get("warehouse_id"),
            "query_text": self.request.get("statement"),
            "query_start_time_ms": self.started_ms,
            "status": status,
            "user_id": USER_ID,
        }
        if self.request.get("query_tags") and not self.drop_tags:
            query["query_tags"] = self.request["query_tags"]
        return query

    def as_json(self) -> dict[str, Any]:
        status: dict[str, Any] = {"state": self.state}
        if self.error is not None:
            status["error"] = self.error
        if self.sql_state is not None:
            status["sql_state"] = self.sql_state
        body: dict[str, Any] = {"statement_id": self.statement_id, "status": status}
        if self.state != "SUCCEEDED":
            return body
        limit = self.request.get("row_limit")
        rows = self.rows[:limit] if limit else self.rows
        per_chunk = -(-len(rows) // self.chunks) if rows else 0
        first = rows[:per_chunk]
        body["manifest"] = {
            "format": "JSON_ARRAY",
            "schema": {
                "column_count": len(self.columns),
                "columns": [
                    {
                        "name": name,
                        "type_text": kind,
                        "type_name": kind.split("(")[0],
                        "position": i,
                    }
                    for i, (name, kind) in enumerate(self.columns)
                ],
            },
            "total_chunk_count": self.chunks,
            "total_row_count": len(rows),
            "truncated": len(rows) < len(self.rows),
        }
        result: dict[str, Any] = {"chunk_index": 0, "row_offset": 0, "row_count": len(first)}
        if first:
            result["data_array"] = first
        if self.chunks > 1:
            result["next_chunk_index"] = 1
            result["next_chunk_internal_link"] = f"{STATEMENTS}/{self.statement_id}/result/chunks/1"
        body["result"] = result
        return body


@dataclass
class Fault:
    method: str
    path: str
    kind: str  # "drop", "hold" or "refuse"
    status: int = 500
    error_code: str = ""
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    authorized: bool
    query: dict[str, list[str]] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)


def _error(code: str, message: str) -> dict[str, str]:
    return {"error_code": code, "message": message}


class FakeSqlApi:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.warehouses: dict[str, dict[str, Any]] = {
            WAREHOUSE: {"id": WAREHOUSE, "name": "Shared", "state": "RUNNING"}
        }
        self.statements: dict[str, Statement] = {}
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self.pages: dict[str, tuple[dict[str, list[str]], int]] = {}
        self.history_delay = 0.0
        """Seconds before the query history lists a new statement."""
        self.drop_tags = False
        """When set, statements made from now on are listed without their
        query tags (a workspace without the feature)."""
        self.echo_credentials = False
        """When set, a refused token is quoted in the answer (as a careless
        proxy might), to prove Tether scrubs it."""
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(POLL,), daemon=True
        )

    def start(self) -> FakeSqlApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ── the test's commands ─────────────────────────────────────────────────

    def statement(self, index: int = 0, timeout: float = 10) -> Statement:
        """The `index`-th statement executed, once it was."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.statements) > index:
                    return list(self.statements.values())[index]
            time.sleep(0.02)
        raise AssertionError(f"no statement {index} within {timeout}s: {list(self.statements)}")

    def run(self, statement_id: str) -> None:
        self._move(statement_id, "RUNNING")

    def succeed(
        self,
        statement_id: str,
        columns: list[tuple[str, str]],
        rows: list[list[str | None]],
        chunks: int = 1,
    ) -> None:
        with self.lock:
            stmt = self.statements[statement_id]
            stmt.columns, stmt.rows, stmt.chunks = columns, rows, chunks
        self._move(statement_id, "SUCCEEDED")

    def fail(
        self,
        statement_id: str,
        message: str,
        error_code: str = "BAD_REQUEST",
        sql_state: str | None = None,
    ) -> None:
        with self.lock:
            stmt = self.statements[statement_id]
            stmt.error, stmt.sql_state = _error(error_code, message), sql_state
        self._move(statement_id, "FAILED")

    def cancel(self, statement_id: str) -> None:
        """Cancels a live statement (as someone in the Databricks UI would)."""
        self._move(statement_id, "CANCELED")

    def forget(self, statement_id: str) -> None:
        """The warehouse drops the statement (12 hours after it ended)."""
        with self.lock:
            del self.statements[statement_id]

    def _move(self, statement_id: str, state: str) -> None:
        with self.lock:
            stmt = self.statements[statement_id]
            if stmt.state not in LIVE:
                raise AssertionError(f"statement {statement_id} already ended: {stmt.state}")
            stmt.state = state

    def calls(self, path: str, method: str = "POST") -> list[Seen]:
        return [s for s in self.seen if s.path == path and s.method == method]

    def drop(self, path: str = STATEMENTS) -> Fault:
        """The next request is done, its answer lost (the connection closes)."""
        return self._fault(Fault("POST", path, "drop"))

    def hold(self, path: str = STATEMENTS) -> Fault:
        """The next request is done, then hangs until `release`, unanswered."""
        return self._fault(Fault("POST", path, "hold"))

    def refuse(self, path: str, status: int, error_code: str, method: str = "GET") -> Fault:
        """The next request is refused with `status`, and nothing done."""
        return self._fault(Fault(method, path, "refuse", status, error_code))

    def _fault(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and fault.path == path:
                    self.faults.remove(fault)
                    return fault
        return None

    # ── the API ─────────────────────────────────────────────────────────────

    def answer(
        self, method: str, path: str, body: Any, query: dict[str, list[str]]
    ) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path == STATEMENTS:
            return self.execute(body)
        if method == "GET" and path == HISTORY:
            return self.history(query)
        if path.startswith(STATEMENTS + "/"):
            statement_id, _, action = path.removeprefix(STATEMENTS + "/").partition("/")
            with self.lock:
                stmt = self.statements.get(statement_id)
                if stmt is None:
                    return 404, _error("NOT_FOUND", f"Statement {statement_id} not found.")
                if method == "GET" and not action:
                    return 200, stmt.as_json()
                if method == "POST" and action == "cancel":
                    if stmt.state in LIVE:
                        stmt.state = "CANCELED"
                    return 200, {}
        if method == "GET" and path.startswith("/api/2.0/sql/warehouses/"):
            warehouse = self.warehouses.get(path.rsplit("/", 1)[1])
            if warehouse is None:
                return 404, _error(
                    "RESOURCE_DOES_NOT_EXIST", f"Warehouse {path.rsplit('/', 1)[1]} does not exist."
                )
            return 200, warehouse
        if method == "GET" and path == "/api/2.0/preview/scim/v2/Me":
            return 200, {"id": str(USER_ID), "userName": "tether@example.com"}
        return 404, _error("ENDPOINT_NOT_FOUND", f"No API found for {method} {path}")

    def history(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        size = int(query.get("max_results", ["100"])[0])
        if not 1 <= size < 1000:
            return 400, _error("INVALID_PARAMETER_VALUE", "max_results must be less than 1000")
        given = {k: v for k, v in query.items() if k.startswith("filter_by.")}
        token = query.get("page_token", [None])[0]
        if token is not None:
            if given:  # as Databricks has answered, even for the same filter
                return 400, _error(
                    "INVALID_PARAMETER_VALUE",
                    "When providing a page token and a filter, the filter must match the"
                    " filter represented by the page token",
                )
            if token not in self.pages:
                return 400, _error("INVALID_PARAMETER_VALUE", "invalid page token")
            given, first = self.pages[token]
        else:
            first = 0
        warehouses = given.get("filter_by.warehouse_ids")
        users = given.get("filter_by.user_ids")
        start = int(given.get("filter_by.query_start_time_range.start_time_ms", ["0"])[0])
        end = int(given.get("filter_by.query_start_time_range.end_time_ms", [str(2**62)])[0])
        shown_by = time.time() * 1000 - self.history_delay * 1000
        with self.lock:
            listed = [
                stmt.as_query()
                for stmt in sorted(self.statements.values(), key=lambda s: -s.started_ms)
                if (warehouses is None or stmt.request.get("warehouse_id") in warehouses)
                and (users is None or str(USER_ID) in users)
                and start <= stmt.started_ms <= end
                and stmt.started_ms <= shown_by
            ]
        page = listed[first : first + size]
        more = first + size < len(listed)
        answer: dict[str, Any] = {"res": page, "has_next_page": more}
        if more:
            token = uuid.uuid4().hex
            self.pages[token] = (given, first + size)
            answer["next_page_token"] = token
        return 200, answer

    def add_statement(self, request: dict[str, Any], started_ms: int) -> Statement:
        """A statement submitted earlier, as an earlier try might have."""
        stmt = Statement(f"01f0seed-{uuid.uuid4()}", request, started_ms=started_ms)
        with self.lock:
            self.statements[stmt.statement_id] = stmt
        return stmt

    def execute(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        warehouse_id = body.get("warehouse_id")
        if warehouse_id not in self.warehouses:
            return 404, _error(
                "RESOURCE_DOES_NOT_EXIST", f"Warehouse {warehouse_id} does not exist."
            )
        if not str(body.get("statement") or "").strip():
            return 400, _error("INVALID_PARAMETER_VALUE", "statement is required")
        wait = body.get("wait_timeout", "10s")
        if wait != "0s" and not (wait.endswith("s") and 5 <= int(wait[:-1]) <= 50):
            return 400, _error(
                "INVALID_PARAMETER_VALUE", f"wait_timeout {wait!r} is not 0s or 5s-50s"
            )
        stmt = Statement(f"01f0{uuid.uuid4().hex[4:8]}-{uuid.uuid4()}", body)
        stmt.drop_tags = self.drop_tags
        with self.lock:
            self.statements[stmt.statement_id] = stmt
        return 200, {"statement_id": stmt.statement_id, "status": {"state": "PENDING"}}


def _handler(api: FakeSqlApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            path = parts.path
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else {}
            if path == "/.well-known/databricks-config":
                self._answer(404, _error("NOT_FOUND", "no host metadata here"))
                return
            given = self.headers.get("authorization", "")
            authorized = given == f"Bearer {api.token}"
            query = parse_qs(parts.query)
            api.seen.append(Seen(self.command, path, body, authorized, query))
            if not authorized:
                message = "Invalid access token."
                if api.echo_credentials:
                    message += f" (got {given!r} for {self.command} {self.path})"
                self._answer(403, _error("PERMISSION_DENIED", message))
                return
            fault = api.take_fault(self.command, path)
            if fault is not None and fault.kind == "refuse":
                fault.reached.set()
                self._answer(fault.status, _error(fault.error_code, "refused by the test"))
                return
            answer = api.answer(self.command, path, body, query)
            if fault is not None:  # the work is done, the answer is lost
                fault.reached.set()
                if fault.kind == "hold":
                    fault.release.wait(60)
                self.close_connection = True
                return
            self._answer(*answer)

        do_GET = do_POST = _handle

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
