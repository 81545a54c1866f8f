"""In-process fakes shared by the unit tests: a clock, and a consumer and producer with the
slice of kafka-python's interface the daemon uses (so `Monitor` runs without a broker).

The Kafka fakes model what the delivery logic depends on: per-partition logs and fetch
positions, a group's committed offsets, rebalances that call the listener the way
kafka-python does (revoke everything, then assign; a partition that stays keeps its fetch
position), and flushes or commits that fail on demand. Tests against a real broker use the
`broker` fixture instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError


class FakeClock:
    """A monotonic clock that moves only when told to (or when something sleeps on it)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclass(frozen=True)
class FakeRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


class FakeConsumer:
    """One group member on one topic. The test decides the assignment with `rebalance()`."""

    def __init__(self, topic: str, partitions: int, committed: dict[int, int] | None = None,
                 logs: dict[int, list[FakeRecord]] | None = None, max_poll_records: int = 5) -> None:
        self.topic = topic
        self.logs = logs if logs is not None else {p: [] for p in range(partitions)}
        self.group_committed: dict[int, int] = dict(committed or {})  # what the group coordinator holds
        self.commit_history: list[dict[int, int]] = []  # every successful commit, sync or async, in order
        self.max_poll_records = max_poll_records
        self.fail_commits = 0  # the next this many commit() calls raise
        self.listener: Any = None
        self.closed = False
        self.topics_present: set[str] | None = None  # None: every topic exists (partitions_for_topic)
        self.paused_partitions: set[int] = set()
        self.max_polled = 0  # the most records one poll returned
        self._positions: dict[int, int] = {}  # assigned partition -> next offset to fetch

    # -- the test's side -----------------------------------------------------------------------

    def append(self, partition: int, key: bytes | None, value: bytes) -> None:
        log = self.logs[partition]
        log.append(FakeRecord(self.topic, partition, len(log), key, value))

    def rebalance(self, partitions: Iterable[int]) -> None:
        """An eager rebalance: revoke everything, then assign `partitions` (new ones start at the
        group's committed offset, or 0)."""
        keep = set(partitions)
        if self.listener is not None:
            self.listener.on_partitions_revoked(self.assignment())
        self._positions = {p: self._positions.get(p, self.group_committed.get(p, 0)) for p in keep}
        if self.listener is not None:
            self.listener.on_partitions_assigned({TopicPartition(self.topic, p) for p in keep})

    def lag(self) -> int:
        """Records in the assigned partitions not fetched yet."""
        return sum(len(self.logs[p]) - position for p, position in self._positions.items())

    def lose(self) -> None:
        """Forced out of the group (e.g. a missed session timeout): the partitions are lost, not
        revoked; rejoining fetches from the committed offsets."""
        lost = self.assignment()
        if self.listener is not None:
            self.listener.on_partitions_lost(lost)
        self._positions = {}

    # -- kafka-python's interface --------------------------------------------------------------

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        assert topics == [self.topic]
        self.listener = listener

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(self.topic, p) for p in self._positions}

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[FakeRecord]]:
        out = {}
        budget = min(self.max_poll_records, max_records or self.max_poll_records)
        for partition, position in sorted(self._positions.items()):
            if partition in self.paused_partitions:
                continue
            records = self.logs[partition][position:position + budget]
            if records:
                out[TopicPartition(self.topic, partition)] = records
                self._positions[partition] = position + len(records)
                budget -= len(records)
        self.max_polled = max(self.max_polled, sum(map(len, out.values())))
        return out

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_partitions |= {tp.partition for tp in partitions}

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_partitions -= {tp.partition for tp in partitions}

    def paused(self) -> set[TopicPartition]:
        return {TopicPartition(self.topic, p) for p in self.paused_partitions}

    def partitions_for_topic(self, topic: str) -> set[int]:
        exists = self.topics_present is None or topic in self.topics_present
        return set(range(len(self.logs))) if exists else set()

    def seek(self, tp: TopicPartition, offset: int) -> None:
        assert tp.partition in self._positions, "seek on a partition that is not assigned"
        self._positions[tp.partition] = offset

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int | None = None) -> None:
        if self.fail_commits:
            self.fail_commits -= 1
            raise KafkaTimeoutError("commit failed (fake)")
        self._store(offsets)

    def commit_async(self, offsets: dict[TopicPartition, Any]) -> None:
        self._store(offsets)

    def _store(self, offsets: dict[TopicPartition, Any]) -> None:
        plain = {tp.partition: meta.offset for tp, meta in offsets.items()}
        self.commit_history.append(plain)
        self.group_committed.update(plain)

    def end_offsets(self, partitions: list[TopicPartition], timeout_ms: int | None = None) -> dict[TopicPartition, int]:
        return {tp: len(self.logs[tp.partition]) for tp in partitions}

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.logs[tp.partition])

    def close(self, autocommit: bool = False, timeout_ms: int | None = None) -> None:
        """Leaving the group revokes the partitions, as kafka-python's close() does."""
        if self.listener is not None and self._positions:
            self.listener.on_partitions_revoked(self.assignment())
        self._positions = {}
        self.closed = True


class FakeFuture:
    def __init__(self) -> None:
        self.exception: Exception | None = None
        self.done = False

    def succeeded(self) -> bool:
        return self.done and self.exception is None

    def failed(self) -> bool:
        return self.done and self.exception is not None


class FakeProducer:
    """Records are delivered (appear in `topics`) only when a flush succeeds; `fail_flushes`
    makes the next flushes time out, failing every record in flight (the Outbox re-sends them)."""

    def __init__(self) -> None:
        self.topics: dict[str, list[tuple[bytes | None, bytes]]] = {}
        self.partitions: dict[str, list[int | None]] = {}  # the partition each delivered record was sent to
        self.fail_flushes = 0
        self.closed = False
        self._in_flight: list[tuple[str, bytes | None, bytes, int | None, FakeFuture]] = []

    def send(self, topic: str, value: bytes, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> FakeFuture:
        future = FakeFuture()
        self._in_flight.append((topic, key, value, partition, future))
        return future

    def flush(self, timeout: float | None = None) -> None:
        failing = self.fail_flushes > 0
        if failing:
            self.fail_flushes -= 1
        for topic, key, value, partition, future in self._in_flight:
            future.done = True
            if failing:
                future.exception = KafkaTimeoutError("not acknowledged within the delivery timeout (fake)")
            else:
                self.topics.setdefault(topic, []).append((key, value))
                self.partitions.setdefault(topic, []).append(partition)
        self._in_flight.clear()

    def close(self, timeout: float | None = None) -> None:
        self.closed = True

    def delivered(self, topic: str) -> list[tuple[bytes | None, bytes]]:
        return self.topics.get(topic, [])


class FakeScorer:
    """Scores a window by its mean: windows of 1.0 samples are anomalous, of 0.0 normal."""

    def __init__(self, window_length: int, threshold: float = 0.5) -> None:
        self.window_length = window_length
        self.threshold = threshold
        self.model_version = "fake-model"
        self.device = "cpu"
        self.artefact = SimpleNamespace(metadata={})  # no "windowing": fixed windows under MONITOR_WINDOWING=auto

    def score(self, windows: np.ndarray) -> np.ndarray:
        errors: np.ndarray = np.asarray(windows, dtype=np.float64).reshape(len(windows), -1).mean(axis=1)
        return errors

    def is_anomalous(self, errors: np.ndarray) -> np.ndarray:
        return np.asarray(errors) > self.threshold

