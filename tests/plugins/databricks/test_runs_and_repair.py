"""The `databricks` backend's reading of a run's tasks and outputs
(`plugins/databricks/runs.py`: `latest_tasks`, `failed_tasks`, `has_output`,
`exit_value`, `with_outputs` and the failure lines it builds, `run_state`, a
queued run's progress, a run judged by one of its repairs) and its repair of a
run (`plugins/databricks/repair.py`), in process: real databricks-sdk objects
for the pure functions, the real `Workspace` client against the fake workspace
(tests/plugins/databricks/workspace.py) for `repair.repair`. No service: fast
enough to judge mutants with (`./dev mutate databricks`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from databricks.sdk.service.jobs import (
    NotebookOutput,
    Run,
    RunOutput,
    RunStatus,
    RunTask,
)

from core.errors import BackendError
from core.models import ErrorInfo, Outcome, Running
from plugins.databricks import repair as repairs
from plugins.databricks.repair import NotRepaired, carries, latest_repair
from plugins.databricks.runs import (
    LINE_TEXT,
    TASK_TEXT,
    _cut,
    _failure,
    _line,
    _read,
    exit_value,
    failed_tasks,
    has_output,
    latest_tasks,
    outcome_of_run,
    run_state,
    with_outputs,
)
from plugins.databricks.workspace import DatabricksSettings, Workspace
from tests.plugins.databricks import workspace as fake
from tests.plugins.databricks.workspace import FakeWorkspace

GET_RUN = "/api/2.2/jobs/runs/get"
REPAIR = "/api/2.2/jobs/runs/repair"
SETTINGS = DatabricksSettings(retry_timeout=5, http_timeout=5, threads=2)


# ── helpers ──────────────────────────────────────────────────────────────────


def task(
    key: str = "main",
    run_id: int | None = 11,
    code: str | None = None,
    message: str | None = None,
    *,
    state: str | None = None,
    result_state: str | None = None,
    attempt: int | None = None,
    notebook: bool = True,
    params: dict[str, str] | None = None,
) -> RunTask:
    """A task run: ended with termination `code` (`status`), or with the
    deprecated `result_state`, or in `state`."""
    body: dict[str, Any] = {"task_key": key}
    if run_id is not None:
        body["run_id"] = run_id
    if attempt is not None:
        body["attempt_number"] = attempt
    if notebook:
        body["notebook_task"] = {"notebook_path": "/n"}
        if params:
            body["notebook_task"]["base_parameters"] = params
    if state is not None:
        body["status"] = {"state": state}
    elif code is not None:
        body["status"] = {
            "state": "TERMINATED",
            "termination_details": {"code": code, "message": message},
        }
    if result_state is not None:
        body["state"] = {
            "life_cycle_state": "TERMINATED",
            "result_state": result_state,
            "state_message": message,
        }
    return RunTask.from_dict(body)


def output(
    result: str | None = None, truncated: bool = False, error: str | None = None
) -> RunOutput:
    notebook = NotebookOutput(result=result, truncated=truncated) if result is not None else None
    return RunOutput(notebook_output=notebook, error=error)


def failed(code: str = "RUN_EXECUTION_ERROR") -> Outcome:
    """A failed run's outcome, as `outcome_of_run` makes it."""
    return Outcome(
        status="failed",
        result={"run_id": 42, "termination_code": code},
        error=ErrorInfo(message=f"Databricks run 42 failed ({code})", type=code),
    )


def succeeded() -> Outcome:
    return Outcome(status="succeeded", result={"run_id": 42, "termination_code": "SUCCESS"})


# ── run_state, progress, repairs ─────────────────────────────────────────────


def test_the_run_state_is_the_current_field_else_the_deprecated_one():
    both = {"status": {"state": "QUEUED"}, "state": {"life_cycle_state": "RUNNING"}}
    assert run_state(Run.from_dict({"run_id": 1, **both})) == "QUEUED"
    old = Run.from_dict({"run_id": 1, "state": {"life_cycle_state": "TERMINATING"}})
    assert run_state(old) == "TERMINATING"
    # a state newer than this SDK: the deprecated one
    new = {"status": {"state": "BRAND_NEW"}, "state": {"life_cycle_state": "PENDING"}}
    assert run_state(Run.from_dict({"run_id": 1, **new})) == "PENDING"
    assert run_state(Run.from_dict({"run_id": 1})) is None


def queued(queue: dict[str, Any] | None) -> Run:
    status: dict[str, Any] = {"state": "QUEUED"}
    if queue is not None:
        status["queue_details"] = queue
    return Run.from_dict({"run_id": 42, "status": status})


