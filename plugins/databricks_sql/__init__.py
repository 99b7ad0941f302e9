"""The `databricks_sql` backend: run one SQL statement on a Databricks SQL
warehouse and keep its result rows as the job's result.

```json
{"warehouse_id": "abcdef1234567890",
 "statement": "SELECT day, count(*) AS orders FROM sales.orders WHERE day >= :since GROUP BY day",
 "parameters": {"since": {"value": "2024-01-01", "type": "DATE"}},
 "catalog": "main", "row_limit": 100}
```

The trigger submits the statement through the Statement Execution API
(`statement_execution.execute_statement` with `wait_timeout="0s"`: it returns
at once with the statement's id, kept as the job's `external`
`{"statement_id", "warehouse_id"}`).

**A backend without a callback.** Nothing outside Tether can call it back: the
warehouse cannot be handed a URL, and needs none. The status check is the
completion channel: every `check_interval` seconds (default 2, backing off to
ten times that while the statement runs long) Tether calls `check_status`,
which reads `statement_execution.get_statement`: `PENDING` and `RUNNING`
confirm it is going (`Running`), and its final state settles the job. Write a
backend of this kind for any system you can ask "has it ended?" but that
cannot call out: implement `check_interval` and `check_status`, and ignore
`trigger.callback_url`.

A `SUCCEEDED` statement's result is the first chunk of its rows, with the
column names and types from the manifest (see `statements.result_of`),
bounded by `row_limit` and by the core's `TETHER_MAX_RESULT_BYTES` (whole
rows are left out, so the result stays a table); a `FAILED` one fails the
job with Databricks' message (`error.type` its error code), a `CANCELED` one
cancels it. Cancel and timeout call `cancel_execution`.

Credentials and client settings are the `databricks` backend's
(`DATABRICKS_HOST` + `DATABRICKS_TOKEN` or another databricks-sdk auth
method, `TETHER_DATABRICKS_PROFILE`, `_RETRY_TIMEOUT`, `_HTTP_TIMEOUT`,
`_THREADS`); its own setting is `TETHER_DATABRICKS_SQL_WAREHOUSE_ID`, the
warehouse of jobs that name none, which readiness checks (`warehouses.get`).

**Once, by its tag.** The Statement Execution API takes no idempotency token,
and the trigger runs again after a crash, or after a try whose answer was lost
(a timeout, a dropped connection). So each statement carries the query tag
`tether` = `tag_value(idempotency key)` and is sent once per try (the SDK does
not send it again, `Workspace.call(once=True)`); before each try the
warehouse's query history is read (`query_history.list`: this warehouse, the
credentials' own user, since the job was created, newest first, at most
`HISTORY_PAGES` pages) for a statement carrying that tag: the first found is
the job's (a repeat is canceled), and none is submitted. A statement that may
have been sent (a try's answer was lost; a replay, `Trigger.replayed`, which
the backend asks for with `asks_if_replayed`) is given `settle` seconds to
appear in the history before it is sent again (each look a wait the core
does not count against its tries: `BackendError.tried`); the core tells a
replay by a mark in the job's row, not by clocks. `cancel_unrecorded` cancels
such statements when the job ended with none recorded. What this cannot see
(docs/databricks.md): a statement listed later than that; any statement when
the history cannot be read (a refusal submits as before, and the log says so;
a failure worth trying again fails the try). Statements safe to repeat
(`MERGE`, `INSERT OVERWRITE`, `CREATE OR REPLACE`) stay the safe choice.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from core.plugin import (
    Backend,
    BackendError,
    ErrorInfo,
    Job,
    Outcome,
    Readiness,
    Running,
    Trigger,
    hookimpl,
    settings_from_env,
)
from plugins.databricks.workspace import DatabricksSettings, Throttled, Workspace
from plugins.databricks_sql.statements import (
    FINAL_STATES,
    INLINE_LIMIT,
    outcome_of_statement,
    result_bound,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from databricks.sdk import WorkspaceClient
    from databricks.sdk.service.sql import QueryTag, StatementResponse

log = logging.getLogger("tether.databricks_sql")

ENV_PREFIX = "TETHER_DATABRICKS_SQL_"

DEFAULT_CHECK_INTERVAL = 2.0
MIN_CHECK_INTERVAL = 0.1
MAX_CHECK_INTERVAL = 86400.0
DEFAULT_ROW_LIMIT = 1000
MAX_ROW_LIMIT = 10_000
MAX_PARAMETERS = 256

TAG_KEY = "tether"
"""The query tag each statement carries, its value `tag_value` of the
attempt's idempotency key: how a statement whose submission's answer was
lost is found again in the warehouse's query history (before the next try,
and to cancel it)."""
JOB_TAG_KEY = "tether_job"
"""A second tag, the job's id, for people reading the query history."""
MARK_TAG_KEY = "tether_mark"
"""A third, the job's `Trigger.mark`: a statement tagged with the attempt's key
is taken for the job's only when it carries this job's mark (or none: a
release before 2026-12-06 sent it). Another Tether deployment's job under
the same id, on the same warehouse and user, tags its statements with the
same key."""
HISTORY_PAGE = 500
"""Queries a page of the query history (the API takes fewer than 1,000)."""
HISTORY_PAGES = 20
"""Pages read at most when looking for a statement: the 10,000 newest
queries of the credentials' user on the warehouse since the job was made."""
HISTORY_SPAN_MS = 29 * 86_400_000
"""The query history takes a time range of at most 30 days."""
CLOCK_MARGIN_MS = 300_000
"""How far the window reaches past the job's creation and now: this host's
clock (the job's `created_at`) and Databricks' (a query's start) may differ."""
SETTLE = 30.0
"""The default of `TETHER_DATABRICKS_SQL_SETTLE`."""
MAX_SETTLE = 3600.0

