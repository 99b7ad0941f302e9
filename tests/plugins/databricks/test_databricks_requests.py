"""The `databricks` backend's requests and its reading of answers, in process:
params, run states, errors, the one-time run spec, and the backend's methods
through the real databricks-sdk client against the fake workspace
(tests/plugins/databricks/workspace.py), no service. Fast enough to judge
mutants with (`./dev mutate databricks`)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import msgspec
import pytest
from databricks.sdk import errors
from databricks.sdk.errors.base import DatabricksError
from databricks.sdk.service import jobs as sdk_jobs
from databricks.sdk.service.jobs import Run

from core.errors import BackendError
from core.models import CheckNow, ErrorInfo, Job, Outcome, Running, Trigger
from core.store.jobs import JobRecord
from core.views import view
from plugins.databricks import (
    Databricks,
    DatabricksParams,
    SubmitRun,
    _with_parameters,
    idempotency_token,
    tether_backends,
)
from plugins.databricks.runs import _name, outcome_of_run
from plugins.databricks.workspace import (
    MAX_MESSAGE,
    DatabricksSettings,
    Workspace,
    _lost_field,
    _screaming,
    submit_arguments,
)
from tests.plugins.databricks.workspace import TOKEN, FakeWorkspace, hang

RUN_NOW = "/api/2.2/jobs/run-now"
SUBMIT = "/api/2.2/jobs/runs/submit"
GET_RUN = "/api/2.2/jobs/runs/get"
CANCEL = "/api/2.2/jobs/runs/cancel"
CALLBACK = "http://tether.test/callbacks/j%3A1?token=cbTk7q2Zx9Lw4Rn8Vb3y"
CREATED = datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC)
SETTINGS = DatabricksSettings(retry_timeout=2, http_timeout=5, threads=2)


def job(
    state: str = "running",
    params: dict[str, Any] | None = None,
    external: dict[str, Any] | None = None,
    result: Any = None,
) -> Job:
    ms = round(CREATED.timestamp() * 1000)
    return view(
        JobRecord(
            id="j",
            backend="databricks",
            state=state,  # type: ignore[arg-type]
            params=params or {"job_id": 7},
            metadata={},
            timeout=60,
            fingerprint="f",
            deadline=ms + 60_000,
            created_at=ms,
            updated_at=ms,
            external=external,
            result=result,
        )
    )


def trigger(params: dict[str, Any], callback_url: str = CALLBACK) -> Trigger:
    return Trigger(
        job=job("pending", params),
        params=msgspec.convert(params, DatabricksParams),
        promise_id="j:1",
        callback_url=callback_url,
        idempotency_key="j:1",
    )


@pytest.fixture
def backend(workspace: FakeWorkspace) -> Iterator[Databricks]:
    yield Databricks(SETTINGS)


@pytest.fixture
def sdk_logs() -> Iterator[list[str]]:
    """What the plugin logs (`tether.databricks`), seen at the logger itself."""
    lines: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("tether.databricks")
    handler, level = Handler(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


# ── params ───────────────────────────────────────────────────────────────────


def convert(params: dict[str, Any]) -> DatabricksParams:
    return msgspec.convert(params, DatabricksParams)


def refusal(params: dict[str, Any]) -> str:
    with pytest.raises(msgspec.ValidationError) as raised:
        convert(params)
    return str(raised.value)


NOTEBOOK = {"task_key": "main", "notebook_task": {"notebook_path": "/n"}}


def test_params_name_a_job_or_a_one_time_run():
    assert convert({"job_id": 1}) == DatabricksParams(job_id=1, check_interval=60.0)
    assert convert({"job_id": 7, "job_parameters": {"a": "b"}, "check_interval": 1}) == (
        DatabricksParams(job_id=7, job_parameters={"a": "b"}, check_interval=1.0)
    )
    # JSON Schema's integers include 7.0: taken, and made the int they are
    assert convert({"job_id": 7.0}).job_id == 7 and type(convert({"job_id": 7.0}).job_id) is int
    timed = convert({"submit": {"tasks": [NOTEBOOK], "timeout_seconds": 60.0}})
    assert timed.submit is not None and type(timed.submit.timeout_seconds) is int
    submit = convert({"submit": {"tasks": [NOTEBOOK], "run_name": "adhoc"}})
    assert submit.submit == SubmitRun(tasks=[NOTEBOOK], run_name="adhoc")
    assert submit.job_id is None and submit.job_parameters == {}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "give exactly one of `job_id` (run a job) and `submit` (a one-time run)"),
        (
            {"job_id": 1, "submit": {"tasks": [NOTEBOOK]}},
            "give exactly one of `job_id` (run a job) and `submit` (a one-time run)",
        ),
        ({"job_id": 0}, "Expected `int` >= 1 - at `$.job_id`"),
        ({"job_id": 0.0}, "Expected `float` > 0.0 - at `$.job_id`"),
        ({"job_id": 7.5}, "`job_id` must be a whole number"),
        (
            {"submit": {"tasks": [NOTEBOOK], "timeout_seconds": 60.5}},
            "`timeout_seconds` must be a whole number - at `$.submit`",
        ),
        ({"job_id": -3}, "Expected `int` >= 1 - at `$.job_id`"),
        (
            {"submit": {"tasks": [NOTEBOOK]}, "job_parameters": {"a": "b"}},
            "`job_parameters` go with `job_id`; a one-time run has none",
        ),
        (
            {"job_id": 1, "job_parameters": {"tether_promise_id": "x", "tether_job_id": "y"}},
            "job_parameters must not set tether_job_id, tether_promise_id: Tether sets it",
        ),
        (
            {"job_id": 1, "job_parameters": {"tether_callback_url": "x", "ok": "y"}},
            "job_parameters must not set tether_callback_url: Tether sets it",
        ),
        ({"job_id": 1, "check_interval": 0.99}, "Expected `float` >= 1.0 - at `$.check_interval`"),
        (
            {"job_id": 1, "check_interval": 86400.5},
            "Expected `float` <= 86400.0 - at `$.check_interval`",
        ),
        ({"submit": {"tasks": []}}, "Expected `array` of length >= 1 - at `$.submit.tasks`"),
        (
            {"submit": {"tasks": [{"notebook_task": {}}]}},
            "tasks[0] needs a `task_key` (a non-empty string) - at `$.submit`",
        ),
        (
            {"submit": {"tasks": [NOTEBOOK, {"task_key": ""}]}},
            "tasks[1] needs a `task_key` (a non-empty string) - at `$.submit`",
        ),
        (
            {"submit": {"tasks": [{"task_key": 3}]}},
            "tasks[0] needs a `task_key` (a non-empty string) - at `$.submit`",
        ),
        (
            {
                "submit": {
                    "tasks": [
                        NOTEBOOK,
                        {
                            "task_key": "b",
                            "notebook_task": {"base_parameters": {"tether_job_id": "x"}},
                        },
                    ]
                }
            },
            "tasks[1].notebook_task.base_parameters must not set tether_job_id: Tether sets it"
            " - at `$.submit`",
        ),
        # taken before, then every try of the trigger failed with a TypeError
        *(
            (
                {"submit": {"tasks": [{"task_key": "a", "notebook_task": {"base_parameters": v}}]}},
                "tasks[0].notebook_task.base_parameters must be an object of names to strings"
                " - at `$.submit`",
            )
            for v in ("oops", ["x"], {"n": 1})
        ),
    ],
)
def test_params_that_cannot_work_are_refused(params: dict[str, Any], message: str):
    assert refusal(params) == message


def test_parameters_of_other_task_kinds_are_not_checked():
    tasks = [
        {"task_key": "a", "python_wheel_task": {"parameters": ["tether_job_id"]}},
        {"task_key": "b", "notebook_task": {"base_parameters": None}},
        {"task_key": "c", "notebook_task": "not an object"},
    ]
    assert convert({"submit": {"tasks": tasks}}).submit is not None


def test_the_check_interval_is_the_params_own():
    backend = Databricks(SETTINGS)
    assert backend.check_interval(convert({"job_id": 1, "check_interval": 2.5})) == 2.5


def test_the_plugin_offers_one_databricks_backend(monkeypatch):
    monkeypatch.delenv("TETHER_DATABRICKS_THREADS", raising=False)
    [backend] = tether_backends()
    assert isinstance(backend, Databricks) and backend.name == "databricks"


def test_the_idempotency_token_is_a_hash_of_the_key_and_the_creation_time():
    t = trigger({"job_id": 7})
    ms = round(CREATED.timestamp() * 1000)
    assert ms % 1000 == 123  # rounded to the millisecond
    digest = hashlib.sha256(f"j:1@{ms}".encode()).hexdigest()
    assert idempotency_token(t) == f"tether-{digest[:57]}"
    assert len(idempotency_token(t)) == 64


def test_the_idempotency_token_rounds_the_creation_time():
    """Half a millisecond and more rounds up (the job's times are whole milliseconds)."""
    t = trigger({"job_id": 7})
    later = msgspec.structs.replace(
        t,
        job=msgspec.structs.replace(t.job, created_at=datetime(2026, 1, 1, 0, 0, 0, 999_600, UTC)),
    )
    ms = round(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC).timestamp() * 1000)
    assert (
        idempotency_token(later)
        == "tether-" + hashlib.sha256(f"j:1@{ms}".encode()).hexdigest()[:57]
    )


# ── run states ───────────────────────────────────────────────────────────────