@pytest.mark.parametrize(
    ("queue", "progress"),
    [
        (
            {"code": "ACTIVE_RUNS_LIMIT_REACHED", "message": "3 runs going"},
            {
                "state": "QUEUED",
                "queue": {"code": "ACTIVE_RUNS_LIMIT_REACHED", "message": "3 runs going"},
            },
        ),
        (
            {"code": "MAX_CONCURRENT_RUNS_REACHED"},
            {"state": "QUEUED", "queue": {"code": "MAX_CONCURRENT_RUNS_REACHED"}},
        ),
        ({"message": "waiting"}, {"state": "QUEUED", "queue": {"message": "waiting"}}),
        ({"message": ""}, {"state": "QUEUED"}),
        ({}, {"state": "QUEUED"}),
        (None, {"state": "QUEUED"}),
    ],
)
def test_a_queued_run_says_why_it_waits(queue: dict[str, Any] | None, progress: dict[str, Any]):
    assert outcome_of_run(queued(queue)) == Running(progress=progress, external={"state": "QUEUED"})


def repaired_run(repair: dict[str, Any] | None, run_status: str = "TERMINATED") -> Run:
    """A run that ended in success, whose history has an ORIGINAL entry and
    the repair 7 (`repair`: its status and state)."""
    body: dict[str, Any] = {
        "run_id": 42,
        "status": {"state": run_status, "termination_details": {"code": "SUCCESS"}},
        "repair_history": [{"id": 6, "type": "ORIGINAL"}, {"id": 7, "type": "REPAIR"}],
    }
    if run_status != "TERMINATED":
        del body["status"]["termination_details"]
    if repair is not None:
        body["repair_history"][1].update(repair)
    return Run.from_dict(body)


def test_a_run_is_judged_by_the_repair_it_is_asked_about():
    going = repaired_run({"status": {"state": "RUNNING"}})
    assert outcome_of_run(going, 7) == Running(
        progress={"state": "RUNNING"}, external={"state": "RUNNING"}
    )
    # the run's own state (success) says nothing of that repair
    assert outcome_of_run(going) == succeeded()
    ended = {"status": {"state": "TERMINATED", "termination_details": {"code": "DRIVER_ERROR"}}}
    assert outcome_of_run(repaired_run(ended), 7) == failed("DRIVER_ERROR")
    by_old_field = {"state": {"life_cycle_state": "PENDING"}}
    assert outcome_of_run(repaired_run(by_old_field), 7) == Running(
        progress={"state": "PENDING"}, external={"state": "PENDING"}
    )


def test_a_repair_not_listed_yet_cannot_be_told_about():
    assert outcome_of_run(repaired_run({"status": {"state": "RUNNING"}}), 8) is None
    assert outcome_of_run(Run.from_dict({"run_id": 42}), 7) is None


def test_a_repair_listed_without_a_state_is_judged_by_the_run():
    assert outcome_of_run(repaired_run(None), 7) == succeeded()
    assert outcome_of_run(repaired_run(None, "RUNNING"), 7) == Running(
        progress={"state": "RUNNING"}, external={"state": "RUNNING"}
    )


def test_a_state_this_sdk_does_not_list_as_going_is_unknown():
    # `status.state` a string the SDK kept as it is (not one of its enums)
    assert _read(RunStatus(state="LATER"), None) is None  # type: ignore[arg-type]
    assert _read(RunStatus(state="WAITING"), None) is not None  # type: ignore[arg-type]


# ── latest_tasks ─────────────────────────────────────────────────────────────


def test_each_task_key_keeps_its_latest_attempt_in_the_runs_order():
    a0, b0 = task("a", 1, attempt=0), task("b", 2, attempt=0)
    a1, c0 = task("a", 3, attempt=1), task("c", 4)
    run = Run(run_id=42, tasks=[a0, b0, a1, c0])
    assert latest_tasks(run) == [a1, b0, c0]
    # an older attempt listed after the newer one does not replace it
    assert latest_tasks(Run(run_id=42, tasks=[a1, a0])) == [a1]
    assert latest_tasks(Run(run_id=42)) == []


def test_of_equal_attempts_the_higher_run_id_wins():
    low, high = task("a", 5, attempt=1), task("a", 9, attempt=1)
    assert latest_tasks(Run(run_id=42, tasks=[high, low])) == [high]
    assert latest_tasks(Run(run_id=42, tasks=[low, high])) == [high]


