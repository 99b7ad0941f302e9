"""The `databricks` backend: run a Databricks job and wait for it durably.

Two kinds of job (`params`, exactly one of `job_id` / `submit`):

```json
{"job_id": 123, "job_parameters": {"table": "sales"}}
{"submit": {"run_name": "adhoc", "tasks": [{"task_key": "main", "notebook_task": {...}, ...}]}}
```

`job_id` runs an existing job (`jobs.run_now`); Tether adds the job parameters
`tether_callback_url`, `tether_promise_id` and `tether_job_id`, which the job
must define (notebooks read them as widgets). `submit` starts a one-time run
(`jobs.submit`, the Jobs API's `runs/submit` body); Tether adds the same three
names to the `base_parameters` of its notebook tasks. Either way the
request carries an `idempotency_token` derived from the job's promise id, so a
retried or replayed trigger never starts a second run. The job's `external` is
`{"run_id", "run_page_url", "state"}` (`state`: the run's at the last look:
as it started, then as each status check finds it).

The notebook POSTs the outcome to `tether_callback_url` when it ends (see
`examples/databricks_notebook.py`). If that callback is lost, Tether asks
`jobs.get_run` every `check_interval` seconds (default 60, backing off) and
settles the job from the run's state, with the notebook's exit value as its
result (`runs/get-output`; by task key for several tasks) or each failed
task's error (`runs.with_outputs`). Cancel and timeout cancel the run.
`POST /jobs/{id}/retry` repairs the run in place (`rerun`,
`plugins.databricks.repair`). 429 and 503 are Tether's to retry, not the
SDK's (`workspace.hand_back_throttling`).
Databricks' own job notifications posted to the callback URL are a hint only:
they never settle a job.

Credentials: databricks-sdk's unified auth (`DATABRICKS_HOST` +
`DATABRICKS_TOKEN`, another auth method's variables, or a profile of
`~/.databrickscfg`, chosen with `TETHER_DATABRICKS_PROFILE`). Timeouts:
`TETHER_DATABRICKS_RETRY_TIMEOUT`, `TETHER_DATABRICKS_HTTP_TIMEOUT`. See
docs/databricks.md.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from core.plugin import (
    Backend,
    BackendError,
    CheckNow,
    ErrorInfo,
    Job,
    Notice,
    NoticeAbout,
    Outcome,
    Readiness,
    Running,
    Trigger,
    callback_promise_id,
    hookimpl,
)
from plugins.databricks import notifications, repair
from plugins.databricks.runs import (
    failed_tasks,
    has_output,
    latest_tasks,
    outcome_of_run,
    run_state,
    with_outputs,
)
from plugins.databricks.workspace import (
    ENV_PREFIX,
    DatabricksSettings,
    Workspace,
    shown_host,
    submit_arguments,
)

if TYPE_CHECKING:
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.service.jobs import BaseRun, Run, RunOutput

log = logging.getLogger("tether.databricks")

CALLBACK_URL_PARAM = "tether_callback_url"
"""The job parameter (notebook widget) holding the callback URL."""
PROMISE_ID_PARAM = "tether_promise_id"
"""The job parameter holding the promise id the callback settles."""
JOB_ID_PARAM = "tether_job_id"
"""The job parameter holding Tether's job id (for logs and tables)."""
RESERVED_PARAMS = (CALLBACK_URL_PARAM, PROMISE_ID_PARAM, JOB_ID_PARAM)

LOOKUP_LIMIT = 1000
"""The most runs `cancel_unrecorded` looks through for one a lost trigger
try started (40 pages of `runs/list`)."""
LOOKUP_SLACK = 3600.0
"""Seconds before the job's creation (Tether's clock) that runs are looked
through from (`start_time`: Databricks' clock): the two clocks may
disagree, and the promise id tells the runs apart."""

OUTPUT_CONCURRENCY = 4
"""`runs/get-output` calls one status check makes at once (one per task of
an ended run: its exit value, or its error)."""

OUTPUT_PATIENCE = 600.0
"""Seconds after a run ended (its `end_time`) that its tasks' outputs are
waited for when Databricks cannot give them now (429, 5xx): a check then
fails and is tried again. Past it the run's end settles the job without
them, as for an output Databricks refuses: a finished run's job is never
held open by its outputs (an audit, 2026-12-04: until the job's timeout)."""

