"""The `tether` command: its answers speak its flags' units, and one group
holds the local commands and the client verbs (`api/client.py`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from api.cli import cli, main, version
from api.client import COMMANDS as CLIENT_COMMANDS
from core.settings import Settings
from tests.conftest import free_port
from tests.system.test_startup import TETHER

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("days", ["0.5", "0", "-3", "nan"])
def test_gc_refuses_too_short_a_retention_in_days(tmp_path: Path, days: str) -> None:
    env = {**os.environ, "TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"}
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "gc", "--older-than", days],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "tether: keep finished jobs at least 1 day"
    assert not (tmp_path / "tether.db").exists()  # refused before the store was opened


# ── one `tether` group: the local commands and the client verbs ──────────────


def sections(help_text: str) -> dict[str, list[str]]:
    """`tether --help`'s command headings, each with the commands under it."""
    found: dict[str, list[str]] = {}
    heading = None
    for line in help_text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            heading = line[:-1]
            found[heading] = []
        elif heading and line.startswith("  ") and line.strip():
            found[heading].append(line.split()[0])
    return found


def test_help_lists_every_command_once_under_its_heading() -> None:
    done = CliRunner().invoke(cli, ["--help"])
    assert done.exit_code == 0, done.output
    listed = sections(done.stdout)
    listed.pop("Options")
    assert list(listed) == [
        "Service",
        "Jobs (talk to a running service)",
        "Store files",
        "Plugins",
    ]
    assert listed["Service"] == ["serve", "gc", "pair-index"]
    assert listed["Jobs (talk to a running service)"] == [c.name for c in CLIENT_COMMANDS]
    assert listed["Store files"] == [
        "rotate-secret",
        "notify-secret",
        "rotate-notify-secret",
        "backup",
        "restore",
    ]
    assert listed["Plugins"] == ["install", "uninstall", "plugins"]
    everything = [name for names in listed.values() for name in names]
    assert sorted(everything) == sorted(cli.commands)  # each command once, none left out


def test_every_client_verb_is_a_command_of_tether() -> None:
    for command in CLIENT_COMMANDS:
        done = CliRunner().invoke(cli, [str(command.name), "--help"], prog_name="tether")
        assert done.exit_code == 0, (command.name, done.output)
        assert done.stdout.startswith(f"Usage: tether {command.name} "), done.stdout
        assert cli.commands[str(command.name)] is command


