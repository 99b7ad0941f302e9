"""The `tether` command: one click group holding the commands that work on
this machine (serve, gc, the store's files, plugins) and the client verbs of
`api/client.py`, which talk to a running service over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import logging.config
import os
import shlex
import socket
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click
import msgspec

from api.packages import run as run_installer
from api.packages import table as plugin_table
from core import version
from core.errors import StoreConfigError, StoreUnavailable, TetherError, near_hint
from core.plugins import Plugins, make_plugin_manager
from core.settings import (
    MAX_RETENTION,
    MIN_RETENTION,
    PREFIX,
    WILDCARD_HOSTS,
    Settings,
    describe,
    listed,
    unknown_env,
)
from core.store.backup import Copied, StoreFileError, embedded_db
from core.store.backup import backup as store_backup
from core.store.backup import restore as store_restore
from core.store.base import check_notify_secret, check_previous_notify_secrets
from core.store.embedded import (
    drop_previous_notify_secrets,
    drop_previous_secrets,
    last_start,
    notify_secret_path,
    open_to_all,
    read_notify_secret,
    read_only,
    read_secrets,
    rotate_notify_secret,
    rotate_secret,
    secret_path,
    sqlite_path,
    waiting_on_previous_secrets,
)
from core.views import duration

# The service's own modules (the web framework, the workflow engine) are
# imported by the commands that run them: the client verbs and the store-file
# commands start ~0.5 s sooner without them.
if TYPE_CHECKING:
    from litestar import Litestar

log = logging.getLogger("tether")

WEAK_SECRET = 32
"""Characters below which a configured `TETHER_CALLBACK_SECRET` is warned
about at start (not refused: an upgraded deployment's waiting jobs hold URLs
signed with it). A generated one is 43 (`secrets.token_urlsafe(32)`)."""

WEAK_TOKEN = 16
"""Characters below which a token of `TETHER_API_TOKEN` or `TETHER_READ_TOKEN`
is warned about at start (found by a security QA pass: `TETHER_API_TOKEN=a`
started unsaid). Not refused: clients hold it."""

RENAMED_LOGGERS = {"uvicorn.error": "tether.http", "uvicorn": "tether.http"}
"""uvicorn logs its start, stop and worker lines as `uvicorn.error`, which reads
as a fault: they are shown as `tether.http`."""


class RenameLoggers(logging.Filter):
    """Shows records of the loggers in `RENAMED_LOGGERS` under their new names."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = RENAMED_LOGGERS.get(record.name, record.name)
        return True


