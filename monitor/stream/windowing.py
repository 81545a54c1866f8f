"""Per-sensor window buffers: input records in, complete windows out.

Windows are aligned to absolute seq: window k covers samples [k*hop, k*hop + L). So the same
windows (and the same alert ids) come out whatever the record boundaries are, and again after
a restart or a redelivery. Per sensor (keyed by (partition, sensor_id), because a sensor's
state follows its partition):

- a record that starts at the expected seq is appended; one record may complete many windows;
- a record re-read at an offset the sensor already consumed (Kafka's order is the truth for a
  partition) is a redelivery: dropped and counted as duplicate samples, unless it continues the
  stream (the partition's offsets started again: a broker that lost its log, a re-created topic);
- a record that starts below the expected seq is a duplicate only if its samples really were
  consumed: it repeats one of the sensor's recent records (seq, length and CRC-32 of its
  samples) or its overlap with the last 2L consumed samples is equal. Anything else is a
  *reset* (a device that rebooted starts again at seq 0): a new segment starts at that record;
- a record more than `max_seq_gap` samples ahead is a *jump*: a new segment starts at once, and
  the segment it left is parked: a later record that continues it exactly (seq = its next seq)
  resumes it, partial window and all. So one bogus seq such as 10**18 costs no window (before, it
  blinded the sensor for good); any other record below is a reset as above;
- a record that starts ahead of the expected seq (within `max_seq_gap`) waits in a small reorder
  stash until the hole is filled (then it is counted as reordered); when the stash is full (in
  records or in bytes) or the hole is older than `reorder_timeout_s`, the hole is a gap: the
  buffer resets and the next window starts at the next aligned position with full data. A record
  that arrives later inside that hole is *late* and dropped (counted as duplicate samples).

A new segment restarts the sensor's buffer at the record (windows stay aligned to absolute seq).

For at-least-once commits each sensor knows the offset of the earliest record it still needs
(buffered samples and stashed records), and each window carries the earliest offset it needs.

Memory is bounded in bytes: per sensor one float32 buffer of L samples, the last 2L samples
(float32, for telling a re-sent record from a reset), 16 record digests and a stash of at most
`reorder_slots` records and `reorder_max_bytes` bytes of float32 samples. For L = 140 that is
about 3 KiB plus the stash (see docs/windowing-and-delivery.md). At most `max_sensors` sensors:
a new sensor evicts the least recently seen one only if that one has been idle for
`evict_min_idle_s`; otherwise the new sensor is refused (`SensorLimit`), so sensors above the
limit never evict each other into starvation. Idle sensors are evicted after `idle_timeout_s`.

Eviction loses no window: an evicted sensor's partial window (its seq and fewer than L samples) is handed to
a `PartialStore` (the daemon's per-sensor state, written to the changelog before the next commit), and when
the sensor comes back with the seq that continues it, its buffer is restored, so the window completes with
the same samples, start and alert id as if the sensor had never been evicted.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from monitor.stream.sensor_table import OVER_CAPACITY, SensorKey, SensorLimit, SensorTable
from monitor.stream.wire import InputRecord

__all__ = ["OVER_CAPACITY", "SEGMENT_REASONS", "Partial", "PartialStore", "Segment", "SensorKey", "SensorLimit",
           "Window", "WindowStats", "Windower"]

RESET, JUMP = "reset", "jump"  # why a sensor's new segment started
SEGMENT_REASONS = (RESET, JUMP)
RECENT_DIGESTS = 16  # per sensor: recent records recognised as re-sent by (seq, length, CRC-32)


@dataclass(frozen=True, slots=True)
class Segment:
    """A sensor's new segment (for the caller's log): where it started and why."""

    key: SensorKey
    reason: str
    previous_next_seq: int
    seq: int


@dataclass(frozen=True, slots=True)
class Partial:
    """An evicted sensor's partial window: its samples [start_seq, next_seq), fewer than one window."""

    start_seq: int
    values: np.ndarray  # float32

    @property
    def next_seq(self) -> int:
        return self.start_seq + len(self.values)


class PartialStore(Protocol):
    """Where evicted sensors' partial windows are kept durably (the daemon's per-sensor state store), so that
    the commit may move past their records and a sensor that resumes still completes the window."""

    def keep_partial(self, key: SensorKey, partial: Partial | None) -> None:
        """Called at eviction, before any later commit; None: the sensor held no partial window."""

    def partial(self, key: SensorKey) -> Partial | None:
        """The partial window kept for a sensor that comes back, if any."""


