"""`TETHER_STORE=http(s)://...`: the workflow on a Resonate server (the
stand-in, `tests/resonate_server/stand_in.py`), the job index in
`TETHER_INDEX`. What opening it checks, what it refuses and how, and that its
token reaches the server and nothing else."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from resonate.connections import SSEConnection
from resonate_base import ConnectorError

import core.store.remote
from api.cli import main
from core.errors import InvalidRequest, StoreConfigError, StoreUnavailable
from core.settings import Settings
from core.store import open_store
from core.store.remote import RemoteConnection, RemoteStore
from core.store.sql import SqlJobIndex
from tests.conftest import eventually
from tests.core.store.test_store_kinds import _job
from tests.resonate_server.stand_in import StandIn

TOKEN = "t0ken-for-the-resonate-server"


def settings(store: str, **more: Any) -> Settings:
    return Settings.from_env({}, store=store, **{"callback_secret": "s", **more})


@pytest.fixture
def server(tmp_path: Path) -> Any:
    running = StandIn(tmp_path / "resonate.db", token=TOKEN).start()
    yield running
    running.stop()


async def test_it_opens_with_the_job_index_beside_it_and_refuses_retention(tmp_path, server):
    index = tmp_path / "index" / "jobs.db"
    store = await open_store(
        settings(server.url, index=f"sqlite:///{index}", store_token=TOKEN), "p1"
    )
    try:
        assert isinstance(store, RemoteStore) and store.kind == "resonate"
        assert store.connection.unicast() == "poll://uni@tether/p1"
        assert store.connection.resolve_target("tether") == "poll://any@tether"
        rec, created = await store.jobs.insert(_job("a"))
        assert created and await store.jobs.get("a") == rec
        assert index.exists() and not (tmp_path / "index" / "jobs.db.secret").exists()
        assert (store.callback_secret, store.notify_secret) == ("s", None)
        with pytest.raises(InvalidRequest, match="no request that deletes promises"):
            await store.delete_promises(86_400_000)
    finally:
        await store.close()
    # the check when it opened, the server's id (none yet: made), then the
    # pairing: none yet, so this index's
    assert (server.kinds["promise.get"], server.kinds["promise.create"]) == (3, 2)
    assert server.authorizations == [f"Bearer {TOKEN}"] * 5


async def test_the_token_goes_on_every_request_and_the_stream_and_nowhere_else(tmp_path, server):
    store = await open_store(
        settings(server.url, index=f"sqlite:///{tmp_path}/i.db", store_token=TOKEN), "p1"
    )
    conn = store.connection
    try:
        conn.recv(lambda message: None)
        await conn.start()
        for _ in range(200):
            if server.streams:
                break
            await asyncio.sleep(0.02)
        assert [(s.group, s.pid) for s in server.streams] == [("tether", "p1")]
        answer = await conn.send(
            '{"kind":"promise.get","head":{"corrId":"c","version":"v"},"data":{"id":"x"}}'
        )
        assert '"status":404' in answer.replace(" ", "")
    finally:
        await conn.stop()
        await store.close()
    # the check, the server's id (2), the pairing (2), the stream, the request
    assert len(server.authorizations) == 7
    assert set(server.authorizations) == {f"Bearer {TOKEN}"}
    assert TOKEN not in repr(store) + repr(conn)
    assert TOKEN not in repr(settings(server.url, store_token=TOKEN))


@pytest.mark.parametrize(
    ("more", "says"),
    [
        ({"index": ""}, "TETHER_INDEX must be set"),
        ({"callback_secret": ""}, "TETHER_CALLBACK_SECRET must be set"),
        ({"retention": 86400.0 * 30}, "TETHER_RETENTION cannot be used"),
        ({"index": "memory://"}, "TETHER_INDEX='memory://' is not supported"),
        ({"index": "sqlite://x.db"}, "write sqlite:///PATH"),
        ({"index": "sqlite://u:pw@x/db"}, "TETHER_INDEX='sqlite://***@x/db': write sqlite:///"),
        ({"index": "redis://u:pw@h/0"}, "TETHER_INDEX='redis://***@h/0'"),
    ],
)
async def test_a_missing_or_wrong_setting_is_refused_before_the_server_is_asked(
    tmp_path, more, says, refused_url
):
    # the port listens to nothing: a refusal names the setting, not the server
    url = refused_url
    with pytest.raises(StoreConfigError) as refused:
        await open_store(settings(url, **{"index": f"sqlite:///{tmp_path}/i.db", **more}), "p")
    assert says in str(refused.value) and "pw" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # nothing made


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("http://u:pa55@127.0.0.1:8001", "bearer token: set TETHER_STORE_TOKEN"),
        ("https://127.0.0.1:8001/?x=1", "no ?query"),
        ("http:///nohost", "http(s)://HOST:PORT"),
        ("http://127.0.0.1:port", "the port is not a number"),
    ],
)
async def test_a_malformed_server_url_is_refused_naming_the_setting(tmp_path, store, says):
    with pytest.raises(StoreConfigError) as refused:
        await open_store(settings(store, index=f"sqlite:///{tmp_path}/i.db"), "p")
    assert "TETHER_STORE=" in str(refused.value) and says in str(refused.value)
    assert "pa55" not in str(refused.value)


async def test_an_index_with_another_store_is_refused(tmp_path):
    with pytest.raises(StoreConfigError, match="TETHER_INDEX is only for a Resonate server"):
        await open_store(
            settings(f"sqlite:///{tmp_path}/t.db", index=f"sqlite:///{tmp_path}/i.db"), "p"
        )
    assert list(tmp_path.iterdir()) == []


async def test_a_server_that_does_not_answer_is_refused_at_once(tmp_path, refused_url):
    started = time.monotonic()
    refused = r"the Resonate server at http://127\.0\.0\.1:[0-9]+ did not answer: "
    with pytest.raises(StoreUnavailable, match=refused):  # down for now: not a setting's fault
        await open_store(settings(refused_url, index=f"sqlite:///{tmp_path}/i.db"), "p")
    assert time.monotonic() - started < 3
    assert not (tmp_path / "i.db").exists()


@pytest.mark.parametrize(("token", "says"), [("", "set TETHER_STORE_TOKEN"), ("wrong", "refused")])
async def test_a_missing_or_refused_token_is_said_without_showing_it(tmp_path, server, token, says):
    with pytest.raises(StoreConfigError) as refused:
        await open_store(
            settings(server.url, index=f"sqlite:///{tmp_path}/i.db", store_token=token), "p"
        )
    message = str(refused.value)
    assert "401" in message and says in message
    assert TOKEN not in message and (not token or token not in message.replace("TOKEN", ""))


async def test_a_server_that_is_not_a_resonate_server_is_refused(tmp_path, receiver):
    with pytest.raises(StoreConfigError, match=r"did not answer as a Resonate server \(HTTP 202"):
        await open_store(settings(receiver.url(""), index=f"sqlite:///{tmp_path}/i.db"), "p")
    assert receiver.hits[0].body["kind"] == "promise.get"


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_server_behind_a_proxy_that_answers_5xx_is_down_for_now(tmp_path, receiver, status):
    """A proxy's 502-504 (the server restarting behind it) is not a setting's
    fault: `StoreUnavailable`, which a worker starting then is tried again on."""
    receiver.respond = lambda hit: (status, {})
    with pytest.raises(StoreUnavailable, match=rf"did not answer: HTTP {status} to promise.get"):
        await open_store(settings(receiver.url(""), index=f"sqlite:///{tmp_path}/i.db"), "p")


async def test_the_job_index_may_be_postgres(fresh_pg_url, server):
    store = await open_store(settings(server.url, index=fresh_pg_url, store_token=TOKEN), "p1")
    try:
        rec, created = await store.jobs.insert(_job("a"))
        assert created and await store.jobs.get("a") == rec
    finally:
        await store.close()


def test_the_index_and_the_token_never_show_in_the_settings():
    shown = repr(Settings(index="postgresql://u:pw@db/x", store_token="tok-123"))
    assert "pw" not in shown and "tok-123" not in shown
    assert "index='postgresql://***@db/x'" in shown and "store_token='***'" in shown
    # libpq takes the password in the query too
    shown = repr(Settings(index="postgresql://db:5432/x?user=u&password=pw&sslmode=require"))
    assert "index='postgresql://db:5432/x?***'" in shown and "pw" not in shown


async def test_a_request_waiting_for_a_gone_server_fails_soon_after_stop(
    tmp_path, server, monkeypatch
):
    """While running, a request retries until the server answers; once the
    SDK stops the connection, requests get `STOP_GRACE` more (the steps
    under way finish as long as the service waits for them), then fail, so
    a service stops within that wait with its server gone."""
    monkeypatch.setattr(core.store.remote, "STOP_GRACE", 0.3)
    conn = RemoteConnection(server.url, group="g", pid="p", token=TOKEN)
    await conn.start()
    server.stop()
    waiting = asyncio.create_task(
        conn.send('{"kind":"promise.get","head":{"corrId":"c","version":"v"},"data":{"id":"x"}}')
    )
    await asyncio.sleep(0.6)  # tried, and tried again after 0.25 s
    assert not waiting.done()
    started = time.monotonic()
    await conn.stop()
    with pytest.raises(ConnectorError):
        await asyncio.wait_for(waiting, 5)
    assert 0.25 < time.monotonic() - started < 2
    await conn.close()


async def test_https_to_a_plain_http_server_says_so(server):
    """It said only that the server did not answer (found by an exploratory
    QA pass): it answered, in plain HTTP."""
    conn = RemoteConnection(server.url.replace("http://", "https://"), group="g", pid="p")
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await conn.check()
    finally:
        await conn.close()
    assert str(refused.value).endswith("(no TLS there: does it serve plain http://?)")


# ── the pairing of the server with one job index ─────────────────────────────


async def _open(server: StandIn, index: Path, **more: Any) -> RemoteStore:
    store = await open_store(
        settings(server.url, index=f"sqlite:///{index}", store_token=TOKEN, **more), "p"
    )
    assert isinstance(store, RemoteStore)
    return store


async def _repair(server: StandIn, index: Path) -> RemoteStore:
    """What `tether pair-index --force` opens."""
    given = settings(server.url, index=f"sqlite:///{index}", store_token=TOKEN)
    return await RemoteStore.open(given, "p", repair=True)


async def _identity(server: StandIn, index: Path) -> str:
    store = await _open(server, index)
    try:
        return await store.jobs.identity()
    finally:
        await store.close()


def _pairings(server: StandIn) -> list[tuple[str, str, str]]:
    """The server's pairing promises: (id, state, the index id tagged)."""
    with sqlite3.connect(server.db) as db:
        rows = db.execute(
            "SELECT id, state, tags FROM r_promises WHERE id LIKE 'tether:index.%' ORDER BY id"
        ).fetchall()
    return [(pid, state, json.loads(tags)["tether:index"]) for pid, state, tags in rows]