def test_of_equal_attempts_and_ids_the_one_listed_last_wins():
    first = task("a", 5, "RUN_EXECUTION_ERROR", attempt=1)
    last = task("a", 5, "SUCCESS", attempt=1)
    assert latest_tasks(Run(run_id=42, tasks=[first, last]))[0] is last


def test_a_missing_attempt_or_run_id_counts_as_zero():
    # attempt None is attempt 0: the higher run id of attempt 0 stays
    assert (
        latest_tasks(Run(run_id=42, tasks=[task("a", 9, attempt=0), task("a", 3)]))[0].run_id == 9
    )
    # run id None is 0: below run id 1 of the same attempt
    kept = task("a", 1, attempt=1)
    assert latest_tasks(Run(run_id=42, tasks=[kept, task("a", None, attempt=1)]))[0] is kept
    # attempt 1 beats a missing attempt whatever the run ids
    newer = task("a", 1, attempt=1)
    assert latest_tasks(Run(run_id=42, tasks=[newer, task("a", 99)]))[0] is newer


# ── failed_tasks ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "given",
    [
        task(code="SUCCESS"),
        task(code="SUCCESS_WITH_FAILURES"),
        task(result_state="SUCCESS"),
        # never ran: skipped, or excluded by an upstream task or a condition
        task(code="SKIPPED"),
        task(code="DISABLED"),
        task(result_state="EXCLUDED"),
        task(result_state="UPSTREAM_FAILED"),
        task(result_state="UPSTREAM_CANCELED"),
        task(result_state="DISABLED"),
        # has not ended, or its state is unknown
        task(state="RUNNING"),
        task(state="QUEUED"),
        task(),
    ],
)
def test_tasks_that_succeeded_never_ran_or_go_on_are_not_failed(given: RunTask):
    assert failed_tasks([given]) == []


@pytest.mark.parametrize(
    "given",
    [
        task(code="RUN_EXECUTION_ERROR"),
        task(code="DRIVER_ERROR"),
        task(code="USER_CANCELED"),
        task(code="MAX_CONCURRENT_RUNS_EXCEEDED"),
        task(result_state="FAILED"),
        task(result_state="TIMEDOUT"),
        task(result_state="CANCELED"),
    ],
)
def test_tasks_that_ran_and_did_not_succeed_are_failed(given: RunTask):
    assert failed_tasks([given]) == [given]


def test_failed_tasks_keep_their_order():
    a, b, c = task("a", 1, "DRIVER_ERROR"), task("b", 2, "SUCCESS"), task("c", 3, "CANCELED")
    assert failed_tasks([c, b, a]) == [c, a]


# ── has_output, exit_value ───────────────────────────────────────────────────


def test_only_a_notebook_task_with_a_run_id_has_output():
    assert has_output(task(run_id=5)) is True
    assert has_output(task(run_id=None)) is False
    assert has_output(task(run_id=5, notebook=False)) is False


@pytest.mark.parametrize(
    ("given", "value"),
    [
        (None, None),
        (RunOutput(), None),
        (RunOutput(notebook_output=NotebookOutput()), None),
        (output('{"rows": 42, "ok": true}'), {"rows": 42, "ok": True}),
        (output("42"), 42),
        (output('"text"'), "text"),
        (output("null"), None),
        (output("not json"), "not json"),
        (output(""), ""),
        (output("[" * 100_000), "[" * 100_000),
        (
            output('{"rows": 4', truncated=True),
            {"truncated": True, "preview": '{"rows": 4', "truncated_by": "databricks"},
        ),
        (output("42", truncated=False), 42),
    ],
)
def test_the_exit_value_is_parsed_when_it_is_json(given: RunOutput | None, value: Any):
    assert exit_value(given) == value


# ── with_outputs ─────────────────────────────────────────────────────────────


def test_a_single_task_run_succeeds_with_its_exit_value():
    only = task("main", 11, "SUCCESS")
    got = with_outputs(succeeded(), [only], {11: output('{"rows": 42}')})
    assert got == Outcome(status="succeeded", result={"rows": 42})
    # no output read, or none to read: no value
    assert with_outputs(succeeded(), [only], {}) == Outcome(status="succeeded", result=None)
    nameless = task("main", None, "SUCCESS")
    assert with_outputs(succeeded(), [nameless], {0: output("1")}).result is None


def test_a_multi_task_run_succeeds_with_each_read_tasks_value_by_key():
    a, b, c = task("a", 1, "SUCCESS"), task("b", 2, "SUCCESS"), task("c", None, "SUCCESS")
    outputs = {1: output('"A"'), 2: None, 3: output('"C"')}
    got = with_outputs(succeeded(), [a, b, c], outputs)
    assert got == Outcome(status="succeeded", result={"a": "A", "b": None})
    assert with_outputs(succeeded(), [a, b], {}) == Outcome(status="succeeded", result=None)
    assert with_outputs(succeeded(), [], {}) == Outcome(status="succeeded", result=None)