def test_the_tether_command_runs_client_verbs_and_local_commands(refused_url: str) -> None:
    url = refused_url
    env = {**os.environ, "TETHER_URL": url}
    got = subprocess.run([TETHER, "get", "x"], env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 4  # the client's own exit status, through `main`
    assert got.stderr == f"tether: cannot reach {url}: connection refused\n"
    helped = subprocess.run(
        [sys.executable, "-m", "api.cli", "-h"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "Jobs (talk to a running service):" in helped.stdout and "rotate-secret" in helped.stdout


def test_main_returns_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tether {version()} (store schema 13, workflow version 4)\n"
    assert main(["serve", "--port", "eighty"]) == 2  # a usage error, as click reports it
    assert "Invalid value for '--port'" in capsys.readouterr().err
    assert main(["install"]) == 2
    assert "Missing argument 'PACKAGE...'" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2


# ── a refused setting is named as the user gave it ───────────────────────────


def serve_refused(*args: str, **env: str | None) -> str:
    """What `tether serve ARGS` says on stderr as it refuses to start (exit 2):
    only for settings it refuses, as it would serve otherwise."""
    quiet: dict[str, str | None] = {"TETHER_PORT": None, "TETHER_HOST": None}
    quiet |= {"TETHER_PUBLIC_URL": None, "TETHER_STORE": "memory://"}
    done = CliRunner().invoke(cli, ["serve", *args], env=quiet | env)
    assert done.exit_code == 2, done.output
    return done.stderr


def test_a_port_out_of_range_names_the_flag_or_the_variable_it_came_from() -> None:
    assert (
        serve_refused("--port", "99999")
        == "tether: invalid --port: must be a whole number <= 65535\n"
    )
    assert serve_refused("--port", "-1") == "tether: invalid --port: must be a whole number >= 0\n"
    by_env = serve_refused(TETHER_PORT="99999")
    assert by_env == "tether: invalid setting TETHER_PORT: must be a whole number <= 65535\n"
    both = serve_refused("--port", "70000", TETHER_PORT="8000")  # the flag wins, and is named
    assert both == "tether: invalid --port: must be a whole number <= 65535\n"


def test_an_unknown_log_level_is_refused_naming_the_known_ones() -> None:
    assert serve_refused(TETHER_LOG_LEVEL="TRACE") == (
        "tether: invalid setting TETHER_LOG_LEVEL: 'TRACE'; use one of DEBUG, INFO, WARNING,"
        " ERROR, CRITICAL (in any case)\n"
    )


@pytest.mark.parametrize(
    "url",
    [
        "tether.example.com",
        "ftp://tether.example.com",
        "https://",
        "https://tether.example.com/base?x=1",
        "https://tether.example.com#top",
        "https://u:pw@tether.example.com",
        "https://tether.example.com:port",
        "https://tether.example.com:0",
        "https://tether example.com",
    ],
)
def test_a_public_url_external_systems_cannot_use_is_refused(url: str) -> None:
    said = serve_refused(TETHER_PUBLIC_URL=url)
    assert said.startswith("tether: invalid setting TETHER_PUBLIC_URL: "), said
    assert "http(s)://HOST[:PORT][/PATH]" in said and "pw" not in said


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"TETHER_DATABRICKS_RETRY_TIMEOUT": "0"}, "TETHER_DATABRICKS_RETRY_TIMEOUT: must be"),
        ({"TETHER_DATABRICKS_RETRY_TIMEOUT": "abc"}, "TETHER_DATABRICKS_RETRY_TIMEOUT"),
        ({"TETHER_DATABRICKS_NOTIFY_USER": "x"}, "NOTIFY_USER is set but TETHER_DATABRICKS"),
    ],
)
def test_a_plugins_setting_refused_is_one_line_as_a_core_one(env: dict[str, str], said: str):
    told = serve_refused(**env)
    assert told.startswith("tether: ") and said in told, told
    assert len(told.splitlines()) == 1 and "Traceback" not in told


def test_a_store_token_for_a_store_that_takes_none_is_refused() -> None:
    said = serve_refused(TETHER_STORE_TOKEN="s3cret-token-4f1c")  # (on memory://)
    assert said.startswith("tether: TETHER_STORE_TOKEN is only for a Resonate server store")
    assert "s3cret" not in said


def test_a_store_url_with_a_password_is_refused_with_it_masked() -> None:
    said = serve_refused(TETHER_STORE="sqlite://u:secretpw@x/db")
    assert said.startswith("tether: TETHER_STORE='sqlite://***@x/db': write sqlite:///"), said
    assert "secretpw" not in said


@pytest.mark.parametrize("token", ["s3cret\nmore", "s3cret\r", "\x7fs3cret"])
def test_a_store_token_no_header_can_carry_is_refused_without_showing_it(token: str) -> None:
    """A token pasted with its line break went into aiohttp's headers, which
    refused it with a traceback at start-up (found in an audit, 2026-12-04)."""
    said = serve_refused(TETHER_STORE="http://127.0.0.1:1", TETHER_STORE_TOKEN=token)
    assert said.startswith("tether: invalid setting TETHER_STORE_TOKEN: "), said
    assert "control character" in said and "s3cret" not in said and "Traceback" not in said


@pytest.mark.parametrize("name", ["TETHER_API_TOKEN", "TETHER_READ_TOKEN"])
@pytest.mark.parametrize("token", ["s3cret-4f1c\nline-two", "s3cret-\u00e9t\u00e9-4f1c"])
def test_an_access_token_no_header_can_carry_is_refused_by_serve_and_the_cli(
    name: str, token: str
) -> None:
    """No client could send it; the CLI said "the connection broke", as
    httpx refused the header on its way out (a line break), or crashed with
    a traceback and exit 1 (past ASCII); found by exploratory QA passes."""
    other = {"TETHER_API_TOKEN": "api-token-5e8a6b7c9d"} if name == "TETHER_READ_TOKEN" else {}
    said = serve_refused(**{name: token, **other})
    assert said.startswith(f"tether: invalid setting {name}: "), said
    assert "control character" in said and "s3cret" not in said and "Traceback" not in said
    listed = CliRunner().invoke(
        cli, ["list", "--url", "http://127.0.0.1:1"], env={"TETHER_API_TOKEN": token}
    )
    assert listed.exit_code == 2 and "s3cret" not in listed.output, listed.output
    assert "TETHER_API_TOKEN holds a control character" in listed.output
    assert "Traceback" not in listed.output