async def test_the_first_index_pairs_the_server_and_any_other_is_refused(tmp_path, server):
    """A host whose TETHER_INDEX is not the one the server's jobs are in would
    take workflows whose jobs it cannot see (each would wait to its deadline):
    it is refused at start, naming both indexes, and makes nothing."""
    first = tmp_path / "first.db"
    store = await _open(server, first)
    try:
        await store.jobs.insert(_job("a"))
        paired = await store.jobs.identity()
    finally:
        await store.close()
    assert _pairings(server) == [("tether:index.1", "pending", paired)]

    elsewhere = tmp_path / "elsewhere" / "jobs.db"
    with pytest.raises(StoreConfigError) as refused:
        await _open(server, elsewhere)
    message = str(refused.value)
    assert f"TETHER_INDEX='sqlite:///{elsewhere}' is not the job index" in message
    assert f"index with id {paired}: it does not exist yet" in message
    assert "tether pair-index --force" in message and TOKEN not in message
    assert not elsewhere.parent.exists()  # nothing made

    # an index that exists (another host's own file) is refused too, by its id
    other = tmp_path / "other.db"
    own = await open_store(settings(f"sqlite:///{other}"), "p")
    try:
        assert isinstance(own.jobs, SqlJobIndex)
        mine = await own.jobs.identity()
    finally:
        await own.close()
    with pytest.raises(StoreConfigError, match=f"id {paired}: its id is {mine}"):
        await _open(server, other)

    store = await _open(server, first)  # the paired one opens, its jobs there
    try:
        assert await store.jobs.get("a") is not None
    finally:
        await store.close()
    assert _pairings(server) == [("tether:index.1", "pending", paired)]