def run(
    status: str | None = None,
    code: str | None = None,
    message: str | None = None,
    life_cycle: str | None = None,
    result_state: str | None = None,
    state_message: str | None = None,
    details: bool = True,
) -> Run:
    body: dict[str, Any] = {"run_id": 42}
    if status is not None:
        body["status"] = {"state": status}
        if details:
            body["status"]["termination_details"] = {"code": code, "message": message}
    state = {
        k: v
        for k, v in {
            "life_cycle_state": life_cycle,
            "result_state": result_state,
            "state_message": state_message,
        }.items()
        if v is not None
    }
    if state:
        body["state"] = state
    return Run.from_dict(body)


def ended(status: str, code: str, message: str | None = None) -> Outcome:
    """A run's outcome: a success keeps the run's message in its result, the
    others say it in their error."""
    result: dict[str, Any] = {"run_id": 42, "termination_code": code}
    if status == "succeeded":
        return Outcome(
            status="succeeded", result={**result, **({"message": message} if message else {})}
        )
    error = ErrorInfo(message=message or "", type=code)
    return Outcome(status=status, result=result, error=error)  # type: ignore[arg-type]


def going(state: str) -> Running:
    """A run Databricks confirms is going, in this state (kept as the job's
    `external.state` too)."""
    return Running(progress={"state": state}, external={"state": state})


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        *[
            (run(state), going(state))
            for state in ("BLOCKED", "PENDING", "QUEUED", "RUNNING", "TERMINATING", "WAITING")
        ],
        # the current field wins over the deprecated one
        (run("RUNNING", life_cycle="TERMINATED", result_state="SUCCESS"), going("RUNNING")),
        (run("TERMINATED", "SUCCESS"), ended("succeeded", "SUCCESS")),
        (
            run("TERMINATED", "SUCCESS", "all good"),
            ended("succeeded", "SUCCESS", message="all good"),
        ),
        (
            run("TERMINATED", "SUCCESS_WITH_FAILURES", state_message="old words"),
            ended("succeeded", "SUCCESS_WITH_FAILURES", message="old words"),
        ),
        (
            run("TERMINATED", "USER_CANCELED", "by Ann"),
            ended(
                "canceled",
                "USER_CANCELED",
                "Databricks run 42 was canceled (USER_CANCELED): by Ann",
            ),
        ),
        (
            run("TERMINATED", "CANCELED", "exceeded timeout_seconds"),
            ended(
                "failed",
                "CANCELED",
                "Databricks run 42 was canceled by Databricks (CANCELED; e.g. its"
                " timeout_seconds passed): exceeded timeout_seconds",
            ),
        ),
        (
            run("TERMINATED", "SKIPPED", "upstream"),
            ended("failed", "SKIPPED", "Databricks run 42 was skipped (SKIPPED): upstream"),
        ),
        (
            run("TERMINATED", "MAX_CONCURRENT_RUNS_EXCEEDED"),
            ended(
                "failed",
                "MAX_CONCURRENT_RUNS_EXCEEDED",
                "Databricks run 42 was skipped (MAX_CONCURRENT_RUNS_EXCEEDED)",
            ),
        ),
        (
            run("TERMINATED", "RUN_EXECUTION_ERROR", "Workload failed"),
            ended(
                "failed",
                "RUN_EXECUTION_ERROR",
                "Databricks run 42 failed (RUN_EXECUTION_ERROR): Workload failed",
            ),
        ),
        # a termination code newer than this SDK: the deprecated result state says
        (
            run("TERMINATED", "BRAND_NEW_CODE", "m", result_state="SUCCESS"),
            ended("succeeded", "SUCCESS", message="m"),
        ),
        (
            run("TERMINATED", "BRAND_NEW_CODE", "m"),
            ended("failed", "UNKNOWN", "Databricks run 42 failed (UNKNOWN): m"),
        ),
        (
            run("TERMINATED", details=False, result_state="CANCELED", state_message="old"),
            ended("canceled", "CANCELED", "Databricks run 42 was canceled (CANCELED): old"),
        ),
        # a state newer than this SDK: fall back to the deprecated state
        (run("BRAND_NEW_STATE", life_cycle="RUNNING"), going("RUNNING")),
        (run("BRAND_NEW_STATE"), None),
        (
            run("BRAND_NEW_STATE", life_cycle="TERMINATED", result_state="FAILED"),
            ended("failed", "FAILED", "Databricks run 42 failed (FAILED)"),
        ),
        # no `status`: the deprecated fields alone
        (run(life_cycle="PENDING"), going("PENDING")),
        (run(life_cycle="RUNNING"), going("RUNNING")),
        (run(life_cycle="TERMINATING"), going("TERMINATING")),
        (run(life_cycle="WAITING_FOR_RETRY"), going("WAITING_FOR_RETRY")),
        (run(life_cycle="BRAND_NEW_LIFE_CYCLE"), None),
        (run(), None),
        (run(life_cycle="TERMINATED", result_state="SUCCESS"), ended("succeeded", "SUCCESS")),
        (
            run(life_cycle="TERMINATED", result_state="TIMEDOUT", state_message="too slow"),
            ended("failed", "TIMEDOUT", "Databricks run 42 failed (TIMEDOUT): too slow"),
        ),
        (
            run(life_cycle="TERMINATED"),
            ended("failed", "UNKNOWN", "Databricks run 42 failed (UNKNOWN)"),
        ),
        (
            run(life_cycle="SKIPPED", result_state="SUCCESS", state_message="skip"),
            ended("failed", "SKIPPED", "Databricks run 42 was skipped (SKIPPED): skip"),
        ),
        (
            run(life_cycle="INTERNAL_ERROR", state_message="driver"),
            ended("failed", "INTERNAL_ERROR", "Databricks run 42 failed (INTERNAL_ERROR): driver"),
        ),
        (
            run(life_cycle="INTERNAL_ERROR", result_state="FAILED"),
            ended("failed", "FAILED", "Databricks run 42 failed (FAILED)"),
        ),
        (
            run(life_cycle="TERMINATED", result_state="UPSTREAM_CANCELED"),
            ended(
                "failed", "UPSTREAM_CANCELED", "Databricks run 42 was skipped (UPSTREAM_CANCELED)"
            ),
        ),
    ],
)
def test_how_a_run_ended_is_read_from_its_state(given: Run, expected: Outcome | Running | None):
    assert outcome_of_run(given) == expected


def test_the_details_message_wins_over_the_old_one():
    assert outcome_of_run(run("TERMINATED", "DRIVER_ERROR", "new", state_message="old")) == ended(
        "failed", "DRIVER_ERROR", "Databricks run 42 failed (DRIVER_ERROR): new"
    )


def test_an_enum_is_named_by_its_wire_value():
    assert _name(sdk_jobs.RunLifeCycleState.TERMINATED) == "TERMINATED"
    assert _name("RAW") == "RAW"
    assert _name(None) is None


# ── settings ─────────────────────────────────────────────────────────────────