@dataclass(slots=True)
class Window:
    """One complete window of one sensor, ready to score."""

    partition: int
    sensor_id: str
    start_seq: int
    values: np.ndarray  # (L,) float32
    first_offset: int  # earliest offset of the records its samples came from: needed until published
    last_offset: int  # offset of the record that completed it
    ts: float | None  # `ts` of the record that completed it, for end-to-end latency
    created: float  # monotonic time it was completed, for the batch's max wait

    @property
    def end_seq(self) -> int:
        return self.start_seq + len(self.values)

    @property
    def key(self) -> SensorKey:
        return (self.partition, self.sensor_id)


@dataclass
class WindowStats:
    """Cumulative counts; the daemon turns them into metrics."""

    samples: int = 0
    duplicate_samples: int = 0
    gaps: int = 0
    reordered_records: int = 0
    evicted_sensors: int = 0
    evicted_samples: int = 0  # samples of evicted sensors dropped (stashed, or buffered without a PartialStore)
    resumed_windows: int = 0  # partial windows of evicted sensors taken up again when they came back
    refused_records: int = 0  # records of new sensors refused at max_sensors
    reset_segments: int = 0
    jump_segments: int = 0


@dataclass(slots=True)
class _Stashed:
    seq: int
    offset: int
    values: np.ndarray  # float32
    ts: float | None
    arrived: float


@dataclass(slots=True)
class _Parked:
    """The segment a jump left, kept so that the stream can resume it."""

    next_seq: int
    wstart: int
    buffer: np.ndarray
    recent: np.ndarray
    segments: deque[tuple[int, int]]


@dataclass(slots=True)
class _Sensor:
    buffer: np.ndarray  # samples [wstart, next_seq) live in buffer[:next_seq - wstart]
    next_seq: int  # seq of the next sample expected
    wstart: int  # start seq of the next window to complete
    last_seen: float
    recent: np.ndarray  # the last (up to 2L) samples consumed: [next_seq - len(recent), next_seq)
    last_offset: int = -1  # highest offset consumed: a record at or below it is a redelivery
    hole: tuple[int, int] = (0, 0)  # the last seq range declared a gap: a record inside it is late
    # (end_seq, offset) of the records holding buffered samples, kept as a monotonic queue
    # (offsets increase front to back) so the front is the earliest offset still needed.
    segments: deque[tuple[int, int]] = field(default_factory=deque)
    digests: deque[tuple[int, int, int]] = field(default_factory=lambda: deque(maxlen=RECENT_DIGESTS))
    stash: list[_Stashed] = field(default_factory=list)  # records ahead of next_seq
    stash_bytes: int = 0
    parked: _Parked | None = None  # the segment before the last jump