DEFAULT_CHECK_INTERVAL = 60.0
MIN_CHECK_INTERVAL = 1.0
MAX_CHECK_INTERVAL = 86400.0
"""A day: later checks back off to ten times it."""

TASK_PARAMETER_FIELDS = {"notebook_task": "base_parameters"}
"""Task types of a one-time run that get Tether's parameters, and where. Only
notebooks: they ignore parameters they do not read, while a Python wheel or
script would get them as command-line arguments it may reject."""

RUN_NAME_MARK = "[tether {} {}]"
"""Written at the end of a one-time run's name (after the name given, if
any) when none of its tasks takes Tether's parameters: the attempt's promise
id and the job's `Trigger.mark`. `cancel_unrecorded` finds such a run by it,
as it finds the others by their parameters; the mark keeps it from taking
another Tether deployment's run of a job under the same id."""
RUN_NAME_MARK_BEFORE = "[tether {}]"
"""The same, as releases before 2026-12-06 wrote it (no job mark): still
taken for the attempt's, for runs those releases started."""

WholeFloat = Annotated[float, Meta(extra_json_schema={"multipleOf": 1})]
"""An integer written with a fraction (`7.0`): JSON Schema counts it an integer,
msgspec's `int` does not, so an `int` field takes it too (`__post_init__` makes
it an int)."""
ID_MAX = 2**63 - 1
"""Databricks' ids are 64-bit signed integers."""
PositiveInt = (
    Annotated[int, Meta(gt=0, le=ID_MAX)] | Annotated[WholeFloat, Meta(gt=0, le=2**53 - 1)]
)
"""A positive integer Databricks can take, `7.0` included (a float only below
2**53: past it a float is not the number sent, `1e300` no id)."""

NOT_RESERVED = {"propertyNames": {"minLength": 1, "not": {"enum": list(RESERVED_PARAMS)}}}
"""In a schema: an object that sets none of Tether's own parameters, and no
parameter without a name."""
JobParameters = Annotated[dict[str, str], Meta(extra_json_schema=NOT_RESERVED)]
TASK_PARAMETERS = {"type": ["object", "null"], "additionalProperties": {"type": "string"}}
"""In a schema: a task's parameters (`TASK_PARAMETER_FIELDS`), names to strings."""
Task = Annotated[
    dict[str, Any],
    Meta(
        extra_json_schema={
            "required": ["task_key"],
            "properties": {
                "task_key": {"type": "string", "minLength": 1},
                **{
                    kind: {"properties": {field: {**TASK_PARAMETERS, **NOT_RESERVED}}}
                    for kind, field in TASK_PARAMETER_FIELDS.items()
                },
            },
        }
    ),
]
"""A task of a one-time run, as the Jobs API writes it; the schema says what
`SubmitRun` checks of it."""