def test_settings_come_from_tether_databricks_variables():
    assert DatabricksSettings.from_env({}) == DatabricksSettings(
        profile="", retry_timeout=60, http_timeout=30.0, threads=8
    )
    env = {
        "TETHER_DATABRICKS_PROFILE": "prod",
        "TETHER_DATABRICKS_RETRY_TIMEOUT": "1",
        "TETHER_DATABRICKS_HTTP_TIMEOUT": "0.5",
        "TETHER_DATABRICKS_THREADS": "1",
    }
    assert DatabricksSettings.from_env(env) == DatabricksSettings(
        profile="prod", retry_timeout=1, http_timeout=0.5, threads=1
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RETRY_TIMEOUT", "0"),
        ("HTTP_TIMEOUT", "0"),
        ("HTTP_TIMEOUT", "-1"),
        ("HTTP_TIMEOUT", "inf"),  # taken before, and every call failed
        ("HTTP_TIMEOUT", "3601"),
        ("RETRY_TIMEOUT", "99999999999999999999999"),  # every call failed: an exploratory QA pass
        ("THREADS", "0"),
        ("THREADS", "257"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_the_variable(name: str, value: str):
    with pytest.raises(ValueError) as raised:
        DatabricksSettings.from_env({f"TETHER_DATABRICKS_{name}": value})
    bound = ", at most 256" if name == "THREADS" else ", at most 3600"
    said = "not a finite number" if value == "inf" else f"must be positive{bound}"
    assert str(raised.value) == f"invalid setting TETHER_DATABRICKS_{name}: {said}"


# ── the workspace client ─────────────────────────────────────────────────────


async def test_the_client_is_built_once_with_the_settings(workspace: FakeWorkspace, sdk_logs):
    ws = Workspace(DatabricksSettings(retry_timeout=3, http_timeout=4.5, threads=1))
    client = await ws.call(lambda w: w)
    assert await ws.call(lambda w: w) is client
    config = client.config
    assert (config.host, config.token) == (workspace.url, TOKEN)
    assert (config.retry_timeout_seconds, config.http_timeout_seconds) == (3, 4.5)
    assert config.debug_headers is False
    assert config.profile is None
    assert f"tether/{version('tether')}" in config.user_agent
    assert sdk_logs == [f"INFO databricks: using workspace {workspace.url}"]


async def test_the_client_reads_the_profile_the_settings_name(tmp_path: Path, monkeypatch):
    ws_server = FakeWorkspace(token="dapi-from-the-profile").start()
    try:
        cfg = tmp_path / "databrickscfg"
        cfg.write_text(
            f"[DEFAULT]\nhost = http://127.0.0.1:1\ntoken = wrong\n\n"
            f"[tether]\nhost = {ws_server.url}\ntoken = dapi-from-the-profile\n"
        )
        for name in ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CONFIG_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(cfg))
        ws = Workspace(DatabricksSettings(profile="tether", retry_timeout=2))
        config = (await ws.call(lambda w: w)).config
        assert (config.host, config.profile) == (ws_server.url, "tether")
    finally:
        ws_server.stop()


async def test_calls_run_in_the_plugins_own_threads_at_most_as_many_as_set(workspace):
    one = Workspace(DatabricksSettings(retry_timeout=2, threads=1))
    name = await one.call(lambda w: threading.current_thread().name)
    assert name.startswith("tether-databricks")

    def meet(barrier: threading.Barrier) -> str:
        barrier.wait()
        return "met"

    two = Workspace(DatabricksSettings(retry_timeout=2, threads=2))
    together = threading.Barrier(2, timeout=2)
    assert await gather(two.call(lambda w: meet(together)), two.call(lambda w: meet(together))) == [
        "met",
        "met",
    ]
    alone = threading.Barrier(2, timeout=0.3)
    with pytest.raises(BackendError):  # one thread: the second call never meets the first
        await gather(one.call(lambda w: meet(alone)), one.call(lambda w: meet(alone)))


async def gather(*calls: Any) -> list[Any]:
    import asyncio

    return list(await asyncio.gather(*calls))


def test_the_sdk_never_logs_requests_in_full():
    sdk = logging.getLogger("databricks.sdk")
    level = sdk.level
    try:
        sdk.setLevel(logging.DEBUG)
        Workspace(SETTINGS)
        assert sdk.level == logging.INFO
        sdk.setLevel(logging.WARNING)
        Workspace(SETTINGS)
        assert sdk.level == logging.WARNING  # quieter is left alone
    finally:
        sdk.setLevel(level)


def test_the_sdk_logger_is_left_alone_at_info():
    """At INFO or quieter, the SDK's logger keeps following its parents."""
    sdk, parent = logging.getLogger("databricks.sdk"), logging.getLogger("databricks")
    levels = sdk.level, parent.level
    try:
        sdk.setLevel(logging.NOTSET)
        parent.setLevel(logging.INFO)
        Workspace(SETTINGS)
        assert sdk.level == logging.NOTSET
    finally:
        sdk.setLevel(levels[0])
        parent.setLevel(levels[1])


async def test_a_run_page_url_is_built_from_a_host_with_a_path(workspace: FakeWorkspace):
    """Only slashes are stripped from the host, whatever it ends with."""
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.config import Config

    from plugins.databricks import _describe

    config = Config(host=f"{workspace.url}/X/", token=TOKEN, retry_timeout_seconds=2)
    w = WorkspaceClient(config=config)
    assert w.config.host == f"{workspace.url}/X"
    # runs/get under that path is not found: the link is built from the host, no state
    assert _describe(w, 5, 7) == {"run_page_url": f"{workspace.url}/X/#job/7/run/5"}


def test_a_workspace_never_shows_its_config():
    assert repr(Workspace(DatabricksSettings(profile="prod"))) == "Workspace(profile='prod')"


async def test_a_backend_error_raised_in_a_call_is_scrubbed(workspace):
    ws = Workspace(SETTINGS)

    def fail(w: Any) -> None:
        raise BackendError(
            f"echo {CALLBACK} and {TOKEN}; cbTk7q2Zx9Lw4Rn8Vb3y",
            retryable=True,
            code="X",
            retry_after=3.0,
        )

    with pytest.raises(BackendError) as raised:
        await ws.call(fail, "cbTk7q2Zx9Lw4Rn8Vb3y")
    error = raised.value
    assert error.message == "echo http://tether.test/callbacks/j%3A1?token=*** and ***; ***"
    assert (error.retryable, error.code, error.retry_after) == (True, "X", 3.0)
    assert error.__suppress_context__


async def test_another_error_raised_in_a_call_is_translated(workspace):
    ws = Workspace(SETTINGS)

    def fail(w: Any) -> None:
        said = "job 9 has cbTk7q2Zx9Lw4Rn8Vb3y"
        raise errors.NotFound(said, error_code="RESOURCE_DOES_NOT_EXIST")

    with pytest.raises(BackendError) as raised:
        await ws.call(fail, "cbTk7q2Zx9Lw4Rn8Vb3y")
    assert raised.value.message == "job 9 has ***"
    assert (raised.value.code, raised.value.retryable) == ("RESOURCE_DOES_NOT_EXIST", False)


# ── errors ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("said", "retryable"),
    [
        ("temporarily_unavailable: try later", True),
        ("server_error: the token service failed", True),
        ("invalid_client: Client authentication failed", False),
        ("cannot configure default credentials", False),
    ],
)
def test_the_token_endpoint_down_for_now_is_retried_not_a_configuration_error(
    said: str, retryable: bool
):
    """databricks-sdk wraps an OAuth token endpoint's error in a ValueError:
    one that says it cannot answer for now (RFC 6749's codes) failed the job
    at once as `databricks_config` (found in an audit, 2026-12-04)."""
    error = Workspace(SETTINGS).translate(ValueError(said))
    assert error.retryable is retryable
    assert error.code == ("timeout" if retryable else "databricks_config")
    assert said in error.message


@pytest.mark.parametrize(
    ("exc", "code", "retryable"),
    [
        (errors.TooManyRequests("slow down"), "TOO_MANY_REQUESTS", True),
        (errors.TemporarilyUnavailable("later"), "TEMPORARILY_UNAVAILABLE", True),
        (errors.InternalError("oops"), "INTERNAL_ERROR", True),
        (errors.DeadlineExceeded("late"), "DEADLINE_EXCEEDED", True),
        (errors.Aborted("raced"), "ABORTED", True),
        (DatabricksError("unmapped"), "DATABRICKS_ERROR", True),
        (errors.BadRequest("bad"), "BAD_REQUEST", False),
        (errors.PermissionDenied("no"), "PERMISSION_DENIED", False),
        (errors.NotFound("gone"), "NOT_FOUND", False),
        (errors.ResourceConflict("twice"), "RESOURCE_CONFLICT", False),
        (errors.NotImplemented("never"), "NOT_IMPLEMENTED", False),
        (errors.Unauthenticated("who"), "UNAUTHENTICATED", False),
    ],
)
def test_databricks_errors_say_whether_to_retry(exc: DatabricksError, code: str, retryable: bool):
    error = Workspace(SETTINGS).translate(exc)
    assert (error.message, error.code, error.retryable, error.retry_after) == (
        str(exc),
        code,
        retryable,
        None,
    )


def test_a_databricks_error_keeps_its_own_code_and_a_capped_retry_after():
    ws = Workspace(SETTINGS)
    error = ws.translate(
        errors.TooManyRequests("slow", error_code="REQUEST_LIMIT_EXCEEDED", retry_after_secs=7)
    )
    assert (error.code, error.retry_after) == ("REQUEST_LIMIT_EXCEEDED", 7)
    assert ws.translate(errors.TooManyRequests("x", retry_after_secs=300)).retry_after == 300
    assert ws.translate(errors.TooManyRequests("x", retry_after_secs=3600)).retry_after == 300


def test_a_databricks_error_without_words_is_named_by_its_kind():
    assert (
        Workspace(SETTINGS).translate(errors.PermissionDenied("", error="")).message
        == "PermissionDenied"
    )


def test_a_spent_retry_budget_says_what_was_retried():
    ws = Workspace(SETTINGS)
    timeout = TimeoutError("Timed out after 0:00:02")
    timeout.__cause__ = errors.TemporarilyUnavailable(
        "try later", error_code="TEMPORARILY_UNAVAILABLE", retry_after_secs=9
    )
    error = ws.translate(timeout)
    assert error.message == "try later (after retrying for 2s)"
    assert (error.code, error.retryable, error.retry_after) == ("TEMPORARILY_UNAVAILABLE", True, 9)

    timeout.__cause__ = errors.BadRequest("echoed the-secret")
    assert ws.translate(timeout, ["the-secret"]).message == "echoed *** (after retrying for 2s)"

    timeout.__cause__ = errors.BadRequest("not retryable on its own")
    assert ws.translate(timeout).retryable is True  # the budget is spent: try again later

    timeout.__cause__ = ConnectionRefusedError("refused")
    error = ws.translate(timeout)
    assert (
        error.message == "Databricks did not answer (ConnectionRefusedError, after retrying for 2s)"
    )
    assert (error.code, error.retryable, error.retry_after) == ("timeout", True, None)

    error = ws.translate(TimeoutError())
    assert error.message == "Databricks did not answer (timeout, after retrying for 2s)"
    assert (error.code, error.retryable) == ("timeout", True)


@pytest.mark.parametrize(
    "words",
    [
        "RPC token bucket limit has been exceeded",
        "Workspace 1 does not have any associated worker environments",
        "ClusterNotReadyException: not yet",
        "Please try again later or try a faster operation.",
    ],
)
def test_an_answer_the_sdk_takes_for_a_passing_fault_is_retryable_whatever_its_status(words):
    """The SDK retries these by their words; `hand_back_throttling` takes
    every answer out of its retries, so Tether retries them (a review,
    2026-12-06: as a 400 they failed the job at once)."""
    error = Workspace(SETTINGS).translate(errors.BadRequest(words, error_code="INVALID_STATE"))
    assert (error.code, error.retryable) == ("INVALID_STATE", True)
    plain = Workspace(SETTINGS).translate(errors.BadRequest("no such job", error_code="X"))
    assert plain.retryable is False
    # not a refusal whose words quote what a client chose (a notebook path)
    quoted = errors.NotFound('Unable to access the notebook "/Users/a/Unexpected error"')
    assert Workspace(SETTINGS).translate(quoted).retryable is False


