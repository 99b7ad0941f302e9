"""A complete Tether plugin: the `echo` backend (the README shows this file)."""

from typing import Any

import msgspec

from core.plugin import Backend, Job, Outcome, Trigger, hookimpl


class EchoParams(msgspec.Struct, forbid_unknown_fields=True):
    message: str


class Echo(Backend):
    name = "echo"
    params_type = EchoParams

    async def trigger(self, trigger: Trigger) -> dict[str, str]:
        # A real backend starts the external job here and hands it
        # trigger.callback_url; echo only remembers what it was asked.
        return {"echoed": trigger.params.message}

    def parse_callback(self, job: Job, body: Any) -> Outcome | None:
        # Echo's native callback body: {"echo_done": <result>}
        if isinstance(body, dict) and "echo_done" in body:
            return Outcome(status="succeeded", result=body["echo_done"])
        return None


@hookimpl
def tether_backends() -> list[Backend]:
    return [Echo()]
