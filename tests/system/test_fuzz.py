"""Property-based fuzzing of the whole HTTP API from its own OpenAPI document,
with every schemathesis check and every phase, the stateful one included:
`st run .../schema/openapi.json --checks all`, as an operator would run it,
bounded so that it takes seconds.

What the checks mean here: no 5xx; no answer the document does not declare;
every schema-valid request accepted and every schema-violating one refused
(the document states the bounds, patterns, enums and
`additionalProperties: false` the service enforces); 405 answers carry
`Allow`; routes behind a token refuse requests without it. `schemathesis.toml`
holds no exception: every backend states its params rules in its schema."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from api.app import create_app
from core.plugins import make_plugin_manager
from tests.conftest import test_settings, wait_until

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "schemathesis.toml"
MAX_EXAMPLES = {"": 20, "fuzz-api-token": 10}
"""Per operation and phase, without a token and with one; with the stateful
phase the first run takes ~15 s alone. With a token the point is the routes'
refusals without it (`ignored_auth`), which fewer examples reach as well:
the suite's longest test (55 s in a loaded run) at 30. Without one, 20 (18-37 s
at 30, the suite near its 10 minutes)."""


@pytest.fixture(scope="module", params=["", "fuzz-api-token"], ids=["open", "api-token"])
def live_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    # one trigger try: the known job fails at once, and logs nothing later (from this
    # thread, into a test capture that may be closed by then)
    config = test_settings(store="memory://", api_token=request.param, trigger_attempts=1)
    app = create_app(config, make_plugin_manager(entry_points=False))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=20)
    # a job that exists, so generated requests also reach the paths past "404"
    httpx.post(
        f"{config.base_url}/jobs",
        json={"id": "known", "backend": "http_webhook", "params": {"url": "http://127.0.0.1:9/x"}},
        headers={"authorization": f"Bearer {request.param}"} if request.param else {},
        trust_env=False,
    )
    yield config.base_url, request.param
    server.should_exit = True
    thread.join(10)


def test_the_api_keeps_its_own_contract(live_url: tuple[str, str], tmp_path: Path) -> None:
    url, token = live_url
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        f"{url}/schema/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES[token]),
        "--seed",
        "12",
        "--generation-deterministic",
        "--max-failures",
        "20",
    ]
    if token:  # with it for /jobs*; `ignored_auth` still sends requests without
        command += ["--header", f"Authorization: Bearer {token}"]
    done = subprocess.run(  # in a scratch directory: schemathesis keeps a cache there
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "Stateful" in report and "Coverage" in report and "Fuzzing" in report
