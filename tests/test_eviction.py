"""Idle eviction loses no window (issue 12): an evicted sensor's partial window is kept durably (in its
per-sensor state record) and taken up again when the sensor continues, so the window is scored as if the
sensor had never been evicted, while the commit moves past its records. Windower and state store over
fakes; the Monitor over fake Kafka clients (tests/fakes.py). The real broker: tests/test_reliability_eviction.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import FakeClock, FakeConsumer, FakeProducer
from test_state_store import L as ML
from test_state_store import STATE, TOPIC, FakeChangelog, beat, make_monitor, make_states, restored_from, scores

from monitor.stream.beat_windowing import POLARITY_BEATS, BeatWindow, BeatWindower
from monitor.stream.beats import BeatConvention
from monitor.stream.rpeaks import DetectorConfig
from monitor.stream.windowing import Partial, SensorKey, Windower
from monitor.stream.wire import InputRecord, encode_input

L = 8
STREAM = np.arange(1, 101, dtype=np.float32)


class DictStore:
    """The PartialStore contract in a dict (the daemon's is the per-sensor state store)."""

    def __init__(self) -> None:
        self.kept: dict[SensorKey, Partial | None] = {}

    def keep_partial(self, key: SensorKey, partial: Partial | None) -> None:
        self.kept[key] = partial

    def partial(self, key: SensorKey) -> Partial | None:
        return self.kept.get(key)


def rec(seq: int, n: int = 4) -> InputRecord:
    return InputRecord(sensor_id="s", seq=seq, values=[float(v) for v in STREAM[seq:seq + n]])


def windower(clock: FakeClock, store: DictStore | None) -> Windower:
    w = Windower(L, idle_timeout_s=600.0, clock=clock)
    w.partials = store
    return w


def test_an_evicted_sensor_that_continues_completes_its_window_with_the_same_samples():
    clock, store = FakeClock(), DictStore()
    w = windower(clock, store)
    windows = [win for seq in (0, 4, 8) for win in w.add(0, seq // 4, rec(seq))[0]]  # one window, half of the next
    assert [win.start_seq for win in windows] == [0]
    clock.now += 600
    _, evicted = w.sweep()
    assert evicted == [(0, "s")] and len(w) == 0
    assert w.needed_offsets() == {}  # the commit may move past the partial window's record: it is kept
    kept = store.kept[(0, "s")]
    assert kept is not None and (kept.start_seq, kept.values.tolist()) == (8, STREAM[8:12].tolist())
    resumed, _ = w.add(0, 3, rec(12))
    assert [win.start_seq for win in resumed] == [8]
    assert resumed[0].values.tolist() == STREAM[8:16].tolist()  # exactly the uninterrupted window
    assert resumed[0].first_offset == 3  # the restored samples are durable: only the new record is needed
    assert (w.stats.resumed_windows, w.stats.evicted_samples) == (1, 0)


def test_a_sensor_that_comes_back_elsewhere_starts_afresh_and_without_a_store_the_samples_are_counted():
    clock, store = FakeClock(), DictStore()
    w = windower(clock, store)
    w.add(0, 0, rec(0, 6))
    clock.now += 600
    w.sweep()
    windows, _ = w.add(0, 1, rec(40, 8))  # a reset / gap: the kept window does not continue
    assert [win.start_seq for win in windows] == [40] and w.stats.resumed_windows == 0
    bare = windower(clock, None)
    bare.add(0, 0, rec(0, 6))
    clock.now += 600
    bare.sweep()
    assert bare.stats.evicted_samples == 6  # no store: the old behaviour, counted as lost


def test_a_sensor_evicted_without_a_partial_window_clears_what_was_kept():
    clock, store = FakeClock(), DictStore()
    w = windower(clock, store)
    w.add(0, 0, rec(0, 8))  # exactly one window: nothing partial
    clock.now += 600
    w.sweep()
    assert store.kept == {(0, "s"): None}


def test_the_state_store_keeps_the_partial_window_bit_for_bit_until_the_next_window_is_applied():
    states = make_states()
    values = np.array([0.1, -1e-7, 3.3333333, 7.0], dtype=np.float32)
    states.keep_partial((0, "a"), Partial(16, values))  # a sensor without any window applied yet
    copy = restored_from(states)
    partial = copy.partial((0, "a"))
    assert partial is not None and partial.start_seq == 16 and partial.values.tobytes() == values.tobytes()
    assert copy.apply((0, "a"), 16, 5, 0.05, True) is not None  # not taken for a replay
    assert copy.partial((0, "a")) is None
    assert "partial" not in json.loads([v for _, _, v in copy.changes() if v][0])


def produce(consumer: FakeConsumer, sensor: str, seq: int, values: list[float]) -> None:
    consumer.append(0, sensor.encode(), encode_input(sensor, seq, values))


def test_the_monitor_scores_an_evicted_sensors_window_after_it_resumes_also_across_a_restart():
    """Sensor a sends 2.5 windows and goes quiet; it is evicted, the commit moves past every record of it, the
    daemon restarts, and a comes back with the seq that continues it: window 2 ML is scored, with the samples of
    both sides (the fake scorer's error is the window's mean)."""
    clock, producer = FakeClock(1000.0), FakeProducer()
    consumer = FakeConsumer(TOPIC, 3)
    signal = np.concatenate([beat(0.2), beat(0.3), beat(0.25), beat(0.22)]).astype(np.float32)
    for seq in range(0, 5 * ML // 2, ML // 2):
        produce(consumer, "a", seq, signal[seq:seq + ML // 2].tolist())
    first = make_monitor(consumer, producer, clock, FakeChangelog(producer))
    for _ in range(30):  # housekeeping runs once a second: past the idle timeout, a is evicted
        first.step()
        clock.now += 25
    first.checkpoint(force=True)
    assert len(first.windower) == 0 and first.metrics.evicted_samples._value.get() == 0
    assert consumer.group_committed[0] == len(consumer.logs[0])  # nothing of a holds the commit
    assert any(b'"partial"' in v for _, v in producer.delivered(STATE))
    second = make_monitor(FakeConsumer(TOPIC, 3, committed=consumer.group_committed, logs=consumer.logs),
                          producer, clock, FakeChangelog(producer))
    for seq in range(5 * ML // 2, 4 * ML, ML // 2):
        produce(second.consumer, "a", seq, signal[seq:seq + ML // 2].tolist())
    for _ in range(50):
        second.step()
        clock.now += 0.05
    second.checkpoint(force=True)
    scored = {s["window_start_seq"]: s["score"] for s in scores(producer)}
    assert sorted(scored) == [0, ML, 2 * ML, 3 * ML]
    assert abs(scored[2 * ML] - float(signal[2 * ML:3 * ML].mean())) < 1e-6


# -- beat windows: an idle eviction ends the segment ---------------------------------------------------------

FS = 360.0
CONVENTION = BeatConvention()


def beat_records(x: np.ndarray, seq0: int, first: int) -> list[tuple[int, InputRecord]]:
    return [(first + i, InputRecord(sensor_id="s", seq=seq0 + start, values=x[start:start + 360].tolist(), fs=FS))
            for i, start in enumerate(range(0, len(x), 360))]


def beat_peaks(windower: BeatWindower, stream: list[tuple[int, InputRecord]]) -> list[int]:
    return [w.r_peak_seq for offset, record in stream for w in windower.add(0, offset, record)[0]
            if isinstance(w, BeatWindow)]


def test_a_beat_sensor_evicted_and_resumed_starts_a_new_segment_and_every_beat_cut_is_scored(record_100):
    """What docs/windowing-and-delivery.md says of beat windows: an eviction holds no cut beat back (a beat goes
    to the batch when it is cut), and a sensor that comes back starts a new segment, exactly as a fresh one
    there. The beats of the uninterrupted stream that are not cut: those the detector had not committed yet
    at the eviction (its latency: guard, votes, the next R peak) and the new segment's warm-up."""
    pytest.importorskip("sleepecg")
    signal, cut = record_100[0][: int(120 * FS)], int(60 * FS)
    clock = FakeClock()
    reference = beat_peaks(BeatWindower(CONVENTION, clock=clock), beat_records(signal, 0, 0))
    evicted = BeatWindower(CONVENTION, clock=clock)
    before = beat_peaks(evicted, beat_records(signal[:cut], 0, 0))
    clock.now += 600
    assert evicted.sweep()[1] == [(0, "s")]
    after = beat_peaks(evicted, beat_records(signal[cut:], cut, 60))
    fresh = beat_peaks(BeatWindower(CONVENTION, clock=clock), beat_records(signal[cut:], cut, 0))
    assert before == reference[:len(before)]  # nothing cut before the eviction is held back
    assert after == fresh == [p for p in reference if p >= after[0]]  # afterwards: a segment started there
    config = DetectorConfig()
    latency_s = config.guard_s + config.votes * config.step_s + config.max_rr_s
    warmup_s = config.window_s - config.guard_s
    not_cut = [p for p in reference if before[-1] < p < after[0]]
    assert all(p >= cut - latency_s * FS for p in not_cut)
    assert len([p for p in not_cut if p >= cut]) <= POLARITY_BEATS - 1 + warmup_s * 3  # (at most 180 bpm)
    assert evicted.stats.start_segments == 2
