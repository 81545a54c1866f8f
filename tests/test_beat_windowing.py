"""BeatWindower: one window per heartbeat, the same whatever the record sizes, after a restart from the commit,
and the same as segmenting the recording offline."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fakes import FakeClock, FakeConsumer, FakeProducer, FakeScorer
from prometheus_client import CollectorRegistry

from monitor.daemon.http import Health
from monitor.daemon.loop import Monitor

from monitor.daemon.metrics import SEGMENT_REASONS as METRIC_SEGMENT_REASONS
from monitor.daemon.metrics import Metrics
from monitor.daemon.settings import MonitorSettings
from monitor.stream.beat_windowing import POLARITY_BEATS, SEGMENT_REASONS, BeatWindow, BeatWindower, convention_of
from monitor.stream.beats import BeatConvention, estimate_polarity, segment
from monitor.stream.rpeaks import OnlineRPeakDetector
from monitor.stream.windowing import SensorLimit
from monitor.stream.wire import InputRecord, InvalidRecord

FS = 360.0
CONVENTION = BeatConvention()

pytest.importorskip("sleepecg")


@pytest.fixture(scope="module")
def signal(record_100: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Two minutes of record 100, lead MLII, 360 Hz, in mV."""
    return record_100[0][: int(120 * FS)]


def records(x: np.ndarray, size: int, *, sensor: str = "s1", seq0: int = 0, fs: float | None = FS,
            first: int = 0) -> list[tuple[int, InputRecord]]:
    """(offset, record) pairs, offsets counting records from `first`."""
    return [(first + i, InputRecord(sensor_id=sensor, seq=seq0 + start, values=x[start:start + size].tolist(), fs=fs))
            for i, start in enumerate(range(0, len(x), size))]


def feed(windower: BeatWindower, stream: list[tuple[int, InputRecord]]) -> list[BeatWindow]:
    out: list[BeatWindow] = []
    for offset, record in stream:
        windows, _ = windower.add(0, offset, record)
        out.extend(w for w in windows if isinstance(w, BeatWindow))
    return out


def new_windower(**kwargs) -> BeatWindower:
    return BeatWindower(CONVENTION, clock=lambda: 0.0, **kwargs)


def test_the_same_beats_whatever_the_record_sizes(signal) -> None:
    runs = {size: feed(new_windower(), records(signal, size)) for size in (1, 36, 3600)}
    reference = runs[3600]
    assert len(reference) > 100
    for size, beats in runs.items():
        assert [w.r_peak_seq for w in beats] == [w.r_peak_seq for w in reference], size
        assert [(w.start_seq, w.end_seq) for w in beats] == [(w.start_seq, w.end_seq) for w in reference]
        assert all(np.array_equal(a.values, b.values) for a, b in zip(beats, reference, strict=True))


def test_streamed_beats_equal_offline_segmentation(signal) -> None:
    """The detector run once over the whole recording, one polarity for it, segment(): the same windows, except
    the first beats, which only set the stream's polarity."""
    streamed = feed(new_windower(), records(signal, 36))
    spans = OnlineRPeakDetector(FS, CONVENTION).push(0, signal)
    peaks = [s.r_peak for s in spans] + [spans[-1].next_r_peak]
    offline = segment(signal, FS, peaks, CONVENTION, polarity=estimate_polarity(signal, FS, peaks))
    by_peak = {int(r): i for i, r in enumerate(offline.r_peak)}
    assert [w.r_peak_seq for w in streamed] == [int(r) for r in offline.r_peak[POLARITY_BEATS - 1:]]
    for w in streamed:
        i = by_peak[w.r_peak_seq]
        assert (w.start_seq, w.end_seq) == (offline.start[i], offline.end[i])
        assert w.rr_s == pytest.approx(offline.rr_s[i])
        np.testing.assert_allclose(w.values, offline.windows[i], atol=1e-5)
        assert w.values.shape == (CONVENTION.length,) and w.raw.shape == (w.end_seq - w.start_seq,)


