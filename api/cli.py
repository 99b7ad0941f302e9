"""The `tether` command."""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import logging
import logging.config
import socket
import sys
from typing import Any

from api.app import create_app
from api.http import SERVER_OPTIONS
from api.packages import run as run_installer
from api.packages import table as plugin_table
from core.errors import StoreConfigError, StoreUnavailable, TetherError
from core.health import orphans, warn_orphans
from core.plugins import Plugins, make_plugin_manager
from core.service import Tether
from core.settings import WILDCARD_HOSTS, Settings, describe, unknown_env
from core.views import duration
from core.watchdog import MIN_RETENTION

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("tether")

RENAMED_LOGGERS = {"uvicorn.error": "tether.http", "uvicorn": "tether.http"}
"""uvicorn logs its start, stop and worker lines as `uvicorn.error`, which reads
as a fault: they are shown as `tether.http`."""


class RenameLoggers(logging.Filter):
    """Shows records of the loggers in `RENAMED_LOGGERS` under their new names."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = RENAMED_LOGGERS.get(record.name, record.name)
        return True


def version() -> str:
    try:
        return importlib.metadata.version("tether")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def log_config(level: str) -> dict[str, Any]:
    """One logging set-up for the `tether` process and each of its uvicorn
    workers (a spawned worker starts with no logging of its own): everything,
    uvicorn's lines included, goes to stderr in one format."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": LOG_FORMAT}},
        "filters": {"rename": {"()": RenameLoggers}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "filters": ["rename"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tether", description="Run jobs on external systems and wait for them durably."
    )
    parser.add_argument("--version", action="version", version=f"tether {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API and a worker")
    serve.add_argument("--host", help="interface to listen on (TETHER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (TETHER_PORT, default 8000)")
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the store (default 1)"
    )
    gc = sub.add_parser("gc", help="delete finished jobs older than a number of days")
    gc.add_argument(
        "--older-than", type=float, required=True, metavar="DAYS", help="age in days (at least 1)"
    )
    for verb in ("install", "uninstall"):
        packages = sub.add_parser(
            verb, help=f"{verb} plugin packages in the environment Tether runs from"
        )
        packages.add_argument("packages", nargs="+", metavar="PACKAGE")
    sub.add_parser("plugins", help="list the installed plugins, their versions and backends")
    args = parser.parse_args(argv)
    if args.command in ("install", "uninstall"):
        return run_installer(args.command, args.packages)
    if args.command == "plugins":
        print(plugin_table(Plugins(make_plugin_manager())))
        return 0

    flags = {name: getattr(args, name, None) for name in ("host", "port")}
    try:
        settings = Settings.from_env(**{k: v for k, v in flags.items() if v is not None})
    except ValueError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(log_config(settings.log_level))
    if args.command == "gc":
        if not args.older_than * 86400 >= MIN_RETENTION:  # NaN too
            least = duration(MIN_RETENTION)  # "1 day": the flag counts days
            print(f"tether: keep finished jobs at least {least}", file=sys.stderr)
            return 2
        return asyncio.run(collect_garbage(settings, args.older_than * 86400))
    if settings.host in WILDCARD_HOSTS and not settings.public_url:
        print(
            f"tether: --host {settings.host or '(empty)'} listens on every interface, so"
            " callback URLs cannot be derived from it (external systems would be told"
            f" to call http://{settings.host}:{settings.port}/...); set TETHER_PUBLIC_URL"
            " to the URL they reach this service at, e.g."
            f" TETHER_PUBLIC_URL=https://tether.example.com",
            file=sys.stderr,
        )
        return 2
    if args.workers > 1 and settings.store.startswith("memory:"):
        print(
            "tether: memory:// lives in one process; use --workers 1, or sqlite:///PATH"
            " for several workers",
            file=sys.stderr,
        )
        return 2
    plugins = Plugins(make_plugin_manager())
    for name, closest in unknown_env(plugins.setting_names()):
        hint = f"; did you mean {closest}?" if closest else ""
        log.warning("unknown setting %s is ignored%s", name, hint)
    problem = asyncio.run(preflight(settings, plugins))
    if problem:
        print(f"tether: {problem}", file=sys.stderr)
        return 2
    log.info("%s", startup_line(settings, plugins, args.workers))
    import uvicorn

    config = uvicorn.Config(
        functools.partial(create_app, settings),  # each worker builds its app from these
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        log_config=log_config(settings.log_level),
        log_level=settings.log_level.lower(),
        **SERVER_OPTIONS,
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=30,
    )
    if args.workers <= 1:
        uvicorn.Server(config).run()
        return 0
    # Several workers share one listening socket. Made here with IPPROTO_TCP
    # (uvicorn's own has proto 0), so asyncio turns on TCP_NODELAY for each
    # connection; without it every response waits ~40 ms on Nagle's algorithm.
    from uvicorn.supervisors import Multiprocess

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.set_inheritable(True)
    Multiprocess(config, sockets=[sock]).run()
    return 0


async def collect_garbage(settings: Settings, older_than: float) -> int:
    """`tether gc`: delete old finished jobs, safe while services run."""
    try:
        tether = await Tether.open(settings, Plugins(make_plugin_manager()), worker=False)
    except (StoreConfigError, StoreUnavailable) as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    try:
        jobs, promises = await tether.collect_garbage(older_than)
    except TetherError as exc:
        print(f"tether: {exc.message}", file=sys.stderr)
        return 2
    finally:
        await tether.close()
    print(f"deleted {jobs} finished jobs and {promises} promises")
    return 0


async def preflight(settings: Settings, plugins: Plugins) -> str | None:
    """Open and close the store once, so that a damaged, locked or unwritable
    store stops `tether serve` with a clear message instead of a traceback; on
    the way, warn about waiting jobs whose backend is no longer installed."""
    try:
        tether = await Tether.open(settings, plugins, worker=False)
    except (StoreConfigError, StoreUnavailable) as exc:
        return str(exc)
    try:
        warn_orphans(await orphans(plugins, tether.jobs))
    except Exception as exc:  # only a warning is at stake; /health counts them again
        log.warning("counting jobs of missing backends failed: %s", type(exc).__name__)
    finally:
        await tether.close()
    return None


def startup_line(settings: Settings, plugins: Plugins, workers: int) -> str:
    """What this service runs, in one line: store (no credentials), public URL,
    backends with their plugins' versions, worker processes."""
    backends = ", ".join(f"{n} ({v})" for n, v in sorted(plugins.versions().items()))
    return (
        f"tether {version()}: store {describe(settings.store)}, public URL"
        f" {settings.base_url}, backends: {backends or 'none'}, {workers} worker(s)"
    )


if __name__ == "__main__":
    sys.exit(main())
