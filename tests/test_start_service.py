"""`start_service` (tests/conftest.py) serves on a socket it binds itself: a
port picked first and bound later (by uvicorn) could be taken in between, by
another test's server while pytest-xdist runs two tests at once, and the
service then failed to start."""

from __future__ import annotations

import socket
from typing import Any

import pytest


async def test_a_port_taken_before_the_service_binds_is_not_its_port(
    start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another server takes the port first; it listens but never answers.
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        # Any port picked in advance is that one: in the fixture's own globals
        # (pytest imports tests/conftest.py as a `conftest`, apart from
        # `tests.conftest`, and other conftest.py files take that name too).
        monkeypatch.setitem(start_service.__globals__, "free_port", lambda: port)
        svc = await start_service()
        assert svc.settings.port != port
        assert svc.settings.base_url == f"http://127.0.0.1:{svc.settings.port}"
        assert (await svc.client.get("/health")).status_code == 200


async def test_a_port_given_is_bound_again_while_its_closed_connections_linger(
    start_service: Any,
) -> None:
    """`start_service(port=…)`: a restart on the port the jobs' callback URLs
    name. Bound with SO_REUSEADDR, as uvicorn binds it: the connections the
    last server on it (which set it too) closed first still hold the port
    (TIME_WAIT) a while."""
    with socket.create_server(("127.0.0.1", 0)) as last:  # SO_REUSEADDR, as uvicorn's
        port = last.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            served, _ = last.accept()
            served.close()  # the server's side closes first: it is the one in TIME_WAIT
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # still held, for a bind without SO_REUSEADDR
    svc = await start_service(port=port)
    assert (svc.settings.port, svc.settings.base_url) == (port, f"http://127.0.0.1:{port}")
    assert (await svc.client.get("/health")).status_code == 200


async def test_an_app_that_fails_to_start_raises_its_error_not_system_exit(
    start_service: Any, tmp_path: Any
) -> None:
    """A store that will not open fails the app's own start-up: the test sees
    that error, and its event loop goes on (uvicorn's `SystemExit` ended it)."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(Exception) as raised:
        await start_service(store=f"sqlite:///{tmp_path / 'a-file' / 'tether.db'}")
    assert type(raised.value).__name__ == "ServiceDidNotStart"
    assert "StoreConfigError: cannot use the embedded store at" in str(raised.value)
    svc = await start_service()  # the loop still serves another
    assert (await svc.client.get("/health")).status_code == 200