@pytest.mark.parametrize("seconds", ["3600", "-1", "1e17"])  # (nan, inf: not finite)
def test_a_retention_under_a_day_or_over_a_century_is_refused(seconds: str) -> None:
    said = serve_refused(TETHER_RETENTION=seconds)
    assert said.startswith("tether: invalid setting TETHER_RETENTION: "), said
    assert "at least 86400 seconds" in said and "or 0 to keep them forever" in said
    assert "at most 3.1536e+09 (a hundred years)" in said


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"TETHER_DEFAULT_TIMEOUT": "0"}, "TETHER_DEFAULT_TIMEOUT: must be a number > 0"),
        ({"TETHER_MAX_TIMEOUT": "-5"}, "TETHER_MAX_TIMEOUT: must be a number > 0"),
        ({"TETHER_MAX_TIMEOUT": "inf"}, "TETHER_MAX_TIMEOUT: not a finite number"),
        # nan and -inf were said to be out of range (a QA pass, 2026-12-06)
        ({"TETHER_DEFAULT_TIMEOUT": "nan"}, "TETHER_DEFAULT_TIMEOUT: not a finite number"),
        ({"TETHER_TASK_TTL": "-inf"}, "TETHER_TASK_TTL: not a finite number"),
        ({"TETHER_RETENTION": "NaN"}, "TETHER_RETENTION: not a finite number"),
        (
            {"TETHER_MAX_TIMEOUT": "60"},
            "invalid settings: TETHER_DEFAULT_TIMEOUT (604800 s) is more than"
            " TETHER_MAX_TIMEOUT (60 s); every job that names no timeout would be refused",
        ),
        ({"TETHER_WATCHDOG_INTERVAL": "-1"}, "TETHER_WATCHDOG_INTERVAL: must be a number >= 0"),
        ({"TETHER_TRIGGER_ATTEMPTS": "-1"}, "TETHER_TRIGGER_ATTEMPTS: must be a whole number >= 0"),
        ({"TETHER_TRIGGER_BACKOFF": "-1"}, "TETHER_TRIGGER_BACKOFF: must be a number >= 0"),
        ({"TETHER_TASK_TTL": "0"}, "TETHER_TASK_TTL: must be a number > 0"),
        (
            {"TETHER_MAX_CONCURRENT_TASKS": "0"},
            "TETHER_MAX_CONCURRENT_TASKS: must be a whole number >= 1",
        ),
        ({"TETHER_MAX_BODY_BYTES": "0"}, "TETHER_MAX_BODY_BYTES: must be a whole number >= 1"),
        ({"TETHER_READINESS_INTERVAL": "0"}, "TETHER_READINESS_INTERVAL: must be a number > 0"),
        # past a hundred years, a job's deadline overflowed the dates it is read as (500 on
        # every list holding it), a lease crashed the start: an exploratory QA pass
        ({"TETHER_MAX_TIMEOUT": "1e12"}, "TETHER_MAX_TIMEOUT: 1e+12; at most 3.1536e+09 seconds"),
        ({"TETHER_TASK_TTL": "1e14"}, "TETHER_TASK_TTL: 1e+14; at most 3.1536e+09 seconds"),
        ({"TETHER_TRIGGER_BACKOFF": "1e300"}, "TETHER_TRIGGER_BACKOFF: 1e+300; at most"),
        # a whole number written otherwise (`TETHER_PORT=1e3` listened on port 1000)
        ({"TETHER_PORT": "1e3"}, "TETHER_PORT: not a whole number"),
        ({"TETHER_MAX_BODY_BYTES": "1000.0"}, "TETHER_MAX_BODY_BYTES: not a whole number"),
        ({"TETHER_LOG_FORMAT": "xml"}, "TETHER_LOG_FORMAT: not one of json, text"),
    ],
)
def test_numbers_no_service_could_run_with_are_refused_at_start(
    env: dict[str, str], said: str
) -> None:
    """Taken, a 0 or a default timeout over the largest refused every job that
    named none (400, blaming a field the client never sent); a negative
    watchdog interval turned the watchdog off."""
    refused = serve_refused(**env)
    assert refused.startswith("tether: invalid setting") and said in refused, refused