async def test_an_index_of_one_server_is_refused_beside_another_until_re_paired(tmp_path, server):
    """A host with the right TETHER_INDEX and another TETHER_STORE paired the
    second server with the index, and ended jobs there whose workflows waited
    on the first (found by an exploratory QA pass). It is refused at start,
    naming both servers' ids, and pairs nothing; `pair-index --force` moves
    the index to the new server."""
    index = tmp_path / "jobs.db"
    store = await _open(server, index)
    try:
        first = await store.connection.identity()
        assert first == await store.connection.identity()  # kept
    finally:
        await store.close()
    other = StandIn(tmp_path / "other.db", token=TOKEN).start()
    try:
        with pytest.raises(StoreConfigError) as refused:
            await _open(other, index)
        message = str(refused.value)
        assert f"is the job index of another Resonate server (id {first})" in message
        assert "tether pair-index --force" in message and TOKEN not in message
        assert _pairings(other) == []  # nothing paired
        moved = await _repair(other, index)
        await moved.close()
        assert [paired for *_, paired in _pairings(other)] == [await _identity(other, index)]
        with pytest.raises(StoreConfigError, match="another Resonate server"):
            await _open(server, index)  # the first server is now the other one
    finally:
        other.stop()


async def test_an_index_with_jobs_and_no_server_kept_is_not_claimed_by_a_fresh_server(
    tmp_path, server
):
    """An index from before the server's id was kept, with jobs: a host on a
    fresh server (a wrong TETHER_STORE) starting first would claim it (found
    by a review). Refused, pairing nothing; the server the index is paired
    with opens it and is kept."""
    index = tmp_path / "jobs.db"
    store = await _open(server, index)
    try:
        await store.jobs.insert(_job("a"))
        await store.jobs.db.execute("DELETE FROM tether_meta WHERE name = 'server_id'", ())
    finally:
        await store.close()
    fresh = StandIn(tmp_path / "fresh.db", token=TOKEN).start()
    try:
        with pytest.raises(StoreConfigError, match="paired with none"):
            await _open(fresh, index)
        assert _pairings(fresh) == []
    finally:
        fresh.stop()
    store = await _open(server, index)  # its own server: kept now
    try:
        assert await store.jobs.meta("server_id") == await store.connection.identity()
    finally:
        await store.close()