WAREHOUSE_ID = re.compile(r"^[A-Za-z0-9_-]+$")
"""A SQL warehouse id (16 hex digits in practice); it goes into URL paths."""
PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
"""A named parameter marker's name, as `:name` writes it in the statement."""

WarehouseId = Annotated[str, Meta(pattern=WAREHOUSE_ID.pattern, max_length=128)]
ParameterName = Annotated[
    str, Meta(max_length=255, extra_json_schema={"pattern": PARAMETER_NAME.pattern})
]
"""Its pattern stated here, checked by `__post_init__`, which names the key
(msgspec says only "a key in `params.parameters`")."""
SqlName = Annotated[str, Meta(min_length=1, max_length=255)]
SqlType = Annotated[str, Meta(min_length=1, max_length=255)]
NOT_BLANK = re.compile(
    r"[^\t\n\x0b\x0c\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
)
"""A character that is no white space of JavaScript's `\\s` (which JSON
Schema's patterns use), Unicode's spaces included. (An explicit class:
Python's and JSON Schema's `\\s` differ, at U+FEFF and U+001C-U+001F.)"""
Statement = Annotated[str, Meta(extra_json_schema={"pattern": NOT_BLANK.pattern})]
"""Not blank: stated here, checked by `__post_init__` (msgspec would quote
the class)."""
RowLimit = (
    Annotated[int, Meta(ge=1, le=MAX_ROW_LIMIT)]
    | Annotated[float, Meta(ge=1, le=MAX_ROW_LIMIT, extra_json_schema={"multipleOf": 1})]
)
"""A whole number of rows; `100.0` too, which JSON Schema counts an integer
(`__post_init__` makes it an int)."""
CheckInterval = Annotated[float, Meta(ge=MIN_CHECK_INTERVAL, le=MAX_CHECK_INTERVAL)]
Value = str | int | float | bool | None


