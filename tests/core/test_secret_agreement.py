"""Hosts sharing a store compare their callback secrets and group at start
(`Tether.compare_with_last_host`): a host whose URLs the others would refuse,
with another public URL or in another group, is named in the log; every step of a rotation done as
docs/operations.md says agrees."""

from __future__ import annotations

import asyncio
import os
import socket

from api.cli import preflight
from core.plugins import Plugins, make_plugin_manager
from core.service import Tether
from core.settings import Settings
from core.store.base import new_notify_secret
from core.store.embedded import (
    SqliteDriver,
    drop_previous_notify_secrets,
    drop_previous_secrets,
    rotate_notify_secret,
    rotate_secret,
)
from core.store.sql import SqlJobIndex
from tests.core.store.test_store_kinds import _job

OLD, NEW, STRAY = "old-secret-" + "o" * 22, "new-secret-" + "n" * 22, "stray-" + "s" * 27


async def test_a_host_with_another_secret_is_named_at_start(fresh_pg_url):
    plugins = Plugins(make_plugin_manager(entry_points=False))

    async def start(
        current: str, previous: str = "", url: str = "https://a", group: str = "tether"
    ) -> list[str]:
        settings = Settings.from_env(
            {},
            store=fresh_pg_url,
            callback_secret=current,
            callback_secret_previous=previous,
            public_url=url,
            group=group,
        )
        tether = await Tether.open(settings, plugins, worker=False)
        try:
            return await tether.compare_with_last_host()
        finally:
            await tether.close()

    assert await start(OLD) == []  # the first
    assert await start(OLD) == []
    [said] = await start(STRAY)
    assert said.startswith("TETHER_CALLBACK_SECRET (or TETHER_CALLBACK_SECRET_PREVIOUS)")
    assert "disagrees with the host that started before this one" in said
    assert "public URL 'https://a'" in said and OLD not in said and STRAY not in said
    # which machine and process, since every host has one public URL (a QA pass)
    assert f" on '{socket.gethostname()}, pid {os.getpid()}', public URL" in said
    assert len(await start(OLD)) == 1  # the next to start finds the stray one, too
    for current, previous in ((OLD, NEW), (NEW, OLD), (NEW, "")):
        assert await start(current, previous) == []
    [said] = await start(NEW, url="https://b")
    assert said.startswith("TETHER_PUBLIC_URL='https://b' differs from the host that started")
    assert "public URL 'https://a'" in said and "jobs waiting now are called back" in said
    [said] = await start(NEW, group="other", url="https://b")
    assert said.startswith("TETHER_GROUP='other' differs from the host that started before")
    assert "public URL 'https://b'" in said and "in 'tether'" in said
    assert len(await start(STRAY, url="https://c")) == 3  # each in a line


def test_only_a_store_other_hosts_share_is_compared():
    def shared(**settings: str) -> bool:
        return Settings.from_env({}, **settings).shared

    assert shared(store="postgresql://h/db") and shared(store="postgres://h/db")
    assert shared(store="http://r:8001", index="postgresql://h/db")
    assert not shared(store="sqlite:///t.db") and not shared(store="memory://")
    assert not shared(store="http://r:8001", index="sqlite:///i.db")


async def test_serve_logs_the_disagreement_before_it_serves(fresh_pg_url, caplog):
    plugins = Plugins(make_plugin_manager(entry_points=False))
    for secret in (OLD, STRAY):
        settings = Settings.from_env({}, store=fresh_pg_url, callback_secret=secret)
        assert await preflight(settings, plugins) is None  # it serves all the same
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("TETHER_CALLBACK_SECRET (or")


async def test_hosts_starting_together_each_find_the_other(fresh_pg_url):
    """Two hosts' first starts at once on Postgres: the second to record waits
    for the first (its row made first), so one of them sees the other."""
    plugins = Plugins(make_plugin_manager(entry_points=False))
    settings = Settings.from_env({}, store=fresh_pg_url, callback_secret=OLD)
    hosts = [await Tether.open(settings, plugins, worker=False) for _ in range(2)]
    try:
        for n in range(5):
            a, b = (
                hosts[0].jobs.swap_meta(f"fact-{n}", "a"),
                hosts[1].jobs.swap_meta(f"fact-{n}", "b"),
            )
            assert set(await asyncio.gather(a, b)) in ({None, "a"}, {None, "b"})
    finally:
        for host in hosts:
            await host.close()


async def test_a_host_without_a_public_url_is_not_said_to_differ(fresh_pg_url):
    plugins = Plugins(make_plugin_manager(entry_points=False))
    said = []
    for port in (8001, 8002):
        settings = Settings.from_env({}, store=fresh_pg_url, callback_secret=OLD, port=port)
        tether = await Tether.open(settings, plugins, worker=False)
        try:
            said += await tether.compare_with_last_host()
        finally:
            await tether.close()
    assert said == []  # its base URL differs; the setting is unset (warned of apart)