def test_canceled_runs_and_failures_without_a_failed_task_stay_as_they_are():
    canceled = Outcome(
        status="canceled",
        result={"run_id": 42, "termination_code": "USER_CANCELED"},
        error=ErrorInfo(message="Databricks run 42 was canceled (USER_CANCELED)", type="X"),
    )
    broken = task("a", 1, "DRIVER_ERROR", "boom")
    assert with_outputs(canceled, [broken], {}) is canceled
    no_error = Outcome(status="failed", result={"run_id": 42})
    assert with_outputs(no_error, [broken], {}) is no_error
    outcome = failed()
    assert with_outputs(outcome, [task("a", 1, "SUCCESS"), task("b", 2, "SKIPPED")], {}) is outcome


def test_a_failed_run_names_its_one_failed_task():
    broken = task("main", 11, "RUN_EXECUTION_ERROR", "Workload failed: boom")
    got = with_outputs(failed(), [broken], {11: output(error="ZeroDivisionError: x")})
    assert got == Outcome(
        status="failed",
        result={
            "run_id": 42,
            "termination_code": "RUN_EXECUTION_ERROR",
            "failed_tasks": [
                {
                    "task_key": "main",
                    "run_id": 11,
                    "code": "RUN_EXECUTION_ERROR",
                    "message": "Workload failed: boom",
                    "error": "ZeroDivisionError: x",
                }
            ],
        },
        error=ErrorInfo(
            message="Databricks run 42 failed (RUN_EXECUTION_ERROR); 1 task failed:"
            " main (RUN_EXECUTION_ERROR): Workload failed: boom: ZeroDivisionError: x",
            type="RUN_EXECUTION_ERROR",
        ),
    )


def test_a_failed_run_names_each_failed_task_in_order():
    a = task("a", 1, "DRIVER_ERROR")
    ok = task("ok", 2, "SUCCESS")
    b = task("b", 3, result_state="TIMEDOUT", message="too slow")
    got = with_outputs(failed("FAILED"), [a, ok, b], {1: None, 3: output(error="timed out")})
    assert got.result == {
        "run_id": 42,
        "termination_code": "FAILED",
        "failed_tasks": [
            {"task_key": "a", "run_id": 1, "code": "DRIVER_ERROR"},
            {
                "task_key": "b",
                "run_id": 3,
                "code": "TIMEDOUT",
                "message": "too slow",
                "error": "timed out",
            },
        ],
    }
    assert got.error == ErrorInfo(
        message="Databricks run 42 failed (FAILED); 2 tasks failed:"
        " a (DRIVER_ERROR); b (TIMEDOUT): too slow: timed out",
        type="FAILED",
    )


def test_a_failed_task_without_a_run_id_has_no_output_read():
    nameless = task("a", None, "DRIVER_ERROR")
    got = with_outputs(failed(), [nameless], {0: output(error="not this one")})
    assert got.result["failed_tasks"] == [{"task_key": "a", "run_id": None, "code": "DRIVER_ERROR"}]


def test_a_failed_task_whose_run_id_is_zero_has_its_output_read():
    """0 is an id like any other (as everywhere else in the plugin)."""
    got = with_outputs(failed(), [task("a", 0, "DRIVER_ERROR")], {0: output(error="OOM")})
    assert got.result["failed_tasks"][0]["error"] == "OOM"


# ── the failure of one task, and its line in the error message ──────────────


def test_a_failure_keeps_the_task_state_message_and_the_outputs_error():
    assert _failure(task("t", 5, "DRIVER_ERROR", "lost"), output(error="OOM")) == {
        "task_key": "t",
        "run_id": 5,
        "code": "DRIVER_ERROR",
        "message": "lost",
        "error": "OOM",
    }
    # empty words are left out
    assert _failure(task("t", 5, "DRIVER_ERROR", ""), output(error="")) == {
        "task_key": "t",
        "run_id": 5,
        "code": "DRIVER_ERROR",
    }
    assert _failure(task("t", 5, "DRIVER_ERROR"), None) == {
        "task_key": "t",
        "run_id": 5,
        "code": "DRIVER_ERROR",
    }


def test_a_failure_of_a_task_in_an_unknown_state_is_unknown():
    assert _failure(task("t", 5), output(error="e")) == {
        "task_key": "t",
        "run_id": 5,
        "code": "UNKNOWN",
        "error": "e",
    }


