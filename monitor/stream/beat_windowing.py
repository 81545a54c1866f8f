"""Beat-synchronous windows: input records in, one window per completed heartbeat out.

`BeatWindower` has the contract of `monitor.stream.windowing.Windower` (`add`, `sweep`, `needed_offsets`,
`drop_partitions`, `stats`, `len`), so the loop and the delivery ledger treat both alike. Per sensor (keyed by
(partition, sensor_id)):

- samples are appended in seq order to an `OnlineRPeakDetector`; each beat it completes is cut by `segment()`
  with the model artefact's `BeatConvention` and comes out as a `BeatWindow` that knows its span
  (start_seq/end_seq in the sensor's own samples), its R peak and its RR interval;
- a record that starts ahead of the expected seq waits in a small reorder stash (as in Windower); when the
  hole is not filled in time it is a gap. A gap, a record that ends more than `reset_after_s` of samples before
  the expected seq (a device reboot) and a change of `fs` each start a new *segment*: a new detector, counted by
  reason. A record that ends within `reset_after_s` of it, whatever its length, is a re-sent one: its samples
  were consumed and are dropped as duplicates;
- every R-peak detector is created with origin seq 0 and starts at the first sample it is given, so a detector
  rebuilt from a replay after a restart commits the same peaks as the one that saw everything (see
  monitor.stream.rpeaks). A segment that starts after a gap therefore begins with a warm-up of up to
  window_s - guard_s (7.5 s) without peaks.

Polarity: the convention fixes the sign of the QRS the model was trained on, and a sensor's lead may show it
the other way up. The sign used for a beat is the dominant deflection of the median QRS of that beat and the
POLARITY_BEATS - 1 beats before it in its segment (the rule of `beats.estimate_polarity`: 5-30 Hz band, 120 ms
around each R peak). It depends only on beats, never on record sizes or arrival, so a replay gives the same
sign; an isolated ectopic beat cannot flip it (the median of 15), and a stable lead keeps one sign. The first
POLARITY_BEATS - 1 beats of a segment only estimate it and are not scored (about 12 s at 70 bpm). To
re-derive those predecessors after a restart, their samples stay needed (uncommitted): the commit lags the
stream by about 15 beats plus the detector's 10 s window.

At-least-once: each sensor knows the offset of the earliest record whose samples its detector or its
polarity history still needs, and each window carries the earliest offset a replay must start from to cut it
again. Memory per sensor is bounded: the detector's buffer (its window plus the pending beat, at most
max_rr_s + 2 margins), POLARITY_BEATS QRS snippets, a few stashed records. Capacity as in Windower (the shared
`SensorTable`): at most `max_sensors` sensors; a new one evicts the least recently seen only if that one has idled
`evict_min_idle_s`, else it is refused (`SensorLimit`, dead-lettered as over_capacity), so live sensors never
evict each other. Idle sensors are evicted after `idle_timeout_s`.

Unlike `Windower`, an eviction keeps nothing: a sensor that comes back starts a new segment (`start`). Every
beat already cut went to the batch, so nothing cut is lost; not cut are the beats the detector had not
committed yet (its latency) and the new segment's warm-up. Keeping the detector's state would mean its last
10-25 s of samples, not one window, and after `idle_timeout_s` without data the two sides are not known to
be one recording (see docs/windowing-and-delivery.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from monitor.stream.beats import BeatConvention, Polarity, qrs_band, segment
from monitor.stream.rpeaks import BeatSpan, DetectorConfig, OnlineRPeakDetector
from monitor.stream.sensor_table import SensorTable
from monitor.stream.windowing import Segment, SensorKey, Window, WindowStats
from monitor.stream.wire import InputRecord, InvalidRecord

FloatArray = npt.NDArray[np.float64]

#: Beats whose median QRS sets the polarity of the last of them (odd: no ties between signs).
POLARITY_BEATS = 15
#: Why a segment started: the `reason` label of ecg_monitor_segments_started_total, counted in the stats as
#: `<reason>_segments` (Windower counts reset and jump the same way).
SEGMENT_REASONS = ("start", "gap", "reset", "jump", "fs_change")


@dataclass(slots=True)
class BeatWindow(Window):
    """One beat of one sensor: `start_seq`/`end_seq` is its span in the sensor's samples, `values` the beat in
    the convention (filtered, resampled to its length, polarity, normalised); `raw` the span's samples as
    received (for the signal-quality check), at `fs`."""

    span_end: int
    r_peak_seq: int
    rr_s: float
    fs: float
    raw: np.ndarray
    flipped: bool = False  # values negated to the convention's QRS sign (see `recorded_values`)

    @property
    def end_seq(self) -> int:
        return self.span_end

    @property
    def recorded_values(self) -> np.ndarray:
        """The beat the way up its lead records it: what the sensor's template compares (monitor.stream.template)."""
        return -self.values if self.flipped else self.values