class SubmitRun(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A one-time run: the body of the Jobs API's `runs/submit` (without
    `idempotency_token`, which Tether sets). Tasks are checked against the SDK's
    types, and for task keys used twice, when the run is started: no JSON
    Schema can say that keys differ, and what the schema allows is accepted."""

    tasks: Annotated[list[Task], Meta(min_length=1)]
    run_name: str | None = None
    timeout_seconds: int | WholeFloat | None = None
    access_control_list: list[dict[str, Any]] | None = None
    budget_policy_id: str | None = None
    duration_target: str | None = None
    email_notifications: dict[str, Any] | None = None
    environment_variables: list[dict[str, Any]] | None = None
    environments: list[dict[str, Any]] | None = None
    git_source: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    notification_settings: dict[str, Any] | None = None
    performance_target: str | None = None
    queue: dict[str, Any] | None = None
    run_as: dict[str, Any] | None = None
    usage_policy_id: str | None = None
    webhook_notifications: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _make_int(self, "timeout_seconds")
        for i, task in enumerate(self.tasks):
            key = task.get("task_key")
            if not isinstance(key, str) or not key:
                raise ValueError(f"tasks[{i}] needs a `task_key` (a non-empty string)")
            for kind, field in TASK_PARAMETER_FIELDS.items():
                section = task.get(kind)
                given = section.get(field) if isinstance(section, dict) else None
                where = f"tasks[{i}].{kind}.{field}"
                if given is not None and not (
                    isinstance(given, dict) and all(isinstance(v, str) for v in given.values())
                ):  # (taken before, then every try failed with a TypeError)
                    raise ValueError(f"{where} must be an object of names to strings")
                if isinstance(given, dict):
                    _check_not_reserved(given, where)


class DatabricksParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`params` of a `databricks` job: exactly one of `job_id` and `submit`."""

    job_id: PositiveInt | None = None
    """Run this existing job (`jobs.run_now`)."""
    job_parameters: JobParameters = msgspec.field(default_factory=dict)
    """Job parameters for `job_id` (strings). Tether adds its own three."""
    submit: SubmitRun | None = None
    """Start this one-time run instead (`jobs.submit`)."""
    check_interval: Annotated[float, Meta(ge=MIN_CHECK_INTERVAL, le=MAX_CHECK_INTERVAL)] = (
        DEFAULT_CHECK_INTERVAL
    )
    """Seconds between `jobs.get_run` checks while the job waits (at least 1;
    later checks back off up to ten times this)."""

    def __post_init__(self) -> None:
        _make_int(self, "job_id")
        if (self.job_id is None) == (self.submit is None):
            raise ValueError(
                "give exactly one of `job_id` (run a job) and `submit` (a one-time run)"
            )
        if self.submit is not None and self.job_parameters:
            raise ValueError("`job_parameters` go with `job_id`; a one-time run has none")
        _check_not_reserved(self.job_parameters, "job_parameters")


RUN_NOW_OR_SUBMIT = {
    "oneOf": [
        {
            "title": "Run an existing job",
            "required": ["job_id"],
            "properties": {"job_id": {"not": {"type": "null"}}, "submit": {"type": "null"}},
        },
        {
            "title": "A one-time run",
            "required": ["submit"],
            "properties": {
                "submit": {"not": {"type": "null"}},
                "job_id": {"type": "null"},
                "job_parameters": {"maxProperties": 0},
            },
        },
    ]
}
"""What `DatabricksParams.__post_init__` checks of the two kinds, as a schema."""

Params = Annotated[DatabricksParams, Meta(extra_json_schema=RUN_NOW_OR_SUBMIT)]
"""`DatabricksParams`, with the schema saying that exactly one kind is given."""


def _make_int(struct: msgspec.Struct, name: str) -> None:
    """A `WholeFloat` field's float made the int it is; a fraction is refused."""
    value = getattr(struct, name)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"`{name}` must be a whole number")
        msgspec.structs.force_setattr(struct, name, int(value))


def _check_not_reserved(parameters: Mapping[str, Any], where: str) -> None:
    if "" in parameters:
        raise ValueError(f"{where} must not have a parameter without a name")
    taken = sorted(set(parameters) & set(RESERVED_PARAMS))
    if taken:
        raise ValueError(f"{where} must not set {', '.join(taken)}: Tether sets it")


def idempotency_token(trigger: Trigger) -> str:
    """The run's `idempotency_token` (at most 64 characters): the same every time
    this job's trigger runs, and never the same for another job, even one reusing
    an id of a job deleted long ago (Databricks remembers tokens indefinitely)."""
    created = round(trigger.job.created_at.timestamp() * 1000)
    digest = hashlib.sha256(f"{trigger.idempotency_key}@{created}".encode()).hexdigest()
    return f"tether-{digest[:57]}"