async def test_hosts_starting_together_with_different_indexes_pair_one(tmp_path, server):
    """Two fresh indexes opened at once: `promise.create` answers the promise
    already there, so exactly one index is paired and the other refused."""
    indexes = [tmp_path / f"host{n}.db" for n in range(4)]
    opened = await asyncio.gather(*(_open(server, i) for i in indexes), return_exceptions=True)
    stores = [s for s in opened if isinstance(s, RemoteStore)]
    try:
        assert len(stores) == 1, opened
        assert all(
            isinstance(s, StoreConfigError) and "is not the job index" in str(s)
            for s in opened
            if s is not stores[0]
        )
        assert _pairings(server) == [("tether:index.1", "pending", await stores[0].jobs.identity())]
    finally:
        for store in stores:
            await store.close()


async def test_every_process_of_one_host_opening_a_fresh_index_together_is_paired(tmp_path, server):
    """`tether serve --workers N`: N processes open one new index at once; it
    gets one id (the first insert wins), and every one of them is accepted."""
    index = tmp_path / "jobs.db"
    stores = await asyncio.gather(*(_open(server, index) for _ in range(4)))
    try:
        ids = {await store.jobs.identity() for store in stores}
        assert len(ids) == 1
        assert _pairings(server) == [("tether:index.1", "pending", ids.pop())]
    finally:
        for store in stores:
            await store.close()