def test_workers_below_one_are_a_usage_error() -> None:
    done = CliRunner().invoke(cli, ["serve", "--workers", "0"])
    assert done.exit_code == 2
    assert "Invalid value for '--workers': 0 is not in the range x>=1" in done.output


def test_the_settings_a_public_url_and_a_retention_may_take() -> None:
    for url in ("https://t.example", "http://10.0.0.1:8080/tether/", "HTTPS://T.example:443"):
        assert Settings.from_env({}, public_url=url).public_url == url
    for days in (0, 1, 30):
        assert Settings.from_env({}, retention=days * 86400.0).retention == days * 86400


def test_a_wildcard_host_names_the_flag_or_the_variable_it_came_from(tmp_path: Path) -> None:
    def refused(*args: str, **env: str) -> str:  # a process: serve has set up logging by then
        quiet = {
            k: v for k, v in os.environ.items() if k not in ("TETHER_HOST", "TETHER_PUBLIC_URL")
        }
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(free_port()), *args],
            cwd=ROOT,
            env=quiet | {"TETHER_STORE": f"sqlite:///{tmp_path}/tether.db"} | env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        return done.stderr

    assert refused("--host", "0.0.0.0").startswith("tether: --host 0.0.0.0 listens on every")
    by_env = refused(TETHER_HOST="0.0.0.0")
    assert by_env.startswith("tether: TETHER_HOST=0.0.0.0 listens on every interface")