def test_a_client_that_cannot_configure_itself_is_not_retried():
    error = Workspace(SETTINGS).translate(
        ValueError(f"default auth: cannot configure: token={TOKEN} for dsn-secret"), ["dsn-secret"]
    )
    assert error.message == (
        "Databricks client configuration: default auth: cannot configure: token=*** for ***"
    )
    assert (error.code, error.retryable) == ("databricks_config", False)


def test_an_answer_that_is_not_json_is_retryable_and_not_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
):
    import requests

    cut = requests.exceptions.JSONDecodeError("Unterminated string starting at", '{"run_id', 0)
    error = Workspace(SETTINGS).translate(cut)
    assert error.message == "Databricks' answer was not JSON (Unterminated string starting at)"
    assert (error.code, error.retryable) == ("bad_answer", True)
    # requests built on simplejson: its JSONDecodeError is no json.JSONDecodeError
    simplejson = type("JSONDecodeError", (ValueError,), {})  # not json.JSONDecodeError
    other = type("JSONDecodeError", (requests.exceptions.InvalidJSONError, simplejson), {})
    monkeypatch.setattr(requests.exceptions, "JSONDecodeError", other)
    error = Workspace(SETTINGS).translate(other("Expecting value"))
    assert (error.code, error.retryable) == ("bad_answer", True)


def test_a_connection_error_the_sdk_did_not_retry_is_retryable():
    error = Workspace(SETTINGS).translate(ConnectionResetError("reset by peer 10.0.0.1"))
    assert error.message == "cannot reach Databricks: ConnectionResetError"
    assert (error.code, error.retryable) == ("connection", True)


def test_anything_else_is_retryable_and_scrubbed():
    error = Workspace(SETTINGS).translate(KeyError("the-secret"), ["the-secret"])
    assert error.message == "Databricks call failed: KeyError: '***'"
    assert (error.code, error.retryable) == ("databricks", True)


@pytest.mark.parametrize(
    ("name", "screaming"),
    [
        ("PermissionDenied", "PERMISSION_DENIED"),
        ("DatabricksError", "DATABRICKS_ERROR"),
        ("X", "X"),
    ],
)
def test_a_kind_is_named_in_screaming_case(name: str, screaming: str):
    assert _screaming(name) == screaming


# ── scrubbing ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("Authorization: Bearer abc.DEF-123_x", "Authorization: *** ***"),
        ("basic dXNlcjpwYXNz", "basic ***"),
        ("GET /x?token=abc&run=1", "GET /x?token=***&run=1"),
        ("GET /x?a=1&TOKEN=abc", "GET /x?a=1&TOKEN=***"),
        ("used dapi0123456789abcdef0 here", "used *** here"),
        ("used dapi0123456789abcdef-2 here", "used *** here"),
        (
            '{"token": "abc", "password":"p", "client_secret" = s }',
            '{"token": "***", "password":"***", "client_secret" = *** }',
        ),
        ("Authorization=xyz", "Authorization=***"),
        ("  spaced  ", "spaced"),
        ("the answer Request log: GET /api with token", "the answer"),
        ("dapi0123 is short", "dapi0123 is short"),
        ("run XXXX-1 ended", "run XXXX-1 ended"),
        ("a Request log: b Request log: c", "a"),
        (
            "Config: host=http://qa-user:pw-x@127.0.0.1:9, auth_type=pat",
            "Config: host=http://***@127.0.0.1:9, auth_type=pat",
        ),
        ("from https://:only-pw@h/x and http://h/y@z", "from https://***@h/x and http://h/y@z"),
        ("HTTPS://U:P@ss@h.example/x", "HTTPS://***@h.example/x"),  # to the last @, any case
        ("a-a.a+a" * 3 + "://u:p@h", "a-a.a+aa-a.a+aa-a.a+a://***@h"),
    ],
)
def test_secrets_are_scrubbed_from_text(text: str, clean: str, monkeypatch):
    for name in ("DATABRICKS_TOKEN", "DATABRICKS_PASSWORD", "DATABRICKS_CLIENT_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert Workspace(SETTINGS).scrub(text) == clean


def test_given_secrets_and_the_environments_are_scrubbed(monkeypatch):
    monkeypatch.setenv("DATABRICKS_TOKEN", "env-token-1")
    monkeypatch.setenv("DATABRICKS_PASSWORD", "env-pass-2")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", "env-secret-3")
    monkeypatch.setenv("ARM_CLIENT_SECRET", "arm-secret-4")
    monkeypatch.setenv("GOOGLE_CREDENTIALS", "google-creds-5")
    ws = Workspace(SETTINGS)
    text = "a env-token-1 b env-pass-2 c env-secret-3 d arm-secret-4 e google-creds-5 f given abc"
    assert ws.scrub(text, ["given", "ab", ""]) == "a *** b *** c *** d *** e *** f *** abc"
    assert ws.scrub("a four-letter abcd", ["abcd"]) == "a four-letter ***"


async def test_the_clients_own_credentials_are_scrubbed(workspace, monkeypatch):
    ws = Workspace(SETTINGS)
    client = await ws.call(lambda w: w)
    monkeypatch.delenv("DATABRICKS_TOKEN")
    client.config.password = "pw-of-the-config"
    client.config.client_secret = "cs-of-the-config"
    assert ws.scrub(f"x {TOKEN} y pw-of-the-config z cs-of-the-config") == "x *** y *** z ***"


def test_a_long_message_is_cut():
    ws = Workspace(SETTINGS)
    assert ws.scrub("a" * MAX_MESSAGE) == "a" * MAX_MESSAGE
    cut = ws.scrub("a" * (MAX_MESSAGE + 1))
    assert cut == "a" * (MAX_MESSAGE - 1) + "…" and len(cut) == MAX_MESSAGE


# ── one-time runs: the spec turned into the SDK's arguments ──────────────────


def test_a_one_time_run_spec_becomes_the_sdks_arguments():
    spec = {
        "run_name": "adhoc",
        "timeout_seconds": 600,
        "tasks": [
            {
                "task_key": "main",
                "notebook_task": {"notebook_path": "/n", "base_parameters": {"a": "1"}},
                "existing_cluster_id": "c-1",
            }
        ],
        "performance_target": "PERFORMANCE_OPTIMIZED",
        "queue": {"enabled": True},
        "git_source": None,
    }
    args = submit_arguments(spec)
    assert set(args) == {"run_name", "timeout_seconds", "tasks", "performance_target", "queue"}
    assert args["run_name"] == "adhoc" and args["timeout_seconds"] == 600
    [task] = args["tasks"]
    assert isinstance(task, sdk_jobs.SubmitTask)
    assert task.notebook_task == sdk_jobs.NotebookTask(
        notebook_path="/n", base_parameters={"a": "1"}
    )
    assert args["performance_target"] is sdk_jobs.PerformanceTarget.PERFORMANCE_OPTIMIZED
    assert args["queue"] == sdk_jobs.QueueSettings(enabled=True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"bogus": 1}, "`submit.bogus` is not a field of a one-time run"),
        ({"idempotency_token": "x"}, "`submit.idempotency_token` is not a field of a one-time run"),
        ({"tasks": {"task_key": "a"}}, "`submit.tasks` must be a list"),
        ({"tasks": ["main"]}, "`submit.tasks[0]` must be an object"),
        (
            {"tasks": [{"task_key": "a"}, {"task_key": "b", "notebook_taks": {"x": 1}}]},
            "unknown field `submit.tasks[1].notebook_taks`",
        ),
        (
            {"tasks": [{"task_key": "a", "notebook_task": {"notebook_path": "/n", "typo": 1}}]},
            "unknown field `submit.tasks[0].notebook_task.typo`",
        ),
        (
            {"performance_target": "FASTEST"},
            "`submit.performance_target` must be one of PERFORMANCE_OPTIMIZED, STANDARD",
        ),
        ({"queue": "on"}, "`submit.queue` must be an object"),
    ],
)
def test_a_spec_the_sdk_would_drop_parts_of_is_refused(spec: dict[str, Any], message: str):
    with pytest.raises(ValueError) as raised:
        submit_arguments(spec)
    assert str(raised.value).startswith(message)


def test_a_field_of_the_wrong_shape_does_not_fit():
    with pytest.raises(ValueError) as raised:
        submit_arguments({"tasks": [{"task_key": "a", "libraries": "numpy"}]})
    assert str(raised.value) == (
        "`submit.tasks[0]` does not fit the Jobs API: 'str' object has no attribute 'get'"
    )


def test_empty_fields_are_left_out_wherever_they_are():
    args = submit_arguments({"git_source": None, "run_name": "r", "tasks": [NOTEBOOK]})
    assert set(args) == {"run_name", "tasks"}


def test_empty_values_the_sdk_leaves_out_are_not_lost_fields():
    spec = {
        "tasks": [
            {
                "task_key": "a",
                "libraries": [],
                "notebook_task": {"notebook_path": "/n", "base_parameters": {}},
                "x": None,
            }
        ]
    }
    assert len(submit_arguments(spec)["tasks"]) == 1