async def test_a_re_pairing_interrupted_after_its_new_pairing_keeps_it(
    tmp_path, server, monkeypatch
):
    """`--force` makes the new pairing before it marks the old one
    superseded: a crash in between leaves the server paired with the new
    index, never with none (which the next process to start, of any index,
    would take)."""
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    old_id = await _identity(server, old)

    async def crash(self: RemoteConnection, generation: int) -> None:
        raise ConnectionError("the process died here")

    monkeypatch.setattr(RemoteConnection, "supersede", crash)
    with pytest.raises(ConnectionError):
        await _repair(server, new)
    monkeypatch.undo()
    with pytest.raises(StoreConfigError, match=f"its id is {old_id}"):
        await _open(server, old)
    new_id = await _identity(server, new)
    assert _pairings(server) == [
        ("tether:index.1", "pending", old_id),
        ("tether:index.2", "pending", new_id),
    ]


async def test_a_re_pairing_that_another_process_beat_changes_nothing(
    tmp_path, server, monkeypatch
):
    first, second, third = (tmp_path / f"{n}.db" for n in ("first", "second", "third"))
    first_id = await _identity(server, first)
    real = RemoteConnection.pair
    beat: list[str] = []

    async def beaten(self: RemoteConnection, generation: int, index_id: str) -> str:
        if not beat:  # another --force gets there first
            beat.append(index_id)
            store = await _repair(server, second)
            await store.close()
        return await real(self, generation, index_id)

    monkeypatch.setattr(RemoteConnection, "pair", beaten)
    with pytest.raises(StoreConfigError, match="by another process meanwhile: nothing was"):
        await _repair(server, third)
    monkeypatch.undo()
    second_id = await _identity(server, second)
    assert _pairings(server) == [
        ("tether:index.1", "resolved", first_id),
        ("tether:index.2", "pending", second_id),
    ]


def test_pair_index_checks_and_with_force_re_pairs(tmp_path, server, monkeypatch, capsys):
    """`tether pair-index` says which index the server is paired with;
    `--force` pairs it with TETHER_INDEX instead (an index that replaces a
    lost one), after which the old index is the one refused."""
    lost, replacement = tmp_path / "lost.db", tmp_path / "replacement.db"
    old = asyncio.run(_identity(server, lost))
    monkeypatch.setenv("TETHER_STORE", server.url)
    monkeypatch.setenv("TETHER_STORE_TOKEN", TOKEN)
    monkeypatch.setenv("TETHER_CALLBACK_SECRET", "s")

    monkeypatch.setenv("TETHER_INDEX", f"sqlite:///{lost}")
    assert main(["pair-index"]) == 0
    said = capsys.readouterr()
    assert f"is paired with the job index sqlite:///{lost} (id {old})" in said.out

    monkeypatch.setenv("TETHER_INDEX", f"sqlite:///{replacement}")
    assert main(["pair-index"]) == 2
    said = capsys.readouterr()
    assert f"index with id {old}: it does not exist yet" in said.err and TOKEN not in said.err
    assert not replacement.exists()

    assert main(["pair-index", "--force"]) == 0
    said = capsys.readouterr()
    new = asyncio.run(_identity(server, replacement))
    assert f"is paired with the job index sqlite:///{replacement} (id {new})" in said.out
    assert f"was paired with the job index {old}; it is now paired with" in said.err
    assert _pairings(server) == [
        ("tether:index.1", "resolved", old),
        ("tether:index.2", "pending", new),
    ]
    with pytest.raises(StoreConfigError, match=f"id {new}: its id is {old}"):
        asyncio.run(_open(server, lost))

    monkeypatch.setenv("TETHER_STORE", f"sqlite:///{tmp_path}/t.db")
    monkeypatch.delenv("TETHER_INDEX")
    assert main(["pair-index"]) == 2
    assert "pair-index is for a Resonate server store" in capsys.readouterr().err


