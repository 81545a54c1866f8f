"""One small HTTP server for /metrics, /healthz and /readyz: one asyncio event loop in one daemon thread.

/healthz answers from the loop's heartbeat only (never touches Kafka), so a broker outage does
not get the pod restarted; /readyz says whether this instance is doing useful work.

However many clients connect, and however slowly, the server uses that one thread: a client has
`timeout_s` to send its request and take the answer, at most `max_connections` are open (a new
one closes the oldest, so a flood of half-open connections cannot lock probes and scrapes out),
and a request head is at most MAX_REQUEST_BYTES. One request per connection (Connection: close).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: Connections open at once; the next one closes the oldest.
MAX_CONNECTIONS = 64
#: Seconds a client has to send its request head, and again to take the response.
REQUEST_TIMEOUT_S = 5.0
#: Longest request line plus headers; longer requests are dropped.
MAX_REQUEST_BYTES = 8192

Response = tuple[int, bytes, str]  # status, body, content type
@dataclass
class Health:
    """Written by the main loop, read by the HTTP thread (plain attribute writes are atomic)."""

    max_age_s: float = 30.0
    last_loop: float = field(default_factory=time.monotonic)
    model_loaded: bool = False
    assigned: int = 0
    kafka_ok: bool = True
    stopping: bool = False
    # Liveness also means progress: a loop that turns but never commits while it has work (a
    # poison output, a stuck flush) fails /healthz after progress_timeout_s, so it gets restarted.
    progress_timeout_s: float = float("inf")
    last_progress: float = field(default_factory=time.monotonic)
    has_work: bool = False  # lag, pending windows or undelivered output
    missing_topics: tuple[str, ...] = ()  # output topics that do not exist: not ready
    clock: Callable[[], float] = time.monotonic  # tests drive it in fake time

    def beat(self) -> None:
        self.last_loop = self.clock()

    def progressed(self) -> None:
        """A commit advanced, or records were consumed with their output delivered, or there is nothing to do."""
        self.last_progress = self.clock()

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        now = self.clock()
        age, stalled = now - self.last_loop, now - self.last_progress
        stuck = self.has_work and stalled >= self.progress_timeout_s
        return age < self.max_age_s and not stuck, {"loop_age_s": round(age, 3), "max_age_s": self.max_age_s,
                                                    "no_progress_s": round(stalled, 3) if self.has_work else 0.0}

    def readyz(self) -> tuple[bool, dict[str, Any]]:
        ready = self.model_loaded and self.assigned > 0 and self.kafka_ok and not self.stopping \
            and not self.missing_topics
        return ready, {"model_loaded": self.model_loaded, "assigned_partitions": self.assigned,
                       "kafka_ok": self.kafka_ok, "stopping": self.stopping,
                       "missing_topics": list(self.missing_topics)}


class HttpServer:
    """`start()` serves in a daemon thread; `port` is the bound port (useful with port 0)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health, *,
                 max_connections: int = MAX_CONNECTIONS, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self._routes = _routes(registry, health)
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._open: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}  # insertion order: oldest first
        self._closing = False
        self._loop = asyncio.new_event_loop()
        # Bound here, so a port in use fails in the caller, before start().
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_BYTES, backlog=128))
        self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
        self.port: int = self._server.sockets[0].getsockname()[1]

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port and every open connection; idempotent."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        else:
            self._loop.run_until_complete(self._close())
        self._loop.close()

    async def _close(self) -> None:
        self._closing = True
        self._server.close()
        await asyncio.sleep(0)  # connections accepted but not yet served register (and are refused)
        tasks = list(self._open.values())
        for writer in list(self._open):
            writer.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        if len(self._open) >= self._max_connections:
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abort()
        task = asyncio.current_task()
        assert task is not None
        self._open[writer] = task
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout_s)
            writer.write(self._respond(head))
            await asyncio.wait_for(writer.drain(), self._timeout_s)
            writer.close()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()  # slow, half-open, oversized or gone: drop it, buffers and all
        finally:
            self._open.pop(writer, None)

    def _respond(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _encode(400, b'{"status": "bad request"}', "application/json")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _encode(405, b'{"status": "method not allowed"}', "application/json")
        route = self._routes.get(target.split("?", 1)[0])
        try:
            status, body, content_type = route() if route else (404, b'{"status": "not found"}', "application/json")
        except Exception:  # noqa: BLE001 - a failing collector must not take the other endpoints down
            log.exception("http: %s failed", target[:100])
            status, body, content_type = 500, b'{"status": "internal error"}', "application/json"
        return _encode(status, body, content_type, head_only=method == "HEAD")


def _routes(registry: CollectorRegistry, health: Health) -> dict[str, Callable[[], Response]]:
    def probe(check: Callable[[], tuple[bool, dict[str, Any]]]) -> Callable[[], Response]:
        def answer() -> Response:
            ok, body = check()
            return 200 if ok else 503, json.dumps({"status": "ok" if ok else "fail", **body}).encode(), \
                "application/json"
        return answer

    return {"/metrics": lambda: (200, generate_latest(registry), CONTENT_TYPE_LATEST),
            "/healthz": probe(health.healthz), "/readyz": probe(health.readyz)}


def _encode(status: int, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)