@pytest.mark.parametrize(
    ("task", "lost"),
    [
        (
            {"notebook_task": {"notebook_path": "/n", "base_paramters": {}}},
            "notebook_task.base_paramters",
        ),
        ({"notebook_task": {"notebook_path": "/n"}, "librarie": []}, "librarie"),
    ],
)
def test_a_misspelt_field_with_an_empty_value_is_lost_too(task: dict[str, Any], lost: str):
    """The SDK leaves empty values out, so an empty one was taken for one it
    left out, and dropped unsaid: docs/databricks.md's own example of a
    refused field, `base_paramters`, went through given `{}` (found by an
    exploratory QA pass)."""
    with pytest.raises(ValueError) as refused:
        submit_arguments({"tasks": [{"task_key": "a", **task}]})
    assert str(refused.value) == f"unknown field `submit.tasks[0].{lost}`"


def test_lost_fields_are_found_at_any_depth():
    assert _lost_field({"a": {"b": 1}}, {"a": {"b": 1}}, "p") is None
    assert _lost_field({"a": {"b": 1}}, {"a": {}}, "p") == "p.a.b"
    assert _lost_field([{"a": 1}, {"b": 2}], [{"a": 1}, {}], "p") == "p[1].b"
    assert _lost_field({"a": None, "b": {}, "c": []}, {}, "p") is None
    assert _lost_field({"a": 0}, {}, "p") == "p.a"
    assert _lost_field({"a": None, "b": 1}, {}, "p") == "p.b"  # past an empty one
    assert _lost_field([1], 5, "p") is None
    assert _lost_field({"a": 1}, [1], "p") is None  # not the same shape: nothing to compare
    assert _lost_field([1, 2], [1], "p") is None


def test_tethers_parameters_go_to_notebook_tasks_only():
    submit = SubmitRun(
        tasks=[
            {
                "task_key": "n",
                "notebook_task": {"notebook_path": "/n", "base_parameters": {"a": "1"}},
            },
            {"task_key": "m", "notebook_task": {"notebook_path": "/m"}},
            {"task_key": "w", "python_wheel_task": {"package_name": "p", "entry_point": "e"}},
        ],
        run_name="r",
    )
    ours = {"tether_job_id": "j"}
    spec = _with_parameters(submit, ours, "m0")
    assert spec["run_name"] == "r"
    assert [t.get("notebook_task", {}).get("base_parameters") for t in spec["tasks"]] == [
        {"a": "1", "tether_job_id": "j"},
        {"tether_job_id": "j"},
        None,
    ]
    assert spec["tasks"][2] == submit.tasks[2]
    assert submit.tasks[0]["notebook_task"]["base_parameters"] == {"a": "1"}  # a copy


@pytest.mark.parametrize(
    ("given", "named"), [("r", "r [tether j:1 m0]"), (None, "[tether j:1 m0]")]
)
def test_a_one_time_run_no_task_of_which_takes_parameters_is_named_for_its_attempt(given, named):
    """Tether's parameters go to no task of a run without a notebook task,
    so the attempt's promise id and the job's mark go into the run's name:
    `cancel_unrecorded` finds it there. A run with a notebook task keeps its
    name."""
    wheel = {"task_key": "w", "python_wheel_task": {"package_name": "p", "entry_point": "e"}}
    ours = {"tether_promise_id": "j:1", "tether_job_id": "j"}
    spec = _with_parameters(SubmitRun(tasks=[wheel], run_name=given), ours, "m0")
    assert spec["run_name"] == named
    assert spec["tasks"] == [wheel]
    with_notebook = _with_parameters(SubmitRun(tasks=[wheel, NOTEBOOK], run_name=given), ours, "m0")
    assert with_notebook.get("run_name") == given


# ── the backend against the workspace ────────────────────────────────────────


async def test_running_a_job_passes_tethers_parameters_and_an_idempotency_token(
    backend: Databricks, workspace: FakeWorkspace, sdk_logs
):
    workspace.add_job(7)
    t = trigger({"job_id": 7, "job_parameters": {"table": "sales"}})
    external = await backend.trigger(t)

    run = workspace.only_run()
    assert external.pop("state") in {"QUEUED", "RUNNING"}  # as the run starts
    assert external == {
        "run_id": run.run_id,
        "run_page_url": f"{workspace.url}/?o=1#job/7/run/{run.run_id}",
    }
    [call] = workspace.calls(RUN_NOW)
    assert call.body == {
        "job_id": 7,
        "job_parameters": {
            "table": "sales",
            "tether_callback_url": CALLBACK,
            "tether_promise_id": "j:1",
            "tether_job_id": "j",
        },
        "idempotency_token": idempotency_token(t),
    }
    assert f"INFO databricks: job j started run {run.run_id}" in sdk_logs
    assert (await backend.trigger(t))["run_id"] == external[
        "run_id"
    ]  # the same token: the same run
    assert len(workspace.runs) == 1


async def test_a_one_time_run_gets_tethers_parameters(backend, workspace: FakeWorkspace):
    workspace.notebooks["/n"] = hang
    t = trigger(
        {
            "submit": {
                "run_name": "adhoc",
                "tasks": [{**NOTEBOOK, "notebook_task": {"notebook_path": "/n"}}],
            }
        }
    )
    external = await backend.trigger(t)

    [call] = workspace.calls(SUBMIT)
    assert call.body == {
        "run_name": "adhoc",
        "tasks": [
            {
                "task_key": "main",
                "notebook_task": {
                    "notebook_path": "/n",
                    "base_parameters": {
                        "tether_callback_url": CALLBACK,
                        "tether_promise_id": "j:1",
                        "tether_job_id": "j",
                    },
                },
            }
        ],
        "idempotency_token": idempotency_token(t),
    }
    assert external["run_id"] == workspace.only_run().run_id
    workspace.end(external["run_id"], "SUCCESS")


async def test_a_one_time_run_the_sdk_cannot_take_fails_at_once(backend, workspace):
    t = trigger({"submit": {"tasks": [{"task_key": "a", "notebok_task": {"notebook_path": "/n"}}]}})
    with pytest.raises(BackendError) as raised:
        await backend.trigger(t)
    assert (
        raised.value.message
        == "invalid params.submit: unknown field `submit.tasks[0].notebok_task`"
    )
    assert (raised.value.code, raised.value.retryable) == ("INVALID_PARAMETER_VALUE", False)
    assert workspace.calls(SUBMIT) == []


async def test_a_task_key_used_twice_fails_at_once(backend, workspace):
    # Checked here, not by POST /jobs: no schema can say that task keys differ.
    t = trigger({"submit": {"tasks": [NOTEBOOK, {"task_key": "x"}, {"task_key": "main"}]}})
    with pytest.raises(BackendError) as raised:
        await backend.trigger(t)
    assert raised.value.message == (
        "invalid params.submit: tasks[2]: task_key 'main' is used twice"
    )
    assert (raised.value.code, raised.value.retryable) == ("INVALID_PARAMETER_VALUE", False)
    assert workspace.seen == []


async def test_a_refused_trigger_never_shows_the_callback_token(backend, workspace: FakeWorkspace):
    workspace.add_job(7)
    workspace.fail(
        RUN_NOW, 400, "INVALID_PARAMETER_VALUE", f"bad value {CALLBACK} (cbTk7q2Zx9Lw4Rn8Vb3y)"
    )
    with pytest.raises(BackendError) as raised:
        await backend.trigger(trigger({"job_id": 7}))
    assert "cbTk7q2Zx9Lw4Rn8Vb3y" not in raised.value.message
    assert raised.value.message == ("bad value http://tether.test/callbacks/j%3A1?token=*** (***)")
    assert (raised.value.code, raised.value.retryable) == ("INVALID_PARAMETER_VALUE", False)


async def test_a_callback_url_without_a_token_scrubs_nothing_extra(backend, workspace):
    workspace.add_job(7)
    workspace.fail(RUN_NOW, 400, "INVALID_PARAMETER_VALUE", "a plain refusal of XXXX")
    with pytest.raises(BackendError, match=r"^a plain refusal of XXXX$"):
        await backend.trigger(trigger({"job_id": 7}, callback_url="http://t/callbacks/j%3A1"))


async def test_a_run_page_url_is_built_when_the_run_cannot_be_read(
    backend, workspace: FakeWorkspace, sdk_logs
):
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    workspace.fail(GET_RUN, 404, "NOT_FOUND", "no", method="GET")
    external = await backend.trigger(trigger({"job_id": 7}))
    run_id = workspace.only_run().run_id
    assert external == {"run_id": run_id, "run_page_url": f"{workspace.url}/#job/7/run/{run_id}"}
    assert f"WARNING databricks: run {run_id}: no run page URL (NotFound)" in sdk_logs
    workspace.end(run_id, "SUCCESS")


async def test_a_host_written_with_a_user_and_password_never_shows_them(
    workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch, logs
):
    """`DATABRICKS_HOST=http://user:password@host`: the SDK does not sign in
    with them (its own credentials win), and they reached the run's page
    (built from the host when the run could not be read), the job's events,
    the log and the SDK's warnings (found by a review, 2026-12-06). The real
    SDK client against the fake workspace; its host metadata is not served,
    so the SDK warns naming the host."""
    monkeypatch.setenv("DATABRICKS_HOST", workspace.url.replace("://", "://qa-user:pw-in-url@"))
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    workspace.fail(GET_RUN, 500, "INTERNAL_ERROR", "x", method="GET")
    backend = Databricks(SETTINGS)
    external = await backend.trigger(trigger({"job_id": 7}))
    run_id = workspace.only_run().run_id
    assert external["run_page_url"] == f"{workspace.url}/#job/7/run/{run_id}"
    assert "using workspace " + workspace.url in logs.text
    assert "names a user or a password" in logs.text  # said, without them
    # the SDK's warning names the host it was given, which is without them
    assert f"from host metadata ({workspace.url}" in logs.text or workspace.url in logs.text
    assert "pw-in-url" not in logs.text and "qa-user" not in logs.text
    assert all(seen.authorized for seen in workspace.seen if seen.path.startswith("/api/"))
    workspace.end(run_id, "SUCCESS")


