"""The event a settle files, kept in its promise's value (`core.settle.noted`):
filed by whoever ends the job from that value when the settle's own index
write never came (the store took the settle, and answered too late)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from resonate.types import Value

from core.callbacks import Callbacks
from core.models import Outcome
from core.plugins import Plugins, make_plugin_manager
from core.settle import noted, settled_value
from core.store.jobs import NewEvent
from core.tokens import CallbackSigner
from core.workflow import callback_promise_id
from tests.core.parts import Parts, open_parts

DONE = Outcome(status="succeeded", result={"rows": 3})
DIGEST = {"body_bytes": 2, "body_sha256": "ab"}


@pytest.fixture
async def parts() -> AsyncIterator[Parts]:
    async with open_parts() as p:
        yield p


def note(verdict: str) -> NewEvent:
    return NewEvent("callback", {"verdict": verdict, "status": "succeeded", **DIGEST})


def test_the_winners_event_is_kept_in_the_value_and_read_back():
    value = settled_value(DONE, "callback", "n", note("accepted"))
    assert value["note"] == {"type": "callback", "data": note("accepted").data}
    assert noted(value) == [note("accepted")]
    assert "note" not in settled_value(DONE, "callback", "n")


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"status": "succeeded"},  # a release before notes, the trigger, the store
        {"note": "callback"},
        {"note": {"type": "not_an_event", "data": {}}},
        {"note": {"type": "callback", "data": ["x"]}},
    ],
)
def test_a_value_without_a_readable_note_files_nothing(value: Any):
    assert noted(value) == []


async def test_a_settle_that_lost_and_ends_the_job_files_the_winners_event_first(parts: Parts):
    """The winner's settle reached the store, its index write did not (a 503):
    a repeat of it is a duplicate, and ends the job with both events."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    winner = settled_value(DONE, "callback", "theirs", note("accepted"))
    await parts.resonate.promises.resolve(callback_promise_id("j"), Value(data=winner))

    result, rec = await parts.settler.settle("j", DONE, by="callback", note=note, attempt=1)
    assert (result, rec.state) == ("duplicate", "succeeded")
    _, events = await parts.jobs.events_after("j", 0, 10)
    assert [(e.type, e.data.get("verdict")) for e in events][-3:] == [
        ("callback", "accepted"),
        ("callback", "duplicate"),
        ("finished", None),
    ]


async def test_a_settle_that_won_files_its_event_once(parts: Parts):
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    result, _ = await parts.settler.settle("j", DONE, by="callback", note=note, attempt=1)
    assert result == "accepted"
    _, events = await parts.jobs.events_after("j", 0, 10)
    assert [e.type for e in events][-2:] == ["callback", "finished"]
    assert [e.type for e in events].count("callback") == 1


async def test_a_settle_that_won_after_the_workflow_ended_the_job_files_nothing_again(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
):
    """The workflow's finish ran between the winner's settle and its index
    write (it resumes as soon as the promise is settled, in any process): it
    filed the winner's event from the value, and the winner files no other
    (it filed a `duplicate` of itself)."""
    await parts.add_job("j", state="running")
    await parts.add_promise("j")
    parts.ended_as_it_settles(monkeypatch)
    result, rec = await parts.settler.settle("j", DONE, by="callback", note=note, attempt=1)
    assert (result, rec.state) == ("accepted", "succeeded")
    _, events = await parts.jobs.events_after("j", 0, 10)
    assert [(e.type, e.data.get("verdict")) for e in events][-2:] == [
        ("callback", "accepted"),
        ("finished", None),
    ]
    assert [e.type for e in events].count("callback") == 1


# ── a promise born after the job ended (the unborn path) ─────────────────────


async def history(parts: Parts) -> list[tuple[str, Any]]:
    _, events = await parts.jobs.events_after("j", 0, 20)
    return [(e.type, e.data.get("verdict")) for e in events]


@pytest.mark.parametrize("same", [True, False])
async def test_a_settle_that_wins_a_promise_born_after_the_job_ended_is_told_how_it_compares(
    parts: Parts, same: bool
):
    """A first callback ended the job before its workflow made its promise
    (the unborn path: its note filed with the end); the workflow then made
    it, and a second callback settled it before the trigger did (which
    settles the promise of a job it finds ended). The second won the
    promise, yet ended nothing: told, and noted, as a `duplicate` (the same
    body: its note is the first one's, which is not its own) or `conflict`."""
    await parts.add_job("j")
    first, _ = await parts.settler.settle("j", DONE, by="callback", note=note, attempt=1)
    assert first == "accepted"
    await parts.add_promise("j")
    seen = await parts.row("j")
    again = DONE if same else Outcome(status="succeeded", result={"rows": 4})

    def again_note(verdict: str) -> NewEvent:
        return note(verdict) if same else NewEvent("callback", {"verdict": verdict, "x": 1})

    result, rec = await parts.settler.settle(
        "j", again, by="callback", note=again_note, attempt=1, seen=seen
    )

    verdict = "duplicate" if same else "conflict"
    assert (result, rec.state, rec.result) == (verdict, "succeeded", {"rows": 3})
    assert (await history(parts))[-3:] == [
        ("callback", "accepted"),
        ("finished", None),
        ("callback", verdict),
    ]
    assert rec == await parts.row("j")


async def test_a_repeated_callback_after_an_unborn_path_end_is_a_duplicate_event(parts: Parts):
    """The same through the callback URL: the second identical POST, its
    promise born meanwhile, is answered and filed as a `duplicate`, once."""
    signer = CallbackSigner(parts.settings.callback_secret, "http://tether.example")
    plugins = Plugins(make_plugin_manager(entry_points=False))
    callbacks = Callbacks(plugins, parts.jobs, signer, parts.settler)
    promise_id = callback_promise_id("j")
    token = signer.token(promise_id)
    body = b'{"status": "succeeded", "result": {"rows": 3}}'
    await parts.add_job("j")

    first = await callbacks.take(promise_id, token, body)
    await parts.add_promise("j")  # the workflow makes it; its trigger has yet to settle it
    second = await callbacks.take(promise_id, token, body)

    assert (first.outcome, second.outcome) == ("accepted", "duplicate")
    assert (await history(parts))[-3:] == [
        ("callback", "accepted"),
        ("finished", None),
        ("callback", "duplicate"),
    ]
    _, events = await parts.jobs.events_after("j", 0, 20)
    assert token not in str([e.data for e in events])
