"""Per-sensor window buffers: input records in, complete windows out.

Windows are aligned to absolute seq: window k covers samples [k*hop, k*hop + L). So the same
windows (and the same alert ids) come out whatever the record boundaries are, and again after
a restart or a redelivery. Per sensor (keyed by (partition, sensor_id), because a sensor's
state follows its partition):

- a record that starts at the expected seq is appended; one record may complete many windows;
- samples already consumed (duplicates) are dropped and counted;
- a record that starts ahead of the expected seq waits in a small reorder stash until the hole
  is filled (then it is counted as reordered); when the stash overflows or the hole is older
  than `reorder_timeout_s`, the hole is a gap: the buffer resets and the next window starts at
  the next aligned position with full data.

For at-least-once commits each sensor knows the offset of the earliest record it still needs
(buffered samples and stashed records), and each window carries the earliest offset it needs.
Memory is bounded: one float32 buffer of L samples per sensor, a stash of a few records,
at most `max_sensors` sensors (the idlest are evicted) and idle sensors are evicted.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from monitor.stream.wire import InputRecord

SensorKey = tuple[int, str]  # (partition, sensor_id)


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


@dataclass(slots=True)
class _Stashed:
    seq: int
    offset: int
    record: InputRecord
    arrived: float


@dataclass(slots=True)
class _Sensor:
    buffer: np.ndarray  # samples [wstart, next_seq) live in buffer[:next_seq - wstart]
    next_seq: int  # seq of the next sample expected
    wstart: int  # start seq of the next window to complete
    last_seen: float
    # (end_seq, offset) of the records holding buffered samples, kept as a monotonic queue
    # (offsets increase front to back) so the front is the earliest offset still needed.
    segments: deque = field(default_factory=deque)
    stash: list = field(default_factory=list)  # of _Stashed, records ahead of next_seq


class Windower:
    def __init__(self, window_length: int, hop: int | None = None, *, reorder_slots: int = 4,
                 reorder_timeout_s: float = 2.0, max_sensors: int = 200_000,
                 idle_timeout_s: float = 600.0, clock=time.monotonic) -> None:
        if window_length < 1:
            raise ValueError("window_length must be >= 1")
        self.length = window_length
        self.hop = hop or window_length
        self.reorder_slots = reorder_slots
        self.reorder_timeout_s = reorder_timeout_s
        self.max_sensors = max_sensors
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.stats = WindowStats()
        self._sensors: OrderedDict[SensorKey, _Sensor] = OrderedDict()  # least recently seen first
        self._stashing: set[SensorKey] = set()  # sensors with a non-empty stash

    def __len__(self) -> int:
        return len(self._sensors)

    # -- input ---------------------------------------------------------------------------------

    def add(self, partition: int, offset: int, record: InputRecord) -> tuple[list[Window], list[SensorKey]]:
        """Feed one record; returns the windows it completed and the sensors evicted to make room."""
        now = self.clock()
        key = (partition, record.sensor_id)
        sensor = self._sensors.get(key)
        evicted: list[SensorKey] = []
        if sensor is None:
            sensor = self._new_sensor(record.seq, now)
            self._sensors[key] = sensor
            evicted = self._evict_over_capacity()
        else:
            self._sensors.move_to_end(key)
            sensor.last_seen = now
        out: list[Window] = []
        if record.seq > sensor.next_seq:
            if len(sensor.stash) < self.reorder_slots:
                sensor.stash.append(_Stashed(record.seq, offset, record, now))
                self._stashing.add(key)
                return out, evicted
            self._close_hole(key, sensor, out, extra=_Stashed(record.seq, offset, record, now))
            return out, evicted
        self._append(key, sensor, offset, record, out, now)
        if sensor.stash:
            self._drain(key, sensor, out, now)
        return out, evicted

    def _new_sensor(self, seq: int, now: float) -> _Sensor:
        return _Sensor(buffer=np.empty(self.length, dtype=np.float32), next_seq=seq,
                       wstart=self._aligned(seq), last_seen=now)

    def _aligned(self, seq: int) -> int:
        """Start of the first window that begins at or after `seq`."""
        return -(-seq // self.hop) * self.hop

    def _append(self, key: SensorKey, s: _Sensor, offset: int, record: InputRecord,
                out: list[Window], now: float) -> None:
        """Append a record that starts at or before next_seq (its overlap is dropped as duplicate)."""
        values = record.values
        skip = s.next_seq - record.seq
        if skip >= len(values):
            self.stats.duplicate_samples += len(values)
            return
        if skip > 0:
            self.stats.duplicate_samples += skip
            values = values[skip:]
        data = np.asarray(values, dtype=np.float32)
        n = len(data)
        self.stats.samples += n
        end_seq = s.next_seq + n
        while s.segments and s.segments[-1][1] >= offset:
            s.segments.pop()  # an older-seq record with a later offset is never the earliest needed
        s.segments.append((end_seq, offset))

        L, pos = self.length, 0
        while pos < n:
            if s.next_seq < s.wstart:  # samples before the next aligned window start: not needed
                step = min(s.wstart - s.next_seq, n - pos)
            else:
                fill = s.next_seq - s.wstart
                step = min(L - fill, n - pos)
                s.buffer[fill:fill + step] = data[pos:pos + step]
                if fill + step == L:
                    out.append(self._emit(key, s, offset, record.ts, now))
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
            self.stats.reordered_records += 1
            self._append(key, s, item.offset, item.record, out, now)
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
                s.next_seq, s.wstart = item.seq, self._aligned(item.seq)
                s.segments.clear()
            self._append(key, s, item.offset, item.record, out, now)
        self._stashing.discard(key)

    # -- housekeeping --------------------------------------------------------------------------

    def sweep(self) -> tuple[list[Window], list[SensorKey]]:
        """Close reorder holes that waited too long and evict idle sensors. Call about once a second."""
        now = self.clock()
        out: list[Window] = []
        stale = [k for k in self._stashing
                 if now - min(item.arrived for item in self._sensors[k].stash) >= self.reorder_timeout_s]
        for key in stale:
            self._close_hole(key, self._sensors[key], out)
        evicted = []
        while self._sensors:
            key, sensor = next(iter(self._sensors.items()))
            if now - sensor.last_seen < self.idle_timeout_s:
                break
            evicted.append(self._evict(key))
        return out, evicted

    def _evict_over_capacity(self) -> list[SensorKey]:
        return [self._evict(next(iter(self._sensors))) for _ in range(len(self._sensors) - self.max_sensors)]

    def _evict(self, key: SensorKey) -> SensorKey:
        del self._sensors[key]
        self._stashing.discard(key)
        self.stats.evicted_sensors += 1
        return key

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget the sensors of revoked partitions (their new owner replays from the commit)."""
        for key in [k for k in self._sensors if k[0] in partitions]:
            del self._sensors[key]
            self._stashing.discard(key)

    # -- commit support ------------------------------------------------------------------------

    def needed_offsets(self) -> dict[int, int]:
        """Per partition, the earliest offset of a record whose samples are still buffered or stashed."""
        needed: dict[int, int] = {}
        for (partition, _), s in self._sensors.items():
            offsets = [item.offset for item in s.stash]
            if s.segments:
                offsets.append(s.segments[0][1])
            if offsets:
                low = min(offsets)
                if low < needed.get(partition, low + 1):
                    needed[partition] = low
        return needed

    def buffered(self, key: SensorKey) -> tuple[int, int] | None:
        """(next window start, next expected seq) of a sensor, for tests and debugging."""
        s = self._sensors.get(key)
        return None if s is None else (s.wstart, s.next_seq)