class Databricks(Backend):
    name = "databricks"
    params_type = Params
    settings_type = notifications.with_notify_settings(DatabricksSettings)
    settings_prefix = ENV_PREFIX

    def __init__(
        self,
        settings: DatabricksSettings | None = None,
        notify: notifications.NotifySettings | None = None,
    ) -> None:
        self.workspace = Workspace(settings or DatabricksSettings.from_env())
        self.notify = notify or notifications.NotifySettings.from_env()
        """Who may post workspace notifications (`receive_notification`)."""

    def check_interval(self, params: DatabricksParams) -> float:
        return params.check_interval

    async def trigger(self, trigger: Trigger) -> dict[str, Any]:
        params: DatabricksParams = trigger.params
        ours = _ours(trigger)
        if params.submit is not None:
            _check_task_keys(params.submit)
        # An int already (`__post_init__`); typed `int | float` for the schema's sake.
        job_id = None if params.job_id is None else int(params.job_id)
        token = idempotency_token(trigger)
        callback_token = trigger.callback_token

        def start(w: WorkspaceClient) -> dict[str, Any]:
            if job_id is not None:
                job_parameters = {**params.job_parameters, **ours}
                waiter = w.jobs.run_now(
                    job_id, job_parameters=job_parameters, idempotency_token=token
                )
            else:
                assert params.submit is not None
                try:
                    spec = _with_parameters(params.submit, ours, trigger.mark)
                    arguments = submit_arguments(spec)
                except ValueError as exc:
                    raise BackendError(
                        f"invalid params.submit: {exc}", code="INVALID_PARAMETER_VALUE"
                    ) from None
                waiter = w.jobs.submit(**arguments, idempotency_token=token)
            run_id = int(waiter.run_id)
            return {"run_id": run_id, **_describe(w, run_id, job_id)}

        external = await self.workspace.call(start, callback_token)
        log.info(
            "databricks: job %s started run %s",
            trigger.job.id,
            external["run_id"],
            extra={
                "job_id": trigger.job.id,
                "promise_id": trigger.promise_id,
                "backend": self.name,
            },
        )
        return external

    async def rerun(self, trigger: Trigger, previous: Job) -> dict[str, Any]:
        """Repairs the previous attempt's run in place (`runs/repair`, its
        failed tasks only, with this attempt's parameters); starts a new run
        when it cannot be repaired. See `plugins.databricks.repair`."""
        run_id = _run_id(previous)
        if run_id is None:  # never started: nothing to repair
            return await self.trigger(trigger)
        params: DatabricksParams = trigger.params
        ours = _ours(trigger)
        parameters = (
            {"job_parameters": {**params.job_parameters, **ours}}
            if params.job_id is not None
            else {"notebook_params": ours}
        )
        extra = {"job_id": trigger.job.id, "promise_id": trigger.promise_id, "backend": self.name}
        try:
            external = await repair.repair(
                self.workspace,
                run_id,
                _repair_id(previous),
                trigger.promise_id,
                parameters,
                trigger.callback_token,
            )
        except repair.NotRepaired as why:
            log.info(
                "databricks: job %s: run %s is not repaired (%s); starting a new run",
                trigger.job.id,
                run_id,
                why,
                extra=extra,
            )
            return await self.trigger(trigger)
        log.info(
            "databricks: job %s: attempt %d repairs run %s (repair %s)",
            trigger.job.id,
            trigger.job.attempt,
            run_id,
            external["repair_id"],
            extra=extra,
        )
        return external

    async def cancel(self, job: Job) -> None:
        run_id = _run_id(job)
        if run_id is None or _ended_in_databricks(job):
            return
        await self.workspace.call(lambda w: w.jobs.cancel_run(run_id))
        log.info(
            "databricks: job %s: asked to cancel run %s",
            job.id,
            run_id,
            extra={"job_id": job.id, "backend": self.name},
        )

    async def cancel_unrecorded(self, trigger: Trigger) -> None:
        """Cancels the runs not yet ended that carry this attempt's
        `tether_promise_id`, in their parameters (beside a callback URL this
        deployment signed: `repair.started_for`) or (a one-time run with no
        notebook task) in their name, with the job's mark, `RUN_NAME_MARK`
        (`runs/list`: the job's
        runs, or the one-time runs, started since the job was created, less
        `LOOKUP_SLACK` for the two clocks; `LOOKUP_LIMIT` at most): a run a
        trigger try started though its answer was lost. A repair of the
        previous attempt's run carries the new attempt's parameters too,
        but a one-time run with no notebook task may name no attempt after
        its repair but by its name, its first attempt's: a run named for an
        earlier attempt of this job that is going again is canceled as
        well (the earlier attempts ended before this one began, their runs
        stopped or over, and a retry waits for the attempt's finish, which
        asks this). Not when the job was retried since (`trigger.retried`:
        a process that stalled inside this attempt's trigger asks, and such
        a run may be the later attempt's, repaired by it); and then nothing
        at all if the attempt recorded a run (another process triggered
        it): the tries could only have started that run (its idempotency
        token; a repair of it), which a later attempt may have repaired."""
        params: DatabricksParams = trigger.params
        job_id = None if params.job_id is None else int(params.job_id)
        since = round((trigger.job.created_at.timestamp() - LOOKUP_SLACK) * 1000)
        extra = {"job_id": trigger.job.id, "promise_id": trigger.promise_id, "backend": self.name}
        recorded = _run_id(trigger.job)
        if trigger.retried and recorded is not None:
            # Another process recorded the attempt's run: this one's tries
            # (the same idempotency token, or a repair of that run) could
            # only have started that run, which a later attempt may repair.
            log.info(
                "databricks: job %s: attempt %d recorded run %s, the only one its tries could"
                " have started; the job was retried since, so it is left to the job",
                trigger.job.id,
                trigger.job.attempt,
                recorded,
                extra=extra,
            )
            return
        earlier = 1 if trigger.retried else trigger.job.attempt
        named = [callback_promise_id(trigger.job.id, k) for k in range(1, earlier)]
        named.append(trigger.promise_id)

        def find(w: WorkspaceClient) -> list[int]:
            from databricks.sdk.service.jobs import RunType

            runs = w.jobs.list_runs(
                job_id=job_id,
                start_time_from=since,
                run_type=RunType.SUBMIT_RUN if job_id is None else None,
                expand_tasks=job_id is None or None,
                limit=25,  # the most a page holds
            )
            found = []
            for seen, run in enumerate(runs, 1):
                ours = repair.started_for(run, run.tasks or [], trigger) or any(
                    _named_for(run, promise_id, trigger.mark) for promise_id in named
                )
                if ours and run.run_id is not None and not _run_over(run):
                    found.append(run.run_id)
                if seen >= LOOKUP_LIMIT:
                    log.warning(
                        "databricks: job %s: looked through %d runs for one its trigger"
                        " may have started, and no further",
                        trigger.job.id,
                        seen,
                        extra=extra,
                    )
                    break
            return found

        found = await self.workspace.call(find, trigger.callback_token)
        if not found:
            log.info(
                "databricks: job %s: no run of its attempt %d found going, to cancel",
                trigger.job.id,
                trigger.job.attempt,
                extra=extra,
            )
        for run_id in found:
            await self.workspace.call(functools.partial(_cancel_run, run_id=run_id))
            log.info(
                "databricks: job %s: asked to cancel run %s, started by a trigger try whose"
                " answer was lost",
                trigger.job.id,
                run_id,
                extra=extra,
            )

    async def check_status(self, job: Job) -> Outcome | Running | None:
        run_id = _run_id(job)
        if run_id is None:
            return None
        repair_id = _repair_id(job)
        history = True if repair_id is not None else None
        try:
            run = await self.workspace.call(
                lambda w: w.jobs.get_run(run_id, include_history=history)
            )
            found = outcome_of_run(run, repair_id)
            if isinstance(found, Outcome) and found.status in ("succeeded", "failed"):
                found = await self._with_outputs(found, run)
        except BackendError as exc:  # the watchdog logs only the type: say what it was
            log.warning(
                "databricks: job %s: reading run %s failed: %s",
                job.id,
                run_id,
                exc,
                extra={"job_id": job.id, "backend": self.name},
            )
            if run_gone(exc):  # deleted (by hand, or 60 days on): it will never end
                message = (
                    f"Databricks run {run_id} no longer exists ({exc.message}): how it ended"
                    " is unknown"
                )
                return Outcome(status="failed", error=ErrorInfo(message, type="RUN_NOT_FOUND"))
            raise
        return found

    async def _with_outputs(self, outcome: Outcome, run: Run) -> Outcome:
        """An ended run's outcome with its tasks' `runs/get-output`: the exit
        values of a run that succeeded, the errors of the tasks that failed
        (see `runs.with_outputs`). An output Databricks refuses (deleted, a
        task kind without one) is left out; one it cannot give now (429,
        5xx) fails the check, which is tried again later, until
        `OUTPUT_PATIENCE` after the run ended: then it is left out too."""
        tasks = latest_tasks(run)
        wanted = (
            [t for t in tasks if has_output(t)]
            if outcome.status == "succeeded"
            else failed_tasks(tasks)
        )
        ids = [t.run_id for t in wanted if t.run_id is not None]
        limit = asyncio.Semaphore(OUTPUT_CONCURRENCY)
        waited = time.time() - run.end_time / 1000 if run.end_time else 0.0

        async def output(task_run_id: int) -> tuple[int, RunOutput | None]:
            async with limit:
                try:
                    got = await self.workspace.call(lambda w: w.jobs.get_run_output(task_run_id))
                except BackendError as exc:
                    if exc.retryable and waited < OUTPUT_PATIENCE:
                        raise BackendError(  # said so: reading the run itself went well
                            f"the output of task run {task_run_id}: {exc.message}",
                            retryable=True,
                            code=exc.code,
                            retry_after=exc.retry_after,
                        ) from None
                    log.warning(
                        "databricks: run %s: task run %s has no output: %s",
                        run.run_id,
                        task_run_id,
                        exc.message,
                    )
                    return task_run_id, None
                return task_run_id, got

        outputs = dict(await asyncio.gather(*(output(i) for i in ids)))
        return with_outputs(outcome, tasks, outputs)

    async def readiness(self) -> Readiness:
        """Asks the workspace who the credentials belong to (`current_user.me`,
        read-only): `unconfigured` when the SDK finds no host or credentials,
        `error` with Databricks' reason when it refuses them or cannot be
        reached."""
        return await self.workspace.readiness()

    def run_keys(self, external: Mapping[str, Any]) -> list[str]:
        """The run id: workspace notifications name it (`run.run_id`, or a
        task's `run.parent_run_id`)."""
        return notifications.run_keys(external)

    async def receive_notification(self, notice: Notice) -> NoticeAbout:
        """A workspace notification destination's POST (see
        `plugins.databricks.notifications`): authenticated with the
        `TETHER_DATABRICKS_NOTIFY_*` credentials, read for its run ids. Tether
        then reads each of its runs with `jobs.get_run` (`check_status`)."""
        notifications.authenticate(self.notify, notice)
        return notifications.read(notice.body)

    def parse_callback(self, job: Job, body: Any) -> Outcome | CheckNow | None:
        """Databricks' own job notification (`{"event_type": "jobs.on_success",
        "run": {"run_id": ...}, ...}`) names a run and an event, and anyone who
        can configure a notification destination can send one: it is never
        trusted to settle a job. It makes Tether read the run's state at once
        (`CheckNow`), and that state alone settles the job. `run.run_id` is
        read as the notification destination reads it (`notifications.run_id`):
        a JSON integer or a string of digits, as Databricks sends ids; a
        fraction, a boolean or anything else is refused (`ValueError`)."""
        if not (isinstance(body, dict) and isinstance(body.get("event_type"), str)):
            return None
        event = body["event_type"][:100]  # quoted back below: as `notifications.read` cuts it
        run = body.get("run")
        given = run.get("run_id") if isinstance(run, dict) else None
        if given is None:
            raise ValueError(
                f"a Databricks notification ({event}) needs `run.run_id`; nothing changed"
            )
        try:  # as the notification destination reads them (`notifications.read`): a task's
            # notification names its job run in `run.parent_run_id`; never `int()` (1067.5)
            about = [int(key) for key in notifications.read(body).keys]
        except ValueError as exc:
            raise ValueError(
                f"a Databricks notification ({event}): {exc}; nothing changed"
            ) from None
        run_id = about[0]  # the job run's: the parent's when named
        expected = _run_id(job)
        if expected is not None and expected in about:
            run_id = expected
        elif expected is not None:
            raise ValueError(
                f"the notification ({event}) is about run {run_id}, but this job's run is"
                f" {expected}; nothing changed"
            )
        return CheckNow(f"Databricks {event} for run {run_id}: reading the run's state")


