"""The `tether` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from core.errors import StoreUnavailable
from core.settings import Settings
from core.store import StoreConfigError, open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tether", description="Run jobs on external systems and wait for them durably."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP API and a worker")
    serve.add_argument("--host", help="interface to listen on (TETHER_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (TETHER_PORT, default 8000)")
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the store (default 1)"
    )
    args = parser.parse_args(argv)

    if args.host:
        os.environ["TETHER_HOST"] = args.host
    if args.port:
        os.environ["TETHER_PORT"] = str(args.port)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    problem = asyncio.run(preflight(settings))
    if problem:
        print(f"tether: {problem}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(
        "api.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


async def preflight(settings: Settings) -> str | None:
    """Open and close the store once, so that a damaged, locked or unwritable
    store stops `tether serve` with a clear message instead of a traceback."""
    try:
        store = await open_store(settings, "preflight")
    except (StoreConfigError, StoreUnavailable) as exc:
        return str(exc)
    await store.close()
    return None


if __name__ == "__main__":
    sys.exit(main())
