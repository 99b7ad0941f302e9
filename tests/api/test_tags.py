"""Tags on `POST /jobs` and the list's filters (`tag`, `created_after`,
`created_before`), through real HTTP on a real store; the CLI's `--tag`."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from api.cli import cli as main_group
from core.store.jobs import now_ms
from tests.conftest import eventually
from tests.core.test_retention import a_week_later, workflow_over


def body(receiver: Any, job_id: str, tags: list[str], **more: Any) -> dict[str, Any]:
    params = {"url": receiver.url(more.pop("path", "/wait"))}
    return {"id": job_id, "backend": "http_webhook", "params": params, "tags": tags, **more}


async def listed(svc: Any, **params: Any) -> list[str]:
    answer = await svc.client.get("/jobs", params=params)
    assert answer.status_code == 200, answer.text
    return [job["id"] for job in answer.json()["items"]]


async def tag_rows(svc: Any) -> list[tuple[Any, ...]]:
    return await svc.tether.jobs.db.fetch(
        "SELECT tag, job_id FROM tether_job_tags ORDER BY tag, job_id", ()
    )


@pytest.mark.parametrize(
    "tags",
    [
        [f"t{i}" for i in range(17)],  # too many
        ["x" * 65],  # too long
        [""],  # too short
        ["has space"],
        ["semi;colon"],
        ["new\nline"],
        ["trailing-newline\n"],  # `$` in Python's re matches before it: checked apart
        ["same", "same"],  # duplicates are refused, not merged
        "a-string",
    ],
)
async def test_bad_tags_are_400_naming_tags_and_change_nothing(start_service, receiver, tags):
    svc = await start_service()
    answer = await svc.client.post("/jobs", json=body(receiver, "bad", tags))
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["details"]["field"].startswith("tags")
    assert (await svc.client.get("/jobs/bad")).status_code == 404
    assert await tag_rows(svc) == []


async def test_tags_are_shown_sorted_and_every_allowed_character_is_taken(start_service, receiver):
    svc = await start_service()
    tags = [f"k{i:02d}" for i in range(15)] + ["Team.a_1:x/y=z-" + "w" * 49]
    answer = await svc.client.post("/jobs", json=body(receiver, "j", tags[::-1]))
    assert answer.status_code == 201, answer.text
    assert answer.json()["tags"] == sorted(tags)
    assert (await svc.job("j"))["tags"] == sorted(tags)
    assert (await svc.client.get("/jobs")).json()["items"][0]["tags"] == sorted(tags)
    untagged = await svc.client.post("/jobs", json=body(receiver, "plain", []))
    assert untagged.json()["tags"] == []


async def test_reattach_compares_tags_in_any_order(start_service, receiver):
    svc = await start_service()
    first = await svc.client.post("/jobs", json=body(receiver, "j", ["b", "a"]))
    assert first.status_code == 201
    again = await svc.client.post("/jobs", json=body(receiver, "j", ["a", "b"]))
    assert again.status_code == 200, again.text
    for other in (["a"], ["a", "b", "c"], []):
        answer = await svc.client.post("/jobs", json=body(receiver, "j", other))
        assert answer.status_code == 409, other
        assert answer.json()["error"]["details"]["differs"] == ["tags"]
    # a job without tags reattaches with none given, as before tags existed
    await svc.client.post("/jobs", json=body(receiver, "plain", []))
    request = body(receiver, "plain", [])
    del request["tags"]
    assert (await svc.client.post("/jobs", json=request)).status_code == 200
    assert sorted(await tag_rows(svc)) == [("a", "j"), ("b", "j")]


async def test_filters_by_tags_state_backend_and_creation_time(start_service, receiver):
    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/done" else None
    svc = await start_service()
    made: dict[str, int] = {}
    for job_id, tags, path in (
        ("a", ["team-a"], "/wait"),
        ("ab", ["team-a", "nightly"], "/done"),
        ("b", ["nightly"], "/wait"),
        ("ab2", ["nightly", "team-a", "x"], "/wait"),
        ("none", [], "/done"),
    ):
        made[job_id] = now_ms()
        answer = await svc.client.post("/jobs", json=body(receiver, job_id, tags, path=path))
        assert answer.status_code == 201
        await asyncio.sleep(0.01)  # distinct creation times
    await svc.wait_state("ab", "succeeded")
    await svc.wait_state("none", "succeeded")
    await svc.wait_state("ab2", "running")

    assert await listed(svc, tag="team-a") == ["ab2", "ab", "a"]
    assert await listed(svc, tag=["team-a", "nightly"]) == ["ab2", "ab"]
    assert await listed(svc, tag=["nightly", "team-a", "x"]) == ["ab2"]
    assert await listed(svc, tag=["team-a", "nope"]) == []
    assert await listed(svc, tag="nightly", state="succeeded") == ["ab"]
    assert await listed(svc, tag="nightly", state=["running", "pending"]) == ["ab2", "b"]
    assert await listed(svc, tag="nightly", backend="http_webhook") == ["ab2", "b", "ab"]
    assert await listed(svc, tag="nightly", backend="databricks") == []

    jobs = {job["id"]: job for job in (await svc.client.get("/jobs")).json()["items"]}
    at = {job_id: jobs[job_id]["created_at"] for job_id in jobs}
    assert await listed(svc, created_after=at["b"]) == ["none", "ab2"]
    assert await listed(svc, created_before=at["ab"]) == ["a"]
    window = {"created_after": at["a"], "created_before": at["none"]}
    assert await listed(svc, **window) == ["ab2", "b", "ab"]
    assert await listed(svc, tag="team-a", **window) == ["ab2", "ab"]
    assert await listed(svc, tag="team-a", state="succeeded", **window) == ["ab"]
    # an offset is honoured; a time without one is UTC
    shifted = datetime.fromisoformat(at["b"]).astimezone().isoformat()
    assert await listed(svc, created_after=shifted) == ["none", "ab2"]
    naive = datetime.fromisoformat(at["b"]).replace(tzinfo=None).isoformat()
    assert await listed(svc, created_after=naive) == ["none", "ab2"]


async def test_creation_time_bounds_finer_than_a_millisecond_are_exclusive(start_service, receiver):
    """Times are kept to the millisecond: a bound inside a job's millisecond
    left it out on both sides (`created_before` was cut down to it), and
    msgspec rounded a seventh digit up into the next second (found by an
    exploratory QA pass)."""
    svc = await start_service()
    created = (await svc.client.post("/jobs", json=body(receiver, "j", []))).json()["created_at"]
    at = datetime.fromisoformat(created)
    assert at.microsecond % 1000 == 0

    def text(moment: datetime, extra: str = "") -> str:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + extra + "Z"

    just_after = [text(at + timedelta(microseconds=m)) for m in (1, 500, 999)]
    for bound in [*just_after, text(at, "0001"), text(at + timedelta(milliseconds=1))]:
        assert await listed(svc, created_before=bound) == ["j"], bound
        assert await listed(svc, created_after=bound) == [], bound
    assert await listed(svc, created_before=text(at)) == []
    assert await listed(svc, created_before=text(at, "0000")) == []
    just_before = [
        text(at - timedelta(microseconds=1), "9999"),
        text(at - timedelta(microseconds=1)),
    ]
    for bound in [*just_before, text(at - timedelta(milliseconds=1))]:
        assert await listed(svc, created_after=bound) == ["j"], bound
        assert await listed(svc, created_before=bound) == [], bound
    assert await listed(svc, created_after=text(at)) == []
    assert await listed(svc, created_after="9999-12-31T23:59:59.9999999Z") == []
    for bound, shown in ((text(at, "0001"), True), (text(at), False)):  # the dashboard too
        page = await svc.client.get("/ui", params={"created_before": bound})
        row = 'class="id"><a href="/ui/jobs/j"'
        assert page.status_code == 200 and (row in page.text) is shown, bound
    assert await listed(svc, created_before="9999-12-31T23:59:59.9999999Z") == ["j"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("created_after", "yesterday"),
        ("created_before", "2026-13-01T00:00:00Z"),
        ("created_before", "null"),
        ("created_after", ""),
    ],
)
async def test_a_bad_time_is_400_naming_the_parameter(start_service, name, value):
    svc = await start_service()
    answer = await svc.client.get("/jobs", params={name: value})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["details"]["field"] == name


@pytest.mark.parametrize("tag", ["team a", "x" * 65, "naïve", "a\n", "<b>"])
async def test_a_tag_filter_no_tag_could_match_is_400_naming_it(start_service, tag):
    svc = await start_service()
    for accept in ("application/json", "text/event-stream"):
        headers = {"accept": accept}
        answer = await svc.client.get("/jobs", params={"tag": ["ok", tag]}, headers=headers)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["details"]["field"] == "tag"
        assert error["message"].startswith(f"invalid tag {tag!r}: a tag is 1 to 64 of")
    page = await svc.client.get("/ui", params={"tag": tag})  # the dashboard says so too
    assert page.status_code == 400 and "invalid tag" in page.text


async def test_paging_through_a_tag_filter(start_service, receiver):
    svc = await start_service()
    for i in range(7):
        tags = ["even"] if i % 2 == 0 else ["odd"]
        await svc.client.post("/jobs", json=body(receiver, f"j{i}", [*tags, "all"]))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"tag": ["even", "all"], "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await svc.client.get("/jobs", params=params)).json()
        seen += [job["id"] for job in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ["j6", "j4", "j2", "j0"]
    assert pages == 2


async def test_a_page_whose_tags_rarely_meet_stops_short_and_the_next_goes_on(
    start_service, receiver
):
    """With the index's budget made tiny (2 entries, then 2 more), tags `a`
    (the even jobs) and `b` (the odd ones, and j0): the newest page reads its
    budget, finds nothing and says where to go on; the next one finds j0 and
    ends the list. The CLI follows the cursor past the empty page."""
    svc = await start_service()
    for i in range(10):
        tags = ["a"] if i % 2 == 0 else ["b"]
        await svc.client.post("/jobs", json=body(receiver, f"j{i}", [*tags, *(["b"] * (i == 0))]))
    index = svc.tether.jobs
    index.FIRST_STRETCH, index.SCAN = 2, 4
    first = (await svc.client.get("/jobs", params={"tag": ["a", "b"], "limit": 2})).json()
    assert first["items"] == [] and first["next_cursor"]
    params = {"tag": ["a", "b"], "limit": 2, "cursor": first["next_cursor"]}
    second = (await svc.client.get("/jobs", params=params)).json()
    assert [job["id"] for job in second["items"]] == ["j0"]
    assert second["next_cursor"] is None
    page = (await svc.client.get("/ui", params={"tag": ["a", "b"]})).text
    assert "No jobs match these filters in this stretch of the list; older ones may." in page
    assert 'rel="next"' in page
    env = {"TETHER_URL": svc.settings.base_url, "TETHER_API_TOKEN": None}
    result = await asyncio.to_thread(
        CliRunner().invoke, main_group, ["list", "--tag", "a", "--tag", "b", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    assert [job["id"] for job in json.loads(result.output)["items"]] == ["j0"]


async def test_the_change_stream_takes_the_tag_filter(start_service, receiver):
    svc = await start_service()
    await svc.client.post("/jobs", json=body(receiver, "other", ["other"]))
    seen: list[str] = []
    headers = {"accept": "text/event-stream"}
    async with svc.client.stream("GET", "/jobs?tag=mine", headers=headers) as stream:
        await svc.client.post("/jobs", json=body(receiver, "mine", ["mine"]))
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                seen.append(line)
                if '"id"' in line:
                    break
    assert seen == ['data: {"ids":[]}', seen[1]]  # the page as it opened: no job has the tag
    assert '"id":"mine"' in seen[1]


async def test_retention_deletes_the_tags_with_the_job(start_service, receiver, tmp_path):
    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/done" else None
    svc = await start_service(store=f"sqlite:///{tmp_path}/gc.db")
    await svc.client.post("/jobs", json=body(receiver, "old", ["t", "u"], path="/done"))
    await svc.client.post("/jobs", json=body(receiver, "waiting", ["t"]))
    await svc.wait_state("old", "succeeded")
    await svc.wait_state("waiting", "running")
    await eventually(lambda: workflow_over(svc))
    assert await a_week_later(svc.tether) == 1
    assert await tag_rows(svc) == [("t", "waiting")]
    assert await listed(svc, tag="t") == ["waiting"]
    assert await listed(svc, tag="u") == []


async def test_the_cli_submits_and_lists_by_tag(start_service, receiver):
    svc = await start_service()
    url = svc.settings.base_url
    env = {"TETHER_URL": url, "TETHER_API_TOKEN": None}

    def run(*args: str) -> str:
        result = CliRunner().invoke(main_group, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    params = f'{{"url": "{receiver.url("/wait")}"}}'
    await asyncio.to_thread(
        run, "submit", "http_webhook", "--id", "c1", "--params", params, "--tag", "b", "--tag", "a"
    )
    await asyncio.to_thread(
        run, "submit", "http_webhook", "--id", "c2", "--params", params, "--tag", "a"
    )
    assert (await svc.job("c1"))["tags"] == ["a", "b"]
    out = await asyncio.to_thread(run, "list", "--tag", "a", "--tag", "b", "--json")
    assert '"c1"' in out and '"c2"' not in out
    out = await asyncio.to_thread(run, "list", "--tag", "a", "--json")
    assert '"c1"' in out and '"c2"' in out


async def test_a_list_naming_more_than_20_backends_is_400(start_service):
    # (each backend is a read of its own; the dashboard took any number)
    svc = await start_service()
    backends = [f"b{n}" for n in range(21)]
    answer = await svc.client.get("/jobs", params={"backend": backends})
    assert answer.status_code == 400, answer.text
    page = await svc.client.get("/ui", params={"backend": backends, "state": "running"})
    assert page.status_code == 400 and "at most 20 backends in one list" in page.text
    fine = await svc.client.get("/ui", params={"backend": backends[:20]})
    assert fine.status_code == 200


async def test_a_list_naming_an_empty_backend_is_400_as_an_empty_tag_or_state(start_service):
    """`backend=` names no backend (none has an empty name): refused as `tag=`
    and `state=` are, rather than answered with an empty list."""
    svc = await start_service()
    for name in ("backend", "tag", "state"):
        answer = await svc.client.get("/jobs", params={name: ""})
        assert answer.status_code == 400, (name, answer.text)
    answer = await svc.client.get("/jobs", params={"backend": ["http_webhook", ""]})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "invalid backend '': name one"
    assert answer.json()["error"]["details"] == {"field": "backend"}
