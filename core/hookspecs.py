"""The plugin contract: every hook Tether calls, and the backend interface.

A *backend* is something Tether can run jobs on (Databricks, any HTTP service,
...). A plugin offers backends through the `tether_backends` hook; each backend
is an object with the methods of :class:`Backend` below. Tether calls them from
its one durable workflow:

```
POST /jobs ─► params_type validates ─► trigger() ─► (wait for the callback) ─► job finished
                                           │          │ check_status() every check_interval,
                      run_keys(external) ◄─┘          │   and when a heartbeat is overdue
                      (indexed with the job)          │ parse_callback() on each callback
              cancel() on POST /jobs/{id}/cancel or on timeout ◄─┘

POST /backends/{name}/notifications ─► receive_notification(notice) ─► run keys
      ─► jobs whose runs they are (one indexed read) ─► check_status() at once
```

`trigger` (or `rerun`) returns what identifies the external run; `run_keys`
names the keys it is known by, which Tether indexes with the job. The external
system's own notifications (one endpoint per backend, not per job) then reach
the job through those keys; they only *hint*: `check_status` decides.

Hooks and backend methods get and return only `core` types
(:mod:`core.models`), never web-framework objects. Plugin authors import
everything from :mod:`core.plugin`.

Delivery guarantees a backend must live with:

- `trigger` runs once per attempt, unless what it returned could not be
  recorded: what it returns is recorded with the job (`external`) and is the
  trigger's durable record. If the process dies after the external run was
  started but before it was recorded, or the recording failed, or the
  worker stalled past its task's lease while another took the job over,
  `trigger` runs again with the *same* `idempotency_key`: pass it to the
  external system so the second call returns the first run.
- `cancel` and `tether_job_finished` run at least once (again after a crash).
  So does `cancel_unrecorded`, for an attempt that ended with no run
  recorded after a try that may have started one.
- `check_status` and `parse_callback` may run in any process, any number of
  times, concurrently; they must not change anything.
- `receive_notification` is called for every request to the backend's
  notification endpoint, from anyone: it authenticates the request itself
  (the API token does not guard that endpoint), must not change anything, and
  runs before any store read. A notification never settles a job by itself.
- `run_keys` is called right after each trigger, in the trigger's step; its
  keys are written with the job's `external`, in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import msgspec
import pluggy

from core.models import CheckNow, Job, Notice, NoticeAbout, Outcome, Running, Trigger

PROJECT = "tether"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Readiness(msgspec.Struct, frozen=True):
    """What a backend's `readiness` found: `ok` (it can run jobs), `unconfigured`
    (no credentials or settings: it cannot run jobs until the operator gives
    them) or `error` (configured, but the external system refused or did not
    answer). `reason` says why, in words for an operator; never a secret."""

    status: Literal["ok", "unconfigured", "error"]
    reason: str = ""


class Backend:
    """Base class of a backend. Subclass it, set `name` and `params_type`, and
    implement `trigger`; the other methods have safe defaults.

    One instance serves every job of its backend and may be used from several
    jobs at once: keep per-job state in the job record (`job.external`), never
    on the instance.
    """

    name: ClassVar[str]
    """The backend's name as clients write it in `POST /jobs {"backend": ...}`:
    1 to 64 of `a-z 0-9 _ -`, beginning with a letter (it is a path segment
    of `/backends/{name}/notifications`, a key of `TETHER_MAX_RUNNING`).
    Unique across all installed plugins: two backends with one name stop the
    service at start-up, naming both plugins, and so does a backend with no
    name, or another name."""

    params_type: ClassVar[type[Any]]
    """A msgspec Struct (or any type `msgspec.convert` accepts) describing the
    job's `params`. `POST /jobs` converts the client's params with it and answers
    422 naming the bad field when they don't fit. Use `forbid_unknown_fields=True`
    so a misspelt parameter is reported instead of ignored."""

    settings_type: ClassVar[type[msgspec.Struct] | None] = None
    """The plugin's own settings, declared so Tether knows their variables: a
    msgspec Struct whose field `name` is read from `{settings_prefix}NAME`
    (read it with `core.plugin.settings_from_env(settings_type,
    settings_prefix)`). At start-up `tether serve` warns about each `TETHER_*`
    variable that no core setting and no declared plugin setting uses, naming
    the closest known name. Type a field that holds a secret
    `core.plugin.Secret`: its value is then masked wherever it stands whole
    in what Tether logs, keeps and reports, whatever its variable is called.
    `None` (the default): the plugin has no settings."""

    settings_prefix: ClassVar[str] = ""
    """Prefix of `settings_type`'s variables, e.g. `TETHER_DATABRICKS_`."""

    asks_if_replayed: ClassVar[bool] = False
    """True: `trigger` and `rerun` are told whether an earlier run of the
    trigger may have made a try nothing recorded (`Trigger.replayed`), which
    costs an index write a trigger (the run's mark, `JobRecord.tries_run`).
    For a backend that cannot hand the external system an idempotency key
    and looks for an earlier try's run itself (`databricks_sql`); such a
    backend waits for a lagging list with `BackendError(tried=False)`."""

    def check_new_params(self, params: Any) -> None:
        """Called when a job is created, with its converted params, and never
        again: raise `ValueError` (its message names the field) to refuse
        params that new jobs may not have but jobs already stored may keep (a
        rule tightened in a release: their stored params are converted with
        `params_type` at every trigger, cancel and status check, where a
        refusal would strand them). `POST /jobs` answers 422 with the message.
        Any other exception is a bug, not a refusal: 500, no job made, logged
        naming the backend and the exception's type (never its message).
        The default accepts everything. Must not block."""

    def check_interval(self, params: Any) -> float | None:
        """Seconds between `check_status` calls while a job with these (converted)
        params waits, or `None` never to check (the job then ends only by
        callback, cancel or timeout). Later checks back off: each waits half the
        job's time running so far, at least this and at most ten times this.
        The default returns `None`. Must not block.
        """
        return None

    async def trigger(self, trigger: Trigger) -> Mapping[str, Any]:
        """Start the external job. Called once per job (again only after a crash,
        see the module docstring), after its params were validated.

        `trigger` carries the job, its converted params, the promise id, the
        callback URL and the idempotency key (see :class:`core.models.Trigger`).
        Hand the callback URL to the external system so it can report the outcome.

        Return what identifies the external run (JSON-serialisable, small, no
        secrets), e.g. `{"run_id": 42, "run_page_url": "..."}`; it is stored as
        the job's `external` and handed back to `cancel` and `check_status`.

        Raise :class:`core.errors.BackendError` when the external system refuses:
        `retryable=True` for timeouts, 5xx and 429 (Tether retries with backoff,
        `settings.trigger_attempts` times in all), `retryable=False` to fail the
        job at once. Any other exception counts as retryable. It may wait
        (await) for as long as one request takes; bound it with a timeout.
        It must never block the event loop (no blocking client, no
        `time.sleep`: use an async client or `asyncio.to_thread`): every
        request and job of the process waits meanwhile, and one blocked past
        a task's lease has its trigger run again by another worker.
        """
        raise NotImplementedError

    async def rerun(self, trigger: Trigger, previous: Job) -> Mapping[str, Any]:
        """Start the external job again: attempt 2 or later of a job that
        failed, timed out or was canceled (`POST /jobs/{id}/retry`). Called
        instead of `trigger`, with the same contract and return value.

        `trigger` is the new attempt's (`trigger.job.attempt`, a new callback
        URL and a new idempotency key, so the external system starts a new
        run); `previous` is the job as the previous attempt ended: its
        `state` and `error`, and the `external` of the latest attempt that
        recorded one (None if none was ever triggered: an attempt whose
        trigger failed leaves the run before it), for a backend that can
        resume or repair a run instead of starting afresh.
        The default calls `self.trigger(trigger)`.
        """
        return await self.trigger(trigger)

    async def cancel(self, job: Job) -> None:
        """Stop the external run of `job`, which was canceled or timed out,
        or is not wanted: the job failed by its trigger's failure while another
        process's trigger started the run, or the attempt ended (and perhaps
        was retried) while its trigger waited for the run (`job` is the
        attempt as it ended; `job.state` says which).

        Called after the job's wait ended, only if `trigger` had returned
        (`job.external` is what it returned). Best effort: an exception is
        logged and the job's state stays as it ended; a call not answered
        within 5 minutes (`core.steps.CANCEL_TIMEOUT`) is given up so. The default does nothing,
        for backends whose runs cannot be stopped.
        """
        return None

    async def cancel_unrecorded(self, trigger: Trigger) -> None:
        """Stop the run `trigger` may have started though no answer of it was
        recorded: the job ended canceled, timed out, or failed by its trigger
        after a try that may have reached the external system (it timed out,
        the connection dropped, a 5xx, or the process died mid-try), and
        `job.external` is None (but with `trigger.retried`: then it is what
        the attempt recorded, if anything). `trigger` is the one the tries
        were made with (`trigger.job` as the attempt ended): find the run by
        what they sent (the promise id, the idempotency key) and stop it.
        Another Tether deployment's job under the same id sends the same:
        take as this job's only a run that carries `trigger.mark`, or a
        callback URL for which `trigger.signed_here` is true. There may be
        no such run (no try got through): then do nothing.

        Called once the attempt's wait is over, in its finish, at least once
        (again after a crash), best effort as `cancel`. Not called when every
        try was a clear refusal (`BackendError(retryable=False)` only), unless
        the refusal came in a replayed run of the workflow (an earlier run may
        have died inside a try the refusal repeats: `trigger_failed`'s
        `replayed`). The default does nothing, for backends that cannot find
        such a run.
        """
        return None

    async def check_status(self, job: Job) -> Outcome | Running | None:
        """Ask the external system whether the run of a waiting job has ended,
        for when its callback was lost (the notebook crashed, the network dropped
        the request).

        Called every `check_interval(params)` seconds while the job is
        `running`, when a callback only hints that the run ended
        (:class:`~core.models.CheckNow`), and when a job with a
        `heartbeat_timeout` went that long without a heartbeat. Return:

        - an :class:`~core.models.Outcome` when the run has ended (it settles
          the job);
        - :class:`~core.models.Running` when the external system confirms the
          run is still going (optionally with its `progress`, shown in the
          history, and `external`: fields of the job's `external` that
          changed, such as the run's state, merged into it): a missed
          heartbeat then only delays, the job waits on;
        - `None` when it cannot tell (no way to ask, an answer it does not
          understand): a missed heartbeat then ends the job `timed_out`.

        Must not change anything. An exception is logged (its type, never its
        message) and decides nothing: the check is tried again later. An
        answer of another type is a bug, taken as an exception on a hint
        (the callback is answered `noted`, saying the check failed). The
        default returns `None`.
        """
        return None

    def parse_callback(self, job: Job, body: Any) -> Outcome | CheckNow | None:
        """Read a callback body in the backend's native shape.

        `body` is the decoded JSON the external system posted to the job's
        callback URL. Return an :class:`~core.models.Outcome` if this backend
        recognises it as the job's outcome; a :class:`~core.models.CheckNow` if
        it only *hints* that the run ended (Tether then calls `check_status` at
        once and settles only on what that returns; the caller gets 202);
        `None` to let Tether read it as its uniform body (`{"status", "result",
        "error"}`). Raise `ValueError` with a message for a body in the native
        shape that is malformed (the caller gets 422, nothing changes). Any
        other exception, or an answer of another type, is a bug: logged
        naming the backend and the exception's or answer's type (never its
        message), and the body read as the uniform one, which so settles the
        job whatever the plugin does. Must not block (no I/O). The default
        returns `None`.
        """
        return None

    def run_keys(self, external: Mapping[str, Any]) -> Sequence[str]:
        """The keys the external system knows this run by, for its
        notifications to find the job (see `receive_notification`).

        `external` is what `trigger` (or `rerun`) returned, as stored. Return
        short strings (at most 200 characters each, e.g. `["1234"]` for a run
        id); each is indexed with the job, for this backend only, in the same
        transaction that records `external`. A key another job of the backend
        had before belongs to the later job from then on. Called once per
        trigger, in the trigger's step, and to tell whether a notification is
        about the job's *current* run (a re-run may have a new one). Must not
        block and must not fail: an exception is logged and indexes nothing.
        The default returns no keys (the backend receives no notifications).
        """
        return ()

    async def receive_notification(self, notice: Notice) -> NoticeAbout | None:
        """Read a notification the external system posted to `POST
        /backends/{name}/notifications`: one endpoint for the whole system,
        for systems that notify a fixed destination rather than each job's
        callback URL (e.g. a Databricks workspace's notification destination).

        `notice` holds the request's headers (names lower-cased), its query
        parameters, the body decoded from JSON and its raw bytes
        (:class:`~core.models.Notice`). The endpoint is not behind Tether's
        API token: **authenticate the request here**, from credentials the
        plugin is configured with, compared in constant time
        (`hmac.compare_digest`). Then return a
        :class:`~core.models.NoticeAbout`: the run keys the notification
        concerns (in `run_keys`'s terms) and what it says happened. Tether
        looks the keys up in one indexed read; a run no job of this service
        started costs no write and is answered 200. For each of its jobs
        whose *current* run it is, Tether records a `notification` event,
        calls `check_status` at once and settles only on what that returns.

        Raise `core.plugin.Unauthorized(message)` when the credentials are
        missing or wrong (401, nothing recorded), `core.plugin.NotFound(message)`
        when notifications are not configured (404; say which settings to
        set), `ValueError(message)` for a body of the wrong shape (422). Never
        put a credential in a message. Must not change anything; bound any
        I/O with a timeout. The default returns `None`: the backend receives
        no notifications, and its endpoint answers 404.
        """
        return None

    async def readiness(self) -> Readiness:
        """Whether the backend could run a job now: credentials present and
        accepted, the external system answering. Shown per backend in `GET
        /health`; it never makes `/health` fail (that stays a liveness check).

        Called in the background shortly after the service starts and then
        every `TETHER_READINESS_INTERVAL` seconds, never per request; the
        answer is cached. Return :class:`Readiness`: `unconfigured` when
        settings or credentials are missing, `error` with the reason when the
        external system refuses them or does not answer. Bound any request
        with a timeout (Tether gives up after 30 s and reports `error`); an
        exception is reported as `error` naming its type only. Must not change
        anything. The default answers `ok`, for backends with nothing to check.
        """
        return Readiness("ok")

    async def close(self) -> None:
        """Let go of what the backend holds (HTTP sessions, clients). Called
        once when the service stops, on the loop the backend ran on; the
        backend may be used again afterwards (tests start a service twice in one
        process), so make clients lazily. The default does nothing.
        """


