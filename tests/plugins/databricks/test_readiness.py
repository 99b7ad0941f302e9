"""The Databricks backend's readiness, against the fake workspace with the
real databricks-sdk client: `ok` when the workspace accepts the credentials,
`unconfigured` without any, `error` with Databricks' reason when it refuses
them. The settings it declares are known to the start-up check."""

from __future__ import annotations

from typing import Any

import pytest

from core.plugin import Readiness
from core.plugins import Plugins, make_plugin_manager
from plugins.databricks import Databricks
from plugins.databricks.workspace import WORKSPACE_ENV, DatabricksSettings, Workspace
from tests.plugins.databricks.workspace import FakeWorkspace

ME = "/api/2.0/preview/scim/v2/Me"


@pytest.fixture
def answers_me(workspace: FakeWorkspace) -> FakeWorkspace:
    """The fake workspace, which answers `current_user.me`."""
    return workspace


async def test_hook_readiness_of_databricks_is_ok_with_accepted_credentials(
    answers_me: FakeWorkspace,
):
    backend = Databricks()
    try:
        assert await backend.readiness() == Readiness("ok")
    finally:
        await backend.close()
    assert [s.path for s in answers_me.seen] == [ME]


async def test_hook_readiness_of_databricks_is_unconfigured_without_credentials(
    workspace: FakeWorkspace, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("DATABRICKS_HOST")
    monkeypatch.delenv("DATABRICKS_TOKEN")
    found = await Databricks().readiness()
    assert found.status == "unconfigured"
    assert "Databricks client configuration" in found.reason
    assert workspace.seen == []


async def test_hook_readiness_of_databricks_is_an_error_with_the_reason_on_bad_credentials(
    answers_me: FakeWorkspace, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi" + "f" * 32)
    answers_me.echo_credentials = True  # the answer quotes the token: it must not show
    found = await Databricks().readiness()
    assert found.status == "error"
    assert "Invalid access token" in found.reason
    assert "f" * 32 not in found.reason
    assert answers_me.seen and not answers_me.seen[0].authorized


def test_the_databricks_plugin_declares_its_settings(workspace: Any):
    names = Plugins(make_plugin_manager(entry_points=False)).setting_names()
    for name in ("PROFILE", "RETRY_TIMEOUT", "HTTP_TIMEOUT", "THREADS"):
        assert f"TETHER_DATABRICKS_{name}" in names


@pytest.mark.parametrize("name", WORKSPACE_ENV)
def test_each_way_the_sdk_finds_a_workspace_counts_as_naming_one(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
):
    """A variable the SDK finds a workspace from (Azure's resource id, the
    Databricks runtime, a model serving endpoint) is not refused as "no
    workspace": the SDK is asked. With none of them, no profile and no
    `~/.databrickscfg`, it is."""
    for other in WORKSPACE_ENV:
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not Workspace(DatabricksSettings()).names_a_workspace()
    monkeypatch.setenv(name, "x")
    assert Workspace(DatabricksSettings()).names_a_workspace()
