"""A store's jobs run in the group they were started in (`Tether.take_group`):
`tether serve` in another `TETHER_GROUP` is refused while any job is in
flight, since they would wait for a host of their group for good; with none
in flight the new group becomes the store's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from api.cli import preflight
from core.plugins import Plugins, make_plugin_manager
from core.service import Tether
from core.store.base import LAST_HOST
from tests.conftest import Receiver, test_settings

pytestmark = pytest.mark.resonate_server


async def test_another_group_is_refused_while_jobs_are_in_flight(
    start_service: Callable[..., Any],
    store_url: Callable[[], str],
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = store_url()
    if store == "memory://":
        pytest.skip("a memory store is new at each start: it has no jobs to strand")
    service = await start_service(store=store)  # in the default group, "tether"
    plugins = Plugins(make_plugin_manager(entry_points=False))

    async def start(group: str) -> str | None:
        settings = test_settings(store=store, index=service.settings.index, group=group)
        return await preflight(settings, plugins)

    body = {"id": "j1", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await service.client.post("/jobs", json=body)).status_code == 201
    await service.wait_state("j1", "running")

    said = await start("other")
    assert said is not None
    assert said.startswith("TETHER_GROUP='other', but this store's group is 'tether' and 1 job")
    assert "Start it with TETHER_GROUP='tether'" in said
    assert await start("other") == said  # refused again: nothing was recorded
    # A worker (started again by the supervisor, or without `tether serve`)
    # says so and runs: it must not take its host down.
    other = test_settings(store=store, index=service.settings.index, group="other")
    with caplog.at_level(logging.ERROR):
        await (await Tether.open(other, plugins)).close()
    assert caplog.records[-1].levelname == "ERROR"
    assert caplog.records[-1].getMessage() == said
    caplog.clear()
    assert await start("tether") is None
    assert "TETHER_GROUP is now" not in caplog.text

    [hit] = receiver.on("/hook")
    answer = await service.client.post(hit.body["callback_url"], json={"status": "succeeded"})
    assert answer.status_code == 200, answer.text
    await service.wait_state("j1", "succeeded")
    with caplog.at_level(logging.WARNING):
        assert await start("other") is None  # none in flight: the store's group now
    assert "TETHER_GROUP is now 'other' (the store's jobs ran in 'tether'" in caplog.text

    # The service still running in "tether" starts a job: the store now
    # records "other", so "tether" is refused until it ends.
    body["id"] = "j2"
    assert (await service.client.post("/jobs", json=body)).status_code == 201
    await service.wait_state("j2", "pending", "running")
    said = await start("tether")
    assert said is not None and "this store's group is 'other' and 1 job(s)" in said
    assert await start("other") is None


async def test_a_store_of_an_earlier_release_is_taken_to_be_in_its_last_hosts_group(
    start_service: Callable[..., Any], store_url: Callable[[], str], receiver: Receiver
) -> None:
    """Releases before the group was recorded left, on a shared store, the
    group of the host that started last (`last_host`): that group is the
    store's until one is recorded."""
    store = store_url()
    if store == "memory://":
        pytest.skip("a memory store is new at each start: it has no jobs to strand")
    service = await start_service(store=store, group="alpha")
    body = {"id": "j1", "backend": "http_webhook", "params": {"url": receiver.url()}}
    assert (await service.client.post("/jobs", json=body)).status_code == 201
    await service.wait_state("j1", "running")
    jobs = service.tether.jobs
    await jobs.db.execute("DELETE FROM tether_meta WHERE name = 'group'", ())
    await jobs.swap_meta(LAST_HOST, '{"group": "alpha", "at": 0, "url": "http://a"}')

    settings = test_settings(store=store, index=service.settings.index, group="beta")
    said = await preflight(settings, Plugins(make_plugin_manager(entry_points=False)))
    assert said is not None and "this store's group is 'alpha' and 1 job(s)" in said
    assert await jobs.meta("group") == "alpha"  # what was known, recorded
    # A store last_host never named: its first start records its group.
    await jobs.db.execute("DELETE FROM tether_meta WHERE name IN ('group', 'last_host')", ())
    settings = test_settings(store=store, index=service.settings.index, group="alpha")
    assert await preflight(settings, Plugins(make_plugin_manager(entry_points=False))) is None
    assert await jobs.meta("group") == "alpha"
