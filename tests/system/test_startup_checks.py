"""What `tether serve` says when it starts: one line naming what it runs,
warnings for unknown settings and for jobs whose backend is gone, and a
refusal to hand out callback URLs on a wildcard address."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.cli import address_url, startup_line
from core.plugin import Backend, hookimpl
from core.plugins import Plugins, make_plugin_manager
from core.settings import Settings, unknown_env
from core.store.postgres import dsn_secrets
from tests.conftest import free_port, test_settings, wait_until
from tests.process import TetherProcess
from tests.system.test_startup import TETHER


def without_public_url() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TETHER_PUBLIC_URL"}


def test_a_wildcard_host_without_a_public_url_is_refused(tmp_path: Path):
    for host in ("0.0.0.0", "::"):
        done = subprocess.run(
            [TETHER, "serve", "--host", host, "--port", str(free_port())],
            env={**without_public_url(), "TETHER_STORE": f"sqlite:///{tmp_path}/t.db"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        assert "every interface" in done.stderr and "TETHER_PUBLIC_URL" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_address_in_use_is_refused_before_the_store_is_touched(tmp_path: Path, workers: str):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        for args, env, named in (
            (["--port", str(port)], {}, "(--port or TETHER_PORT)"),
            ([], {"TETHER_PORT": str(port)}, "(TETHER_PORT or --port)"),
        ):
            done = subprocess.run(
                [TETHER, "serve", "--workers", workers, *args],
                env={**os.environ, "TETHER_STORE": f"sqlite:///{tmp_path}/t.db", **env},
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 2, done.stderr
            assert done.stderr == (
                f"tether: 127.0.0.1:{port} is already in use (another tether serve?):"
                f" choose another port {named}\n"
            )
            assert list(tmp_path.iterdir()) == []  # no store made, nothing migrated
    finally:
        taken.close()


def test_several_workers_hold_their_port_from_the_start(tmp_path: Path):
    """`tether serve --workers 2` listens as it binds: no other process can
    take the port while the workers start. (They alone listened, each once
    it had started, a second or two later; another process that bound and
    listened meanwhile, as SO_REUSEADDR lets it while nobody listens, got
    the port, and every worker then failed to listen and was replaced,
    every 0.5 s, with no end and no word but tracebacks.)"""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [TETHER, "serve", "--workers", "2", "--port", str(port)],
            env={**os.environ, "TETHER_STORE": f"sqlite:///{tmp_path}/t.db"},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        # Bound long before this line; its workers are not started yet.
        wait_until(lambda: "2 worker(s)" in log.read_text() or proc.poll() is not None, 60)
        assert proc.poll() is None, log.read_text()
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with other, pytest.raises(OSError) as refused:
            other.bind(("127.0.0.1", port))
            other.listen()
        assert refused.value.errno == errno.EADDRINUSE

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).is_success
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60)
        assert "Traceback" not in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.parametrize(
    ("family", "host", "shown"),
    [
        (socket.AF_INET, "127.0.0.1", "http://127.0.0.1:{}"),
        (socket.AF_INET, "0.0.0.0", "http://0.0.0.0:{}"),
        (socket.AF_INET6, "::1", "http://[::1]:{}"),
    ],
)
def test_the_address_several_workers_listen_on_is_shown_as_a_url(
    family: socket.AddressFamily, host: str, shown: str
):
    with socket.socket(family) as sock:
        try:
            sock.bind((host, 0))
        except OSError as exc:  # no IPv6 here
            pytest.skip(f"cannot bind {host}: {exc}")
        assert address_url(sock) == shown.format(sock.getsockname()[1])


def test_an_address_not_of_this_machine_is_refused_naming_it(tmp_path: Path):
    done = subprocess.run(
        [TETHER, "serve", "--host", "nohost.invalid", "--port", str(free_port())],
        env={**os.environ, "TETHER_STORE": f"sqlite:///{tmp_path}/t.db"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("tether: cannot listen on nohost.invalid:"), done.stderr
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


def test_a_wildcard_host_with_a_public_url_starts(tmp_path: Path):
    proc = TetherProcess(
        tmp_path, {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db"}, args=("--host", "0.0.0.0")
    )
    try:
        proc.start()
    finally:
        proc.kill()


def test_version():
    done = subprocess.run([TETHER, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.strip().startswith("tether ") and done.stdout.split()[1][0].isdigit()


def test_unknown_settings_are_named_with_the_closest_known_one():
    known = Plugins(make_plugin_manager(entry_points=False)).setting_names()
    env = {
        "TETHER_PROT": "8810",
        "TETHER_DATABRICKS_PROFIL": "x",
        "TETHER_XYZZY": "1",
        "TETHER_PORT": "1",
        "TETHER_URL": "http://x",
        "TETHER_TEST_PG_DSN": "postgresql://x",
        "DATABRICKS_HOST": "not ours",
        "TETHER_Port": "1",  # upper-cased, known or not: not the nearest known name
        "TETHER_WEBHOOK_AUTH_partner": "x",
    }
    assert unknown_env(known, env) == [
        ("TETHER_DATABRICKS_PROFIL", "TETHER_DATABRICKS_PROFILE"),
        ("TETHER_PROT", "TETHER_PORT"),
        ("TETHER_Port", "TETHER_PORT"),
        ("TETHER_WEBHOOK_AUTH_partner", "TETHER_WEBHOOK_AUTH_PARTNER"),
        ("TETHER_XYZZY", None),
    ]


def test_the_start_up_line_hides_store_credentials():
    settings = Settings.from_env(
        {}, store="postgresql://tether:pg-secret@db:5432/tether", public_url="https://t.example"
    )
    line = startup_line(settings, Plugins(make_plugin_manager(entry_points=False)), 3)
    assert "pg-secret" not in line
    assert "store postgresql://***@db:5432/tether" in line
    assert "public URL https://t.example" in line
    assert "databricks (tether " in line and "http_webhook (tether " in line
    assert "3 worker(s)" in line


def test_the_start_up_line_names_the_embedded_stores_file_resolved(tmp_path: Path, monkeypatch):
    """`sqlite:///tmp/x.db` reads as /tmp/x.db and is ./tmp/x.db (found by a
    QA pass): the line says which file."""
    monkeypatch.chdir(tmp_path)
    plugins = Plugins(make_plugin_manager(entry_points=False))
    relative = Settings.from_env({}, store="sqlite:///tmp/x.db")
    line = startup_line(relative, plugins, 1)
    assert f"store sqlite:///tmp/x.db (the file {tmp_path.resolve()}/tmp/x.db)," in line
    line = startup_line(Settings.from_env({}, store="memory://"), plugins, 1)
    assert "store memory://, public URL" in line


@pytest.mark.parametrize(
    ("store", "shown"),
    [
        ("host=db port=5432 password=pg-secret", "host=db port=5432 password=***"),
        ("host=db password='pg secret' user=u", "host=db password=*** user=u"),
        ("postgresql://u:pg-secret@h1:5432,h2:5433/db", "postgresql://***@h1:5432,h2:5433/db"),
        ("postgresql://u:pg-secret@[::1/db?x", "'postgresql://***@[::1/db?***' is not a URL"),
        ("postgresql://u:pg-secret@h:port/db", "postgresql://***@h:port/db"),
        ("postgresql://h/db?password=pg-secret", "postgresql://h/db?***"),
        ("postgresql://u:pg/secret@127.0.0.1:1/db", "postgresql://***@127.0.0.1:1/db"),
        # libpq quotes a password with spaces, squeezed: "pg secret"
        ("postgresql://u:pg  secret@127.0.0.1:1/db", "postgresql://***@127.0.0.1:1/db"),
        # libpq ends the password at the first "@" and quotes the rest as the host
        ("postgresql://u:pgpw@secret@127.0.0.1:1/db", "postgresql://***@127.0.0.1:1/db"),
    ],
)
def test_a_store_setting_python_cannot_read_is_refused_without_its_password(
    tmp_path: Path, store: str, shown: str
):
    done = subprocess.run(
        [TETHER, "serve", "--port", str(free_port())],
        env={**os.environ, "TETHER_STORE": store, "TETHER_CALLBACK_SECRET": "s" * 32},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert shown in done.stderr, done.stderr
    for secret in ("pg-secret", "pg secret", "pg  secret", "pg/secret", "secret", "pgpw"):
        assert secret not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_shared_store_without_a_public_url_is_warned_about(tmp_path: Path):
    port = free_port()
    base = {**without_public_url(), "TETHER_CALLBACK_SECRET": "s" * 32}
    for env, warned in (
        ({"TETHER_STORE": "postgresql://u:pw@127.0.0.1:1/db"}, True),
        (
            {
                "TETHER_STORE": "postgresql://u:pw@127.0.0.1:1/db",
                "TETHER_PUBLIC_URL": "https://t.example",
            },
            False,
        ),
        ({"TETHER_STORE": "memory://"}, False),  # refused: --workers 2 on memory://
    ):
        done = subprocess.run(
            [TETHER, "serve", "--port", str(port), "--workers", "2"],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr  # the store cannot open: it stops there
        said = f"TETHER_PUBLIC_URL is not set: callback URLs made here name this host (http://127.0.0.1:{port})"
        assert (said in done.stderr) == warned, done.stderr


def test_the_secrets_a_postgres_error_may_quote_are_each_password_as_written_and_read():
    for dsn in (
        "postgresql://u:a%20%20b@h/db",
        "postgresql://u@h/db?password=a%20%20b",
        "postgresql://u:a  b@[::1/db",
        "postgresql://u:a  b@h1:1,h2:2/db?sslmode=x",
    ):
        assert {"a  b", "a b"} <= set(dsn_secrets(dsn)), dsn
    assert set(dsn_secrets("postgresql://u:p/w?d@h/db")) == {"p/w?d"}
    assert dsn_secrets("postgresql://u:PwA@Secret2tail@h/db") == ["PwA@Secret2tail", "Secret2tail"]
    assert set(dsn_secrets("postgresql://u:pgpw@a@secret@h/db")) == {
        "pgpw@a@secret",
        "pgpw",
        "secret",
    }
    assert dsn_secrets("postgresql://h/db") == []


class Params(msgspec.Struct):
    pass


class Gone(Backend):
    name = "gone"
    params_type = Params

    async def trigger(self, trigger: Any) -> dict[str, Any]:
        return {"run": 1}


class GonePlugin:
    @hookimpl
    def tether_backends(self) -> list[Backend]:
        return [Gone()]


async def test_serve_says_what_it_runs_and_warns(tmp_path: Path):
    store = f"sqlite:///{tmp_path}/tether.db"
    app = create_app(
        test_settings(store=store), make_plugin_manager(entry_points=False, extra=[GonePlugin()])
    )
    async with AsyncTestClient(app, base_url="http://127.0.0.1") as client:
        for job_id in ("a", "b"):
            assert (await client.post("/jobs", json={"id": job_id, "backend": "gone"})).is_success
    (tmp_path / "tether.db").chmod(0o644)  # as a store made before its files were private

    proc = TetherProcess(
        tmp_path,
        {
            "TETHER_STORE": store,
            "TETHER_PROT": "8810",
            "TETHER_DATABRICKS_THREDS": "2",
            "TETHER_WEBHOOK_AUTH_partner": "Bearer partner-s3cret",
            "TETHER_API_TOKEN": "api-secret-value",
            "TETHER_READ_TOKEN": "rd-s3cret",  # short: warned of, by its length
            "TETHER_MAX_RUNNING": "http-webhook=1,databricks=2,nothing_like_it=3,HTTP_WEBHOOK=4",
            "TETHER_WATCHDOG_INTERVAL": "0",
        },
    )
    try:
        proc.start()
        with proc.client() as client:

            def missing() -> Any:
                return client.get("/health").json()["missing"] or None

            assert eventually_sync(missing) == [{"backend": "gone", "waiting": 2}]
    finally:
        proc.terminate()
    log = proc.log.read_text()
    assert "unknown setting TETHER_PROT is ignored; did you mean TETHER_PORT?" in log
    assert "TETHER_DATABRICKS_THREDS is ignored; did you mean TETHER_DATABRICKS_THREADS?" in log
    assert (
        "unknown setting TETHER_WEBHOOK_AUTH_partner is ignored; setting names are upper case:"
        " TETHER_WEBHOOK_AUTH_PARTNER" in log
    )
    assert "partner-s3cret" not in log
    assert (  # "process-secret": a guessable key signs every callback URL
        "TETHER_CALLBACK_SECRET is 14 characters: whoever guesses it can settle any job." in log
    )
    assert "TETHER_READ_TOKEN lists a token of 9 characters: a short one can be guessed" in log
    assert "TETHER_API_TOKEN lists" not in log and "rd-s3cret" not in log
    db = tmp_path / "tether.db"
    assert (  # the secret file is the owner's alone: not named
        f"the store's files {db} are readable by every user of this host" in log
        and f"run: chmod go-rwx {db}\n" in log
    )
    assert "backend 'gone' is not installed, and 2 waiting job(s) use it" in log
    # a typo in a limit's backend took no limit at all, silently
    assert (
        "TETHER_MAX_RUNNING names 'http-webhook', which is no installed backend: it limits"
        " nothing; did you mean http_webhook?" in log
    )
    assert "TETHER_MAX_RUNNING names 'nothing_like_it', which is no installed backend" in log
    assert (
        "TETHER_MAX_RUNNING names 'HTTP_WEBHOOK', which is no installed backend: it limits"
        " nothing; did you mean http_webhook?" in log
    )
    assert "TETHER_WATCHDOG_INTERVAL=0: this process's watchdog is off." in log
    assert "names 'databricks'" not in log
    shown = f"store {store} (the file {(tmp_path / 'tether.db').resolve()}), public URL {proc.url}"
    assert f"{shown}, backends: databricks (tether " in log
    assert "1 worker(s)" in log
    assert "uvicorn.error" not in log
    assert "tether.http: Uvicorn running on" in log or "tether.http: Application startup" in log
    assert "tether.access: GET /health 200" in log
    for secret in ("api-secret-value", "process-secret"):
        assert secret not in log


def eventually_sync(check: Any, timeout: float = 20) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("never happened")