def _check_task_keys(submit: SubmitRun) -> None:
    """Fails the job, before any request, when a one-time run uses a task key
    twice (which Databricks refuses)."""
    seen: set[str] = set()
    for i, task in enumerate(submit.tasks):
        key = task["task_key"]
        if key in seen:
            raise BackendError(
                f"invalid params.submit: tasks[{i}]: task_key {key!r} is used twice",
                code="INVALID_PARAMETER_VALUE",
            )
        seen.add(key)


def _with_parameters(submit: SubmitRun, ours: Mapping[str, str], mark: str) -> dict[str, Any]:
    """The one-time run spec as JSON (a copy), with Tether's parameters added to
    its notebook tasks; when no task takes them, the attempt's promise id and
    the job's mark are written into the run's name instead (`RUN_NAME_MARK`)."""
    spec: dict[str, Any] = msgspec.to_builtins(submit)
    tasks = []
    given = False
    for task in spec["tasks"]:
        task = dict(task)
        for kind, field in TASK_PARAMETER_FIELDS.items():
            section = task.get(kind)
            if isinstance(section, dict):
                task[kind] = {**section, field: {**(section.get(field) or {}), **ours}}
                given = True
        tasks.append(task)
    promise_id = ours.get(PROMISE_ID_PARAM)
    if not given and promise_id:
        named = RUN_NAME_MARK.format(promise_id, mark)
        spec["run_name"] = f"{spec['run_name']} {named}" if spec.get("run_name") else named
    return {**spec, "tasks": tasks}