@pytest.mark.parametrize(
    ("password", "reached"),
    [
        ("pw@in-url", True),
        ("pw in url", True),
        ("pw/in?url", False),
        ("pw#in-url", False),
        ("pwZZ@Secret/x?y z", False),
    ],
)
async def test_a_password_with_an_at_or_a_slash_in_the_host_never_shows(
    workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch, logs, password: str, reached: bool
):
    """`@` in the password: the HTTP client splits at the last `@` (the host
    works), and the mask stopped at the first, showing the rest. `/` or `?`
    in it: the SDK refused the host and quoted it whole in its configuration
    error (a review, 2026-12-06), then, masked, still quoted the part it took
    for the port (a QA pass); a space stopped the mask, and the whole
    password was logged; with `@` and `/`, a part of the password was looked
    up as the host. The SDK is now given the host without them, and the
    workspace is reached; where a `/`, `?` or `#` hides where the host ends,
    no client is made and nothing is sent (taking the host from after the
    last `@` sent the token to one named in a path: a QA pass)."""
    host = workspace.url.replace("://", f"://qa-user:{password}@")
    monkeypatch.setenv("DATABRICKS_HOST", host)
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    workspace.fail(GET_RUN, 500, "INTERNAL_ERROR", "x", method="GET")
    backend = Databricks(SETTINGS)
    try:
        said = str(await backend.trigger(trigger({"job_id": 7})))
        assert reached
        workspace.end(workspace.only_run().run_id, "SUCCESS")
        assert "names a user or a password" in logs.text  # said, without them
    except BackendError as exc:
        assert not reached and exc.code == "databricks_config", exc.message
        said = exc.message
        assert "take the user and password out" in said
        assert workspace.seen == []  # nothing sent, to any host
    readiness = await backend.workspace.readiness()
    for text in (said, logs.text, str(readiness.reason)):
        for part in ("in-url", "in?url", "in url", "Secret", "qa-user"):
            assert part not in text, text


async def test_a_host_with_an_at_in_its_path_is_reached_at_its_own_host(
    workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch, logs
):
    """A workspace URL copied from a browser may name a user in its path
    (`…/Users/alice@example.com`): the host was taken from after its last
    `@`, and the token sent there (a QA pass, HIGH). A host with no
    userinfo is the SDK's as written: it asks its own host (which knows no
    such path here), and nothing goes elsewhere."""
    elsewhere = FakeWorkspace().start()
    try:
        port = elsewhere.url.rpartition(":")[2]
        monkeypatch.setenv(
            "DATABRICKS_HOST", f"{workspace.url}/browse/Users/alice@127.0.0.1:{port}"
        )
        with pytest.raises(BackendError):
            await Databricks(SETTINGS).trigger(trigger({"job_id": 7}))
        assert any(seen.path.startswith("/browse/Users/alice@") for seen in workspace.seen)
        assert elsewhere.seen == []
        assert "names a user or a password" not in logs.text
    finally:
        elsewhere.stop()


@pytest.mark.parametrize(
    "written",
    [
        "{url}\\@127.0.0.1:{port}",  # urllib3 ends the authority at the backslash
        "{url}\\Users\\alice@127.0.0.1:{port}",
        "http://qa-user:pw-in-url@{hostport}\\x@127.0.0.1:{port}",
        "{url}\uff0f@127.0.0.1:{port}",  # a fullwidth solidus, a slash once normalised
        "http://qa-user:pw-in-url\uff20{hostport}",  # a fullwidth at sign
        "http:/qa-user:pw-in-url@{hostport}",  # one slash: the SDK's host would be `http`
    ],
)
async def test_a_host_whose_end_the_parsers_read_differently_is_sent_nothing(
    workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch, logs, written: str
):
    """Where urllib3 (which sends the request) and `urlsplit` would read
    another host, or a normalised character hides one, no client is made:
    the token went to a second workspace named after a backslash or a
    fullwidth solidus, a fullwidth at sign's password was quoted in the
    job's error, and a one-slash typo's logged (a QA pass, HIGH)."""
    elsewhere = FakeWorkspace().start()
    try:
        port = elsewhere.url.rpartition(":")[2]
        hostport = workspace.url.partition("://")[2]
        host = written.format(url=workspace.url, port=port, hostport=hostport)
        monkeypatch.setenv("DATABRICKS_HOST", host)
        with pytest.raises(BackendError) as refused:
            await Databricks(SETTINGS).trigger(trigger({"job_id": 7}))
        assert refused.value.code == "databricks_config"
        assert elsewhere.seen == [] and workspace.seen == []
        assert "pw-in-url" not in refused.value.message + logs.text
    finally:
        elsewhere.stop()


def test_the_sdks_child_loggers_hide_a_hosts_password_too(workspace: FakeWorkspace, logs):
    """A logger's filter sees its own records alone: the SDK's children
    (`databricks.sdk.oauth`, whose warning quotes an exception) need their
    own (a review, 2026-12-07). One the SDK makes after the backend was
    made (a module imported as the client is built) gets its filter when
    the client is built."""
    ws = Workspace(SETTINGS)
    late = f"databricks.sdk.qa_late_{uuid.uuid4().hex}"
    logging.getLogger(late)  # made as the SDK makes its loggers, on a module's import
    ws.client()
    names = ("databricks.sdk", "databricks.sdk.oauth", "databricks.sdk.retries", late)
    for name in names:
        logging.getLogger(name).warning("failed: https://qa-user:pw-in-url@h.example/x")
    assert "pw-in-url" not in logs.text
    assert logs.text.count("https://***@h.example/x") == len(names)


