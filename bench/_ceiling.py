"""The machine's ceiling: a plain Litestar app with one constant endpoint,
served exactly as `tether serve` serves Tether (uvicorn, same options).

    python bench/_ceiling.py --port N [--workers W]

`GET /c` answers `{"status": "ok"}`; `GET /health` the same (for readiness).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from litestar import Litestar, get

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from api.http import SERVER_OPTIONS

CONSTANT = {"status": "ok"}


@get("/c")
async def constant() -> dict[str, Any]:
    return CONSTANT


@get("/health")
async def health() -> dict[str, Any]:
    return CONSTANT


def create_app() -> Litestar:
    return Litestar(route_handlers=[constant, health], debug=False)


def serve(app: str, before: Callable[[argparse.Namespace], None] | None = None) -> None:
    """Serve `app` (``module:factory`` in bench/) on ``--port`` with
    ``--workers``, with the options of api.cli.main (tether serve), so the only
    difference from Tether is the app. `before` runs with the arguments first."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if before is not None:
        before(args)
    uvicorn.run(
        app,
        factory=True,
        app_dir=str(Path(__file__).resolve().parent),
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
        **SERVER_OPTIONS,
    )


def main() -> None:
    serve("_ceiling:create_app")


if __name__ == "__main__":
    main()