def test_a_failures_words_are_cut_at_the_task_limit():
    assert TASK_TEXT == 2000
    at = "m" * TASK_TEXT
    over = "e" * (TASK_TEXT + 1)
    got = _failure(task("t", 5, "DRIVER_ERROR", f"  {at}\n"), output(error=over))
    assert got["message"] == at
    assert got["error"] == "e" * (TASK_TEXT - 1) + "…"
    assert len(got["error"]) == TASK_TEXT


@pytest.mark.parametrize(
    ("failure", "line"),
    [
        ({"task_key": "t", "code": "C"}, "t (C)"),
        ({"task_key": "t", "code": "C", "message": "m"}, "t (C): m"),
        ({"task_key": "t", "code": "C", "error": "e"}, "t (C): e"),
        ({"task_key": "t", "code": "C", "message": "m", "error": "e"}, "t (C): m: e"),
        # words one already says are said once
        ({"task_key": "t", "code": "C", "message": "boom", "error": "x: boom"}, "t (C): boom"),
        ({"task_key": "t", "code": "C", "message": "x: boom", "error": "boom"}, "t (C): x: boom"),
        ({"task_key": "t", "code": "C", "message": "same", "error": "same"}, "t (C): same"),
        ({"task_key": "t", "code": "C", "message": "", "error": "e"}, "t (C): e"),
    ],
)
def test_a_failed_tasks_line_says_its_words_once(failure: dict[str, Any], line: str):
    assert _line(failure) == line


def test_a_lines_words_are_cut_at_the_line_limit():
    assert LINE_TEXT == 300
    at, over = "a" * LINE_TEXT, "b" * (LINE_TEXT + 1)
    line = _line({"task_key": "t", "code": "C", "message": at, "error": over})
    assert line == f"t (C): {at}: {'b' * (LINE_TEXT - 1)}…"


@pytest.mark.parametrize(
    ("text", "limit", "cut"),
    [
        ("abc", 3, "abc"),
        ("abcd", 3, "ab…"),
        ("  abc \n", 3, "abc"),
        ("", 3, ""),
        ("abcdef", 1, "…"),
    ],
)
def test_text_is_stripped_then_cut_with_an_ellipsis(text: str, limit: int, cut: str):
    assert _cut(text, limit) == cut


# ── repair: pure parts ───────────────────────────────────────────────────────


def test_the_latest_repair_is_the_last_repair_entry():
    def history(*items: tuple[int, str]) -> Run:
        return Run.from_dict(
            {"run_id": 42, "repair_history": [{"id": i, "type": t} for i, t in items]}
        )

    assert latest_repair(Run.from_dict({"run_id": 42})) is None
    assert latest_repair(history((6, "ORIGINAL"))) is None
    assert latest_repair(history((6, "ORIGINAL"), (7, "REPAIR"), (9, "REPAIR"))) == 9
    assert latest_repair(history((6, "ORIGINAL"), (7, "REPAIR"), (8, "ORIGINAL"))) == 7


def run_with(
    job: dict[str, str] | None = None,
    notebook: dict[str, str] | None = None,
    tasks: list[RunTask] | None = None,
) -> Run:
    body: dict[str, Any] = {"run_id": 42}
    if job is not None:
        body["job_parameters"] = [{"name": k, "value": v} for k, v in job.items()]
    if notebook is not None:
        body["overriding_parameters"] = {"notebook_params": notebook}
    run = Run.from_dict(body)
    run.tasks = tasks
    return run


def test_a_run_carries_an_attempts_promise_id_in_any_of_its_parameters():
    promise = {"tether_promise_id": "j:2"}
    assert carries(run_with(job={"table": "t", **promise}), "j:2") is True
    assert carries(run_with(job=promise), "j:1") is False
    assert carries(run_with(notebook=promise), "j:2") is True
    assert carries(run_with(notebook=promise), "j:1") is False
    assert carries(run_with(tasks=[task(params=promise)]), "j:2") is True
    assert carries(run_with(tasks=[task(params=promise)]), "j:1") is False
    # any of them naming it is enough
    assert carries(run_with(job={"tether_promise_id": "j:1"}, notebook=promise), "j:2") is True


def test_a_run_naming_no_attempt_carries_none():
    assert carries(run_with(), "j:1") is None
    assert carries(run_with(job={"table": "t"}, notebook={"x": "y"}), "j:1") is None
    assert carries(run_with(job={"tether_promise_id": ""}), "j:1") is None
    assert carries(run_with(notebook={}), "j:1") is None
    assert (
        carries(run_with(tasks=[task(params={"table": "t"}), task("b", notebook=False)]), "j:1")
        is None
    )