def test_serve_on_any_free_port_hands_out_callback_urls_naming_the_port_bound(
    tmp_path: Path,
) -> None:
    """`--port 0` with no TETHER_PUBLIC_URL: the callback URLs (the public
    URL the start-up line names) carry the port the service listens on, not
    0, which no external system could call back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env |= {"TETHER_STORE": "memory://", "TETHER_CALLBACK_SECRET": "s"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        service = subprocess.Popen([TETHER, "serve", "--port", "0"], env=env, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while "running on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
    finally:
        service.terminate()
        service.wait(timeout=30)
    public = re.search(r"public URL http://127\.0\.0\.1:(\d+),", text)
    bound = re.search(r"running on http://127\.0\.0\.1:(\d+)", text)
    assert public and bound, text
    assert public.group(1) == bound.group(1) != "0"


@pytest.mark.parametrize("verb", ["get", "watch", "events", "cancel", "retry"])
def test_an_empty_id_is_a_usage_error_naming_it(verb: str) -> None:
    """Not a request to `/jobs/` (the list's route) answered confusingly:
    refused before any request, exit 2, naming the ID."""
    done = CliRunner().invoke(cli, [verb, "", "--url", "http://127.0.0.1:9"])
    assert done.exit_code == 2, done.output
    named = "'ID...'" if verb in ("cancel", "retry") else "'ID'"  # (they take several)
    assert f"Invalid value for {named}: an empty ID names no job" in done.output
    if verb in ("cancel", "retry"):
        done = CliRunner().invoke(cli, [verb, "a", "", "--url", "http://127.0.0.1:9"])
        assert done.exit_code == 2 and "an empty ID names no job" in done.output


def test_the_client_commands_do_not_load_the_web_stack() -> None:
    """`tether get` and the other client verbs start fast: importing the
    command loads neither Litestar nor the durable SDK (`tether serve`
    imports them itself)."""
    code = "import sys, api.cli; print(sorted({'litestar', 'resonate'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9?x=1", "http://127.0.0.1:9/#top", "http://u:pw@127.0.0.1:9"]
)
def test_a_service_url_with_a_query_or_credentials_is_a_usage_error(url: str) -> None:
    """Not sent: a query would be dropped or mangled, and credentials in the
    URL would replace the API token with Basic auth (a bare 401)."""
    done = CliRunner().invoke(cli, ["get", "j", "--url", url])
    assert done.exit_code == 2, done.output
    assert "give the service's base URL alone" in done.output and "pw" not in done.output


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"TETHER_GROUP": ""}, "invalid setting TETHER_GROUP: ''; give a name without '/', '@'"),
        ({"TETHER_GROUP": "a b/c"}, "invalid setting TETHER_GROUP: 'a b/c'; give a name"),
        ({"TETHER_GROUP": "team@prod"}, "invalid setting TETHER_GROUP: 'team@prod'; give"),
        ({"TETHER_GROUP": " "}, "invalid setting TETHER_GROUP: ' '; give a name"),
        ({"TETHER_GROUP": "a\nb"}, "invalid setting TETHER_GROUP: 'a\\nb'; give a name"),
        ({"TETHER_DATABRICKS_THREADS": "1.5"}, "TETHER_DATABRICKS_THREADS: not a whole number"),
        ({"TETHER_DATABRICKS_HTTP_TIMEOUT": "abc"}, "TETHER_DATABRICKS_HTTP_TIMEOUT: not a number"),
        ({"TETHER_ACCESS_LOG": "maybe"}, "TETHER_ACCESS_LOG: not 0, 1, true or false"),
    ],
)
def test_a_setting_of_the_wrong_kind_is_refused_in_plain_words(env: dict[str, str], said: str):
    """A group the embedded store refused with a traceback (exit 1), and
    msgspec's "Expected `int`, got `str`" for a variable, which is always a
    string (found by an exploratory QA pass)."""
    told = serve_refused(**env)
    assert told.startswith("tether: ") and said in told, told
    assert len(told.splitlines()) == 1 and "Traceback" not in told


@pytest.mark.parametrize("value", ["Bearer s3cret\nmore", "Bearer s3cret\r", "\x7fs3cret"])
def test_a_webhook_credential_no_header_can_carry_is_refused_without_showing_it(value: str):
    """Taken, every trigger using it failed as a ValueError, tried again as if
    it could pass (found by an exploratory QA pass)."""
    said = serve_refused(TETHER_WEBHOOK_AUTH_PARTNER=value)
    assert said.startswith("tether: invalid setting TETHER_WEBHOOK_AUTH_PARTNER: "), said
    assert "control character" in said and "s3cret" not in said


def test_the_settings_a_group_may_take() -> None:
    for group in ("tether", "team-a.prod_2", "g" * 200, "team a", "équipe"):  # as before
        assert Settings(group=group).group == group


def test_the_service_loads_neither_the_http_client_nor_rich() -> None:
    """`tether serve` and each of its workers import `api.cli`: the client
    verbs (httpx, Rich) are mounted only when one is asked for, about 80 ms
    of each process's start."""
    code = (
        "import sys, api.cli, api.app;"
        " print(sorted({'api.client', 'httpx', 'rich'} & set(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_a_mistyped_client_verb_is_named_with_the_one_meant() -> None:
    """The client verbs are mounted when asked for: click's "did you mean"
    read only what was mounted, and `tether sumbit` lost its hint (found by
    a review)."""
    got = subprocess.run(
        [TETHER, "sumbit"], capture_output=True, text=True, timeout=60, env=os.environ.copy()
    )
    assert got.returncode == 2
    assert "No such command 'sumbit'. Did you mean 'submit'?" in got.stderr, got.stderr


def test_an_exit_with_words_is_status_1_and_the_words(monkeypatch, capsys) -> None:
    """`sys.exit("text")` (a plugin's, at start-up) ended in a ValueError
    traceback from reading its code as a number (found by a review)."""
    import api.cli

    def exits(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("the plugin gave up")

    monkeypatch.setattr(api.cli.cli, "main", exits)
    assert api.cli.main(["plugins"]) == 1
    assert capsys.readouterr().err == "the plugin gave up\n"