async def test_one_host_is_told_of_a_secret_or_url_changed_since_its_last_start(tmp_path, caplog):
    """The embedded store keeps the same record: a start with another callback
    secret (or another public URL) than the last one strands the jobs that were
    waiting, and `tether serve` says so; a rotation's steps agree."""
    plugins = Plugins(make_plugin_manager(entry_points=False))
    store = f"sqlite:///{tmp_path / 't.db'}"

    async def start(
        current: str, previous: str = "", url: str = "https://a", port: int = 8000
    ) -> list[str]:
        settings = Settings.from_env(
            {},
            store=store,
            callback_secret=current,
            callback_secret_previous=previous,
            public_url=url,
            port=port,
        )
        assert await preflight(settings, plugins) is None  # it serves all the same
        said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        caplog.clear()
        return said

    assert await start(OLD) == []  # the first
    assert await start(OLD) == []
    for current, previous in ((NEW, OLD), (NEW, "")):  # one host's rotation through the env
        assert await start(current, previous) == []
    [said] = await start(STRAY)
    assert said.startswith("the callback secret disagrees with this store's last start")
    assert "TETHER_CALLBACK_SECRET_PREVIOUS" in said and "public URL 'https://a'" in said
    assert NEW not in said and STRAY not in said
    assert await start("") != []  # the secret file's own (made now) is another still
    assert await start("") == []
    rotate_secret(tmp_path / "t.db")  # docs/operations.md, one host: rotate, restart
    assert await start("") == []
    drop_previous_secrets(tmp_path / "t.db")  # once the old URLs are done with
    assert await start("") == []  # the last start signed with the one kept
    [said] = await start("", url="https://b")
    assert said.startswith("TETHER_PUBLIC_URL='https://b' differs from this store's last start")
    assert "called back at the old URL" in said
    # unset: the URLs are made of the host and port, and a new port strands
    # the jobs waiting as well (found by an exploratory QA pass of upgrades)
    assert await start("", url="", port=8000) == []  # (from https://b: no job waits)
    assert await start("", url="", port=9000) == []
    index = SqlJobIndex(SqliteDriver(tmp_path / "t.db"))
    await index.insert(_job("waiting"))
    await index.close()
    [said] = await start("", url="", port=8000)
    assert said.startswith(
        "callback URLs now begin 'http://127.0.0.1:8000' (TETHER_PUBLIC_URL is not set: made of"
        " TETHER_HOST and TETHER_PORT), which differs from this store's last start"
    )
    assert "public URL 'http://127.0.0.1:9000'" in said and "1 job(s) are waiting now" in said
    assert "TETHER_PUBLIC_URL to" not in said  # (it advised pointing it at the other address)


N_OLD, N_NEW, N_STRAY = (new_notify_secret() for _ in range(3))


async def test_a_host_with_another_notification_secret_is_named_at_start(fresh_pg_url):
    """Hosts on one Postgres that share no notification secret: no receiver
    verifies both hosts' messages. Each step of a rotation (a host restarted
    with the new secret and the old as previous, while the others still
    sign with the old; then the old dropped) shares one, and is not named."""
    plugins = Plugins(make_plugin_manager(entry_points=False))

    async def start(current: str, previous: str = "") -> list[str]:
        settings = Settings.from_env(
            {},
            store=fresh_pg_url,
            callback_secret=OLD,
            notify_secret=current,
            notify_secret_previous=previous,
            public_url="https://a",
        )
        tether = await Tether.open(settings, plugins, worker=False)
        try:
            return await tether.compare_with_last_host()
        finally:
            await tether.close()

    assert await start(N_OLD) == [] and await start(N_OLD) == []
    [said] = await start(N_STRAY)
    assert said.startswith("TETHER_NOTIFY_SECRET disagrees with the host that started before")
    assert N_OLD not in said and N_STRAY not in said
    assert len(await start(N_OLD)) == 1  # the next finds the stray one
    for current, previous in ((N_NEW, N_OLD), (N_OLD, ""), (N_NEW, N_OLD), (N_NEW, "")):
        assert await start(current, previous) == []
    assert await start("") == []  # none: no notifications to compare


async def test_one_host_is_told_of_a_notification_secret_changed_since_its_last_start(
    tmp_path, caplog
):
    """The embedded store: a start that no longer signs with the secret the
    last one signed with (receivers were given that one) is named; the
    rotation docs/operations.md gives (through the environment, or the
    store's file) is not."""
    plugins = Plugins(make_plugin_manager(entry_points=False))
    store = f"sqlite:///{tmp_path / 't.db'}"

    async def start(current: str = "", previous: str = "") -> list[str]:
        settings = Settings.from_env(
            {}, store=store, notify_secret=current, notify_secret_previous=previous
        )
        assert await preflight(settings, plugins) is None  # it serves all the same
        said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        caplog.clear()
        return said

    assert await start() == [] and await start() == []  # the file's own
    rotate_notify_secret(tmp_path / "t.db")
    assert await start() == []
    drop_previous_notify_secrets(tmp_path / "t.db")
    assert await start() == []
    [said] = await start(N_STRAY)
    assert said.startswith("the notification secret disagrees with this store's last start")
    assert "TETHER_NOTIFY_SECRET_PREVIOUS" in said and N_STRAY not in said
    for current, previous in ((N_NEW, N_STRAY), (N_NEW, "")):  # a rotation through the env
        assert await start(current, previous) == []
