"""Routers made for the one app they are registered in."""

from __future__ import annotations

from typing import Any

from litestar import Router


class AppRouter(Router):
    """A router made for the one app it is registered in. Litestar
    deep-copies each router it registers, so that one router may serve
    several apps: for Tether's routers, made anew by each `create_app`, the
    copies of every handler were half the time an app took to build (a
    test starts a service hundreds of times; each worker builds one)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> AppRouter:
        return self
