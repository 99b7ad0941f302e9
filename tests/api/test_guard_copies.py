"""The API's guards (`api.auth.guarding`) run as route middleware: every
check Litestar's `guards=` made, without its copy of the route handler for
each guard of each request (`BaseRouteHandler.authorize_connection`)."""

from __future__ import annotations

import copy
from typing import Any

import litestar.handlers.base

AUTH = {"authorization": "Bearer tok-api"}


async def test_the_api_checks_tokens_queries_and_bodies_without_copying_its_handlers(
    start_service, monkeypatch
):
    copies: list[Any] = []

    def counted(thing: Any) -> Any:
        copies.append(thing)
        return copy.copy(thing)

    monkeypatch.setattr(litestar.handlers.base, "copy", counted)
    svc = await start_service(api_token="tok-api", read_token="tok-read")
    client = svc.client
    assert (await client.get("/jobs/nope", headers=AUTH)).status_code == 404
    assert (await client.get("/jobs/nope")).status_code == 401  # the token guard
    read = {"authorization": "Bearer tok-read"}
    assert (await client.get("/jobs/nope", headers=read)).status_code == 404
    assert (await client.post("/jobs", json={}, headers=read)).status_code == 403
    unknown = await client.get("/jobs?colour=red", headers=AUTH)  # the strict query guard
    assert unknown.status_code == 400 and unknown.json()["error"]["details"]["field"] == "colour"
    text = {**AUTH, "content-type": "text/plain"}  # the JSON body guard
    assert (await client.post("/jobs", content=b"{}", headers=text)).status_code == 415
    assert (await client.post("/jobs", json={}, headers=AUTH)).status_code == 400
    twice = await client.post("/callbacks/p:1?token=a&token=b", json={})
    assert twice.status_code == 400  # the strict query guard, on the callback router
    assert (await client.get("/health")).status_code == 200
    assert copies == []