async def test_health_checks_at_once_find_a_re_pairing_once(tmp_path, server, caplog):
    """Checks running at once (a liveness and a readiness probe, the
    background check) each say the host is out; it is logged once."""
    store = await _open(server, tmp_path / "first.db")
    try:
        await store.jobs.ping()
        await (await _repair(server, tmp_path / "second.db")).close()
        with caplog.at_level(logging.ERROR, "tether"):
            found = await asyncio.gather(
                *(store.jobs.ping() for _ in range(4)), return_exceptions=True
            )
        assert all(isinstance(f, StoreUnavailable) for f in found), found
        assert len({f.message for f in found if isinstance(f, StoreUnavailable)}) == 1
        assert [r.levelno for r in caplog.records if r.levelno >= logging.ERROR] == [logging.ERROR]
        assert store.out_of_service() == found[0].message  # type: ignore[union-attr]
    finally:
        await store.close()


async def test_a_postgres_index_is_paired_too(fresh_pg_url, server, tmp_path):
    store = await open_store(settings(server.url, index=fresh_pg_url, store_token=TOKEN), "p1")
    try:
        paired = await store.jobs.identity()
        assert _pairings(server) == [("tether:index.1", "pending", paired)]
        with pytest.raises(StoreConfigError, match=f"index with id {paired}"):
            await _open(server, tmp_path / "local.db")
        await store.jobs.ping()
        # re-paired while it runs: its health check says so
        await (await _repair(server, tmp_path / "local.db")).close()
        with pytest.raises(
            StoreUnavailable, match=f"not with this host's TETHER_INDEX \\(id {paired}"
        ):
            await store.jobs.ping()
    finally:
        await store.close()


async def test_the_message_stream_outlives_aiohttp_s_timeout_and_a_failed_listener(
    server, start_service, receiver, monkeypatch, caplog
):
    """aiohttp ends a response at its session's total timeout (300 s by
    default; 1 s here), and the SDK's listener retries only `ClientError`s:
    the stream then ended for good and no job was ever started again. The
    stream has no total timeout, and a listener that fails starts again."""
    monkeypatch.setattr(aiohttp.client, "DEFAULT_TIMEOUT", aiohttp.ClientTimeout(total=1))
    service = await start_service(store=server.url, store_token=TOKEN)

    async def runs(job_id: str) -> None:
        body = {"id": job_id, "backend": "http_webhook", "params": {"url": receiver.url()}}
        assert (await service.client.post("/jobs", json=body)).status_code == 201
        await service.wait_state(job_id, "running", timeout=10)

    await asyncio.sleep(2.5)  # past the patched default
    await runs("after-the-timeout")
    assert "message stream failed" not in caplog.text  # it never timed out

    stream = service.tether.store.connection.sse
    real = SSEConnection._read_stream
    fails = iter([RuntimeError("a bug in the listener")])

    async def read_once_then_fail(self: Any, resp: Any) -> None:
        error = next(fails, None)
        if error is not None:
            raise error
        await real(self, resp)

    monkeypatch.setattr(SSEConnection, "_read_stream", read_once_then_fail)
    stream._sse_handle.cancel()  # a new listener, whose first read fails
    stream._sse_handle = asyncio.create_task(stream._sse_loop())
    await runs("after-a-failure")
    assert "message stream failed (RuntimeError): listening again in 1 s" in caplog.text