def test_only_a_tasks_latest_attempt_carries():
    old = task("main", 1, attempt=0, params={"tether_promise_id": "j:1"})
    new = task("main", 2, attempt=1, params={"tether_promise_id": "j:2"})
    assert carries(run_with(tasks=[old, new]), "j:1") is False
    assert carries(run_with(tasks=[old, new]), "j:2") is True


# ── repair: against the fake workspace ───────────────────────────────────────


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeWorkspace]:
    """One fake workspace for the module (stopping one takes half a second),
    and an environment in which the SDK finds it, as conftest's `workspace`."""
    ws = FakeWorkspace().start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        env.setenv("DATABRICKS_HOST", ws.url)
        env.setenv("DATABRICKS_TOKEN", ws.token)
        yield ws
    ws.stop()


@pytest.fixture
def workspace(shared: FakeWorkspace) -> Iterator[FakeWorkspace]:
    """The module's fake workspace, emptied after each test."""
    yield shared
    for run in list(shared.runs.values()):
        run.end("USER_CANCELED", "the test is over")
    with shared.lock:
        shared.runs.clear()
        shared.faults.clear()
        shared.seen.clear()
        shared.exits.clear()


RUN_ID = 501
PAGE = "/?o=1#job/7/run/501"
PARAMS = {"job_parameters": {"table": "t", "tether_promise_id": "j:2"}}


def put_run(
    ws: FakeWorkspace,
    status: str = "TERMINATED",
    code: str | None = "RUN_EXECUTION_ERROR",
    parameters: dict[str, str] | None = None,
    repaired: bool = False,
) -> fake.Run:
    """Run 501 of job 7 (one notebook task, `main`, run 502) as the workspace
    has it; `repaired`: repair 601 made of it already, going on as the run."""
    ws.notebooks["idle"] = lambda ws, run: None  # a repair leaves the run queued
    run = fake.Run(RUN_ID, 7, "job-7", parameters or {"tether_promise_id": "j:1"}, "idle", None)
    run.status, run.code, run.message = status, code, "Workload failed" if code else ""
    run.tasks = [fake.TaskRun("main", 502, notebook_path="/n")]
    if repaired:
        ended = ("TERMINATED", "RUN_EXECUTION_ERROR", "")
        run.repairs = [
            {"id": 600, "type": "ORIGINAL", "task_run_ids": [502], "start_time": 0, "ended": ended},
            {"id": 601, "type": "REPAIR", "task_run_ids": [503], "start_time": 1},
        ]
    ws.runs[RUN_ID] = run
    return run


async def repair(
    known: int | None = None,
    promise_id: str = "j:2",
    parameters: dict[str, Any] = PARAMS,
    settings: DatabricksSettings = SETTINGS,
) -> dict[str, Any]:
    return await repairs.repair(
        Workspace(settings), RUN_ID, known, promise_id, parameters, "the-secret"
    )


async def test_a_failed_run_is_repaired_with_the_new_attempts_parameters(
    workspace: FakeWorkspace,
):
    run = put_run(workspace)
    external = await repair()
    made = run.repairs[-1]["id"]
    assert external == {
        "run_id": RUN_ID,
        "run_page_url": workspace.url + PAGE,
        "state": "QUEUED",
        "repair_id": made,
    }
    [sent] = workspace.calls(REPAIR)
    assert sent.body == {
        "run_id": RUN_ID,
        "rerun_all_failed_tasks": True,
        "job_parameters": {"table": "t", "tether_promise_id": "j:2"},
    }
    assert [r["type"] for r in run.repairs] == ["ORIGINAL", "REPAIR"]
    assert run.parameters["tether_promise_id"] == "j:2"
    assert len(workspace.calls(GET_RUN, "GET")) == 2  # before, and the repair's state after


async def test_a_canceled_run_is_repaired_too(workspace: FakeWorkspace):
    run = put_run(workspace, code="USER_CANCELED")
    external = await repair(parameters={"notebook_params": {"tether_promise_id": "j:2"}})
    assert external["repair_id"] == run.repairs[-1]["id"]
    assert workspace.calls(REPAIR)[0].body["notebook_params"] == {"tether_promise_id": "j:2"}


async def test_a_repair_an_earlier_try_made_is_taken(workspace: FakeWorkspace, logs):
    put_run(workspace, "RUNNING", None, {"tether_promise_id": "j:2"}, repaired=True)
    external = await repair(known=None, promise_id="j:2")
    assert external == {
        "run_id": RUN_ID,
        "run_page_url": workspace.url + PAGE,
        "state": "RUNNING",
        "repair_id": 601,
    }
    assert workspace.calls(REPAIR) == []
    assert "tether.databricks INFO databricks: run 501: repair 601 is this attempt's already" in (
        logs.lines
    )