def test_a_bare_hosts_password_is_a_secret_and_a_short_one_alone_is_not(monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", "qa-user:pw-in-a-bare-host@h.example")
    said = Workspace(SETTINGS).scrub("host=qa-user:pw-in-a-bare-host@h.example pw-in-a-bare-host")
    assert "pw-in-a-bare-host" not in said
    monkeypatch.setenv("DATABRICKS_HOST", "https://admin:pass@h.example")
    assert Workspace(SETTINGS).scrub("the password passed") == "the password passed"


def test_the_userinfo_mask_takes_linear_time():
    """Unanchored, `a.a.a.…` made it retry from every word boundary: 40 KB
    took 5 s and 1 MB would have taken most of an hour (a review,
    2026-12-06). 200 KB here: seconds at the least with the old pattern."""
    text = "a." * 100_000
    started = time.process_time()
    assert Workspace(SETTINGS).scrub(text).startswith("a.a.")
    assert time.process_time() - started < 2.0  # (the old pattern: about 2 minutes)


async def test_a_one_time_run_whose_page_cannot_be_read_has_none(backend, workspace):
    workspace.notebooks["/n"] = hang
    workspace.fail(GET_RUN, 404, "NOT_FOUND", "no", method="GET")
    external = await backend.trigger(
        trigger(
            {"submit": {"tasks": [{"task_key": "a", "notebook_task": {"notebook_path": "/n"}}]}}
        )
    )
    assert external["run_page_url"] is None
    workspace.end(external["run_id"], "SUCCESS")


async def test_cancel_cancels_the_run(backend, workspace: FakeWorkspace, sdk_logs):
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    external = await backend.trigger(trigger({"job_id": 7}))
    run_id = external["run_id"]

    await backend.cancel(job("canceled", external=external))

    [call] = workspace.calls(CANCEL)
    assert call.body == {"run_id": run_id}
    assert workspace.runs[run_id].code == "USER_CANCELED"
    assert f"INFO databricks: job j: asked to cancel run {run_id}" in sdk_logs


@pytest.mark.parametrize(
    ("external", "result"),
    [
        (None, None),
        ({}, None),
        ({"run_id": "1001"}, None),  # not a run id Tether recorded
        ({"run_id": 1001}, {"run_id": 1001, "termination_code": "USER_CANCELED"}),
    ],
)
async def test_cancel_leaves_alone_what_has_no_run_or_ended_there(
    backend, workspace: FakeWorkspace, external, result
):
    await backend.cancel(job("canceled", external=external, result=result))
    assert workspace.calls(CANCEL) == []


def other_trigger(params: dict[str, Any], n: int) -> Trigger:
    """Another job's trigger (its own promise id, key and callback URL)."""
    return Trigger(
        job=msgspec.structs.replace(job("pending", params), id=f"o{n}"),
        params=msgspec.convert(params, DatabricksParams),
        promise_id=f"o{n}:1",
        callback_url=CALLBACK.replace("j%3A1", f"o{n}%3A1"),
        idempotency_key=f"o{n}:1",
    )


SUBMIT_PARAMS = {"submit": {"run_name": "adhoc", "tasks": [NOTEBOOK]}}

WHEEL = {"task_key": "w", "python_wheel_task": {"package_name": "p", "entry_point": "e"}}


def deployed(params: dict[str, Any], secret: str, *, later_ms: int = 0, **given: Any) -> Trigger:
    """Attempt 1 of job `j` as the Tether deployment signing with `secret`
    hands it over: its callback URL carries that secret's token (`tokens`:
    the ones it accepts), the job made `later_ms` after `CREATED`."""
    made = job("pending", params)
    made = msgspec.structs.replace(made, created_at=CREATED + timedelta(milliseconds=later_ms))
    return msgspec.structs.replace(
        trigger(params, callback_url=CALLBACK.replace("cbTk7q2Zx9Lw4Rn8Vb3y", secret)),
        job=made,
        tokens=given.get("tokens", (secret,)),
    )


@pytest.mark.parametrize("params", [{"job_id": 7}, SUBMIT_PARAMS], ids=["job", "one-time"])
async def test_cancel_unrecorded_finds_the_attempts_active_run_among_pages_of_others(
    backend, workspace: FakeWorkspace, sdk_logs, params
):
    """A run the trigger started, its answer lost: found by the promise id in
    its parameters (a job's `job_parameters`, a one-time run's notebook
    tasks' `base_parameters`), past a page of 25 newer runs, and canceled;
    the others are left going."""
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    ours = (await backend.trigger(trigger(params)))["run_id"]
    others = [(await backend.trigger(other_trigger(params, n)))["run_id"] for n in range(30)]

    await backend.cancel_unrecorded(
        msgspec.structs.replace(trigger(params), job=job("canceled", params))
    )

    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": ours}]
    assert workspace.runs[ours].code == "USER_CANCELED"
    assert all(workspace.runs[r].status != "TERMINATED" for r in others)
    lists = workspace.calls("/api/2.2/jobs/runs/list", "GET")
    assert len(lists) == 2  # two pages
    assert (
        f"INFO databricks: job j: asked to cancel run {ours}, started by a trigger try whose"
        " answer was lost"
    ) in sdk_logs


async def test_cancel_unrecorded_finds_a_one_time_run_without_a_notebook_task_by_its_name(
    backend, workspace: FakeWorkspace, sdk_logs
):
    """A one-time run of a Python wheel carries no parameters of Tether's: it
    is found by the promise id in its name, among other jobs' such runs
    (whose names differ only past the mark's start: `j:1` is not `oj:1`,
    nor `j:10`), and canceled."""
    wheel = {"task_key": "w", "python_wheel_task": {"package_name": "p", "entry_point": "e"}}
    params = {"submit": {"run_name": "nightly", "tasks": [wheel]}}
    ours = (await backend.trigger(trigger(params)))["run_id"]
    others = [(await backend.trigger(other_trigger(params, n)))["run_id"] for n in range(3)]
    ten = msgspec.structs.replace(trigger(params), promise_id="j:10", idempotency_key="j:10")
    others.append((await backend.trigger(ten))["run_id"])
    assert workspace.runs[ours].run_name == f"nightly [tether j:1 {trigger(params).mark}]"

    await backend.cancel_unrecorded(
        msgspec.structs.replace(trigger(params), job=job("canceled", params))
    )

    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": ours}]
    assert all(workspace.runs[r].status != "TERMINATED" for r in others)
    assert (
        f"INFO databricks: job j: asked to cancel run {ours}, started by a trigger try whose"
        " answer was lost"
    ) in sdk_logs


async def test_cancel_unrecorded_without_such_a_run_cancels_nothing(
    backend, workspace: FakeWorkspace, sdk_logs
):
    """No try got through (or its run already ended): nothing is canceled."""
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    ended = (await backend.trigger(trigger({"job_id": 7})))["run_id"]
    workspace.end(ended, "SUCCESS")
    await backend.trigger(other_trigger({"job_id": 7}, 1))

    await backend.cancel_unrecorded(trigger({"job_id": 7}))

    assert workspace.calls(CANCEL) == []
    assert "INFO databricks: job j: no run of its attempt 1 found going, to cancel" in sdk_logs


@pytest.mark.parametrize("params", [{"job_id": 7}, SUBMIT_PARAMS], ids=["job", "one-time"])
async def test_cancel_unrecorded_finds_a_repair_made_for_the_attempt(
    backend, workspace: FakeWorkspace, params
):
    """Attempt 2 repairs attempt 1's run, the answer lost: the run, running
    again with attempt 2's parameters, is found by its promise id and the
    callback URL signed for attempt 2 (each attempt's URL has a token of its
    own), though its first parameters still carry attempt 1's."""
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    first = await backend.trigger(deployed(params, "token-1"))
    workspace.end(first["run_id"], "FAILED", "boom")
    url = CALLBACK.replace("j%3A1", "j~2%3A1").replace("cbTk7q2Zx9Lw4Rn8Vb3y", "token-2")
    second = msgspec.structs.replace(
        trigger(params, callback_url=url),
        job=msgspec.structs.replace(job("pending", params), attempt=2),
        promise_id="j~2:1",
        idempotency_key="j~2:1",
        tokens=("token-2",),
    )
    previous = job("failed", params, external=first)
    assert (await backend.rerun(second, previous))["run_id"] == first["run_id"]

    await backend.cancel_unrecorded(second)

    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": first["run_id"]}]


@pytest.mark.parametrize("dropped", [False, True], ids=["params-kept", "params-dropped"])
async def test_cancel_unrecorded_finds_a_repair_of_a_one_time_run_without_a_notebook_task(
    backend, workspace: FakeWorkspace, dropped: bool
):
    """A one-time run of a Python wheel takes no parameters of Tether's: its
    repair by attempt 2 sends them as `notebook_params`, which Databricks
    may keep (found by them) or drop (the run names no attempt but by its
    name, attempt 1's). Attempt 2 ended with no run recorded (the repair's
    answer lost): a run named for an earlier attempt of the job that is
    going again was repaired since, and is canceled. Another job's such run
    is left."""
    workspace.drops_unused_notebook_params = dropped
    wheel = {"task_key": "w", "python_wheel_task": {"package_name": "p", "entry_point": "e"}}
    params = {"submit": {"run_name": "nightly", "tasks": [wheel]}}
    first = await backend.trigger(trigger(params))
    other = (await backend.trigger(other_trigger(params, 1)))["run_id"]
    workspace.end(first["run_id"], "FAILED", "boom")
    second = msgspec.structs.replace(
        trigger(params),
        job=msgspec.structs.replace(job("canceled", params), attempt=2),
        promise_id="j~2:1",
        idempotency_key="j~2:1",
    )
    previous = job("failed", params, external=first)
    assert (await backend.rerun(second, previous))["run_id"] == first["run_id"]
    assert workspace.runs[first["run_id"]].status != "TERMINATED"  # going again

    await backend.cancel_unrecorded(second)

    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": first["run_id"]}]
    assert workspace.runs[other].status != "TERMINATED"


async def test_a_stale_cancel_unrecorded_leaves_a_wheel_run_a_later_attempt_repaired(
    backend, workspace: FakeWorkspace
):
    """Attempts 2 and 3 each repaired the wheel's run (its name still
    attempt 1's; the repairs' parameters not listed), and attempt 3's
    repair is going. A process that stalled inside attempt 2's trigger asks
    to stop what its tries may have started, the job retried since
    (`retried`): the run is left to attempt 3. So it is when attempt 1's
    stalled process asks, whose mark the run's name carries: attempt 1
    recorded the run, the only one its tries could have started (the same
    idempotency token). The same ask from attempt 3's own finish would stop
    it."""
    workspace.drops_unused_notebook_params = True
    wheel = {"task_key": "w", "python_wheel_task": {"package_name": "p", "entry_point": "e"}}
    params = {"submit": {"run_name": "nightly", "tasks": [wheel]}}
    run = first = await backend.trigger(trigger(params))
    attempts = {}
    for n in (2, 3):
        workspace.end(run["run_id"], "FAILED", "boom")
        attempts[n] = msgspec.structs.replace(
            trigger(params),
            job=msgspec.structs.replace(job("canceled", params), attempt=n),
            promise_id=f"j~{n}:1",
            idempotency_key=f"j~{n}:1",
        )
        previous = job("failed", params, external=run)
        run = await backend.rerun(attempts[n], previous)

    await backend.cancel_unrecorded(msgspec.structs.replace(attempts[2], retried=True))
    assert workspace.calls(CANCEL) == []
    # attempt 1's stalled process (the run's name is its), the run recorded by another
    recorded = msgspec.structs.replace(job("canceled", params), external=first)
    stale = msgspec.structs.replace(trigger(params), job=recorded, retried=True)
    await backend.cancel_unrecorded(stale)
    assert workspace.calls(CANCEL) == []

    await backend.cancel_unrecorded(attempts[3])
    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": run["run_id"]}]


@pytest.mark.parametrize(
    "params",
    [{"job_id": 7}, SUBMIT_PARAMS, {"submit": {"run_name": "nightly", "tasks": [WHEEL]}}],
    ids=["job", "one-time", "one-time-wheel"],
)
async def test_cancel_unrecorded_leaves_another_deployments_run_of_a_job_under_the_same_id(
    backend, workspace: FakeWorkspace, params
):
    """Two Tether deployments share a workspace, and each has a job `j`:
    their runs name the same promise id. A run is taken for this
    deployment's only when the callback URL in its parameters was signed
    here (`Trigger.signed_here`), or, for a run that takes no parameters,
    when its name carries this job's mark (`Trigger.mark`). The other
    deployment's run goes on."""
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    ours = deployed(params, "ours")
    theirs = (await backend.trigger(deployed(params, "theirs", later_ms=1)))["run_id"]
    mine = (await backend.trigger(ours))["run_id"]

    await backend.cancel_unrecorded(msgspec.structs.replace(ours, job=job("canceled", params)))

    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": mine}]
    assert workspace.runs[theirs].status != "TERMINATED"


async def test_cancel_unrecorded_takes_a_run_signed_before_a_secret_rotation(
    backend, workspace: FakeWorkspace
):
    """The run's callback URL carries the token of the secret the
    deployment signed with then, which it still accepts (a rotation under
    way): the run is the attempt's."""
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    run = (await backend.trigger(deployed({"job_id": 7}, "old")))["run_id"]

    rotated = deployed({"job_id": 7}, "new", tokens=("new", "old"))
    await backend.cancel_unrecorded(msgspec.structs.replace(rotated, job=job("canceled")))

    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": run}]


async def test_cancel_unrecorded_takes_a_run_named_by_a_release_before_the_job_mark(
    backend, workspace: FakeWorkspace
):
    """A one-time wheel run named `[tether j:1]`, as releases before the job
    mark named it, is still found by it."""
    params = {"submit": {"run_name": "nightly", "tasks": [WHEEL]}}
    run = (await backend.trigger(trigger(params)))["run_id"]
    workspace.runs[run].run_name = "nightly [tether j:1]"

    await backend.cancel_unrecorded(
        msgspec.structs.replace(trigger(params), job=job("canceled", params))
    )

    assert [c.body for c in workspace.calls(CANCEL)] == [{"run_id": run}]


async def test_a_run_that_ended_elsewhere_is_recognised_only_by_its_termination_code(
    backend, workspace: FakeWorkspace
):
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    external = await backend.trigger(trigger({"job_id": 7}))
    await backend.cancel(job("timed_out", external=external, result={"run_id": external["run_id"]}))
    assert len(workspace.calls(CANCEL)) == 1


async def test_a_status_check_reads_the_run(backend, workspace: FakeWorkspace):
    workspace.add_job(7, notebook="quiet")
    workspace.notebooks["quiet"] = hang
    external = await backend.trigger(trigger({"job_id": 7}))
    run_id = external["run_id"]
    assert await backend.check_status(job(external=external)) == going("RUNNING")
    workspace.exits[run_id] = '{"rows": 3}'  # dbutils.notebook.exit(...)
    workspace.end(run_id, "SUCCESS", "done")
    assert await backend.check_status(job(external=external)) == Outcome(
        status="succeeded", result={"rows": 3}
    )
    [task] = workspace.runs[run_id].tasks
    assert [c.path for c in workspace.seen[-2:]] == [GET_RUN, "/api/2.2/jobs/runs/get-output"]
    assert task.run_id != run_id  # its task's output: a run's own id has none


async def test_a_status_check_without_a_run_asks_nothing(backend, workspace: FakeWorkspace):
    assert await backend.check_status(job(external=None)) is None
    assert workspace.seen == []


async def test_a_status_check_that_fails_says_why_and_raises(backend, workspace, sdk_logs):
    workspace.fail(GET_RUN, 403, "PERMISSION_DENIED", "no access to run 5", method="GET")
    with pytest.raises(BackendError) as raised:  # the job waits on: access may come back
        await backend.check_status(job(external={"run_id": 5}))
    assert raised.value.message.startswith("no access to run 5")  # and the SDK's config, masked
    assert sdk_logs[-1].startswith(
        "WARNING databricks: job j: reading run 5 failed: no access to run 5"
    )


@pytest.mark.parametrize(
    ("status", "code", "said"),
    [
        (400, "INVALID_PARAMETER_VALUE", "Run 5 does not exist."),
        (404, "RESOURCE_DOES_NOT_EXIST", "Run 5 does not exist."),
    ],
)
async def test_a_run_that_no_longer_exists_fails_its_job(backend, workspace, status, code, said):
    """Deleted by hand, or 60 days on: it will never end, so the job does not
    wait for its timeout (7 days by default) with nothing in its history."""
    workspace.fail(GET_RUN, status, code, said, method="GET")
    found = await backend.check_status(job(external={"run_id": 5}))
    assert found == Outcome(
        status="failed",
        error=ErrorInfo(
            f"Databricks run 5 no longer exists ({said}): how it ended is unknown",
            type="RUN_NOT_FOUND",
        ),
    )


async def test_another_bad_request_reading_a_run_is_not_taken_for_a_deleted_run(backend, workspace):
    workspace.fail(GET_RUN, 400, "INVALID_PARAMETER_VALUE", "run_id must be set", method="GET")
    with pytest.raises(BackendError):
        await backend.check_status(job(external={"run_id": 5}))


# ── notifications ────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "body",
    [None, "text", [], {}, {"status": "succeeded"}, {"event_type": 3, "run": {"run_id": 1}}],
)
def test_a_body_that_is_no_notification_is_left_to_tether(body: Any):
    assert Databricks(SETTINGS).parse_callback(job(external={"run_id": 1}), body) is None


