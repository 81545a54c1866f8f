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
from kafka.errors import (InvalidRecordError, InvalidTopicError, KafkaError, MessageSizeTooLargeError,
                          RecordListTooLargeError, TopicAuthorizationFailedError)
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
#: Produce errors that retrying the same record cannot cure, as a metric's reason label.
UNPRODUCIBLE: dict[type[KafkaError], str] = {
    MessageSizeTooLargeError: "too_large", RecordListTooLargeError: "too_large", InvalidRecordError: "invalid_record",
    TopicAuthorizationFailedError: "unauthorized", InvalidTopicError: "invalid_topic"}
UNPRODUCIBLE_REASONS = ("too_large", "invalid_record", "unauthorized", "invalid_topic", "missing_topic")


def unproducible_reason(exc: BaseException | None) -> str | None:
    """The reason a produce can never succeed, or None for an error worth retrying."""
    return next((reason for kind, reason in UNPRODUCIBLE.items() if isinstance(exc, kind)), None)


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


class RebalanceListener(ConsumerRebalanceListener):  # kafka-python has no type hints
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
    value: bytes | None  # None: a tombstone
    headers: list[tuple[str, bytes]] | None
    partition: int | None = None  # None: the producer's partitioner (by key)
    future: Any = None  # kafka-python FutureRecordMetadata, None until sent
    reported: bool = False  # reported as unproducible (once)
    dropped: bool = False  # unproducible on a droppable topic: given up


class Outbox:
    """Records produced since the last successful flush. Offsets are committed only when it is
    empty, so every alert, score and dead letter derived from a committed record is on the broker.
    A record whose delivery failed (e.g. the broker was down past the delivery timeout) is re-sent.

    A record that can never be produced (too large, topic unauthorised or invalid) is reported
    once to `on_unproducible(topic, reason, error)`; on a `droppable` topic (the dead letters) it
    is then dropped, on the others (alerts, scores) it stays and is retried, holding the commit.
    Records for a topic in `missing` are not handed to the producer at all (its send() would block
    max_block_ms waiting for metadata); they wait until the topic exists."""

    def __init__(self, producer: KafkaProducer, on_error: Callable[[str, Exception], None], *,
                 droppable: Iterable[str] = (),
                 on_unproducible: Callable[[str, str, BaseException], None] = lambda *_: None) -> None:
        self.producer = producer
        self.on_error = on_error
        self.droppable = frozenset(droppable)
        self.on_unproducible = on_unproducible
        self.missing: set[str] = set()  # output topics known not to exist (the daemon checks)
        self._items: list[_Outgoing] = []

    def __len__(self) -> int:
        return len(self._items)

    def send(self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None = None,
             partition: int | None = None) -> None:
        item = _Outgoing(topic, key, value, headers, partition)
        self._items.append(item)
        self._send(item)

    def _send(self, item: _Outgoing) -> bool:
        if item.topic in self.missing:
            item.future = None
            return False
        try:
            item.future = self.producer.send(item.topic, value=item.value, key=item.key, headers=item.headers,
                                             partition=item.partition)
            return True
        except KafkaError as exc:  # metadata unavailable within max_block_ms, buffer full, too large, ...
            item.future = None
            if self._unproducible(item, exc):
                return True  # dropped: nothing to wait for
            if not item.reported:  # an unproducible one was reported once; no warning per retry
                self.on_error("send", exc)
            return False

    def _unproducible(self, item: _Outgoing, exc: BaseException | None) -> bool:
        """Report a record that can never be produced; True if it is dropped (a droppable topic)."""
        reason = unproducible_reason(exc)
        if reason is None:
            return False
        if not item.reported:
            item.reported = True
            self.on_unproducible(item.topic, reason, exc or KafkaError(reason))
        if item.topic in self.droppable:
            item.dropped = True
            return True
        return False

    def flush(self, timeout_s: float) -> bool:
        """Deliver everything; True when all records are acknowledged and the outbox is empty."""
        self._items = [item for item in self._items if not item.dropped]
        if not self._items:
            return True
        for item in self._items:
            if (item.future is None or item.future.failed()) and not self._send(item):
                return False
        self._items = [item for item in self._items if not item.dropped]
        try:
            self.producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            self.on_error("flush", exc)
            return False
        failed = [item for item in self._items
                  if not item.future.succeeded() and not self._unproducible_failure(item)]
        if failed:
            retried = [item for item in failed if not item.reported]
            if retried:
                self.on_error("send", retried[0].future.exception or KafkaError("not delivered"))
            self._items = failed
            return False
        self._items.clear()
        return True

    def _unproducible_failure(self, item: _Outgoing) -> bool:
        """A delivery that failed for good on a droppable topic: dropped (True). Others are re-sent."""
        return bool(item.future.failed()) and self._unproducible(item, item.future.exception)