async def test_a_later_repair_naming_no_attempt_is_taken(workspace: FakeWorkspace):
    put_run(workspace, parameters={"table": "t"}, repaired=True)
    external = await repair(known=None, promise_id="j:2")
    assert external == {
        "run_id": RUN_ID,
        "run_page_url": workspace.url + PAGE,
        "state": "TERMINATED",
        "repair_id": 601,
    }
    assert workspace.calls(REPAIR) == []


async def test_a_repair_made_by_hand_is_repaired_after(workspace: FakeWorkspace):
    run = put_run(workspace, parameters={"tether_promise_id": "j:1"}, repaired=True)
    external = await repair(known=None, promise_id="j:2")
    [sent] = workspace.calls(REPAIR)
    assert sent.body["latest_repair_id"] == 601
    assert external["repair_id"] == run.repairs[-1]["id"] != 601
    assert [r["type"] for r in run.repairs] == ["ORIGINAL", "REPAIR", "REPAIR"]


async def test_the_repair_the_previous_attempt_ran_as_is_repaired_after(
    workspace: FakeWorkspace,
):
    # the run names no attempt: were 601 not the previous attempt's, it would be taken
    run = put_run(workspace, parameters={"table": "t"}, repaired=True)
    external = await repair(known=601, promise_id="j:2")
    assert workspace.calls(REPAIR)[0].body["latest_repair_id"] == 601
    assert external["repair_id"] == run.repairs[-1]["id"] != 601
    assert external["state"] == "QUEUED"


@pytest.mark.parametrize(("status", "named"), [("RUNNING", "RUNNING"), ("BRAND_NEW", "unknown")])
async def test_a_run_that_has_not_ended_is_repaired_later(
    workspace: FakeWorkspace, status: str, named: str
):
    put_run(workspace, status, None)
    with pytest.raises(BackendError) as raised:
        await repair()
    error = raised.value
    assert error.message == (
        f"Databricks run 501 has not ended yet ({named}): only an ended run is repaired"
        " (this attempt tries again; once it failed, retry the job once the run ended)"
    )
    assert (error.retryable, error.code, error.retry_after) == (True, "RUN_NOT_ENDED", 5.0)
    assert workspace.calls(REPAIR) == []


async def test_a_run_that_is_ending_is_waited_for_then_repaired(
    workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch
):
    """A retry right after a cancel: Databricks ends the run in its own time
    (`TERMINATING` while its cluster stops). The repair waits for it, looking
    every `ENDING_WAIT`, instead of spending the trigger's tries (four, 15 s
    in all) and failing the new attempt."""
    monkeypatch.setattr(repairs, "ENDING_WAIT", 0.05)
    run = put_run(workspace, "TERMINATING", None)

    async def ends() -> None:
        await asyncio.sleep(0.3)
        run.status, run.code = "TERMINATED", "USER_CANCELED"

    ending = asyncio.create_task(ends())
    external = await repair()
    await ending
    assert external["repair_id"] == run.repairs[-1]["id"]
    assert len(workspace.calls(REPAIR)) == 1
    assert len([c for c in workspace.seen if c.path == GET_RUN]) >= 4  # it looked again