def _named_for(run: BaseRun, promise_id: str, mark: str) -> bool:
    """Whether a one-time run's name carries this promise id's mark, with
    this job's mark (or none: an earlier release's run)."""
    name = run.run_name or ""
    return name.endswith(RUN_NAME_MARK.format(promise_id, mark)) or name.endswith(
        RUN_NAME_MARK_BEFORE.format(promise_id)
    )


def _describe(w: WorkspaceClient, run_id: int, job_id: int | None) -> dict[str, Any]:
    """The run's page (as `jobs.get_run` gives it, else built from the host)
    and its state as the run starts (`QUEUED` when the workspace or the job
    is at its limit of concurrent runs, `BLOCKED`, `PENDING`, ...), when
    `jobs.get_run` says."""
    try:
        run = w.jobs.get_run(run_id)
    except Exception as exc:  # the run was started: a missing link must not fail the job
        log.warning("databricks: run %s: no run page URL (%s)", run_id, type(exc).__name__)
        run = None
    described: dict[str, Any] = {"run_page_url": run.run_page_url if run else None}
    if not described["run_page_url"]:
        host = (shown_host(w.config.host) or "").rstrip("/")
        if host and job_id is not None:
            described["run_page_url"] = f"{host}/#job/{job_id}/run/{run_id}"
    state = run_state(run) if run is not None else None
    if state is not None:
        described["state"] = state
    return described