async def test_a_server_that_refuses_a_request_is_a_503_naming_its_status(
    server, start_service, receiver, caplog
):
    """A status the SDK does not handle itself (here a 401: the server's token
    changed under the service) was an unhandled error, 500 `internal`."""
    service = await start_service(store=server.url, store_token=TOKEN)
    body = {"id": "r", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await service.client.post("/jobs", json=body)).status_code == 201
    await service.wait_state("r", "running")
    assert (await service.client.post("/jobs/r/cancel", json={})).status_code == 200
    await service.wait_state("r", "canceled")
    server.token = "another-token-for-the-server"
    answer = await service.client.post("/jobs/r/retry", json={})
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "store_unavailable"
    assert error["message"].startswith("the store refused the request (status 401")
    assert "the store refused POST /jobs/r/retry (status 401" in caplog.text
    assert TOKEN not in caplog.text and "another-token" not in caplog.text
    server.token = TOKEN
    assert (await service.job("r"))["attempt"] == 1  # nothing changed


async def test_a_message_stream_that_stays_closed_fails_the_health_check(
    server, start_service, monkeypatch
):
    """The server answers requests but not the stream (here: a wrong path,
    404): the process takes no work, and `/health` says so past a grace."""
    monkeypatch.setattr(core.store.remote, "STREAM_DOWN_GRACE", 0.5)
    service = await start_service(store=server.url, store_token=TOKEN)
    assert (await service.client.get("/health")).status_code == 200
    stream = service.tether.store.connection.sse
    url, stream._url = stream._url, stream._url + "/nowhere"
    stream._sse_handle.cancel()
    stream._sse_handle = asyncio.create_task(stream._sse_loop())

    async def says() -> str | None:
        health = await service.client.get("/health")
        return health.text if health.status_code == 503 else None

    said = await eventually(says, timeout=10)
    assert f"the Resonate server at {server.url} answers, but its message stream" in said
    assert "has not been open for" in said and TOKEN not in said
    stream._url = url
    stream._sse_handle.cancel()
    stream._sse_handle = asyncio.create_task(stream._sse_loop())
    await eventually(lambda: stream.down_since is None, timeout=10)
    assert (await service.client.get("/health")).status_code == 200
    # one listener: a cancelled one ends (the SDK's loop swallows the
    # cancellation, and going round again left a second one fighting it)
    listeners = [t for t in asyncio.all_tasks() if "_sse_loop" in repr(t.get_coro())]
    assert listeners == [stream._sse_handle]


async def test_a_message_stream_gone_silent_is_opened_again(
    server, start_service, receiver, monkeypatch, caplog
):
    """The server stops writing to the process's stream and routes nothing
    to it, while the connection stays open (a server that lost track of it,
    or a middlebox that dropped it without a word): the process took no work
    ever again, with `/health` at 200. Past `STREAM_SILENCE` the stream is
    opened again, and a job made meanwhile runs."""
    monkeypatch.setattr(core.store.remote, "STREAM_SILENCE", 1.5)
    service = await start_service(store=server.url, store_token=TOKEN)
    stream = service.tether.store.connection.sse
    await eventually(lambda: stream.down_since is None, timeout=10)
    assert server.silence(stream._pid) == 1
    body = {"id": "made-while-silent", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await service.client.post("/jobs", json=body)).status_code == 201
    await asyncio.sleep(0.5)
    assert (await service.job("made-while-silent"))["state"] == "pending"  # no stream took it
    await service.wait_state("made-while-silent", "running", timeout=10)
    assert "message stream brought nothing for 1.5 s: opening it again" in caplog.text
    assert "message stream failed" not in caplog.text


async def test_the_message_stream_s_socket_has_tcp_keepalive(server, start_service):
    """A server host that vanishes sends nothing, not even a close: TCP
    keep-alive probes give the connection up (and keep a NAT's entry for it
    alive meanwhile). Read from the process's own open sockets to the server."""
    import os
    import socket

    service = await start_service(store=server.url, store_token=TOKEN)
    stream = service.tether.store.connection.sse
    await eventually(lambda: stream.down_since is None, timeout=10)
    options = (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            try:
                peer = sock.getpeername()
            except OSError:
                continue
            if sock.type == socket.SOCK_STREAM and peer == ("127.0.0.1", server.port):
                found.append(
                    [sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)]
                    + [sock.getsockopt(socket.IPPROTO_TCP, option) for option in options]
                )
    assert [1, *core.store.remote.STREAM_KEEPALIVE] in found, found