def log_config(level: str, log_format: str = "text") -> dict[str, Any]:
    """One logging set-up for the `tether` process and each of its uvicorn
    workers (a spawned worker starts with no logging of its own): everything,
    uvicorn's lines included, goes to stderr in one format."""
    from api.logs import LogQueue, Repeats, StaleLeases, formatter

    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": formatter(log_format)},
        "filters": {
            "rename": {"()": RenameLoggers},
            "stale": {"()": StaleLeases},
            "repeats": {"()": Repeats},
        },
        "handlers": {
            "stderr": {
                "()": LogQueue,  # written by a thread: a full pipe never blocks the loop
                "formatter": "plain",
                "filters": ["rename", "stale", "repeats"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def serving_app(settings: Settings) -> Litestar:
    """The app of a `tether serve` process (each worker calls this), with lean
    log records: no format here shows the caller's line or thread."""
    from api.app import create_app
    from api.logs import lean_records

    lean_records()
    return create_app(settings)


INTERRUPTED = 130
"""The exit status of a command Ctrl-C (SIGINT) ended: 128 + SIGINT's 2."""


class Refused(click.ClickException):
    """A setting, flag or store the command cannot work with: `tether: MESSAGE`
    on stderr and exit status 2, before anything is changed."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"tether: {self.message}", err=True)


def installed_plugins() -> Plugins:
    """The installed plugins, their backends made; a plugin's setting refused
    (`TETHER_DATABRICKS_RETRY_TIMEOUT=abc`) is said in one line, as a core
    setting is, not as a traceback."""
    try:
        return Plugins(make_plugin_manager())
    except ValueError as exc:
        raise Refused(str(exc)) from None


def load_settings(**flags: Any) -> Settings:
    """The settings, the flags given (not None) over the environment's. A value
    refused is named as the user gave it: `invalid --port: ...` for a flag's,
    `invalid setting TETHER_PORT: ...` (as `Settings.from_env` says) for the
    environment's."""
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Settings.from_env(**given)
    except ValueError as exc:
        message = str(exc)
        for name in given:  # a flag wins over its variable: the value was the flag's
            said = f"invalid setting {PREFIX}{name.upper()}: "
            if message.startswith(said):
                message = f"invalid {flag(name)}: {message.removeprefix(said)}"
        raise Refused(message) from None


def flag(setting: str) -> str:
    """The flag of a setting (`public_url`: `--public-url`)."""
    return "--" + setting.replace("_", "-")


CLIENT_VERBS = (
    "submit",
    "get",
    "list",
    "events",
    "watch",
    "cancel",
    "retry",
    "complete",
    "heartbeat",
)
"""The verbs of `api/client.py` (its `COMMANDS`, in their order), which talk
to a running service over HTTP: imported only when one is run or the help
lists them. `tether serve` and each of its workers never load the HTTP
client and Rich (about 80 of 500 ms of a process's imports)."""


class Sections(click.Group):
    """A group whose help lists its commands under the headings of `SECTIONS`
    (in their order there) instead of in one alphabetical list, and which
    mounts the client verbs (`CLIENT_VERBS`) when they are first asked for."""

    def _with_client_verbs(self) -> None:
        if CLIENT_VERBS[0] not in self.commands:
            from api.client import add_client_commands

            add_client_commands(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in CLIENT_VERBS or cmd_name not in self.commands:
            self._with_client_verbs()  # (an unknown name: "did you mean" reads them all)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._with_client_verbs()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; Ctrl-C (SIGINT) ends it with status 130, as a shell
        reports a command a SIGINT ended. Click said "Aborted!" and exited 1,
        which `tether watch` and `submit --wait` use for a failed job, and
        `serve` for a failure (a QA pass). Output whose reader stopped reading
        (`| head`) ends it with 0, as output that fit the pipe did: click
        exited 1, so `tether list --ids | head -1` under `set -o pipefail`
        failed or not by how many jobs there were (a QA pass)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo(err=True)  # ends the line the terminal's ^C is on
            raise click.exceptions.Exit(INTERRUPTED) from None
        except BrokenPipeError:
            # what is left to write goes nowhere, the interpreter's last flush too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(0) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._with_client_verbs()
        width = max(map(len, self.commands))  # one column width across the sections
        limit = formatter.width - 6 - width  # as click's own list
        for title, names in SECTIONS.items():
            rows = [
                (name.ljust(width), self.commands[name].get_short_help_str(limit)) for name in names
            ]
            with formatter.section(title):
                formatter.write_dl(rows)


def print_version(context: click.Context, _: click.Parameter, value: bool) -> None:
    """`tether --version`: the release, and what tells builds of one release
    apart (found by an exploratory QA pass: every build since 2026-11-30 said
    0.1.0): the store's schema version it migrates to, and the workflow
    version it starts jobs under (CHANGELOG.md)."""
    if not value or context.resilient_parsing:
        return
    from core.store.migrations import MIGRATIONS
    from core.workflow import VERSION

    schema = MIGRATIONS[-1].version
    click.echo(f"tether {version()} (store schema {schema}, workflow version {VERSION})")
    context.exit()


@click.group("tether", cls=Sections, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=print_version,
    help="Show the version, the store schema and the workflow version, and exit.",
)
def cli() -> None:
    """Run jobs on external systems and wait for them durably."""


def main(argv: list[str] | None = None) -> int:
    """`tether ARGV`; its exit status (click ends every run with SystemExit)."""
    standard_streams_open()
    try:
        cli.main(argv, prog_name="tether")
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        print(done.code, file=sys.stderr)  # `sys.exit("text")`, as Python ends one
        return 1
    finally:  # a command's log lines out before its own words end it
        from api.logs import flush_logs

        flush_logs()


# ── the service ───────────────────────────────────────────────────────────────


def standard_streams_open() -> None:
    """Open the null device on each of descriptors 0-2 that a starter left
    closed, as daemons do: the next file opened took it, and with stderr
    closed the workers wrote their logs into the supervisor's shared memory
    (its table of connections, in RAM, without bound; found by a QA pass).
    The logs of such a service go nowhere, as its starter chose."""
    for fd in range(3):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest descriptor free: `fd`
            os.set_inheritable(opened, True)  # as a standard stream is: the workers' too
    for name, fd in (("stdin", 0), ("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is None:  # Python found it closed at start
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


@cli.command()
@click.option("--host", help="Interface to listen on (TETHER_HOST, default 127.0.0.1).")
@click.option("--port", type=int, help="Port (TETHER_PORT, default 8000).")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes sharing the store.",
)
def serve(host: str | None, port: int | None, workers: int) -> None:
    """Run the HTTP API and a worker."""
    from api.app import token_problem

    settings = load_settings(host=host, port=port)
    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
    if settings.host in WILDCARD_HOSTS and not settings.public_url:
        given = "--host " if host is not None else f"{PREFIX}HOST="
        raise Refused(
            f"{given}{settings.host or '(empty)'} listens on every interface, so"
            " callback URLs cannot be derived from it (external systems would be told"
            f" to call http://{settings.host}:{settings.port}/...); set TETHER_PUBLIC_URL"
            " to the URL they reach this service at, e.g."
            " TETHER_PUBLIC_URL=https://tether.example.com"
        )
    problem = token_problem(settings)
    if problem:
        raise Refused(problem)
    if not settings.public_url and settings.shared:
        log.warning(
            "TETHER_PUBLIC_URL is not set: callback URLs made here name this host (%s),"
            " so a host that dies takes the way back to its jobs with it; set it, the same on"
            " every host, to the load balancer's URL (docs/deploy.md)",
            settings.base_url,
        )
    if workers > 1 and settings.store.startswith("memory:"):
        raise Refused(
            "memory:// lives in one process; use --workers 1, or sqlite:///PATH for several workers"
        )
    # The address first: one in use is refused before start-up opens (and
    # perhaps migrates) the store. Several workers share a socket that
    # listens from now on: bound alone, another process could take the port
    # (SO_REUSEADDR) until the first worker listened, and no worker could.
    flag = "--port" if port is not None else ""
    sock = listening_socket(settings.host, settings.port, flag, listen=workers > 1)
    if settings.port == 0 and not settings.public_url:  # any free port: URLs name the one bound
        settings = msgspec.structs.replace(settings, port=sock.getsockname()[1])
    plugins = installed_plugins()
    for name, closest in unknown_env(plugins.setting_names()):
        hint = f"; did you mean {closest}?" if closest else ""
        if closest == name.upper():
            hint = f"; setting names are upper case: {closest}"
        log.warning("unknown setting %s is ignored%s", name, hint)
    if settings.watchdog_interval == 0:
        log.warning(
            "TETHER_WATCHDOG_INTERVAL=0: this process's watchdog is off. Unless another"
            " process on the store runs one, no heartbeat miss is acted on, no status check is"
            " made, a deadline is noticed only when the store times the wait out, a minute"
            " late, and a queued job's never (it has no wait yet): completion notifications"
            " are still sent"
        )
    if 0 < len(settings.callback_secret) < WEAK_SECRET:
        log.warning(
            "TETHER_CALLBACK_SECRET is %d characters: whoever guesses it can settle any job."
            " Use at least %d random ones (python3 -c 'import secrets;"
            " print(secrets.token_urlsafe(32))'), rotated in as docs/operations.md says",
            len(settings.callback_secret),
            WEAK_SECRET,
        )
    stores = [url for url in (settings.store, settings.index) if url.startswith("sqlite:")]
    for url in stores:
        with contextlib.suppress(ValueError):
            readable = open_to_all(sqlite_path(url))
            if readable:
                shown = " ".join(shlex.quote(str(path)) for path in readable)
                log.warning(
                    "the store's files %s are readable by every user of this host (made"
                    " before Tether made them private, it keeps their modes): they hold the"
                    " jobs' params, results and history, and the secrets. Unless that is"
                    " meant, run: chmod go-rwx %s",
                    shown,
                    shown,
                )
    for name, value in (("API", settings.api_token), ("READ", settings.read_token)):
        short = min((len(token) for token in listed(value)), default=WEAK_TOKEN)
        if short < WEAK_TOKEN:  # its length only, never the token
            log.warning(
                "TETHER_%s_TOKEN lists a token of %d characters: a short one can be guessed"
                " by trying (TETHER_WRONG_TOKENS_PER_MINUTE, unless 0, slows each address,"
                " not many together). Use at least %d random ones"
                " (python3 -c 'import secrets; print(secrets.token_urlsafe(32))'), replaced"
                " as docs/operations.md says",
                name,
                short,
                WEAK_TOKEN,
            )
    for backend in settings.limits.keys() - plugins.backends.keys():
        hint = near_hint(backend.lower(), plugins.backends)
        log.warning(
            "TETHER_MAX_RUNNING names %r, which is no installed backend: it limits nothing%s",
            backend,
            hint,
        )
    problem = asyncio.run(preflight(settings, plugins))
    if problem:
        sock.close()
        raise Refused(problem)
    log.info("%s", startup_line(settings, plugins, workers))
    import uvicorn

    from api.server import more_open_files

    more_open_files()

    from api.http import SERVER_OPTIONS, proxy_options  # the web stack: not for the client commands

    config = uvicorn.Config(
        functools.partial(serving_app, settings),  # each worker builds its app from these
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_config=log_config(settings.log_level, settings.log_format),
        log_level=settings.log_level.lower(),
        **SERVER_OPTIONS,
        **proxy_options(settings.trusted_proxies),
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=30,
    )
    from uvicorn.config import STARTUP_FAILURE

    from api.metrics import multiprocess_dir
    from api.server import Supervisor, TetherServer  # uvicorn's, waking less when idle

    if workers <= 1:
        sock.close()  # uvicorn binds its own (and logs where it listens)
        TetherServer(config).run()
        return
    sock.set_inheritable(True)  # several workers share it
    # One worker's uvicorn says where it listens; the supervisor's does not.
    log.info("listening on %s with %d workers", address_url(sock), workers)
    supervisor = Supervisor(config, sockets=[sock], store=describe(settings.store))
    with multiprocess_dir(workers):  # the workers read it as they start
        supervisor.run()
    if supervisor.failed:
        raise SystemExit(STARTUP_FAILURE)


BACKLOG = 2048
"""The backlog of the socket several workers share, from `tether serve`'s
listen until the first worker listens again with uvicorn's `backlog` (the
same, its default)."""


def listening_socket(host: str, port: int, flag: str, listen: bool = False) -> socket.socket:
    """A socket bound to `host`:`port` (and, with `listen`, listening: the
    port is then this process's alone), or `Refused` naming why not (in use,
    not an address of this machine) and the setting to change (`flag` when
    the port was given as one). Made with IPPROTO_TCP (uvicorn's own has
    proto 0), so asyncio turns on TCP_NODELAY for each connection; without
    it every response waits ~40 ms on Nagle's algorithm."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        if listen:  # another bound it too meanwhile, and listened first: in use
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"
        if exc.errno == errno.EADDRINUSE:
            why = f"{where} is already in use (another tether serve?): choose another port"
            setting = f"{flag} or {PREFIX}PORT" if flag else f"{PREFIX}PORT or --port"
        else:
            why = f"cannot listen on {where}: {exc.strerror or exc}"
            setting = f"{PREFIX}HOST / {PREFIX}PORT or --host / --port"
        raise Refused(f"{why} ({setting})") from None
    return sock


def address_url(sock: socket.socket) -> str:
    """The URL of a bound socket's address, as uvicorn's "running on" line
    shows one: http://127.0.0.1:8000, http://[::1]:8000, http://0.0.0.0:8000."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


@cli.command()
@click.option(
    "--older-than", type=float, required=True, metavar="DAYS", help="Age in days (at least 1)."
)
@click.option(
    "--store",
    metavar="URL",
    help="The store (TETHER_STORE, default sqlite:///.tether/tether.db).",
)
def gc(older_than: float, store: str | None) -> None:
    """Delete finished jobs older than a number of days."""
    settings = load_settings(store=store or None)
    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
    if not older_than * 86400 >= MIN_RETENTION:  # NaN too
        raise Refused(f"keep finished jobs at least {duration(MIN_RETENTION)}")  # "1 day"
    if not older_than * 86400 <= MAX_RETENTION:
        raise Refused(f"--older-than is at most {MAX_RETENTION / 86400:g} days (a hundred years)")
    asyncio.run(collect_garbage(settings, older_than * 86400))


async def collect_garbage(settings: Settings, older_than: float) -> None:
    """`tether gc`: delete old finished jobs, safe while services run."""
    from core.service import Tether

    _refuse_no_store(settings, "gc")
    try:
        tether = await Tether.open(settings, installed_plugins(), worker=False)
    except (StoreConfigError, StoreUnavailable) as exc:
        raise Refused(str(exc)) from None
    try:
        jobs, promises = await tether.collect_garbage(older_than)
    except TetherError as exc:
        raise Refused(exc.message) from None
    finally:
        await tether.close()
    click.echo(f"deleted {jobs} finished jobs and {promises} promises")


def _refuse_no_store(settings: Settings, command: str) -> None:
    """Refuse a store with nothing in it for `tether COMMAND`: an embedded
    store no service has made (opening it would make an empty one, and its
    secret files, where a typo or a relative path pointed), or memory://;
    and a Resonate server's, which keeps every promise."""
    if settings.store.startswith("memory:"):
        raise Refused(f"memory:// keeps nothing beyond its process: tether {command} has no jobs")
    if settings.store.lower().startswith(("http:", "https:")):  # before it opens (and pairs) any
        raise Refused(  # (found by an exploratory QA pass: it made the index, paired the server)
            "the Resonate server store does not support retention: the Resonate protocol"
            f" has no request that deletes promises; tether {command} opened nothing"
        )
    if settings.store.startswith("sqlite:"):
        try:
            db = embedded_db(settings, command)
        except StoreFileError as exc:
            raise Refused(str(exc)) from None
        if not db.is_file():
            raise Refused(
                f"no embedded store at {db}: set TETHER_STORE to the store the services"
                " use (a service makes it when it first starts)"
            )


@cli.command("pair-index")
@click.option(
    "--force",
    is_flag=True,
    help="Re-pair a server paired with another index (its jobs become invisible).",
)
def pair_index(force: bool) -> None:
    """Check that the Resonate server in TETHER_STORE keeps its jobs in
    TETHER_INDEX, pairing the two if the server has no index yet.

    Every host on one Resonate server must use the one job index the server is
    paired with: `tether serve` refuses to start with another. --force pairs
    the server with TETHER_INDEX instead: only for an index that replaces one
    lost for good, with every host stopped or already on the new index."""
    settings = load_settings()
    logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
    asyncio.run(_pair_index(settings, force))


async def _pair_index(settings: Settings, force: bool) -> None:
    from core.store.remote import SCHEMES, RemoteStore

    if settings.store.partition("://")[0] not in SCHEMES:
        raise Refused(
            f"pair-index is for a Resonate server store (TETHER_STORE=http(s)://...);"
            f" {describe(settings.store)} keeps its job index itself"
        )
    try:
        store = await RemoteStore.open(settings, "tether-pair-index", repair=force)
    except (StoreConfigError, StoreUnavailable) as exc:
        raise Refused(str(exc)) from None
    try:
        mine = await store.jobs.identity()
    finally:
        await store.close()
    click.echo(
        f"the Resonate server at {describe(settings.store)} is paired with the job index"
        f" {describe(settings.index)} (id {mine})"
    )


# ── local commands on the embedded store's files (never an HTTP route) ───────


def store_option[F: Callable[..., Any]](function: F) -> F:
    """`--store`: the local store whose files `rotate-secret`,
    `rotate-notify-secret`, `notify-secret`, `backup` and `restore` read and
    write."""
    return click.option(
        "--store",
        metavar="URL",
        help="The store (TETHER_STORE, default sqlite:///.tether/tether.db).",
    )(function)


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size:,} bytes"


@cli.command("rotate-secret")
@store_option
@click.option(
    "--drop-previous",
    is_flag=True,
    help="Instead, forget the previous secrets (their URLs then answer 401).",
)
@click.option(
    "--force",
    is_flag=True,
    help="With --drop-previous: drop them even while jobs may wait on their URLs.",
)
def rotate_secret_command(store: str | None, drop_previous: bool, force: bool) -> None:
    """Rotate the callback secret; previous ones stay accepted.

    New callback URLs are signed with a new secret kept beside the embedded
    store, and URLs signed with the old ones still work (docs/operations.md).
    No secret is printed."""
    if force and not drop_previous:  # (a rotation, the opposite of what was meant)
        raise click.UsageError("--force goes with --drop-previous")
    check = None if force else _refuse_stranding
    secrets, count = _rewrite(CALLBACK_SECRETS, store, drop_previous, check)
    restart = "Restart every `tether serve` using this store now (stop them all, then start)"
    if drop_previous:
        click.echo(
            f"dropped {count} previous callback secret(s) from {secrets}. {restart}:"
            " callback URLs signed with them then answer 401."
        )
    else:
        click.echo(
            f"rotated the callback secret in {secrets}; {count} previous secret(s) still"
            f" accepted. {restart}: until then they sign with the old secret. Once no job"
            " waits on a URL handed out before the restart (each has ended: wait for its"
            " finish, not only its deadline), run `tether rotate-secret --drop-previous`"
            " and restart again."
        )


def _refuse_stranding(db: Path) -> None:
    """Refuse `rotate-secret --drop-previous` while jobs may wait on URLs
    signed with a previous secret of store `db`: their callbacks would
    answer 401, and their outcomes be lost (found by a QA pass, 2026-12-06:
    nothing checked, and the next start said nothing)."""
    try:
        if len(read_secrets(secret_path(db))) < 2:
            return  # nothing to drop
        restarted, waiting, since = waiting_on_previous_secrets(db)
    except (OSError, sqlite3.Error) as exc:
        raise Refused(f"cannot read the store to see which jobs wait: {exc}") from None
    if not restarted:
        raise Refused(
            "the service has not started since the callback secret was rotated: it still signs"
            " callback URLs with a secret this would drop, so the callbacks of the jobs waiting"
            f" ({waiting} now) would answer 401. Restart every `tether serve` of this store, let"
            " the jobs waiting then end, and run this again (--force drops them anyway)"
        )
    if waiting and not since:
        raise Refused(
            f"{waiting} job(s) still wait, and the store does not say when the service last"
            " started: their callback URLs may be signed with a previous secret, and would"
            " answer 401. Wait until they end (`tether list --state pending --state running`),"
            " then run this again (--force drops them anyway)"
        )
    if waiting:
        # (the list's times are read to the second: rounded up, it shows them all)
        second = datetime.fromtimestamp(-(-since // 1000), UTC)
        before = second.isoformat(timespec="seconds").replace("+00:00", "Z")
        raise Refused(
            f"{waiting} job(s) created before the last start ({before}) still wait: their"
            " callback URLs may be signed with a previous secret, and would answer 401."
            " Wait until they end (`tether list --state pending --state running"
            f" --created-before {before}`), then run this again (--force drops them anyway)"
        )


@dataclass(frozen=True)
class SecretFile:
    """A file of secrets kept beside the embedded store, one a line, current
    first, that a `rotate-...` command rewrites."""

    name: str  # "callback secret"
    command: str  # "rotate-secret"
    setting: str  # "TETHER_CALLBACK_SECRET"; its previous ones: ..._PREVIOUS
    section: str  # of docs/operations.md
    store_keeps: str  # what Postgres is said to keep no file of
    path: Callable[[Path], Path]
    rotate: Callable[[Path], int]  # how many are previous now
    drop: Callable[[Path], int]  # how many went


CALLBACK_SECRETS = SecretFile(
    "callback secret",
    "rotate-secret",
    "TETHER_CALLBACK_SECRET",
    "Rotating the callback secret",
    "secret",
    secret_path,
    rotate_secret,
    drop_previous_secrets,
)
NOTIFY_SECRETS = SecretFile(
    "notification secret",
    "rotate-notify-secret",
    "TETHER_NOTIFY_SECRET",
    "Changing the secret",
    "notification secret",
    notify_secret_path,
    rotate_notify_secret,
    drop_previous_notify_secrets,
)


def _rewrite(
    kind: SecretFile,
    store: str | None,
    drop_previous: bool,
    check: Callable[[Path], None] | None = None,
) -> tuple[Path, int]:
    """Rotate `kind`'s file (or drop its previous secrets, once `check` of the
    store's database, if given, has not refused): its path, and how many
    secrets are previous now (or went). Refused when the services of the
    store do not sign with that file."""
    try:
        db = _secret_file_of(kind, load_settings(store=store or None))
        if drop_previous and check is not None:
            check(db)
        return kind.path(db), (kind.drop if drop_previous else kind.rotate)(db)
    except (ValueError, StoreFileError) as exc:  # StoreConfigError: a damaged secret file
        raise Refused(str(exc)) from None
    except OSError as exc:  # (before the path is known, too: a directory it may not search)
        raise Refused(f"cannot use {exc.filename or 'the secret file'}: {exc.strerror}") from None


def _secret_file_of(kind: SecretFile, settings: Settings) -> Path:
    """The embedded store whose `kind` file its command may rewrite: one
    whose services sign with that file's secrets."""
    setting = kind.setting
    if settings.store.startswith(("postgresql:", "postgres:")):
        raise StoreFileError(
            f"{describe(settings.store)} keeps no {kind.store_keeps} file: rotate the {kind.name}"
            f" through {setting} and {setting}_PREVIOUS on every host"
            f' (docs/operations.md, "{kind.section}")'
        )
    db = embedded_db(settings, kind.command)
    if getattr(settings, setting.removeprefix("TETHER_").lower()):
        raise StoreFileError(
            f"{setting} is set, so services sign with it and not with the"
            f" file {kind.path(db)}: rotate it through {setting} and"
            f" {setting}_PREVIOUS (docs/operations.md)"
        )
    if not kind.path(db).is_file():
        raise StoreFileError(
            f"no {kind.name} file {kind.path(db)}: a service makes one when it first"
            " opens the store"
        )
    return db


@cli.command("notify-secret")
@store_option
def notify_secret_command(store: str | None) -> None:
    """Print the current notification secret, the one to give receivers.

    Receivers verify each notification's `webhook-signature` with it
    (docs/lifecycle.md, "Completion notifications"). It is
    TETHER_NOTIFY_SECRET when set, else the one the embedded store keeps
    beside its database. After `tether rotate-notify-secret` it is the new
    one, which a service signs with only from its next start: give it to
    receivers once every service has restarted (docs/operations.md). Only
    the secret is printed, on a line of its own."""
    settings = load_settings(store=store or None)
    try:
        secret = _notify_secret(settings)
    except (StoreConfigError, StoreFileError) as exc:
        raise Refused(str(exc)) from None
    except OSError as exc:
        raise Refused(f"cannot read the notification secret: {exc.strerror}") from None
    click.echo(secret)
    if not _signed_at_last_start(settings, secret):
        click.echo(
            "tether: warning: the services of this store started last before this secret"
            " was theirs (`tether rotate-notify-secret`, or a new TETHER_NOTIFY_SECRET):"
            " they sign with it from their next start. Restart every `tether serve`"
            " before giving it to receivers",
            err=True,
        )


def _signed_at_last_start(settings: Settings, secret: str) -> bool:
    """Whether the last `tether serve` of the embedded store `settings` names
    signed with `secret` (its `tether_meta` record, one-way fingerprints);
    True when that cannot be told (no start yet, another store, a record of
    a release before 2026-12-06)."""
    from core.tokens import notify_fingerprints

    if not settings.store.startswith("sqlite:"):
        return True
    try:
        with read_only(embedded_db(settings, "notify-secret")) as conn:
            last = last_start(conn)
        signed = last["notify"] if last else None
    except (sqlite3.Error, StoreFileError, msgspec.DecodeError, KeyError, TypeError):
        return True
    return not signed or notify_fingerprints([secret])[0] in signed


def _notify_secret(settings: Settings) -> str:
    """The (current) notification secret services using `settings` sign with;
    a malformed TETHER_NOTIFY_SECRET_PREVIOUS is refused as `tether serve`
    refuses it."""
    check_previous_notify_secrets(settings.notify_secret_previous)
    if settings.notify_secret:
        return check_notify_secret(settings.notify_secret)
    if settings.store.startswith(("postgresql:", "postgres:")):
        raise StoreFileError(
            f"{describe(settings.store)} keeps no notification secret: set"
            " TETHER_NOTIFY_SECRET, the same on every host (docs/operations.md)"
        )
    path = notify_secret_path(embedded_db(settings, "notify-secret"))
    if not path.is_file():
        raise StoreFileError(
            f"no notification secret file {path}: a service makes one when it first opens"
            " the store (or set TETHER_NOTIFY_SECRET)"
        )
    return read_notify_secret(path)


@cli.command("rotate-notify-secret")
@store_option
@click.option(
    "--drop-previous",
    is_flag=True,
    help="Instead, forget the previous secrets (messages are then signed with the new one only).",
)
def rotate_notify_secret_command(store: str | None, drop_previous: bool) -> None:
    """Rotate the notification secret; messages are signed with both.

    A new secret is kept beside the embedded store, and until the previous
    ones are dropped each completion notification carries a signature under
    every one, so receivers verify it with the old secret or the new
    (docs/operations.md). No secret is printed."""
    path, count = _rewrite(NOTIFY_SECRETS, store, drop_previous)
    restart = "Restart every `tether serve` using this store now (one at a time will do)"
    if drop_previous:
        click.echo(
            f"dropped {count} previous notification secret(s) from {path}. {restart}:"
            " messages are then signed with the current secret only, and receivers that"
            " know only a dropped one refuse them."
        )
    else:
        click.echo(
            f"rotated the notification secret in {path}; messages are also signed with"
            f" {count} previous secret(s). {restart}: until then they are signed with"
            " the old secret only. Once every service has restarted, give receivers the new"
            " secret (`tether notify-secret` prints it); once every receiver has it, run"
            " `tether rotate-notify-secret --drop-previous` and restart again."
        )


@cli.command("backup")
@store_option
@click.argument("path", metavar="PATH")
@click.option("--force", is_flag=True, help="Replace PATH if it exists.")
def backup_command(store: str | None, path: str, force: bool) -> None:
    """Copy the embedded store and its secrets (services may run).

    The copy is consistent and integrity checked; the store's callback secrets
    go to PATH.secret, its notification secrets to PATH.notify-secret."""
    settings = load_settings(store=store or None)
    unused = [secret_path] if settings.callback_secret else []
    unused += [notify_secret_path] if settings.notify_secret else []
    try:
        db = embedded_db(settings, "backup")
        copied = store_backup(db, Path(path), force=force, unused=unused)
    except (ValueError, StoreFileError) as exc:
        raise Refused(str(exc)) from None
    click.echo(
        f"backed up {db} to {copied.path} ({_size(copied.size)}, {copied.jobs} jobs,"
        f" {copied.waiting} not finished), integrity checked"
    )
    _print_secret(copied, settings)


@cli.command("restore")
@store_option
@click.argument("backup", metavar="BACKUP")
@click.option("--force", is_flag=True, help="Replace the store if it exists.")
def restore_command(store: str | None, backup: str, force: bool) -> None:
    """Restore a backup as the embedded store (services stopped).

    BACKUP is a file `tether backup` wrote; it is put in place as the store,
    which is refused while a process has the store open."""
    settings = load_settings(store=store or None)
    try:
        db = embedded_db(settings, "restore")
        copied = store_restore(Path(backup), db, force=force)
    except (ValueError, StoreFileError) as exc:
        raise Refused(str(exc)) from None
    click.echo(
        f"restored {backup} to {db} ({_size(copied.size)}, {copied.jobs} jobs,"
        f" {copied.waiting} not finished), integrity checked"
    )
    _print_secret(copied, settings)


def _print_secret(copied: Copied, settings: Settings) -> None:
    for aside in copied.set_aside:
        click.echo(
            f"the store's own {aside.name.removesuffix('.before-restore')} is kept as {aside}"
        )
    if copied.secret is not None:
        click.echo(f"callback secrets copied to {copied.secret} (mode 0600)")
    elif settings.callback_secret:
        click.echo(
            "the callback secret is TETHER_CALLBACK_SECRET (no file): keep it, and"
            " TETHER_CALLBACK_SECRET_PREVIOUS, with the backup"
        )
    else:
        click.echo(
            "no callback secret file came with it (its services took theirs from"
            " TETHER_CALLBACK_SECRET?): give that secret to the services, or the callback URLs"
            " handed out before will answer 401"
        )
    if copied.notify_kept:
        click.echo(
            f"notifications are signed with the store's own secret and the backup's, in"
            f" {copied.notify_secret}: receivers given either verify. Once every receiver has"
            " the store's own, `tether rotate-notify-secret --drop-previous` drops the"
            " backup's (and any other previous one)"
        )
    elif copied.notify_secret is not None:
        click.echo(f"notification secrets copied to {copied.notify_secret} (mode 0600)")
    elif settings.notify_secret:
        click.echo(
            "the notification secret is TETHER_NOTIFY_SECRET (no file): keep it, and"
            " TETHER_NOTIFY_SECRET_PREVIOUS, with the backup"
        )
    else:
        click.echo(
            "no notification secret file came with it (its services took theirs from"
            " TETHER_NOTIFY_SECRET?): give that secret to the services, or a new one is made"
            " and receivers refuse what it signs"
        )


# ── plugins ───────────────────────────────────────────────────────────────────


def packages_command(verb: str) -> click.Command:
    """`tether install|uninstall PACKAGE...`, with the installer's exit status."""

    where = "into" if verb == "install" else "from"

    @click.command(
        verb, help=f"{verb.capitalize()} plugin packages {where} Tether's own environment."
    )
    @click.argument("packages", nargs=-1, required=True, metavar="PACKAGE...")
    def command(packages: tuple[str, ...]) -> None:
        raise click.exceptions.Exit(run_installer(verb, list(packages)))

    return command


cli.add_command(packages_command("install"))
cli.add_command(packages_command("uninstall"))


@cli.command()
def plugins() -> None:
    """List the installed plugins, their versions and backends."""
    click.echo(plugin_table(installed_plugins()))


# ── the client verbs, and how `tether --help` lists everything ────────────────

SECTIONS = {
    "Service": ("serve", "gc", "pair-index"),
    "Jobs (talk to a running service)": CLIENT_VERBS,
    "Store files": (
        "rotate-secret",
        "notify-secret",
        "rotate-notify-secret",
        "backup",
        "restore",
    ),
    "Plugins": ("install", "uninstall", "plugins"),
}
"""The headings of `tether --help`: commands on this machine's store and
environment, and the verbs that talk to a service over HTTP."""


async def preflight(settings: Settings, plugins: Plugins) -> str | None:
    """Open and close the store once, so that a damaged, locked or unwritable
    store, or a group that would strand the store's jobs (`Tether.take_group`),
    stops `tether serve` with a clear message instead of a traceback; on the
    way, warn about waiting jobs whose backend is no longer installed."""
    from core.health import orphans, warn_orphans
    from core.service import Tether

    try:
        tether = await Tether.open(settings, plugins, worker=False)
    except (StoreConfigError, StoreUnavailable) as exc:
        return str(exc)
    try:
        try:
            refused = await tether.take_group()
        except StoreUnavailable as exc:
            return str(exc)
        if refused:
            return refused
        try:
            warn_orphans(await orphans(plugins, tether.jobs))
        except Exception as exc:  # only a warning is at stake; /health counts them again
            log.warning("counting jobs of missing backends failed: %s", type(exc).__name__)
        try:
            for said in await tether.compare_with_last_host():
                log.error("%s", said)
        except Exception as exc:  # as above: a warning at most
            log.warning("comparing settings with the other hosts failed: %s", type(exc).__name__)
    finally:
        await tether.close()
    return None


def startup_line(settings: Settings, plugins: Plugins, workers: int) -> str:
    """What this service runs, in one line: store (no credentials), public URL,
    backends with their plugins' versions, worker processes."""
    backends = ", ".join(f"{n} ({v})" for n, v in sorted(plugins.versions().items()))
    index = f", job index {describe(settings.index)}" if settings.index else ""
    store = describe(settings.store)
    with contextlib.suppress(StoreFileError):  # the embedded store's file, resolved:
        # `sqlite:///tmp/x.db` reads as /tmp/x.db and is ./tmp/x.db (found by a QA pass)
        store += f" (the file {embedded_db(settings, 'serve').resolve()})"
    return (
        f"tether {version()}: store {store}{index}, public URL"
        f" {settings.base_url}, backends: {backends or 'none'}, {workers} worker(s)"
    )


if __name__ == "__main__":
    sys.exit(main())