def _ours(trigger: Trigger) -> dict[str, str]:
    """Tether's three parameters for this attempt."""
    return {
        CALLBACK_URL_PARAM: trigger.callback_url,
        PROMISE_ID_PARAM: trigger.promise_id,
        JOB_ID_PARAM: trigger.job.id,
    }


def _cancel_run(w: WorkspaceClient, run_id: int) -> None:
    w.jobs.cancel_run(run_id)


def _run_over(run: BaseRun) -> bool:
    """Whether a listed run has ended (nothing to cancel): by its `status`,
    else its deprecated `state`. Anything else (queued, blocked, waiting to
    retry, running, terminating) is stopped."""
    if run.status is not None and run.status.state is not None:
        return run.status.state.value == "TERMINATED"
    life = run.state.life_cycle_state if run.state is not None else None
    return life is not None and life.value in ("TERMINATED", "SKIPPED", "INTERNAL_ERROR")


def _ended_in_databricks(job: Job) -> bool:
    """True when the job was settled from its run's final state (canceled in
    Databricks, say): there is nothing left to cancel."""
    return isinstance(job.result, dict) and "termination_code" in job.result


def run_gone(exc: BackendError) -> bool:
    """Whether Databricks said the run does not exist: `runs/get` answers 400
    `INVALID_PARAMETER_VALUE` "Run N does not exist." (404
    `RESOURCE_DOES_NOT_EXIST` on other routes)."""
    if exc.code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return exc.code == "INVALID_PARAMETER_VALUE" and "does not exist" in exc.message


def _run_id(job: Job) -> int | None:
    value = (job.external or {}).get("run_id")
    return value if isinstance(value, int) else None


def _repair_id(job: Job) -> int | None:
    """The repair of the run this attempt made (`rerun`), if it made one."""
    value = (job.external or {}).get("repair_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@hookimpl
def tether_backends() -> list[Backend]:
    # Reads TETHER_DATABRICKS_* only: the client is built on first use.
    return [Databricks()]