@dataclass
class BeatStats(WindowStats):
    """WindowStats plus the beat counts; segments by reason."""

    beats: int = 0  # beats cut into windows (scored)
    warmup_beats: int = 0  # beats that only estimated a new segment's polarity
    dropped_beats: int = 0  # RR beyond the detector's max_rr_s, or a span the segment does not cover
    start_segments: int = 0  # (named like Windower's reset_segments: `<reason>_segments`)
    gap_segments: int = 0
    reset_segments: int = 0
    fs_change_segments: int = 0


@dataclass(slots=True)
class _Stashed:
    seq: int
    offset: int
    record: InputRecord
    arrived: float


@dataclass(slots=True)
class _Sensor:
    fs: float
    detector: OnlineRPeakDetector
    next_seq: int
    last_seen: float
    # (end_seq, offset) of the records holding samples still needed, a monotonic queue (offsets increase
    # front to back) so the front is the earliest offset still needed.
    records: deque[tuple[int, int]] = field(default_factory=deque)
    stash: list[_Stashed] = field(default_factory=list)
    # the last POLARITY_BEATS - 1 beats' QRS snippets, with the seq a replay must start at to cut them again
    qrs: deque[tuple[FloatArray, int]] = field(default_factory=deque)
    dropped_seen: int = 0  # the detector's beats_dropped already counted


def convention_of(windowing: dict[str, Any] | None, mode: str, window_length: int) -> BeatConvention | None:
    """The beat convention to serve with, or None for fixed windows.

    windowing: the artefact's `metadata["windowing"]` ({"kind": "fixed"} when absent: models trained before
    beat windows). mode: MONITOR_WINDOWING, "auto" (the artefact's), "fixed" or "beats" (the artefact's
    convention, else the default convention at the model's window length).
    """
    stored = windowing or {"kind": "fixed"}
    if mode == "fixed" or (mode == "auto" and stored.get("kind") != "beats"):
        return None
    convention = BeatConvention.from_dict(stored) if stored.get("kind") == "beats" else BeatConvention(
        length=window_length)
    if convention.length != window_length:
        raise ValueError(f"the artefact's beat convention has length {convention.length}, "
                         f"its model {window_length}")
    return convention