class SqlParameter(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A named parameter with its SQL type: `{"value": "2024-01-01", "type":
    "DATE"}`. `value` null (or left out) is SQL NULL; `type` is any type
    Databricks SQL casts the value's text to (`INT`, `DECIMAL(10,2)`,
    `TIMESTAMP`, ...); without it a string is a `STRING` and a number or
    boolean gets the type its JSON implies."""

    value: Value = None
    type: SqlType | None = None


Parameters = Annotated[dict[ParameterName, Value | SqlParameter], Meta(max_length=MAX_PARAMETERS)]


class DatabricksSqlParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`params` of a `databricks_sql` job: one SQL statement on a SQL warehouse."""

    warehouse_id: WarehouseId
    """The SQL warehouse to run it on (optional when the service has a default,
    `TETHER_DATABRICKS_SQL_WAREHOUSE_ID`)."""
    statement: Statement
    """The SQL statement, with `:name` markers for `parameters`."""
    parameters: Parameters = msgspec.field(default_factory=dict)
    """Values of the statement's `:name` markers: a JSON value, or `{"value",
    "type"}` to give its SQL type."""
    catalog: SqlName | None = None
    """Default catalog of the statement (`USE CATALOG`)."""
    schema: SqlName | None = None
    """Default schema of the statement (`USE SCHEMA`)."""
    row_limit: RowLimit = DEFAULT_ROW_LIMIT
    """At most this many rows (1 to 10000) go into the job's result."""
    check_interval: CheckInterval = DEFAULT_CHECK_INTERVAL
    """Seconds between status checks (0.1 to 86400; later checks back off up
    to ten times this)."""

    def __post_init__(self) -> None:
        if isinstance(self.row_limit, float):
            if not self.row_limit.is_integer():
                raise ValueError("`row_limit` must be a whole number")
            msgspec.structs.force_setattr(self, "row_limit", int(self.row_limit))
        if not NOT_BLANK.search(self.statement):
            raise ValueError("`statement` is blank: give the SQL statement to run")
        # Python's `$` also matches before a final newline, JSON Schema's does not.
        if self.warehouse_id is not None and not WAREHOUSE_ID.fullmatch(self.warehouse_id):
            raise ValueError("`warehouse_id` must be letters, digits, `_` and `-` only")
        for name in self.parameters:
            if not PARAMETER_NAME.fullmatch(name):
                raise ValueError(f"`parameters`: {name!r} is not a parameter name")


def params_type(default_warehouse: str) -> type[DatabricksSqlParams]:
    """`DatabricksSqlParams` of a service with this default warehouse:
    `warehouse_id` may then be left out, and the schema says so."""
    if not default_warehouse:
        return DatabricksSqlParams
    made: type[DatabricksSqlParams] = msgspec.defstruct(  # type: ignore[assignment]  # a subclass
        "DatabricksSqlParams",
        [("warehouse_id", WarehouseId | None, None)],
        bases=(DatabricksSqlParams,),
        frozen=True,
        kw_only=True,
        forbid_unknown_fields=True,
    )
    made.__doc__ = DatabricksSqlParams.__doc__
    return made


class DatabricksSqlSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The backend's own settings, from `TETHER_DATABRICKS_SQL_<FIELD>`. The
    client's (credentials, timeouts) are the `databricks` backend's."""

    warehouse_id: str = ""
    """`TETHER_DATABRICKS_SQL_WAREHOUSE_ID`: the SQL warehouse of jobs that
    name none, and the one readiness checks. Empty: every job names its own."""
    settle: float = SETTLE
    """`TETHER_DATABRICKS_SQL_SETTLE`: seconds a statement that may have been
    submitted (a try's answer was lost, or a replay after a crash) is given
    to appear in the query history before it is submitted again: until then
    a try that does not find it fails with `retry_after`, and the next one
    looks again. 0 to 3600."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DatabricksSqlSettings:
        settings = settings_from_env(cls, ENV_PREFIX, env)
        if not 0 <= settings.settle <= MAX_SETTLE:
            raise ValueError(f"invalid setting {ENV_PREFIX}SETTLE: 0 to {MAX_SETTLE:g} seconds")
        if settings.warehouse_id and not WAREHOUSE_ID.fullmatch(settings.warehouse_id):
            raise ValueError(
                f"invalid setting {ENV_PREFIX}WAREHOUSE_ID: a warehouse id is letters,"
                " digits, `_` and `-`"
            )
        return settings


def sql_parameters(given: Mapping[str, Value | SqlParameter]) -> list[dict[str, str]]:
    """The API's `parameters` list: `{"name", "value"?, "type"?}` each, the
    value as text (`value` left out for NULL). A JSON number or boolean with no
    type gets the one its JSON implies (`INT`, `BIGINT`, `DECIMAL(38,0)`,
    `DOUBLE`, `BOOLEAN`): a whole number of 39 digits or more is a `DOUBLE`."""
    out = []
    for name, item in given.items():
        value, kind = (item.value, item.type) if isinstance(item, SqlParameter) else (item, None)
        text, implied = _as_sql(value)
        kind = kind or implied
        parameter = {"name": name}
        if text is not None:
            parameter["value"] = text
        if kind:
            parameter["type"] = kind
        out.append(parameter)
    return out


def _as_sql(value: Value) -> tuple[str | None, str | None]:
    """A value's text and the SQL type its JSON implies (None: a STRING)."""
    if value is None or isinstance(value, str):
        return value, None
    if isinstance(value, bool):  # before int: a bool is an int in Python
        return ("true" if value else "false"), "BOOLEAN"
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
            return str(value), "INT"
        if -(2**63) <= value < 2**63:
            return str(value), "BIGINT"
        # Past 38 digits no DECIMAL fits: a DOUBLE, as the same number written
        # `1e40` is (JSON does not tell them apart); its type keeps every digit.
        return str(value), "DECIMAL(38,0)" if abs(value) < 10**38 else "DOUBLE"
    return repr(value), "DOUBLE"


class DatabricksSql(Backend):
    name = "databricks_sql"
    params_type = DatabricksSqlParams
    asks_if_replayed = True  # a replay waits for a statement the history lists late
    settings_type = DatabricksSqlSettings
    settings_prefix = ENV_PREFIX

    def __init__(
        self,
        settings: DatabricksSqlSettings | None = None,
        client_settings: DatabricksSettings | None = None,
    ) -> None:
        self.settings = settings or DatabricksSqlSettings.from_env()
        self.workspace = Workspace(client_settings or DatabricksSettings.from_env())
        self._user: list[int] | None = None
        self._unsure: dict[str, float] = {}
        """Keys of statements that may have been sent unanswered, and since when."""
        self._waited: dict[str, float] = {}
        """Keys whose settling time this process has begun, and when."""
        self._last_sent = ""
        """The last statement this process submitted, until a look's page lists it."""
        self._said_tags_dropped = False
        self.max_result_bytes = result_bound()
        """The core's bound on a result (`TETHER_MAX_RESULT_BYTES`): rows are
        cut to fit it here, so that the core never has to cut the table."""
        # Depends on the default warehouse configured, though `Backend`
        # declares it on the class.
        self.params_type = params_type(self.settings.warehouse_id)  # type: ignore[misc]

    def check_interval(self, params: DatabricksSqlParams) -> float:
        return params.check_interval

    async def trigger(self, trigger: Trigger) -> dict[str, Any]:
        params: DatabricksSqlParams = trigger.params
        warehouse_id = params.warehouse_id or self.settings.warehouse_id
        parameters = sql_parameters(params.parameters)
        extra = {"job_id": trigger.job.id, "promise_id": trigger.promise_id, "backend": self.name}

        key = trigger.idempotency_key
        earlier = await self._look_for_earlier(trigger, warehouse_id)
        if earlier:
            self._unsure.pop(key, None)
            return await self._take(trigger, warehouse_id, earlier)
        # Unreadable (None): waiting would show nothing more.
        wait = 0.0 if earlier is None else self._still_settling(key, trigger.replayed)
        if wait > 0:
            raise BackendError(
                "an earlier try's statement may have been accepted (its answer was lost, or"
                " the process died inside it) and the query history does not list it yet:"
                f" looking again in {wait:.0f}s",
                retryable=True,
                code="statement_unsure",
                retry_after=wait,
                tried=False,  # a wait, not a try: not counted against TETHER_TRIGGER_ATTEMPTS
            )

        def execute(w: WorkspaceClient) -> str:
            from databricks.sdk.service.sql import (
                Disposition,
                Format,
                QueryTag,
                StatementParameterListItem,
            )

            response = w.statement_execution.execute_statement(
                statement=params.statement,
                warehouse_id=warehouse_id,
                wait_timeout="0s",
                parameters=[StatementParameterListItem.from_dict(p) for p in parameters] or None,
                catalog=params.catalog,
                schema=params.schema,
                row_limit=int(params.row_limit),
                byte_limit=min(self.max_result_bytes, INLINE_LIMIT),
                disposition=Disposition.INLINE,
                format=Format.JSON_ARRAY,
                query_tags=[
                    QueryTag(key=TAG_KEY, value=tag_value(key)),
                    QueryTag(key=JOB_TAG_KEY, value=trigger.job.id),
                    QueryTag(key=MARK_TAG_KEY, value=trigger.mark),
                ],
            )
            if not response.statement_id:  # accepted, perhaps: never send it again
                raise BackendError(
                    "Databricks answered the statement without a statement_id",
                    code="no_statement_id",
                )
            return response.statement_id

        # Sent once: a try whose answer was lost is looked for before the next.
        try:
            statement_id = await self.workspace.call(execute, once=True)
        except BackendError as exc:
            if exc.retryable and not isinstance(exc, Throttled):  # it may have got through
                self._unsure.setdefault(key, time.monotonic())
            raise
        self._unsure.pop(key, None)
        # Sent: a later replay of this trigger (the job's record failed) waits
        # for it again, though this process waited once before sending it.
        self._waited.pop(key, None)
        self._last_sent = statement_id
        log.info(
            "databricks_sql: job %s started statement %s on warehouse %s",
            trigger.job.id,
            statement_id,
            warehouse_id,
            extra=extra,
        )
        return {"statement_id": statement_id, "warehouse_id": warehouse_id}

    async def _take(
        self, trigger: Trigger, warehouse_id: str, earlier: list[str]
    ) -> dict[str, Any]:
        """The job's statement is the first an earlier try submitted; any
        later one (a repeat nothing could find in time) is canceled."""
        statement_id, *repeats = earlier
        extra = {"job_id": trigger.job.id, "promise_id": trigger.promise_id, "backend": self.name}
        log.info(
            "databricks_sql: job %s: statement %s on warehouse %s was submitted by an"
            " earlier try (the query history lists it): not submitted again",
            trigger.job.id,
            statement_id,
            warehouse_id,
            extra=extra,
        )
        for repeat in repeats:
            log.warning(
                "databricks_sql: job %s: statement %s repeats its statement %s (both carry"
                " its tag): asking to cancel the repeat",
                trigger.job.id,
                repeat,
                statement_id,
                extra=extra,
            )
            await self.workspace.call(functools.partial(_cancel_statement, statement_id=repeat))
        return {"statement_id": statement_id, "warehouse_id": warehouse_id}

    def _still_settling(self, key: str, replayed: bool) -> float:
        """Seconds left before the statement with `key` may be submitted: one
        this process sent lost its answer, or (`replayed`) an earlier run of
        the trigger may have sent one, when is unknown, so the wait starts
        now, once. 0: none, or the settling time is over."""
        now = time.monotonic()
        settle = self.settings.settle
        for marks in (self._unsure, self._waited):
            _prune(marks, now - (20 * settle + 600))  # the jobs those were for have long ended
        sent = self._unsure.get(key)
        if sent is None:
            if not replayed or key in self._waited:
                return 0.0
            sent = self._unsure[key] = now
        self._waited.pop(key, None)  # to the end: the marks stay in the order made
        self._waited[key] = now
        left = settle - (now - sent)
        if left <= 0:
            del self._unsure[key]
        return max(left, 0.0)

    async def cancel_unrecorded(self, trigger: Trigger) -> None:
        """Cancels the statements the query history lists with this attempt's
        tag: submitted by a try whose answer was lost, not recorded."""
        params: DatabricksSqlParams = trigger.params
        warehouse_id = params.warehouse_id or self.settings.warehouse_id
        found = await self._find(trigger, warehouse_id)
        for statement_id in found:
            cancel = functools.partial(_cancel_statement, statement_id=statement_id)
            await self.workspace.call(cancel)
            log.info(
                "databricks_sql: job %s: asked to cancel statement %s, which no try's answer"
                " recorded (found in the query history by its tag)",
                trigger.job.id,
                statement_id,
                extra={"job_id": trigger.job.id, "backend": self.name},
            )

    async def _look_for_earlier(self, trigger: Trigger, warehouse_id: str) -> list[str] | None:
        """`_find`, before a statement is submitted. A refusal of the look
        (no such API, no permission) is None: the statement is submitted
        at once (no settling: nothing would show), and that is said; a
        failure worth trying again fails this try."""
        try:
            return await self._find(trigger, warehouse_id)
        except BackendError as exc:
            if exc.retryable:
                raise
            log.warning(
                "databricks_sql: job %s: the query history cannot be read (%s): the statement"
                " is submitted without looking for an earlier try's",
                trigger.job.id,
                exc,
                extra={"job_id": trigger.job.id, "backend": self.name},
            )
            return None

    async def _find(self, trigger: Trigger, warehouse_id: str) -> list[str]:
        """The statements on `warehouse_id` tagged with this attempt's key
        (and this job's mark, or none: `MARK_TAG_KEY`), first submitted
        first: the warehouse's query history of the credentials' own user
        since the job was created, newest first, at most `HISTORY_PAGES`
        pages."""
        value = tag_value(trigger.idempotency_key)
        mark = trigger.mark
        now_ms = int(time.time() * 1000)
        created_ms = int(trigger.job.created_at.timestamp() * 1000)
        since = max(created_ms - CLOCK_MARGIN_MS, now_ms - HISTORY_SPAN_MS)

        def look(w: WorkspaceClient) -> list[str]:
            from databricks.sdk.service.sql import QueryFilter, TimeRange

            window = TimeRange(start_time_ms=since, end_time_ms=now_ms + CLOCK_MARGIN_MS)
            wanted = QueryFilter(
                warehouse_ids=[warehouse_id],
                query_start_time_range=window,
                user_ids=self._own_user(w),
            )
            found: dict[str, int] = {}
            page = w.query_history.list(filter_by=wanted, max_results=HISTORY_PAGE)
            for number in range(2, HISTORY_PAGES + 2):
                for query in page.res or ():
                    tags = query.query_tags or ()
                    if query.query_id and _tagged(tags, value, mark):
                        found[query.query_id] = query.query_start_time_ms or 0
                    elif query.query_id == self._last_sent and self._last_sent:
                        self._tags_seen(any(t.key == TAG_KEY for t in tags))
                token = page.next_page_token
                if not page.has_next_page or not token or number > HISTORY_PAGES:
                    break
                try:  # the token alone: it stands for the filter (which Databricks
                    # has refused beside a token, even the same one)
                    page = w.query_history.list(max_results=HISTORY_PAGE, page_token=token)
                except Exception as exc:
                    if found:
                        break
                    said = self.workspace.translate(exc).message
                    raise BackendError(
                        f"the query history's page {number} could not be read: {said}",
                        retryable=True,
                        code="query_history",
                    ) from None
            return sorted(found, key=lambda sid: (found[sid], sid))

        return await self.workspace.call(look)

    def _tags_seen(self, kept: bool) -> None:
        """The query history listed the last statement this process sent:
        whether with its `tether` tag. Without it, the workspace drops query
        tags, and a lost answer's statement cannot be found: said once."""
        self._last_sent = ""
        if not kept and not self._said_tags_dropped:
            self._said_tags_dropped = True
            log.warning(
                "databricks_sql: the query history lists statements without the query tags"
                " Tether gave them (this workspace does not keep query tags): a statement"
                " whose submission's answer is lost cannot be found, and may run twice"
            )

    def _own_user(self, w: WorkspaceClient) -> list[int] | None:
        """The credentials' own user id (`current_user.me`, asked once), which
        the statements they submit run as: the look reads only those. None
        (every user's) when it is not a number."""
        if self._user is None:
            try:
                found = w.current_user.me().id or ""
            except Exception:  # looked for among every user's queries; asked again next time
                return None
            self._user = [int(found)] if found.isdecimal() and found.isascii() else []
        return self._user or None

    async def cancel(self, job: Job) -> None:
        statement_id = _statement_id(job)
        if statement_id is None or _ended_in_databricks(job):
            return
        await self.workspace.call(lambda w: w.statement_execution.cancel_execution(statement_id))
        log.info(
            "databricks_sql: job %s: asked to cancel statement %s",
            job.id,
            statement_id,
            extra={"job_id": job.id, "backend": self.name},
        )

    async def _cancel_if_any(self, job: Job, statement_id: str) -> None:
        """Ask to cancel a statement Databricks said it does not know, before
        its job fails: a 404 from a proxy or in an incident may hide one
        still running, which a retry would run beside. Its failure (a 404:
        gone indeed) is logged, not raised."""
        try:
            await self.cancel(job)
        except BackendError as exc:
            log.info(
                "databricks_sql: job %s: statement %s is not there to cancel: %s",
                job.id,
                statement_id,
                exc,
                extra={"job_id": job.id, "backend": self.name},
            )

    async def check_status(self, job: Job) -> Outcome | Running | None:
        """Reads the statement (`get_statement`): this backend's only way to
        learn that it ended."""
        statement_id = _statement_id(job)
        if statement_id is None:
            return None

        def read(w: WorkspaceClient) -> StatementResponse | None:
            from databricks.sdk import errors

            try:
                return w.statement_execution.get_statement(statement_id)
            except errors.NotFound as exc:
                if exc.error_code in (None, "", "NOT_FOUND", "RESOURCE_DOES_NOT_EXIST"):
                    return None  # the warehouse forgot it
                raise

        try:
            statement = await self.workspace.call(read)
        except BackendError as exc:  # the watchdog logs only the type: say what it was
            log.warning(
                "databricks_sql: job %s: reading statement %s failed: %s",
                job.id,
                statement_id,
                exc,
                extra={"job_id": job.id, "backend": self.name},
            )
            raise
        if statement is None:
            message = (
                f"Databricks SQL statement {statement_id} no longer exists (a warehouse"
                " forgets a statement 12 hours after it ended): how it ended is unknown"
            )
            await self._cancel_if_any(job, statement_id)
            return Outcome(status="failed", error=ErrorInfo(message, type="statement_gone"))
        found = outcome_of_statement(
            statement, statement_id, _row_limit(job), self.max_result_bytes
        )
        if isinstance(found, Outcome) and found.error is not None:
            error = ErrorInfo(self.workspace.scrub(found.error.message), type=found.error.type)
            found = Outcome(status=found.status, result=found.result, error=error)
        return found

    async def readiness(self) -> Readiness:
        """With a default warehouse, asks for it (`warehouses.get`, read-only):
        `ok` naming its state, `error` when it does not exist or is being
        deleted. Without one, asks whose the credentials are
        (`current_user.me`), as the `databricks` backend does. `unconfigured`
        when no workspace or credentials are found."""
        warehouse_id = self.settings.warehouse_id
        if not warehouse_id or not self.workspace.names_a_workspace():
            found = await self.workspace.readiness()
            if found.status == "ok":
                return Readiness("ok", f"no default warehouse ({ENV_PREFIX}WAREHOUSE_ID)")
            return found
        try:
            warehouse = await self.workspace.call(lambda w: w.warehouses.get(warehouse_id))
        except BackendError as exc:
            if exc.code == "databricks_config":
                return Readiness("unconfigured", exc.message)
            return Readiness("error", f"SQL warehouse {warehouse_id}: {exc.message}")
        state = getattr(warehouse.state, "value", None) or "in an unknown state"
        shown = f"SQL warehouse {warehouse_id}" + (f" ({warehouse.name})" if warehouse.name else "")
        if state in ("DELETED", "DELETING"):
            return Readiness("error", f"{shown} is {state}")
        return Readiness("ok", f"{shown} is {state}")


def _prune(marks: dict[str, float], before: float) -> None:
    """Drops the marks made before `before`: the oldest first (a mark is
    made later than every one before it), stopping at the first newer."""
    while marks:
        key, made = next(iter(marks.items()))
        if made >= before:
            return
        del marks[key]


def _tagged(tags: Iterable[QueryTag], value: str, mark: str) -> bool:
    """Whether a statement's tags are this attempt's: the key's `tether`
    tag, and the job's mark unless it carries none."""
    marks = [t.value for t in tags if t.key == MARK_TAG_KEY]
    keyed = any(t.key == TAG_KEY and t.value == value for t in tags)
    return keyed and (not marks or mark in marks)


def tag_value(key: str) -> str:
    """The `tether` tag's value for an attempt's idempotency key: 32 hex
    digits (a key has `:` and `~`, which the tags' text form gives meaning)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _cancel_statement(w: WorkspaceClient, statement_id: str) -> None:
    w.statement_execution.cancel_execution(statement_id)


def _statement_id(job: Job) -> str | None:
    value = (job.external or {}).get("statement_id")
    return value if isinstance(value, str) and value else None


def _ended_in_databricks(job: Job) -> bool:
    """True when the job was settled from the statement's final state (canceled
    in Databricks, say): there is nothing left to cancel."""
    return isinstance(job.result, dict) and job.result.get("state") in FINAL_STATES


def _row_limit(job: Job) -> int:
    """The job's `row_limit` (checked when the job was accepted)."""
    given = job.params.get("row_limit") if isinstance(job.params, dict) else None
    if isinstance(given, int | float) and not isinstance(given, bool) and given >= 1:
        return int(given)
    return DEFAULT_ROW_LIMIT


@hookimpl
def tether_backends() -> list[Backend]:
    # Reads TETHER_DATABRICKS_* only: the client is built on first use.
    return [DatabricksSql()]
