"""One small HTTP server for /metrics, /healthz and /readyz, in a daemon thread.

/healthz answers from the loop's heartbeat only (never touches Kafka), so a broker outage does
not get the pod restarted; /readyz says whether this instance is doing useful work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


@dataclass
class Health:
    """Written by the main loop, read by the HTTP thread (plain attribute writes are atomic)."""

    max_age_s: float = 30.0
    last_loop: float = field(default_factory=time.monotonic)
    model_loaded: bool = False
    assigned: int = 0
    kafka_ok: bool = True
    stopping: bool = False

    def beat(self) -> None:
        self.last_loop = time.monotonic()

    def healthz(self) -> tuple[bool, dict]:
        age = time.monotonic() - self.last_loop
        return age < self.max_age_s, {"loop_age_s": round(age, 3), "max_age_s": self.max_age_s}

    def readyz(self) -> tuple[bool, dict]:
        ready = self.model_loaded and self.assigned > 0 and self.kafka_ok and not self.stopping
        return ready, {"model_loaded": self.model_loaded, "assigned_partitions": self.assigned,
                       "kafka_ok": self.kafka_ok, "stopping": self.stopping}


class HttpServer:
    """`start()` serves in a daemon thread; `port` is the bound port (useful with port 0)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        handler = _handler(registry, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(registry: CollectorRegistry, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, body = health.healthz() if path == "/healthz" else health.readyz()
                body = {"status": "ok" if ok else "fail", **body}
                self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
            else:
                self._send(404, b'{"status": "not found"}', "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # scrapes every few seconds: keep quiet
            log.debug("http %s", format % args)

    return Handler
