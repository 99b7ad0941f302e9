"""The Litestar application factory."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pluggy
from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from api.controllers import CallbackController, JobController, health
from api.errors import EXCEPTION_HANDLERS
from core.plugins import Plugins, make_plugin_manager
from core.service import Tether
from core.settings import Settings, get_settings
from core.store import open_store

QUIET_LOGGERS = ("resonate", "httpx", "httpcore")


def create_app(
    settings: Settings | None = None, pm: pluggy.PluginManager | None = None
) -> Litestar:
    """The app; the store opens and the worker starts in its lifespan."""
    settings = settings or get_settings()
    plugins = Plugins(pm or make_plugin_manager())
    logging.getLogger("tether").setLevel(settings.log_level.upper())
    for noisy in QUIET_LOGGERS:  # per-request chatter; URLs may carry caller secrets
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pid = uuid.uuid4().hex
        app.state.tether = Tether(settings, plugins, await open_store(settings, pid), pid)
        await app.state.tether.start()
        try:
            yield
        finally:
            await app.state.tether.stop()

    return Litestar(
        route_handlers=[JobController, CallbackController, health],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Tether", version="1.0.0"),
        debug=False,
        logging_config=None,  # the process's logging (`tether serve` sets it up) as it is
    )


def app_from_env() -> Any:
    """ASGI entry point for servers given an import string (`api.app:app_from_env`)."""
    return create_app()
