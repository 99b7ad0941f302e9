"""The Litestar application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pluggy
from litestar import Litestar
from litestar.di import Provide

import api.server
from api.access import Observer, log_request, observed
from api.auth import Sessions, api_token_guard, guarding, known_hosts_guard
from api.controllers import (
    BackendController,
    CallbackController,
    JobController,
    QueryRules,
    health,
    health_head,
    health_options,
    query_rules,
    strict_query,
)
from api.errors import EXCEPTION_HANDLERS
from api.metrics import install as install_metrics
from api.metrics import metrics, observe_request
from api.openapi import openapi_config
from api.routers import AppRouter
from api.ui import TEMPLATES, ui_router
from core.errors import StoreUnavailable
from core.plugins import Plugins, make_plugin_manager
from core.service import Tether
from core.settings import Settings, get_settings, listed

QUIET_LOGGERS = ("resonate", "httpx", "httpcore")


def create_app(
    settings: Settings | None = None, pm: pluggy.PluginManager | None = None
) -> Litestar:
    """The app; the service opens (store, worker, watchdog) in its lifespan and
    reaches the handlers through dependency injection as `tether`."""
    settings = settings or get_settings()
    problem = token_problem(settings)
    if problem:
        raise ValueError(problem)
    plugins = Plugins(pm or make_plugin_manager())
    logging.getLogger("tether").setLevel(settings.log_level.upper())
    for noisy in QUIET_LOGGERS:  # per-request chatter; URLs may carry caller secrets
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    opened: list[Tether] = []

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        try:
            opened.append(await Tether.open(settings, plugins))
        except StoreUnavailable:  # down for now: a supervisor tries again (api.server)
            api.server.store_down_at_start = True
            raise
        try:
            yield
        finally:
            await opened.pop().close()

    def provide_tether() -> Tether:
        return opened[0]

    sessions = Sessions(settings, lambda: opened[0].store.callback_secret)
    rules: QueryRules = {}  # filled below, once the app has its routes
    strict = strict_query(rules)
    # Behind the tokens: an API token for everything, a read token where a
    # route declares `opt=READ` (api.auth.READ). Callbacks carry their
    # own token; /health is for probes. The guards run as one route
    # middleware each (`guarding`: no copy of the handler per guard).
    guarded = AppRouter(
        "/",
        route_handlers=[JobController, metrics],
        middleware=[guarding(api_token_guard(settings, sessions), strict)],
    )
    others = AppRouter(
        "/",
        # `health_options` before `health`: registered after it, Litestar's own
        # OPTIONS handler (204, whatever the store does) would win
        route_handlers=[CallbackController, health_options, health, health_head],
        middleware=[guarding(strict)],
    )
    # A backend's notifications: its plugin authenticates them, and reads
    # every query parameter (no strict guard).
    notices = AppRouter("/", route_handlers=[BackendController])
    known_host = known_hosts_guard(settings)  # without tokens: DNS rebinding
    app = Litestar(
        route_handlers=[guarded, others, notices, ui_router(sessions)],
        middleware=[guarding(known_host)] if known_host else [],
        dependencies={"tether": Provide(provide_tether, sync_to_thread=False)},
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=openapi_config(settings, plugins),
        template_config=TEMPLATES,
        debug=False,
        logging_config=None,  # the process's logging (`tether serve` sets it up) as it is
    )
    rules.update(query_rules(app.routes))
    install_metrics(app, plugins.backends)
    observers: list[Observer] = [observe_request]
    if settings.access_log:
        observers.append(log_request)
    app.asgi_handler = observed(app.asgi_handler, observers)
    return app


def token_problem(settings: Settings) -> str | None:
    """Why the API and read tokens cannot be served as set, or None. Names
    the settings, never their values: `tether serve` can refuse before it
    starts workers, and `create_app` refuses, so no entry point serves them."""
    api, read = set(listed(settings.api_token)), set(listed(settings.read_token))
    for name, value, tokens in (
        ("TETHER_API_TOKEN", settings.api_token, api),
        ("TETHER_READ_TOKEN", settings.read_token, read),
    ):
        if value and not tokens:  # `${A},${B}` with both empty, `"${A} "`
            return (
                f"{name} is set but lists no token (only commas and spaces): is a variable"
                " it was made of empty? Without an API token every route is open to anyone;"
                f" give it a token, or unset {name}"
            )
    if read and not api:
        return (
            "TETHER_READ_TOKEN is set but TETHER_API_TOKEN is not: without an API token"
            " every route is open to anyone, so a read-only token would restrict nothing;"
            " set TETHER_API_TOKEN too, or unset TETHER_READ_TOKEN"
        )
    if api & read:
        return (
            "a token is listed in both TETHER_API_TOKEN and TETHER_READ_TOKEN; a read"
            " token must differ from every API token (it would be allowed to write)"
        )
    return None


def app_from_env() -> Any:
    """ASGI entry point for servers given an import string (`api.app:app_from_env`)."""
    return create_app()
