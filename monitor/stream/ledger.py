"""The delivery ledger: per partition, what was read, what is still needed, what may be
committed, and where to resume after a rebalance. No Kafka client here: the daemon hands the
`Checkpoint` its flush and commit functions.

Delivery is at-least-once. An offset may be committed only when every record below it is fully
processed and everything derived from it (alerts, scores, dead letters) is on the broker. Per
partition the safe offset is the lowest of

- the position: the next offset to read;
- the offsets still needed by *holders* of partial work: the windower (records whose samples
  are buffered or stashed) and the batcher (the first record of each pending window);
- the offsets of records whose outputs were sent but not yet acknowledged by a flush;

then moved lower by the *guard* (the alert policy) so that a replay never starts inside an
alert stretch (see monitor.stream.policy). A restart from a committed offset therefore re-reads
every record a window not yet published needs, and re-derives the same alert ids.

A revoked partition's state is dropped; the ledger remembers its safe offset as the resume
point, because kafka-python keeps the fetch position of a partition that comes straight back
and the samples buffered below it would otherwise never be windowed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

Offsets = dict[int, int]  # partition -> offset


class OffsetHolder(Protocol):
    """Partial work that still needs the records from some offset on (Windower, Batcher)."""

    def needed_offsets(self) -> Offsets: ...

    def drop_partitions(self, partitions: set[int]) -> None: ...


class ReplayGuard(Protocol):
    """Moves a commit below state a replay must re-derive (AlertPolicy)."""

    def safe_offset(self, partition: int, candidate: int) -> int: ...

    def committed(self, partition: int, offset: int) -> None: ...

    def drop_partitions(self, partitions: set[int]) -> None: ...


def _lower(into: Offsets, partition: int, offset: int) -> None:
    if offset < into.get(partition, offset + 1):
        into[partition] = offset


class Ledger:
    def __init__(self, holders: Sequence[OffsetHolder], guard: ReplayGuard | None = None) -> None:
        self.holders = list(holders)
        self.guard = guard
        self.positions: Offsets = {}  # next offset to read
        self.committed: Offsets = {}  # the last offset this instance committed (while it owns the partition)
        self._unflushed: Offsets = {}  # lowest offset whose outputs the producer has not acknowledged
        self._resume: Offsets = {}  # revoked partition -> where to re-read it if it comes back

    # -- what happened ---------------------------------------------------------------------------

    def read(self, partition: int, offset: int) -> None:
        """The record at `offset` was processed (its samples windowed, or it was dead-lettered)."""
        self.positions[partition] = offset + 1

    def sent(self, partition: int, offset: int) -> None:
        """Outputs derived from the record at `offset` (for a window: its first record) were
        handed to the producer; they hold the commit until a flush acknowledges them."""
        _lower(self._unflushed, partition, offset)

    def delivered(self) -> None:
        """A flush succeeded: everything sent so far is on the broker."""
        self._unflushed.clear()

    def mark_committed(self, offsets: Offsets) -> None:
        for partition, offset in offsets.items():
            self.committed[partition] = offset
            if self.guard is not None:
                self.guard.committed(partition, offset)

    # -- what may be committed -------------------------------------------------------------------

    def needed(self) -> Offsets:
        """Per partition, the lowest offset still needed by partial work or unacknowledged output."""
        needed = dict(self._unflushed)
        for holder in self.holders:
            for partition, offset in holder.needed_offsets().items():
                _lower(needed, partition, offset)
        return needed

    def safe_offsets(self) -> Offsets:
        """Per read partition, the offset a restart may resume from without losing a window or
        changing an alert id."""
        needed = self.needed()
        safe = {}
        for partition, position in self.positions.items():
            candidate = min(position, needed.get(partition, position))
            safe[partition] = candidate if self.guard is None else self.guard.safe_offset(partition, candidate)
        return safe

    def to_commit(self, partitions: Collection[int] | None = None) -> Offsets:
        """Safe offsets that move a partition's commit forward (commits only go up)."""
        return {p: o for p, o in self.safe_offsets().items()
                if o > self.committed.get(p, -1) and (partitions is None or p in partitions)}

    # -- rebalances ------------------------------------------------------------------------------

    def revoke(self, partitions: set[int]) -> Offsets:
        """Drop revoked partitions, remembering their safe offsets as resume points (returned)."""
        safe = self.safe_offsets()
        points = {p: safe[p] for p in partitions if p in safe}
        self._resume.update(points)
        self._forget(partitions)
        return points

    def lose(self, partitions: set[int]) -> None:
        """Forced out of the group: drop the state; the next owner replays from the last commit."""
        self._forget(partitions)

    def resume_points(self, assigned: Collection[int]) -> Offsets:
        """Where to seek the newly assigned partitions that this instance revoked before; the
        other remembered points are stale after the rebalance and are forgotten."""
        points = {p: o for p, o in self._resume.items() if p in assigned}
        self._resume.clear()
        return points

    def _forget(self, partitions: set[int]) -> None:
        for holder in self.holders:
            holder.drop_partitions(partitions)
        if self.guard is not None:
            self.guard.drop_partitions(partitions)
        for partition in partitions:
            self.positions.pop(partition, None)
            self.committed.pop(partition, None)


class Checkpoint:
    """Flush, then commit, in the order of quix-streams' `Checkpoint.commit`: offsets are
    committed only after a flush acknowledged everything produced, so a commit never covers an
    output that could still be lost. A failed flush commits nothing and is retried by the next
    call; commits are rate-limited to one per `interval_s` unless forced, and after a failed
    commit the next waits `retry_delay()`.

    `flush(timeout_s)` and `commit(offsets, timeout_s)` return False on failure (they report
    the error themselves); `on_delivered` runs after each successful flush."""

    def __init__(self, ledger: Ledger, flush: Callable[[float], bool], commit: Callable[[Offsets, float], bool], *,
                 interval_s: float = 1.0, retry_delay: Callable[[], float] = lambda: 1.0,
                 on_delivered: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self._flush, self._commit = flush, commit
        self.interval_s = interval_s
        self.retry_delay = retry_delay
        self.on_delivered = on_delivered
        self.clock = clock
        self.undelivered = False  # the last flush failed: nothing new should be consumed until it succeeds
        self._last_commit = -float("inf")
        self._retry_at = -float("inf")

    def flush(self, timeout_s: float) -> bool:
        """Deliver everything produced; True when the producer acknowledged all of it."""
        self.undelivered = not self._flush(timeout_s)
        if self.undelivered:
            return False
        self.ledger.delivered()
        self.on_delivered()
        return True

    def __call__(self, force: bool = False, timeout_s: float = 5.0) -> bool:
        """Flush; then, when due (or forced), commit the safe offsets. True when everything
        produced is delivered and the commit (if one was due) succeeded."""
        if not self.flush(timeout_s):
            return False
        now = self.clock()
        if not force and (now - self._last_commit < self.interval_s or now < self._retry_at):
            return True
        self._last_commit = now
        offsets = self.ledger.to_commit()
        if not offsets:
            return True
        if not self._commit(offsets, timeout_s):
            self._retry_at = now + self.retry_delay()
            return False
        self.ledger.mark_committed(offsets)
        return True
