"""The HTTP server of /metrics, /healthz and /readyz: slow, half-open and misbehaving clients cost
no threads and cannot keep the endpoints from answering others (probes and scrapes)."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from monitor.daemon.http import Health, HttpServer

HALF_OPEN = 300


@pytest.fixture
def health() -> Health:
    return Health(max_age_s=1e6, model_loaded=True, assigned=1)  # no loop here to beat it


@pytest.fixture
def server(health) -> Iterator[HttpServer]:
    registry = CollectorRegistry()
    Counter("ecg_test_requests", "a metric to find in /metrics", registry=registry).inc(3)
    server = HttpServer("127.0.0.1", 0, registry, health).start()
    yield server
    server.stop()


def get(server: HttpServer, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def connect(server: HttpServer, sends: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    if sends:
        sock.sendall(sends)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closes the connection (recv gives EOF or a reset) within 10 s."""
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_endpoints_answer(server, health):
    status, body, headers = get(server, "/metrics")
    assert status == 200 and "ecg_test_requests_total 3.0" in body and headers["Content-Type"].startswith("text/plain")
    status, body, _ = get(server, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert get(server, "/readyz?verbose=1")[0] == 200
    health.assigned = 0
    status, body, _ = get(server, "/readyz")
    assert status == 503 and json.loads(body)["assigned_partitions"] == 0
    assert get(server, "/nothing-here")[0] == 404
    assert get(server, "/healthz", method="HEAD")[:2] == (200, "")
    assert get(server, "/healthz", method="POST")[0] in (405, 501)


def test_300_half_open_connections_hold_no_threads_and_healthz_still_answers(server):
    before = threading.active_count()
    idle = [connect(server) for _ in range(HALF_OPEN // 2)]
    # slowloris: a request started and never finished
    slow = [connect(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n") for _ in range(HALF_OPEN // 2)]
    try:
        # Connections are accepted in order: once this answers, the server has seen all the others.
        status, body, _ = get(server, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert get(server, "/metrics")[0] == 200
        assert threading.active_count() - before <= 2
    finally:
        for sock in idle + slow:
            sock.close()


def test_a_client_that_never_finishes_its_request_is_disconnected(health):
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), health, timeout_s=0.2).start()
    try:
        idle, slow = connect(server), connect(server, b"GET /healthz HTTP/1.1\r\n")
        assert closed_by_server(idle) and closed_by_server(slow)
        assert get(server, "/healthz")[0] == 200
    finally:
        server.stop()


def test_an_oversized_or_malformed_request_is_refused(server):
    huge = connect(server, b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n")
    assert closed_by_server(huge)
    garbage = connect(server, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert garbage.recv(100).startswith(b"HTTP/1.1 400")
    assert get(server, "/healthz")[0] == 200


def test_stop_closes_the_port_and_open_connections(health):
    server = HttpServer("127.0.0.1", 0, CollectorRegistry(), health).start()
    idle = connect(server)
    assert get(server, "/healthz")[0] == 200  # served after `idle` was accepted
    server.stop()
    assert closed_by_server(idle)
    with pytest.raises(OSError):
        connect(server)
    assert not any(thread.name == "http" for thread in threading.enumerate())
