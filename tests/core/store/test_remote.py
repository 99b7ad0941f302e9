"""`TETHER_STORE=http(s)://...`: the workflow on a Resonate server (the
stand-in, `tests/resonate_server/stand_in.py`), the job index in
`TETHER_INDEX`. What opening it checks, what it refuses and how, and that its
token reaches the server and nothing else."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from resonate_base import ConnectorError

import core.store.remote
from core.errors import InvalidRequest, StoreConfigError
from core.settings import Settings
from core.store import open_store
from core.store.remote import RemoteConnection, RemoteStore
from tests.conftest import free_port
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
    assert server.kinds["promise.get"] == 1  # the check when it opened
    assert server.authorizations == [f"Bearer {TOKEN}"]


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
    assert len(server.authorizations) == 3  # the check, the stream, the request
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
        ({"index": "redis://u:pw@h/0"}, "TETHER_INDEX='redis://***@h/0'"),
    ],
)
async def test_a_missing_or_wrong_setting_is_refused_before_the_server_is_asked(
    tmp_path, more, says
):
    # the port listens to nothing: a refusal names the setting, not the server
    url = f"http://127.0.0.1:{free_port()}"
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


async def test_a_server_that_does_not_answer_is_refused_at_once(tmp_path):
    started = time.monotonic()
    refused = r"the Resonate server at http://127\.0\.0\.1:[0-9]+ did not answer: "
    with pytest.raises(StoreConfigError, match=refused):
        await open_store(
            settings(f"http://127.0.0.1:{free_port()}", index=f"sqlite:///{tmp_path}/i.db"), "p"
        )
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


async def test_a_request_waiting_for_a_gone_server_fails_soon_after_stop(
    tmp_path, server, monkeypatch
):
    """While running, a request retries until the server answers; once the
    SDK stops the connection, requests get `STORE_WAIT` more, then fail, so
    a service stops promptly with its server gone."""
    monkeypatch.setattr(core.store.remote, "STORE_WAIT", 0.3)
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