class BeatWindower(SensorTable[_Sensor, Window]):
    def __init__(self, convention: BeatConvention, *, default_fs: float | None = None,
                 detector: DetectorConfig | None = None, reorder_slots: int = 4, reorder_timeout_s: float = 2.0,
                 reset_after_s: float = 10.0, max_sensors: int = 200_000, idle_timeout_s: float = 600.0,
                 evict_min_idle_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = BeatStats()
        super().__init__(self.stats, max_sensors=max_sensors, idle_timeout_s=idle_timeout_s,
                         evict_min_idle_s=evict_min_idle_s, reorder_timeout_s=reorder_timeout_s, clock=clock)
        self.convention = convention
        self.length = convention.length
        self.default_fs = default_fs
        self.detector_config = detector or DetectorConfig()
        self.reorder_slots = reorder_slots
        self.reset_after_s = reset_after_s
        self.new_segments: list[Segment] = []  # since the caller last took them (it logs them)

    # -- input ---------------------------------------------------------------------------------

    def add(self, partition: int, offset: int, record: InputRecord) -> tuple[list[Window], list[SensorKey]]:
        """Feed one record; returns the beat windows it completed and the sensors evicted to make room.
        InvalidRecord (reason schema) when the record has no `fs` and there is no default; SensorLimit for a new
        sensor when no room can be made."""
        fs = record.fs or self.default_fs
        if fs is None:
            raise InvalidRecord("schema", "fs: required for beat windows (or set MONITOR_DEFAULT_FS)")
        now = self.clock()
        key = (partition, record.sensor_id)
        sensor = self._sensors.get(key)
        evicted = self._take_admit_evicted()
        out: list[Window] = []
        if sensor is None:
            evicted += self._make_room(now)
            sensor = self._sensors[key] = self._new_sensor(key, fs, record.seq, now, "start")
        else:
            self._sensors.move_to_end(key)
            sensor.last_seen = now
            if fs != sensor.fs:
                self._close_hole(key, sensor, out)  # the stash belongs to the old rate
                sensor = self._sensors[key] = self._new_sensor(key, fs, record.seq, now, "fs_change", sensor)
            elif record.end_seq < sensor.next_seq - int(self.reset_after_s * fs):
                sensor = self._sensors[key] = self._new_sensor(key, fs, record.seq, now, "reset", sensor)
                self._stashing.discard(key)
        if record.seq > sensor.next_seq:
            item = _Stashed(record.seq, offset, record, now)
            if len(sensor.stash) < self.reorder_slots:
                sensor.stash.append(item)
                self._stashing.add(key)
            else:
                self._close_hole(key, sensor, out, extra=item)
            return out, evicted
        self._append(key, sensor, offset, record, out, now)
        if sensor.stash:
            self._drain(key, sensor, out, now)
        return out, evicted

    def _new_sensor(self, key: SensorKey, fs: float, seq: int, now: float, reason: str,
                    previous: _Sensor | None = None) -> _Sensor:
        setattr(self.stats, f"{reason}_segments", getattr(self.stats, f"{reason}_segments") + 1)
        if previous is not None:
            self.new_segments.append(Segment(key, reason, previous.next_seq, seq))
        # origin 0 for every segment: a detector rebuilt by a replay agrees with the original (see module doc)
        detector = OnlineRPeakDetector(fs, self.convention, origin_seq=0, start_seq=seq,
                                       config=self.detector_config)
        return _Sensor(fs=fs, detector=detector, next_seq=seq, last_seen=now)

    def _append(self, key: SensorKey, s: _Sensor, offset: int, record: InputRecord, out: list[Window],
                now: float) -> None:
        """Append a record that starts at or before next_seq (its overlap is dropped as duplicate)."""
        n, skip = len(record.values), s.next_seq - record.seq
        if skip >= n:
            self.stats.duplicate_samples += n
            return
        self.stats.duplicate_samples += max(0, skip)
        self.stats.samples += n - max(0, skip)
        while s.records and s.records[-1][1] >= offset:
            s.records.pop()  # an older-seq record with a later offset is never the earliest needed
        s.records.append((record.end_seq, offset))
        first_offset = s.records[0][1]  # a replay from here rebuilds the state that completes these beats
        spans = s.detector.push(record.seq, record.values)
        s.next_seq = record.end_seq
        for span in spans:
            window = self._cut(key, s, span, first_offset, offset, record.ts, now)
            if window is not None:
                out.append(window)
        self._count_dropped(s)
        self._trim(s)

    def _cut(self, key: SensorKey, s: _Sensor, span: BeatSpan, first_offset: int, last_offset: int,
             ts: float | None, now: float) -> BeatWindow | None:
        snippet = qrs_snippet(span, s.fs)
        history = [q for q, _ in s.qrs] + [snippet]
        s.qrs.append((snippet, min(span.start_seq, s.detector.replay_seq(span.r_peak))))
        if len(s.qrs) > POLARITY_BEATS - 1:
            s.qrs.popleft()
        if len(history) < POLARITY_BEATS:
            self.stats.warmup_beats += 1
            return None
        beats = segment(span.samples, s.fs, [span.r_peak, span.next_r_peak], self.convention,
                        offset=span.start_seq, polarity=polarity_of(history))
        if len(beats) == 0:
            self.stats.dropped_beats += 1
            return None
        self.stats.beats += 1
        start, end = int(beats.start[0]), int(beats.end[0])
        raw = span.samples[start - span.start_seq : end - span.start_seq].astype(np.float32)
        return BeatWindow(key[0], key[1], start, beats.windows[0], first_offset, last_offset, ts, now,
                          span_end=end, r_peak_seq=span.r_peak, rr_s=float(beats.rr_s[0]), fs=s.fs, raw=raw,
                          flipped=bool(beats.flipped[0]))

    def _count_dropped(self, s: _Sensor) -> None:
        dropped = s.detector.beats_dropped
        self.stats.dropped_beats += dropped - s.dropped_seen
        s.dropped_seen = dropped

    @staticmethod
    def _needed_seq(s: _Sensor) -> int:
        return min([s.detector.lowest_needed_seq] + [seq for _, seq in s.qrs])

    def _trim(self, s: _Sensor) -> None:
        """Forget records whose samples neither the detector nor the polarity history needs."""
        needed = self._needed_seq(s)
        while s.records and s.records[0][0] <= needed:
            s.records.popleft()

    def _drain(self, key: SensorKey, s: _Sensor, out: list[Window], now: float) -> None:
        """Apply stashed records that the stream has caught up with, in seq order."""
        s.stash.sort(key=lambda x: x.seq)
        while s.stash and s.stash[0].seq <= s.next_seq:
            item = s.stash.pop(0)
            self.stats.reordered_records += 1
            self._append(key, s, item.offset, item.record, out, now)
        if not s.stash:
            self._stashing.discard(key)

    def _close_hole(self, key: SensorKey, s: _Sensor, out: list[Window], extra: _Stashed | None = None) -> None:
        """The hole before the stash will not be filled: count a gap, start a segment at the earliest stashed
        record."""
        stash = sorted(s.stash + ([extra] if extra else []), key=lambda x: x.seq)
        s.stash.clear()
        self._stashing.discard(key)
        now = self.clock()
        for item in stash:
            if item.seq > s.next_seq:
                self.stats.gaps += 1
                s = self._sensors[key] = self._new_sensor(key, s.fs, item.seq, s.last_seen, "gap", s)
            self._append(key, s, item.offset, item.record, out, now)

    # -- commit support ------------------------------------------------------------------------

    def _held_offsets(self, s: _Sensor) -> list[int]:
        return [s.records[0][1]] if s.records else []

    def memory_bytes(self) -> int:
        """Bytes of sample data held (detector buffers, QRS snippets, stashed records), roughly."""
        return sum(8 * (s.detector.buffered_samples + sum(len(q) for q, _ in s.qrs)
                        + sum(len(item.record.values) for item in s.stash)) for s in self._sensors.values())

    def buffered(self, key: SensorKey) -> tuple[int, int] | None:
        """(earliest seq still needed, next expected seq) of a sensor, for tests and debugging."""
        s = self._sensors.get(key)
        return None if s is None else (self._needed_seq(s), s.next_seq)


# -- polarity ----------------------------------------------------------------------------------

def qrs_snippet(span: BeatSpan, fs: float) -> FloatArray:
    """The beat's QRS, 5-30 Hz (P/T waves and baseline do not vote), 60 ms either side of its R peak. Filtered
    over the beat's own slice, so it depends on that beat's samples only."""
    half = max(1, int(round(0.06 * fs)))
    filtered = qrs_band(fs).zero_phase(span.samples)
    centre = span.r_peak - span.start_seq
    snippet: FloatArray = filtered[centre - half : centre + half + 1]
    return snippet


def polarity_of(snippets: list[FloatArray]) -> Polarity:
    """The dominant deflection of the median QRS (the rule of beats.estimate_polarity)."""
    median = np.median(np.stack(snippets), axis=0)
    return 1 if median.max() >= -median.min() else -1


def beat_fields(window: Window) -> dict[str, Any]:
    """The wire fields of a beat window (r_peak_seq, rr_s); none for a fixed window."""
    if isinstance(window, BeatWindow):
        return {"r_peak_seq": window.r_peak_seq, "rr_s": window.rr_s}
    return {}