@pytest.mark.parametrize("given", [1001, "1001"])
def test_a_notification_about_the_jobs_run_asks_for_a_check(given: Any):
    hint = Databricks(SETTINGS).parse_callback(
        job(external={"run_id": 1001}), {"event_type": "jobs.on_success", "run": {"run_id": given}}
    )
    assert hint == CheckNow("Databricks jobs.on_success for run 1001: reading the run's state")


def test_a_notification_before_the_run_is_known_asks_for_a_check():
    hint = Databricks(SETTINGS).parse_callback(
        job(external=None), {"event_type": "jobs.on_failure", "run": {"run_id": 5}}
    )
    assert hint == CheckNow("Databricks jobs.on_failure for run 5: reading the run's state")


@pytest.mark.parametrize("run_part", [None, "1001", {}, {"run_id": None}])
def test_a_notification_without_a_run_id_is_refused(run_part: Any):
    body = {"event_type": "jobs.on_start", "run": run_part}
    with pytest.raises(ValueError) as raised:
        Databricks(SETTINGS).parse_callback(job(external={"run_id": 1}), body)
    assert str(raised.value) == (
        "a Databricks notification (jobs.on_start) needs `run.run_id`; nothing changed"
    )


@pytest.mark.parametrize(
    ("given", "type_name"),
    [
        (1001.5, "a number with a fraction or an exponent"),  # was read as run 1001 (int() of it)
        (
            1001.0,
            "a number with a fraction or an exponent",
        ),  # Databricks sends integers: no float is a run id
        (True, "true or false"),  # was read as run 1
        ("1_001", "a string of other characters"),  # int() reads it as 1001
        ("1001.0", "a string of other characters"),
        ("1e3", "a string of other characters"),
        ("x", "a string of other characters"),
        ([1001], "a list"),
    ],
)
def test_a_notification_whose_run_id_is_not_a_whole_number_is_refused(given: Any, type_name: str):
    """`run.run_id` is read as the notification destination reads it: a JSON
    integer, or a string of digits; never through `int()`."""
    body = {"event_type": "jobs.on_success", "run": {"run_id": given}}
    with pytest.raises(ValueError) as raised:
        Databricks(SETTINGS).parse_callback(job(external={"run_id": 1001}), body)
    assert str(raised.value) == (
        "a Databricks notification (jobs.on_success): `run.run_id` must be a run id (a whole"
        f" number, or a string of digits), not {type_name}; nothing changed"
    )
    with pytest.raises(ValueError):  # before the run is known too
        Databricks(SETTINGS).parse_callback(job(external=None), body)


def test_a_notification_whose_run_id_is_negative_says_so():
    body = {"event_type": "jobs.on_success", "run": {"run_id": -1001}}
    with pytest.raises(ValueError) as raised:
        Databricks(SETTINGS).parse_callback(job(external={"run_id": 1001}), body)
    assert str(raised.value) == (
        "a Databricks notification (jobs.on_success): `run.run_id` is negative: not a run id;"
        " nothing changed"
    )


def test_a_notification_quotes_at_most_100_characters_of_its_event_type():
    body = {"event_type": "jobs." + "x" * 10_000, "run": {"run_id": 9}}
    with pytest.raises(ValueError) as raised:
        Databricks(SETTINGS).parse_callback(job(external={"run_id": 1001}), body)
    assert str(raised.value) == (
        f"the notification ({'jobs.' + 'x' * 95}) is about run 9, but this job's run is 1001;"
        " nothing changed"
    )


def test_a_notification_about_another_run_is_refused():
    with pytest.raises(ValueError) as raised:
        Databricks(SETTINGS).parse_callback(
            job(external={"run_id": 1001}), {"event_type": "jobs.on_success", "run": {"run_id": 9}}
        )
    assert str(raised.value) == (
        "the notification (jobs.on_success) is about run 9, but this job's run is 1001;"
        " nothing changed"
    )


def test_a_task_notification_is_read_by_its_job_run_as_the_notification_endpoint_reads_it():
    """A task's notification names its task run in `run.run_id` and the job's
    run in `run.parent_run_id`; posted to the callback URL it was refused,
    naming the task run (an audit, 2026-12-04), where the notification
    endpoint took it."""
    task = {
        "event_type": "jobs.on_success",
        "run": {"parent_run_id": "1001", "run_id": "1067"},
        "task": {"task_key": "main"},
    }
    checked = Databricks(SETTINGS).parse_callback(job(external={"run_id": 1001}), task)
    assert isinstance(checked, CheckNow) and "for run 1001" in checked.reason
    with pytest.raises(ValueError) as raised:
        Databricks(SETTINGS).parse_callback(job(external={"run_id": 5}), task)
    assert "is about run 1001, but this job's run is 5" in str(raised.value)