def test_an_inverted_lead_gives_the_same_beats(signal) -> None:
    upright = feed(new_windower(), records(signal, 360))
    inverted = feed(new_windower(), records(-signal, 360))
    assert [w.r_peak_seq for w in inverted] == [w.r_peak_seq for w in upright]
    for a, b in zip(inverted, upright, strict=True):
        np.testing.assert_allclose(a.values, b.values, atol=1e-5)


def test_each_beat_also_comes_the_way_up_its_lead_records_it(signal) -> None:
    """The model sees every beat with the convention's QRS sign; the sensor's own template compares them the way
    the lead records them, so a lead and its inverse give opposite recorded beats (record 100's MLII QRS is
    positive, the convention's negative: its beats are flipped)."""
    upright = feed(new_windower(), records(signal, 360))
    inverted = feed(new_windower(), records(-signal, 360))
    assert all(w.flipped for w in upright) and not any(w.flipped for w in inverted)
    for a, b in zip(inverted, upright, strict=True):
        np.testing.assert_allclose(a.recorded_values, -b.recorded_values, atol=1e-5)
        assert b.recorded_values[:10].max() > 2  # the recorded R peak, near the window's start, is upward


@pytest.mark.parametrize("cut", [0.3, 0.55, 0.8])
def test_a_restart_from_the_commit_recreates_every_later_beat(signal, cut: float) -> None:
    """Commit what the windower still needs (all beats emitted so far published), restart there: every beat the
    uninterrupted run emits after that point comes out again, identical; earlier ones at most repeated."""
    stream = records(signal, 50)
    first = new_windower()
    split = int(cut * len(stream))
    before = feed(first, stream[:split])
    commit = first.needed_offsets()[0]
    after = feed(first, stream[split:])
    assert stream[split][0] - commit < 40 * FS / 50  # the commit lags by about 15 beats plus 10 s, not more

    replayed = feed(new_windower(), stream[commit:])
    by_peak = {w.r_peak_seq: w for w in replayed}
    for w in after:
        again = by_peak[w.r_peak_seq]
        assert (again.start_seq, again.end_seq) == (w.start_seq, w.end_seq)
        np.testing.assert_array_equal(again.values, w.values)
        assert again.first_offset >= commit
    published = {w.r_peak_seq: w for w in before}
    for peak, w in by_peak.items():
        if peak in published:
            np.testing.assert_array_equal(w.values, published[peak].values)


def test_each_window_needs_no_record_before_its_first_offset(signal) -> None:
    """A window's first_offset is where a replay must start to cut it again (what the batcher holds)."""
    stream = records(signal, 100)
    beats = feed(new_windower(), stream)
    for w in beats[::25]:
        replayed = feed(new_windower(), stream[w.first_offset:])
        assert w.r_peak_seq in {b.r_peak_seq for b in replayed}


def test_gaps_resets_and_rate_changes_start_new_segments(signal) -> None:
    windower = new_windower()
    minute = int(60 * FS)
    feed(windower, records(signal[:minute], 360))
    # 5 s missing, then the rest: a gap (after the reorder stash fills up)
    later = records(signal[minute + int(5 * FS):], 360, seq0=minute + int(5 * FS), first=1000)
    after_gap = feed(windower, later)
    assert windower.stats.gap_segments == 1 and windower.stats.start_segments == 1
    assert after_gap and after_gap[0].r_peak_seq > minute + int(12.5 * FS)  # 7.5 s detector warm-up + polarity
    # the device reboots: seq back to 0
    feed(windower, records(signal[:minute], 360, first=2000))
    assert windower.stats.reset_segments == 1
    # the same sensor at another rate
    feed(windower, records(signal[:3600], 360, seq0=10 * minute, fs=250.0, first=3000))
    assert windower.stats.fs_change_segments == 1
    assert [s.reason for s in windower.new_segments] == ["gap", "reset", "fs_change"]


def test_the_metrics_know_every_segment_reason() -> None:
    assert METRIC_SEGMENT_REASONS == SEGMENT_REASONS


def test_duplicates_are_dropped_not_a_reset(signal) -> None:
    windower = new_windower()
    stream = records(signal[: int(30 * FS)], 360)
    feed(windower, stream)
    feed(windower, stream[-5:])  # re-sent records within the last 10 s
    tail = signal[int(5 * FS): int(30 * FS)]
    feed(windower, [(100, InputRecord(sensor_id="s1", seq=int(5 * FS), values=tail.tolist(), fs=FS))])  # 25 s
    assert windower.stats.duplicate_samples == 5 * 360 + len(tail)
    assert windower.stats.reset_segments == 0


