"""`TetherProcess.start` (tests/process.py) trusts only the `tether serve` it
spawned: another process on its port (another test's service, on the port
`free_port` gave both while pytest-xdist runs two tests at once) answering
/health with 200 is not taken for it."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import process
from tests.conftest import free_port
from tests.process import AddressInUse, TetherProcess


class Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def another_service(port: int = 0) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 (on `port`; 0: any free one) answering
    every GET with 200; its port."""
    server = ThreadingHTTPServer(("127.0.0.1", port), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_another_service_holds_is_given_up_for_a_free_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    with another_service() as taken:
        given = [taken]  # what free_port gives first: the other service's port
        monkeypatch.setattr(process, "free_port", lambda: given.pop() if given else free_port())
        env = {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db"}
        service = TetherProcess(tmp_path, env, args=("--workers", workers))
        assert service.port == taken
        try:
            service.start()
            assert service.proc is not None and service.proc.poll() is None
            assert service.port != taken
            assert (
                service.env["TETHER_PUBLIC_URL"]
                == service.url
                == f"http://127.0.0.1:{service.port}"
            )
            with service.client() as client:  # tether's own answer, not the other's
                assert client.get("/health").json()["store"] == "sqlite"
            assert "already in use" not in service.log.read_text()  # the serving one's log
        finally:
            service.kill()


def test_a_port_the_test_chose_and_another_service_holds_is_an_error(tmp_path: Path) -> None:
    with another_service() as taken:
        service = TetherProcess(tmp_path, {"TETHER_STORE": "memory://"}, port=taken)
        with pytest.raises(AddressInUse, match=f"port {taken} is taken") as refused:
            service.start()
        assert f"port {taken} is kept" in str(refused.value)
        assert service.proc is not None and service.proc.poll() is not None
        assert "already in use" in service.log.read_text()


def test_a_restart_keeps_the_port_it_served_on_though_another_service_took_it(
    tmp_path: Path,
) -> None:
    """`start` again after a kill is a restart: the jobs' callback URLs name
    the port the service served on, so it is kept (as a port the test
    chose is), and one taken meanwhile is an error, not a move elsewhere
    that would send those callbacks to whoever took it."""
    env = {"TETHER_STORE": f"sqlite:///{tmp_path}/t.db"}
    service = TetherProcess(tmp_path, env).start()
    served = service.port
    service.kill()
    with another_service(served):
        with pytest.raises(AddressInUse, match=f"port {served} is taken"):
            service.start()
        assert (service.port, service.env["TETHER_PORT"]) == (served, str(served))
        assert service.proc is not None and service.proc.poll() is not None


def test_a_start_reads_the_socket_tables_only_once_something_answers_on_its_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of /proc/net/tcp and tcp6 walks the kernel's whole connection
    table (~13 ms of system time here, however few sockets it lists): made
    every 20 ms while the service starts, it took ~0.6 s of a core per start,
    ~100 starts a run, on two shared cores. A refused connection is what
    says nobody listens yet; the tables are read once somebody does."""
    looks: list[int] = []
    listening = process.listening

    def counted(pid: int, port: int) -> bool | None:
        looks.append(port)
        return listening(pid, port)

    monkeypatch.setattr(process, "listening", counted)
    service = TetherProcess(tmp_path, {"TETHER_STORE": "memory://"})
    try:
        service.start()
    finally:
        service.kill()
    assert 1 <= len(looks) <= 5, len(looks)  # once ours listens, at most a slow answer or two