class Windower(SensorTable[_Sensor, Window]):
    def __init__(self, window_length: int, hop: int | None = None, *, reorder_slots: int = 4,
                 reorder_timeout_s: float = 2.0, reorder_max_bytes: int = 1 << 16, max_seq_gap: int | None = None,
                 max_sensors: int = 200_000, idle_timeout_s: float = 600.0, evict_min_idle_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window_length < 1:
            raise ValueError("window_length must be >= 1")
        self.stats = WindowStats()
        super().__init__(self.stats, max_sensors=max_sensors, idle_timeout_s=idle_timeout_s,
                         evict_min_idle_s=evict_min_idle_s, reorder_timeout_s=reorder_timeout_s, clock=clock)
        self.length = window_length
        self.hop = hop or window_length
        self.reorder_slots = reorder_slots
        self.reorder_max_bytes = reorder_max_bytes
        self.max_seq_gap = max_seq_gap
        self.new_segments: list[Segment] = []  # since the caller last took them (it logs them)
        self.evicted_at: dict[SensorKey, int] = {}  # evicted sensor -> its next window start (the caller clears)
        # Evicted sensors' partial windows go here (None: they are dropped and counted in evicted_samples).
        self.partials: PartialStore | None = None

    # -- input ---------------------------------------------------------------------------------

    def add(self, partition: int, offset: int, record: InputRecord) -> tuple[list[Window], list[SensorKey]]:
        """Feed one record; returns the windows it completed and the sensors evicted to make room.
        Raises SensorLimit for a new sensor when no room can be made."""
        now = self.clock()
        key = (partition, record.sensor_id)
        sensor = self._sensors.get(key)
        evicted = self._take_admit_evicted()
        if sensor is None:
            evicted += self._make_room(now)
            sensor = self._new_sensor(record.seq, now)
            self._sensors[key] = sensor
            self._resume(key, sensor)
        else:
            self._sensors.move_to_end(key)
            sensor.last_seen = now
        values = np.asarray(record.values, dtype=np.float32)
        out: list[Window] = []
        if offset <= sensor.last_offset and self._redelivered(sensor, record.seq):
            self.stats.duplicate_samples += len(values)
            return out, evicted
        sensor.last_offset = offset
        item = _Stashed(record.seq, offset, values, record.ts, now)
        if record.seq > sensor.next_seq:
            if self.max_seq_gap is not None and record.seq - sensor.next_seq > self.max_seq_gap:
                self._new_segment(key, sensor, out, item, JUMP)
            elif len(sensor.stash) < self.reorder_slots and \
                    sensor.stash_bytes + values.nbytes <= self.reorder_max_bytes:
                sensor.stash.append(item)
                sensor.stash_bytes += values.nbytes
                self._stashing.add(key)
            else:
                self._close_hole(key, sensor, out, extra=item)
            return out, evicted
        if sensor.parked is not None and record.seq == sensor.parked.next_seq:
            self._unpark(sensor)  # the stream goes on where it was before the jump
        elif record.seq < sensor.next_seq and not self._consumed(sensor, record.seq, values):
            if sensor.hole[0] <= record.seq and record.end_seq <= sensor.hole[1]:
                self.stats.duplicate_samples += len(values)  # late: its hole was already declared a gap
                return out, evicted
            self._new_segment(key, sensor, out, item, RESET)
            return out, evicted
        self._append(key, sensor, item, out, now)
        if sensor.stash:
            self._drain(key, sensor, out, now)
        return out, evicted

    def _new_sensor(self, seq: int, now: float) -> _Sensor:
        return _Sensor(buffer=np.empty(self.length, dtype=np.float32), next_seq=seq,
                       wstart=self._aligned(seq), last_seen=now, recent=np.empty(0, dtype=np.float32))

    def _resume(self, key: SensorKey, s: _Sensor) -> None:
        """A sensor evicted with a partial window comes back where it stopped: take the window up again, so
        it completes and is scored as if the sensor had never been evicted."""
        partial = None if self.partials is None else self.partials.partial(key)
        if partial is None or partial.next_seq != s.next_seq or not 0 < len(partial.values) < self.length:
            return  # nothing kept, or the stream does not continue it (a reset, a gap): a new start
        s.wstart = partial.start_seq
        s.buffer[:len(partial.values)] = partial.values
        s.recent = partial.values.copy()
        self.stats.resumed_windows += 1

    def _aligned(self, seq: int) -> int:
        """Start of the first window that begins at or after `seq`."""
        return -(-seq // self.hop) * self.hop

    @staticmethod
    def _redelivered(s: _Sensor, seq: int) -> bool:
        """A record at an offset the sensor already passed is a redelivery if its samples were consumed
        or wait in the stash. One that continues the stream (or runs ahead of it, not stashed) means the
        partition's offsets started again (a broker that lost its log, a re-created topic): not a repeat."""
        return seq < s.next_seq or any(item.seq == seq for item in s.stash)

    def _consumed(self, s: _Sensor, seq: int, values: np.ndarray) -> bool:
        """Were the samples of this record (starting below next_seq) really consumed already?"""
        if (seq, len(values), zlib.crc32(values.tobytes())) in s.digests:
            return True
        tail_start = s.next_seq - len(s.recent)
        lo, hi = max(seq, tail_start), min(seq + len(values), s.next_seq)
        return lo < hi and bool(np.array_equal(values[lo - seq:hi - seq], s.recent[lo - tail_start:hi - tail_start]))

    def _new_segment(self, key: SensorKey, s: _Sensor, out: list[Window], item: _Stashed, reason: str) -> None:
        """Start the sensor over at `item` (a reset or a jump); what the stash can still complete is emitted first."""
        if s.stash:
            self._close_hole(key, s, out)
        self.new_segments.append(Segment(key, reason, s.next_seq, item.seq))
        if reason == RESET:
            self.stats.reset_segments += 1
            s.parked = None
        else:
            self.stats.jump_segments += 1
            if s.parked is None:  # from a jump segment, keep the segment before the first jump
                s.parked = _Parked(s.next_seq, s.wstart, s.buffer.copy(), s.recent, s.segments.copy())
        self._restart(s, item.seq)
        self._append(key, s, item, out, item.arrived)

    @staticmethod
    def _unpark(s: _Sensor) -> None:
        parked, s.parked = s.parked, None
        assert parked is not None
        s.next_seq, s.wstart, s.buffer, s.recent, s.segments = (parked.next_seq, parked.wstart, parked.buffer,
                                                                parked.recent, parked.segments)

    def _restart(self, s: _Sensor, seq: int) -> None:
        s.next_seq, s.wstart = seq, self._aligned(seq)
        s.segments.clear()
        s.recent = s.recent[:0]

    def _append(self, key: SensorKey, s: _Sensor, item: _Stashed, out: list[Window], now: float) -> None:
        """Append a record that starts at or before next_seq (its overlap is dropped as duplicate)."""
        data = item.values
        skip = s.next_seq - item.seq
        if skip >= len(data):
            self.stats.duplicate_samples += len(data)
            return
        s.digests.append((item.seq, len(data), zlib.crc32(data.tobytes())))
        if skip > 0:
            self.stats.duplicate_samples += skip
            data = data[skip:]
        n = len(data)
        self.stats.samples += n
        end_seq = s.next_seq + n
        offset = item.offset
        while s.segments and s.segments[-1][1] >= offset:
            s.segments.pop()  # an older-seq record with a later offset is never the earliest needed
        s.segments.append((end_seq, offset))
        s.recent = np.concatenate((s.recent, data))[-2 * self.length:]

        L, pos = self.length, 0
        while pos < n:
            if s.next_seq < s.wstart:  # samples before the next aligned window start: not needed
                step = min(s.wstart - s.next_seq, n - pos)
            else:
                fill = s.next_seq - s.wstart
                step = min(L - fill, n - pos)
                s.buffer[fill:fill + step] = data[pos:pos + step]
                if fill + step == L:
                    out.append(self._emit(key, s, offset, item.ts, now))
            pos += step
            s.next_seq += step
        self._trim(s)

    def _emit(self, key: SensorKey, s: _Sensor, offset: int, ts: float | None, now: float) -> Window:
        while s.segments and s.segments[0][0] <= s.wstart:
            s.segments.popleft()
        window = Window(key[0], key[1], s.wstart, s.buffer.copy(), s.segments[0][1], offset, ts, now)
        s.wstart += self.hop
        if self.hop < self.length:  # overlapping windows: keep the tail as the next window's head
            s.buffer[:self.length - self.hop] = s.buffer[self.hop:]
        return window

    @staticmethod
    def _trim(s: _Sensor) -> None:
        """Forget records whose samples are all before the next window start."""
        while s.segments and s.segments[0][0] <= s.wstart:
            s.segments.popleft()

    def _drain(self, key: SensorKey, s: _Sensor, out: list[Window], now: float) -> None:
        """Apply stashed records that the buffer has caught up with, in seq order."""
        s.stash.sort(key=lambda x: x.seq)
        while s.stash and s.stash[0].seq <= s.next_seq:
            item = s.stash.pop(0)
            s.stash_bytes -= item.values.nbytes
            self.stats.reordered_records += 1
            self._append(key, s, item, out, now)
        if not s.stash:
            self._stashing.discard(key)

    def _close_hole(self, key: SensorKey, s: _Sensor, out: list[Window], extra: _Stashed | None = None) -> None:
        """The hole before the stash will not be filled: count a gap, restart at the earliest stashed record."""
        if extra is not None:
            s.stash.append(extra)
        s.stash.sort(key=lambda x: x.seq)
        now = self.clock()
        while s.stash:
            item = s.stash.pop(0)
            if item.seq > s.next_seq:
                self.stats.gaps += 1
                s.hole = (s.next_seq, item.seq)
                self._restart(s, item.seq)
            self._append(key, s, item, out, now)
        s.stash_bytes = 0
        self._stashing.discard(key)

    # -- housekeeping --------------------------------------------------------------------------

    def _on_evict(self, key: SensorKey, s: _Sensor) -> None:
        """The partial window goes to the PartialStore (synchronously: before the commit can move past its
        records). A stash is dropped (the sweep closes holes long before a sensor idles out), and so is a
        segment parked by a jump."""
        buffered = max(0, s.next_seq - s.wstart)
        self.stats.evicted_samples += sum(len(i.values) for i in s.stash)
        if self.partials is None:
            self.stats.evicted_samples += buffered
        else:
            values = s.buffer[:buffered].copy()
            self.partials.keep_partial(key, Partial(s.wstart, values) if buffered else None)
        self.evicted_at[key] = s.wstart

    # -- commit support ------------------------------------------------------------------------

    def _held_offsets(self, s: _Sensor) -> list[int]:
        """The earliest offsets of the buffered samples and of the parked segment's."""
        return [q[0][1] for q in (s.segments, None if s.parked is None else s.parked.segments) if q]

    def buffered(self, key: SensorKey) -> tuple[int, int] | None:
        """(next window start, next expected seq) of a sensor, for tests and debugging."""
        s = self._sensors.get(key)
        return None if s is None else (s.wstart, s.next_seq)

    def memory_bytes(self) -> int:
        """Bytes of sample data held (buffers, recent samples, stashes): what the bounds bound."""
        return sum(s.buffer.nbytes + s.recent.nbytes + s.stash_bytes +
                   (0 if s.parked is None else s.parked.buffer.nbytes + s.parked.recent.nbytes)
                   for s in self._sensors.values())
