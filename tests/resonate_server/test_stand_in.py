"""The stand-in Resonate server speaks what resonate-sdk's remote mode
expects: `Resonate(url=...)` alone (its own `HttpConnection` and
`SSEConnection`, nothing of Tether) runs a workflow on it, suspended on a
promise settled from outside, and a token is enforced."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import aiohttp
from resonate.context import Context
from resonate.resonate import Resonate
from resonate.types import Value

from tests.resonate_server.stand_in import StandIn


async def _shout(ctx: Context, text: str) -> str:
    return text.upper()


async def _wait(ctx: Context, text: str) -> dict[str, Any]:
    p = ctx.promise(timeout=timedelta(minutes=5))
    loud = await ctx.run(_shout, text)
    return {"loud": loud, "value": await p}


async def test_the_sdk_in_remote_mode_runs_a_workflow_on_the_stand_in(tmp_path):
    server = StandIn(tmp_path / "r.db").start()
    r = Resonate(url=server.url, group="g", pid="p1", env={})
    try:
        r.register(_wait)
        r.register(_shout)
        handle = r.run("w1", _wait, "hi")
        # the step ran and the workflow suspended on w1:1, its lease given back
        async with asyncio.timeout(10):
            while server.kinds["task.suspend"] == 0:
                await asyncio.sleep(0.02)
        await r.promises.resolve("w1:1", Value(data={"rows": 42}))
        async with asyncio.timeout(10):
            assert await handle.result() == {"loud": "HI", "value": {"rows": 42}}
        # the resume went through the message stream, as an `execute`
        assert server.delivered >= 1 and server.kinds["task.acquire"] >= 1
    finally:
        await r.stop()
        server.stop()


async def test_the_stand_in_refuses_a_request_or_stream_without_its_token(tmp_path):
    server = StandIn(tmp_path / "r.db", token="t0ken").start()
    body = '{"kind":"promise.get","head":{"corrId":"c","version":"v"},"data":{"id":"x"}}'
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/", data=body) as resp:
                assert resp.status == 401
                assert (await resp.json())["head"] == {"corrId": "c", "status": 401, "version": ""}
            async with http.get(server.url + "/poll/g/p") as resp:
                assert resp.status == 401
            ok = {"Authorization": "Bearer t0ken"}
            async with http.post(server.url + "/", data=body, headers=ok) as resp:
                assert (await resp.json())["head"]["status"] == 404
    finally:
        server.stop()
