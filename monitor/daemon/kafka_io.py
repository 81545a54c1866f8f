"""Kafka clients built from the settings, the rebalance listener and the outbox.

Plain kafka-python against any Kafka-protocol broker (Apache Kafka in production; the tests use
Tansu). Nothing here creates topics: operators own them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from monitor.daemon.settings import MonitorSettings

log = logging.getLogger(__name__)

#: send() blocks at most this long when topic metadata is unknown (broker down), so the
#: main loop keeps turning and /healthz stays truthful.
PRODUCER_MAX_BLOCK_MS = 5_000
#: A client that cannot reach any bootstrap server gives up this soon (and is retried with
#: backoff), so start-up against a down broker keeps the heartbeat behind /healthz fresh.
BOOTSTRAP_TIMEOUT_MS = 5_000
#: Longest a fetch waits at the broker for data (the latency budget is 250 ms end to end).
FETCH_MAX_WAIT_MS = 50


def make_consumer(settings: MonitorSettings, **overrides: Any) -> KafkaConsumer:
    """A group member with manual commits; subscribe it with a RebalanceListener."""
    config: dict[str, Any] = {
        **settings.kafka_common(),
        "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
        "group_id": settings.group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": settings.auto_offset_reset,
        "max_poll_records": settings.max_poll_records,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": max(100, settings.session_timeout_ms // 3),
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        # The broker answers a fetch as soon as there is data; this only bounds an idle fetch.
        # Kept short because some Kafka-protocol brokers hold every fetch this long.
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
        # `crc32c` (a dependency) makes the check cheap; kafka-python's pure-Python fallback costs
        # more CPU than scoring, so where the C package is missing, rely on the broker (which
        # verifies CRCs on produce), TCP, and the JSON validation every record goes through.
        "check_crcs": importlib.util.find_spec("crc32c") is not None,
    }
    config.update(overrides)
    return KafkaConsumer(**config)


def make_producer(settings: MonitorSettings, **overrides: Any) -> KafkaProducer:
    """acks=all and unbounded retries inside the delivery timeout; the Outbox re-sends past it."""
    config: dict[str, Any] = {
        **settings.kafka_common(),
        "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
        "acks": "all",
        "linger_ms": 5,
        "max_block_ms": PRODUCER_MAX_BLOCK_MS,
        # Not idempotent: a broker that lost the producer's id (a restarted in-memory broker, a
        # restored cluster) answers the epoch bump with an error kafka-python treats as fatal, and
        # the producer never sends again. Duplicates are fine (delivery is at-least-once, ids are
        # deterministic); one request in flight keeps each partition's records in order.
        "enable_idempotence": False,
        "max_in_flight_requests_per_connection": 1,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def commit_offsets(consumer: KafkaConsumer, topic: str, offsets: dict[int, int], timeout_s: float) -> None:
    """Commit {partition: next offset to read} of `topic`, blocking; raises KafkaError on failure."""
    consumer.commit(_offsets(topic, offsets), timeout_ms=int(timeout_s * 1000))


def commit_offsets_async(consumer: KafkaConsumer, topic: str, offsets: dict[int, int]) -> None:
    """The same without waiting. Rebalance callbacks run on kafka-python's IO thread, where a
    blocking commit raises RuntimeError; if an async commit is lost the next owner re-reads more."""
    consumer.commit_async(_offsets(topic, offsets))


def _offsets(topic: str, offsets: dict[int, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python has no type hints
    """Forwards kafka-python's callbacks (they run inside poll()) to the daemon, as sets of partitions."""

    def __init__(self, on_revoked: Callable[[set[TopicPartition]], None],
                 on_assigned: Callable[[set[TopicPartition]], None],
                 on_lost: Callable[[set[TopicPartition]], None]) -> None:
        self._on_revoked, self._on_assigned, self._on_lost = on_revoked, on_assigned, on_lost

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._on_assigned(set(assigned))

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        self._on_lost(set(lost))


@dataclass(slots=True)
class _Outgoing:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None
    future: Any = None  # kafka-python FutureRecordMetadata, None until sent


class Outbox:
    """Records produced since the last successful flush. Offsets are committed only when it is
    empty, so every alert, score and dead letter derived from a committed record is on the broker.
    A record whose delivery failed (e.g. the broker was down past the delivery timeout) is re-sent."""

    def __init__(self, producer: KafkaProducer, on_error: Callable[[str, Exception], None]) -> None:
        self.producer = producer
        self.on_error = on_error
        self._items: list[_Outgoing] = []

    def __len__(self) -> int:
        return len(self._items)

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        item = _Outgoing(topic, key, value, headers)
        self._items.append(item)
        self._send(item)

    def _send(self, item: _Outgoing) -> bool:
        try:
            item.future = self.producer.send(item.topic, value=item.value, key=item.key, headers=item.headers)
            return True
        except KafkaError as exc:  # metadata unavailable within max_block_ms, buffer full, ...
            item.future = None
            self.on_error("send", exc)
            return False

    def flush(self, timeout_s: float) -> bool:
        """Deliver everything; True when all records are acknowledged and the outbox is empty."""
        if not self._items:
            return True
        for item in self._items:
            if (item.future is None or item.future.failed()) and not self._send(item):
                return False
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            self.on_error("flush", exc)
            return False
        failed = [item for item in self._items if not item.future.succeeded()]
        if failed:
            self.on_error("send", failed[0].future.exception or KafkaError("not delivered"))
            self._items = failed
            return False
        self._items.clear()
        return True