def test_records_without_fs_use_the_default_or_are_refused(signal) -> None:
    no_fs = records(signal[: int(20 * FS)], 360, fs=None)
    with pytest.raises(InvalidRecord) as refused:
        feed(new_windower(), no_fs[:1])
    assert refused.value.reason == "schema"
    defaulted = feed(new_windower(default_fs=FS), no_fs)
    assert defaulted and [w.r_peak_seq for w in defaulted] == [
        w.r_peak_seq for w in feed(new_windower(), records(signal[: int(20 * FS)], 360))]


def test_memory_and_the_commit_stay_bounded(signal) -> None:
    windower = new_windower()
    sizes, lags = [], []
    for offset, record in records(np.tile(signal, 3), 360):  # 6 minutes
        windower.add(0, offset, record)
        sizes.append(windower.memory_bytes())
        lags.append(offset - windower.needed_offsets()[0])
    assert max(sizes) < 8 * 30 * FS  # under 30 s of float64 samples
    assert max(lags[len(lags) // 2:]) <= 40  # records of 1 s: about 15 beats plus the detector's 10 s


def test_above_max_sensors_new_sensors_are_refused_not_the_live_ones_evicted(signal) -> None:
    """Issue 12 for beat windows: four live sensors and room for two. The first two keep every beat; the others
    are refused (SensorLimit: dead-lettered as over_capacity) instead of evicting the live ones in turn."""
    x = signal[: int(40 * FS)]
    streams = [records(x, 360, sensor=f"s{i}") for i in range(4)]
    windower = new_windower(max_sensors=2)
    beats: dict[str, list[BeatWindow]] = {f"s{i}": [] for i in range(4)}
    refused = evicted = 0
    for offset, (_, record) in enumerate(r for step in zip(*streams, strict=True) for r in step):
        try:
            windows, gone = windower.add(0, offset, record)
        except SensorLimit:
            refused += 1
            continue
        evicted += len(gone)
        beats[record.sensor_id] += [w for w in windows if isinstance(w, BeatWindow)]
    alone = feed(new_windower(), streams[0])
    for sensor in ("s0", "s1"):
        assert [(w.r_peak_seq, w.start_seq, w.end_seq) for w in beats[sensor]] == [
            (w.r_peak_seq, w.start_seq, w.end_seq) for w in alone]
    assert beats["s2"] == beats["s3"] == [] and refused == 2 * len(streams[0]) and evicted == 0
    assert windower.stats.refused_records == refused and windower.stats.evicted_sensors == 0


def test_the_loop_dead_letters_beat_sensors_above_the_limit(signal) -> None:
    loop = _Loop(max_sensors=1)
    kept = records(signal[: int(20 * FS)], 360)
    loop.run(kept + records(signal[:720], 360, sensor="late"))
    assert [s["r_peak_seq"] for s in loop.out("scores")] == [w.r_peak_seq for w in feed(new_windower(), kept)]
    assert [d["reason"] for d in loop.out("dlq")] == ["over_capacity"] * 2
    assert loop.metric("ecg_monitor_invalid_records_total", reason="over_capacity") == 2


def test_the_windowing_mode_and_the_artefact_convention() -> None:
    beats = CONVENTION.to_dict()
    assert convention_of(None, "auto", 140) is None  # an artefact from before beat windows
    assert convention_of({"kind": "fixed"}, "auto", 140) is None
    assert convention_of(beats, "auto", 140) == CONVENTION
    assert convention_of(beats, "fixed", 140) is None
    assert convention_of({"kind": "fixed"}, "beats", 96) == BeatConvention(length=96)
    with pytest.raises(ValueError, match="length"):
        convention_of(beats, "beats", 96)


# -- the loop in beats mode, over the fake Kafka clients in fake time ---------------------------------------------

class _Loop:
    """A Monitor over fakes whose model records the beat convention (scores are the FakeScorer's window means)."""

    def __init__(self, **settings: Any) -> None:
        values: dict[str, Any] = dict(input_topic="in", scores_topic="scores", alerts_topic="alerts",
                                      dlq_topic="dlq", max_batch=16, max_wait_ms=10)
        self.settings = MonitorSettings(_env_file=None, **{**values, **settings})
        self.clock = FakeClock(1000.0)
        self.consumer = FakeConsumer("in", 1, max_poll_records=50)
        self.producer = FakeProducer()
        scorer = FakeScorer(CONVENTION.length)
        scorer.artefact = SimpleNamespace(metadata={"windowing": CONVENTION.to_dict()})
        self.metrics = Metrics(CollectorRegistry(), threshold=scorer.threshold)
        self.monitor = Monitor(self.settings, scorer, self.consumer, self.producer,  # type: ignore[arg-type]
                               self.metrics, Health(max_age_s=30.0, model_loaded=True, clock=self.clock),
                               clock=self.clock, sleep=self.clock.sleep)
        self.monitor.subscribe()
        self.consumer.rebalance([0])

    def run(self, stream: list[tuple[int, InputRecord]], steps: int = 400) -> None:
        for _, record in stream:
            self.consumer.append(0, record.sensor_id.encode(), record.to_bytes())
        for _ in range(steps):
            self.clock.now += 0.05
            self.monitor.step()

    def out(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(value) for _, value in self.producer.delivered(topic)]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0


def test_the_loop_publishes_beats_with_their_r_peak_and_rr(signal) -> None:
    loop = _Loop()
    stream = records(signal[: int(40 * FS)], 360)
    loop.run(stream + records(signal[:720], 360, sensor="no-fs", fs=None))
    expected = feed(new_windower(), stream)
    scores = loop.out("scores")
    assert [(s["r_peak_seq"], s["window_start_seq"], s["window_end_seq"]) for s in scores] == [
        (w.r_peak_seq, w.start_seq, w.end_seq) for w in expected]
    assert [s["rr_s"] for s in scores] == pytest.approx([w.rr_s for w in expected])
    assert {json.loads(base64.b64decode(d["value_b64"]))["sensor_id"] for d in loop.out("dlq")} == {"no-fs"}
    assert {d["reason"] for d in loop.out("dlq")} == {"schema"}
    assert loop.metric("ecg_monitor_beats_total") == len(expected)
    assert loop.metric("ecg_monitor_rr_interval_seconds_count") == len(expected)
    assert loop.metric("ecg_monitor_segments_started_total", reason="start") == 1


def test_the_loop_uses_the_default_fs_and_fixed_windows_when_told(signal) -> None:
    no_fs = records(signal[: int(20 * FS)], 360, fs=None)
    loop = _Loop(default_fs=FS)
    loop.run(no_fs)
    assert loop.out("scores") and not loop.out("dlq")
    fixed = _Loop(windowing="fixed")
    fixed.run(no_fs)
    scores = fixed.out("scores")
    assert len(scores) == int(20 * FS) // CONVENTION.length
    assert all(s["r_peak_seq"] is None and s["rr_s"] is None for s in scores)
    assert [s["window_start_seq"] for s in scores[:2]] == [0, CONVENTION.length]


@pytest.mark.parametrize("event", ["rebalance", "lost"])
def test_no_beat_is_lost_across_a_rebalance_or_lost_partitions(signal, event: str) -> None:
    """The revoked sensor's detector and polarity history are dropped; the partition is re-read from where its
    beats can be cut again, so every beat is published (some twice: at-least-once)."""
    loop = _Loop()
    stream = records(signal[: int(60 * FS)], 360)
    loop.run(stream[:30], steps=200)
    assert loop.out("scores") and loop.consumer.group_committed.get(0, 0) > 0  # mid-stream
    if event == "rebalance":
        loop.consumer.rebalance([0])
    else:
        loop.consumer.lose()
        loop.consumer.rebalance([0])
    loop.run(stream[30:])
    expected = feed(new_windower(), stream)
    published = {s["r_peak_seq"] for s in loop.out("scores")}
    assert published == {w.r_peak_seq for w in expected}
