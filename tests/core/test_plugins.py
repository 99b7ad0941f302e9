"""The plugin contract: discovery, validation, every hook exercised, docs in step."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from core import hookspecs
from core.hookspecs import Backend, TetherHookSpecs
from core.plugin import BackendError, Outcome, hookimpl
from core.plugins import PluginError, Plugins, make_plugin_manager
from core.store.jobs import now_ms
from tests.conftest import (
    HOLD,
    claimed_by,
    contract_calls,
    contract_names,
    eventually,
    test_settings,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tether_echo"


@pytest.fixture
def echo() -> Any:
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield importlib.import_module("tether_echo")
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("tether_echo", None)


class Params(msgspec.Struct):
    pass


def backend_named(name: str) -> Backend:
    cls = type("B", (Backend,), {"name": name, "params_type": Params})
    return cls()  # type: ignore[no-any-return]


class Offers:
    def __init__(self, *backends: Any) -> None:
        self.backends = backends

    @hookimpl
    def tether_backends(self) -> Any:
        return self.backends


# ── discovery and validation ─────────────────────────────────────────────────


def test_hook_tether_backends_two_plugins_with_one_backend_name_fail_naming_both():
    first, second = Offers(backend_named("dup")), Offers(backend_named("dup"))
    pm = make_plugin_manager(entry_points=False)
    pm.register(first, name="team-a-plugin")
    pm.register(second, name="team-b-plugin")
    with pytest.raises(ValueError, match=r"'dup'.*'team-a-plugin'.*'team-b-plugin'"):
        Plugins(pm)


def test_hook_tether_backends_a_plugin_clashing_with_a_builtin_fails():
    pm = make_plugin_manager(entry_points=False, extra=[Offers(backend_named("http_webhook"))])
    with pytest.raises(ValueError, match="http_webhook"):
        Plugins(pm)


def test_hook_tether_backends_must_return_backends():
    pm = make_plugin_manager(entry_points=False, extra=[Offers("not a backend")])
    with pytest.raises(TypeError, match=r"not a core\.plugin\.Backend"):
        Plugins(pm)


def test_a_hookimpl_matching_no_spec_fails_at_start_up():
    class Misspelt:
        @hookimpl
        def tether_backend(self) -> list[Backend]:  # missing "s"
            return []

    with pytest.raises(PluginError) as refused:
        make_plugin_manager(entry_points=False, extra=[Misspelt()])
    assert str(refused.value).endswith(
        "cannot be used: unknown hook 'tether_backend' (did you mean tether_backends?)"
    ), refused.value


def test_a_fresh_manager_has_only_the_builtins():
    assert sorted(Plugins(make_plugin_manager(entry_points=False)).backends) == [
        "databricks",
        "databricks_sql",
        "http_webhook",
    ]
    assert Plugins(make_plugin_manager(builtins=False, entry_points=False)).backends == {}


def test_a_plugin_is_found_through_the_tether_entry_point_group(tmp_path, monkeypatch, echo):
    dist = tmp_path / "tether_echo-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tether-echo\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[tether]\necho = tether_echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    plugins = Plugins(make_plugin_manager())
    assert sorted(plugins.backends) == ["databricks", "databricks_sql", "echo", "http_webhook"]
    assert type(plugins.backends["echo"]).__module__ == "tether_echo"


BROKEN = {
    "argument": (
        "from core.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef tether_job_finished(job, extra):\n    pass\n"
    ),
    "import": "import not_a_real_dependency_xyz\n",
    "hook": (
        "from core.hookspecs import hookimpl\n\n@hookimpl\ndef tether_job_finishd(job):\n    pass\n"
    ),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_an_installed_plugin_that_cannot_be_used_is_named_in_one_line(
    tmp_path, monkeypatch, broken
):
    dist = tmp_path / "tether_bad-0.2.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tether-bad\nVersion: 0.2.0\n")
    module = f"tether_bad_{broken}"  # not one an earlier test imported
    (dist / "entry_points.txt").write_text(f"[tether]\nbad = {module}\n")
    (tmp_path / f"{module}.py").write_text(BROKEN[broken])
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(PluginError) as refused:
        make_plugin_manager()
    said = {
        "argument": "cannot be used: Plugin 'bad' for hook 'tether_job_finished' hookimpl"
        " definition: tether_job_finished(job, extra) Argument(s) {'extra'} are declared in"
        " the hookimpl but can not be found in the hookspec",
        "import": "cannot be loaded: ModuleNotFoundError: No module named"
        " 'not_a_real_dependency_xyz'",
        "hook": "cannot be used: unknown hook 'tether_job_finishd'"
        " (did you mean tether_job_finished?)",
    }[broken]
    assert str(refused.value) == (
        f"plugin 'bad' of package tether-bad 0.2.0 {said}; fix it, or remove it with"
        " `tether uninstall tether-bad`"
    )
    assert "\n" not in str(refused.value)
    # `tether plugins`, where an operator looks first, and `tether serve`: the
    # line, exit status 2, no traceback
    tether = str(Path(sys.executable).with_name("tether"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "TETHER_PORT": "0"}
    for command in (["plugins"], ["serve"]):
        done = subprocess.run(
            [tether, *command], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert (done.returncode, done.stderr) == (2, f"tether: {refused.value}\n"), done


# ── each hook and backend method, through the running service ────────────────


async def test_hook_trigger_and_parse_callback_of_the_example_plugin(start_service, echo):
    svc = await start_service(plugins=[echo])
    response = await svc.client.post(
        "/jobs", json={"id": "e", "backend": "echo", "params": {"message": "hi"}}
    )
    assert response.status_code == 201
    job = await svc.wait_state("e", "running")
    assert job["external"] == {"echoed": "hi"}
    bad = await svc.client.post("/jobs", json={"backend": "echo", "params": {"msg": "hi"}})
    assert bad.status_code == 422
    assert "unknown field `msg` - at `params`" in bad.json()["error"]["message"]
    assert bad.json()["error"]["details"] == {"field": "params", "backend": "echo"}
    wrong = await svc.client.post("/jobs", json={"backend": "echo", "params": {"message": 5}})
    assert wrong.status_code == 422
    assert wrong.json()["error"]["message"].endswith("got `int` - at `params.message`")
    assert wrong.json()["error"]["details"] == {"field": "params.message", "backend": "echo"}

    path = svc.tether.signer.url("e:1").removeprefix(svc.settings.base_url)
    native = await svc.client.post(path, json={"echo_done": "bye"})
    assert native.json()["outcome"] == "accepted"
    assert (await svc.job("e"))["result"] == "bye"


async def test_hook_trigger_errors_never_keep_the_callback_token(start_service):
    class Quoting(Backend):
        name = "quoting"
        params_type = Params

        async def trigger(self, trigger: Any) -> dict[str, Any]:
            cut = trigger.job.metadata.get("cut")
            if cut:  # an answer quoting the URL, cut to a limit inside its token
                raise BackendError(f"refused: {trigger.callback_url[:cut]}")
            if trigger.job.metadata.get("typed"):
                raise BackendError(f"refused {trigger.callback_url}")
            raise RuntimeError(f"could not reach {trigger.callback_url}")

    svc = await start_service(plugins=[Offers(Quoting())], trigger_attempts=1)
    url = svc.tether.signer.url("cut:1")
    cut = len(url) - 23  # the token's first 20 characters
    for job_id, metadata in (("plain", {}), ("typed", {"typed": True}), ("cut", {"cut": cut})):
        await svc.client.post(
            "/jobs", json={"id": job_id, "backend": "quoting", "metadata": metadata}
        )
        job = await svc.wait_state(job_id, "failed")
        message = job["error"]["message"]
        assert "/callbacks/" in message and "token=***" in message, message
        token = svc.tether.signer.token(f"{job_id}:1")
        events = (await svc.client.get(f"/jobs/{job_id}/events")).text
        assert token[:4] not in message and token[:4] not in events


async def test_hook_parse_callback_errors_become_422(start_service):
    class Strict(Backend):
        name = "strict"
        params_type = Params

        async def trigger(self, trigger: Any) -> dict[str, Any]:
            return {}

        def parse_callback(self, job: Any, body: Any) -> Outcome | None:
            if "native" in body:
                raise ValueError("native body lacks 'state'")
            return None

    svc = await start_service(plugins=[Offers(Strict())])
    await svc.client.post("/jobs", json={"id": "s", "backend": "strict"})
    await svc.wait_state("s", "running")
    path = svc.tether.signer.url("s:1").removeprefix(svc.settings.base_url)
    response = await svc.client.post(path, json={"native": 1})
    assert response.status_code == 422
    assert "lacks 'state'" in response.json()["error"]["message"]
    assert (await svc.job("s"))["state"] == "running"


async def test_hook_tether_job_finished_sees_every_final_job(start_service, receiver):
    seen: list[tuple[str, str]] = []

    class Observer:
        @hookimpl
        def tether_job_finished(self, job: Any) -> None:
            seen.append((job.id, job.state))

    class Broken:
        @hookimpl
        def tether_job_finished(self, job: Any) -> None:
            raise RuntimeError("observer bug")

    receiver.callback = lambda hit: {"status": "succeeded"} if hit.path == "/hook" else None
    svc = await start_service(plugins=[Observer(), Broken()])
    await svc.client.post(
        "/jobs", json={"id": "a", "backend": "http_webhook", "params": {"url": receiver.url()}}
    )
    await svc.client.post(
        "/jobs",
        json={
            "id": "b",
            "backend": "http_webhook",
            "timeout": 0.3,
            "params": {"url": receiver.url("/silent")},
        },
    )
    # A job whose workflow start was lost (a crash right after its row was
    # written), then canceled: no workflow will finish it, the cancel does.
    lost = msgspec.structs.replace(
        (await svc.tether.jobs.get("a")),  # a row to copy: another id, pending, never started
        id="lost",
        state="pending",
        finished_at=None,
        result=None,
        error=None,
        external=None,
        fingerprint="lost",
        events=0,
        created_at=now_ms(),
        deadline=now_ms() + 60_000,
    )
    await svc.tether.jobs.insert(lost)
    assert (await svc.client.post("/jobs/lost/cancel")).status_code == 200
    await eventually(
        lambda: sorted(seen) == [("a", "succeeded"), ("b", "timed_out"), ("lost", "canceled")],
        timeout=10,
        holds=HOLD,
    )
    assert (await svc.job("a"))["state"] == "succeeded"


async def test_hook_cancel_failing_leaves_the_job_canceled(start_service):
    calls: list[str] = []

    class Stubborn(Backend):
        name = "stubborn"
        params_type = Params

        async def trigger(self, trigger: Any) -> dict[str, Any]:
            return {"run": 1}

        async def cancel(self, job: Any) -> None:
            calls.append(job.id)
            raise RuntimeError("the external system refused")

    svc = await start_service(plugins=[Offers(Stubborn())])
    await svc.client.post("/jobs", json={"id": "s", "backend": "stubborn"})
    await svc.wait_state("s", "running")
    assert (await svc.client.post("/jobs/s/cancel")).status_code == 200
    await eventually(lambda: calls == ["s"], holds=HOLD)
    assert (await svc.job("s"))["state"] == "canceled"


async def test_hook_close_runs_once_when_the_service_stops(tmp_path):
    closed: list[str] = []

    class Holder(Backend):
        name = "holder"
        params_type = Params

        async def trigger(self, trigger: Any) -> dict[str, Any]:
            return {}

        async def close(self) -> None:
            closed.append(self.name)

    settings = test_settings(store=f"sqlite:///{tmp_path}/close.db")
    app = create_app(settings, make_plugin_manager(entry_points=False, extra=[Offers(Holder())]))
    async with AsyncTestClient(app) as client:
        assert (await client.post("/jobs", json={"backend": "holder"})).status_code == 201
        assert closed == []
    assert closed == ["holder"]  # the test client runs the app's lifespan on its own loop


async def test_hook_check_status_errors_are_retried_later(start_service):
    answers: list[Any] = [RuntimeError("flaky"), None, Outcome(status="failed", error=None)]

    class Flaky(Backend):
        name = "flaky"
        params_type = Params

        def check_interval(self, params: Any) -> float:
            return 0.1

        async def trigger(self, trigger: Any) -> dict[str, Any]:
            return {}

        async def check_status(self, job: Any) -> Outcome | None:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[no-any-return]

    svc = await start_service(plugins=[Offers(Flaky())])
    await svc.client.post("/jobs", json={"id": "f", "backend": "flaky"})
    job = await svc.wait_state("f", "failed")
    assert answers == []
    assert job["error"] is None  # recorded as the backend said it: failed, no detail


# ── meta: every hook documented and tested, docs in step with code ───────────


def test_every_hook_and_backend_method_is_documented():
    for name in contract_names():
        obj = getattr(TetherHookSpecs, name, None) or getattr(Backend, name)
        doc = inspect.getdoc(obj) or ""
        assert len(doc) > 80, f"{name} needs a docstring saying when it runs and what it returns"
    for attribute in ("name", "params_type", "settings_type", "settings_prefix"):
        assert f"    {attribute}: ClassVar" in inspect.getsource(Backend)
        assert f"`{attribute}" in (ROOT / "docs" / "plugins.md").read_text()


def test_every_hook_and_backend_method_has_a_test():
    """Each has a test named for it; and a test named for a hook fails unless
    it ran that hook (tests/conftest.py watches every `test_hook_…` test)."""
    tests = set()
    for path in ROOT.joinpath("tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        tests |= {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        }
    for name in contract_names():
        assert any(name in claimed_by(t) for t in tests), f"no test_hook_{name}... test"


def test_a_test_named_for_a_hook_is_watched_for_calls_of_it():
    assert claimed_by("test_hook_check_status_and_check_interval_notice_x") == {
        "check_status",
        "check_interval",
    }
    assert claimed_by("test_hook_tether_job_finished_sees_y") == {"tether_job_finished"}
    assert claimed_by("test_the_docs_list_every_hook") == set()

    class Quiet(Backend):
        name = "quiet"
        params_type = Params

        def check_interval(self, params: Any) -> float | None:
            return 1.0

    with contract_calls() as called:
        plugins = Plugins(make_plugin_manager(entry_points=False, extra=[Offers(Quiet())]))
        plugins.backends["quiet"].check_interval(Params())
        plugins.backends["http_webhook"].parse_callback(None, {})  # type: ignore[arg-type]
    assert called == {"tether_backends", "check_interval", "parse_callback"}
    with contract_calls() as called:
        plugins.backends["quiet"].check_interval(Params())  # counted again in a new block
    assert called == {"check_interval"}


def test_the_readme_and_plugin_docs_show_the_tested_example_plugin():
    source = (EXAMPLE / "tether_echo.py").read_text()
    body = source.split('"""', 2)[2].strip()
    for doc in (
        (ROOT / "README.md").read_text(),
        inspect.getdoc(importlib.import_module("core.plugin")) or "",
    ):
        blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
        assert body in [b.strip() for b in blocks], "the example plugin in the docs drifted"


def test_the_docs_list_every_hook():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in contract_names():
        assert f"`{name}" in docs, f"docs/plugins.md does not mention {name}"
    assert hookspecs.PROJECT == "tether"