async def test_a_run_ending_for_too_long_is_not_ended(
    workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(repairs, "ENDING_WAIT", 0.05)
    monkeypatch.setattr(repairs, "ENDING_LIMIT", 0.2)
    put_run(workspace, "TERMINATING", None)
    with pytest.raises(BackendError) as raised:
        await repair()
    assert raised.value.code == "RUN_NOT_ENDED" and "(TERMINATING)" in raised.value.message
    assert workspace.calls(REPAIR) == []


@pytest.mark.parametrize("code", ["SUCCESS", "SUCCESS_WITH_FAILURES"])
async def test_a_run_that_succeeded_is_not_repaired(workspace: FakeWorkspace, code: str):
    put_run(workspace, code=code)
    with pytest.raises(NotRepaired) as raised:
        await repair()
    assert str(raised.value) == f"it succeeded ({code}): no task failed there"
    assert workspace.calls(REPAIR) == []


async def test_a_run_databricks_no_longer_has_is_not_repaired(workspace: FakeWorkspace):
    with pytest.raises(NotRepaired) as raised:
        await repair()
    assert str(raised.value) == "it cannot be read: Run 501 does not exist."


async def test_a_run_that_cannot_be_read_now_is_tried_again(workspace: FakeWorkspace):
    put_run(workspace)
    workspace.fail(GET_RUN, 503, "TEMPORARILY_UNAVAILABLE", "later", method="GET")
    with pytest.raises(BackendError) as raised:
        await repair()
    assert (raised.value.retryable, raised.value.code) == (True, "TEMPORARILY_UNAVAILABLE")
    assert workspace.calls(REPAIR) == []


async def test_a_refused_repair_is_not_repaired_and_says_why_scrubbed(workspace: FakeWorkspace):
    run = put_run(workspace)
    workspace.fail(REPAIR, 400, "INVALID_PARAMETER_VALUE", "no: the-secret is wrong")
    with pytest.raises(NotRepaired) as raised:
        await repair()
    assert str(raised.value) == "Databricks refused to repair it: no: *** is wrong"
    assert run.repairs == []
    assert len(workspace.calls(GET_RUN, "GET")) == 2  # looked for a repair before giving up


async def test_a_run_databricks_cannot_repair_is_not_repaired(workspace: FakeWorkspace):
    # naming no attempt, it would be taken had a repair been made since
    run = put_run(workspace, parameters={"table": "t"})
    run.repairable = False
    with pytest.raises(NotRepaired) as raised:
        await repair()
    assert str(raised.value) == "Databricks refused to repair it: Run 501 cannot be repaired."


async def test_a_refusal_with_no_repair_since_the_known_one_is_not_repaired(
    workspace: FakeWorkspace,
):
    run = put_run(workspace, parameters={"tether_promise_id": "j:2"}, repaired=True)
    run.repairable = False
    with pytest.raises(NotRepaired) as raised:
        await repair(known=601)
    assert str(raised.value) == "Databricks refused to repair it: Run 501 cannot be repaired."
    assert workspace.calls(REPAIR)[0].body["latest_repair_id"] == 601


async def test_a_retryable_repair_failure_is_raised_as_it_is(workspace: FakeWorkspace):
    put_run(workspace)
    workspace.fail(REPAIR, 503, "TEMPORARILY_UNAVAILABLE", "busy with the-secret")
    with pytest.raises(BackendError) as raised:
        await repair()
    assert (raised.value.retryable, raised.value.code, raised.value.message) == (
        True,
        "TEMPORARILY_UNAVAILABLE",
        "busy with ***",
    )
    assert len(workspace.calls(GET_RUN, "GET")) == 1  # not looked for: the next try will


async def test_a_repair_whose_answer_was_lost_is_found_not_made_again(
    workspace: FakeWorkspace, logs
):
    run = put_run(workspace)
    dropped = workspace.drop(REPAIR)  # made; the SDK sends it again and is refused
    # the SDK's own backoff (~1.6 s) runs inside retry_timeout: room for a loaded machine
    external = await repair(settings=DatabricksSettings(retry_timeout=30, http_timeout=5))
    assert dropped.reached.is_set()
    assert len(workspace.calls(REPAIR)) == 2
    assert [r["type"] for r in run.repairs] == ["ORIGINAL", "REPAIR"]
    made = run.repairs[-1]["id"]
    assert external == {
        "run_id": RUN_ID,
        "run_page_url": workspace.url + PAGE,
        "state": "QUEUED",
        "repair_id": made,
    }
    assert (
        f"tether.databricks INFO databricks: run 501: repair {made} was made by an earlier request"
        in logs.lines
    )


@pytest.mark.parametrize(("status", "code"), [(503, "TEMPORARILY_UNAVAILABLE"), (400, "BAD")])
async def test_a_repairs_state_that_cannot_be_read_is_left_out(
    workspace: FakeWorkspace, status: int, code: str
):
    run = put_run(workspace)
    fault = workspace.fail(GET_RUN, status, code, "no", method="GET")
    fault.skip = 1  # the first read passes; the one after the repair fails
    external = await repair()
    assert external == {
        "run_id": RUN_ID,
        "run_page_url": workspace.url + PAGE,
        "repair_id": run.repairs[-1]["id"],
    }


async def test_a_repair_id_missing_from_the_answer_is_read_from_the_run(
    workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch
):
    made = workspace.repair_run

    def without_id(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, _ = made(body)
        return status, {}

    monkeypatch.setattr(workspace, "repair_run", without_id)
    run = put_run(workspace)
    external = await repair()
    assert external["repair_id"] == run.repairs[-1]["id"]
    assert external["state"] == "QUEUED"
    assert len(workspace.calls(GET_RUN, "GET")) == 3  # before, for the id, for its state