class TetherHookSpecs:
    """The hooks a plugin may implement (with `@hookimpl`)."""

    @hookspec
    def tether_backends(self) -> Sequence[Backend]:  # type: ignore[empty-body]
        """Offer backends.

        Called once when the service starts. Return the plugin's backends
        (instances of :class:`Backend` subclasses), or an empty sequence. Build
        clients lazily or cheaply here: it runs before the service answers
        anything. Must not block on the network.

        Raise `ValueError` naming the variable to refuse the plugin's
        settings (as `settings_from_env` does): its message is what `tether
        serve` says, so never quote a secret. Any other exception, or an
        answer that is not a sequence of usable backends (each with a `name`
        and a `params_type`), stops the service too, in one line naming the
        plugin and its package.
        """

    @hookspec
    def tether_job_finished(self, job: Job) -> None:
        """Observe a job that reached a final state (`succeeded`, `failed`,
        `canceled`, `timed_out`), e.g. for metrics or notifications.

        Called for every job of every backend, in the process that ran the job's
        workflow, after the job record was updated and, for a canceled or timed
        out job, after its backend's `cancel`. At least once per job. Return
        nothing. A plain `def` (an `async def` stops the service at start-up:
        its body would never run). Must not block: it runs on the event loop,
        so hand slow work to a queue; a call of 0.1 s or more is logged as a
        warning. An exception is logged and does not change the job.
        """
