"""Beat windows end to end: MIT-BIH record 100 streamed through the real broker and the daemon (scores topic on).

One daemon serves every combination at once, one sensor each: record 100 (lead MLII) at 360 Hz and resampled
to 125/250/500 Hz, in records of 1 sample, 36 samples and 10 s. Records of one sample cost one Kafka record per
sample, so those sensors stream 60 s; records of 36 samples and 10 s stream a 5-minute excerpt, and one sensor
streams the whole 30 minutes (360 Hz, 10 s records). Asserted per sensor: R-peak sensitivity and PPV >= 99.5%
against the annotated beats (150 ms); the same R peaks for every record size of a rate; the beats equal those of
the in-process BeatWindower; and, on the whole record, the same beats and scores as offline segmentation (the
detector over the whole recording, one polarity, segment(), the Scorer). A second test kills the daemon with
SIGKILL mid-stream and restarts it: the R peaks published over both runs are exactly the uninterrupted set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from support import MonitorProcess, Record, Topics, at_rate, consume_all, monitor_env, produce, wait_for

from monitor.core.artefact import Artefact
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.core.scoring import Scorer
from monitor.stream.beat_windowing import POLARITY_BEATS, BeatWindow, BeatWindower
from monitor.stream.beats import BeatConvention, Beats, estimate_polarity, segment
from monitor.stream.rpeaks import OnlineRPeakDetector
from monitor.stream.wire import InputRecord, encode_input

CONVENTION = BeatConvention()
NATIVE_FS = 360
RATES = (360, 125, 250, 500)
SIZES = {"1": 1, "36": 36, "10s": None}  # None: 10 s of samples at the sensor's rate
SECONDS = {"1": 60.0, "36": 300.0, "10s": 300.0}

pytest.importorskip("sleepecg")


@pytest.fixture(scope="module")
def beats_model(tmp_path_factory) -> Path:
    """An untrained model with the beat convention: these tests assert beats and agreement, not detection."""
    torch.manual_seed(0)
    config = ModelConfig(window_length=CONVENTION.length, embedding_dim=8, hidden_dim=16)
    artefact = Artefact(config, LSTMAutoencoder(config).state_dict(), threshold=1.0,
                        normalisation={"kind": "zscore"}, model_version="beats-test",
                        metadata={"windowing": CONVENTION.to_dict()})
    return artefact.save(tmp_path_factory.mktemp("beats-model") / "beats.pt")


def input_records(sensor: str, signal: np.ndarray, fs: int, size: int) -> Iterable[Record]:
    for start in range(0, len(signal), size):
        yield sensor.encode(), encode_input(sensor, start, signal[start:start + size], fs=float(fs))


def interleave(*streams: Iterable[Record]) -> Iterable[Record]:
    """Round-robin over the sensors' records, as live sensors would send them."""
    iterators = [iter(s) for s in streams]
    while iterators:
        for it in list(iterators):
            item = next(it, None)
            if item is None:
                iterators.remove(it)
            else:
                yield item


def reference_beats(signal: np.ndarray, fs: int) -> list[BeatWindow]:
    """The in-process BeatWindower's beats (record sizes do not matter: tests/test_beat_windowing.py)."""
    windower = BeatWindower(CONVENTION, clock=lambda: 0.0)
    out: list[BeatWindow] = []
    step = 10 * fs
    for i, start in enumerate(range(0, len(signal), step)):
        record = InputRecord(sensor_id="ref", seq=start, values=signal[start:start + step].tolist(), fs=float(fs))
        out.extend(w for w in windower.add(0, i, record)[0] if isinstance(w, BeatWindow))
    return out


def offline_beats(signal: np.ndarray, fs: int) -> Beats:
    """Offline segmentation: the detector over the whole recording at once, one polarity for it, segment()."""
    spans = OnlineRPeakDetector(fs, CONVENTION).push(0, signal)
    peaks = [s.r_peak for s in spans] + [spans[-1].next_r_peak]
    return segment(signal, fs, peaks, CONVENTION, polarity=estimate_polarity(signal, fs, peaks))


def se_ppv(scores: list[dict], truth: np.ndarray, fs: int) -> tuple[float, float]:
    """R peaks of the published beats (and the last one's next R) against the annotated beats they cover."""
    tol = int(0.15 * fs)
    last = max(scores, key=lambda s: s["r_peak_seq"])
    found = np.array(sorted({s["r_peak_seq"] for s in scores} | {last["r_peak_seq"] + round(last["rr_s"] * fs)}))
    truth = truth[(truth > found[0] - tol) & (truth < found[-1] + tol)]
    distance = np.abs(found[:, None] - truth[None, :]) <= tol
    return distance.any(axis=0).mean(), distance.any(axis=1).mean()


def by_sensor(records: list) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in records:
        value = json.loads(record.value)
        out.setdefault(value["sensor_id"], []).append(value)
    return out


def test_record_100_through_the_broker_and_the_daemon(broker, topic_prefix, tmp_path, record_100,
                                                      beats_model) -> None:
    plan = {f"r{fs}-{name}": (fs, name, SECONDS[name]) for fs in RATES for name in SIZES}
    plan["r360-10s-full"] = (NATIVE_FS, "10s", None)
    data = {sensor: at_rate(record_100, fs, seconds) for sensor, (fs, _, seconds) in plan.items()}
    # the in-process windower's beats per distinct stream (the full record is checked against offline below)
    distinct = {(fs, seconds): sensor for sensor, (fs, _, seconds) in plan.items() if seconds is not None}
    by_stream = {key: reference_beats(data[sensor][0], key[0]) for key, sensor in distinct.items()}
    references = {sensor: by_stream.get((fs, seconds), []) for sensor, (fs, _, seconds) in plan.items()}

    full = offline_beats(data["r360-10s-full"][0], NATIVE_FS)

    topics = Topics.for_prefix(topic_prefix).create(broker.bootstrap, partitions=3)
    env = monitor_env(broker.bootstrap, topics, beats_model, MONITOR_MAX_BATCH="256")
    streams = [input_records(sensor, data[sensor][0], fs, SIZES[name] or 10 * fs)
               for sensor, (fs, name, _) in plan.items()]
    with MonitorProcess(env, log_path=tmp_path / "monitor.log") as monitor:
        produce(broker.bootstrap, topics.input, interleave(*streams))
        expected = sum(len(r) for r in references.values()) + len(full) - (POLARITY_BEATS - 1)
        published = by_sensor(consume_all(broker.bootstrap, topics.scores, min_count=expected, timeout_s=600))
        wait_for(lambda: monitor.metric("ecg_monitor_beats_total") >= expected, 10)  # synced once a second
        metrics = monitor.metrics()
        assert monitor.stop() == 0

    # (a rebalance mid-run would replay some beats: at-least-once; hence >= and the de-duplication below)
    assert metrics.value("ecg_monitor_beats_total") >= expected
    assert metrics.value("ecg_monitor_segments_started_total", reason="start") >= len(plan)
    for sensor, (fs, _, seconds) in plan.items():
        scores = sorted({s["r_peak_seq"]: s for s in published[sensor]}.values(), key=lambda s: s["r_peak_seq"])
        if seconds is not None:
            reference = references[sensor]
            assert [s["r_peak_seq"] for s in scores] == [w.r_peak_seq for w in reference], sensor
            assert [(s["window_start_seq"], s["window_end_seq"]) for s in scores] == [
                (w.start_seq, w.end_seq) for w in reference]
        se, ppv = se_ppv(scores, data[sensor][1], fs)
        print(f"{sensor}: {len(scores)} beats, Se {se:.4f}, PPV {ppv:.4f}")
        assert se >= 0.995 and ppv >= 0.995, (sensor, se, ppv)

    # every record size of a rate: the same R peaks where their streams overlap
    for fs in RATES:
        sets = {name: {s["r_peak_seq"] for s in published[f"r{fs}-{name}"]} for name in SIZES}
        common_end = min(max(peaks) for peaks in sets.values())
        first = {name: {p for p in peaks if p <= common_end} for name, peaks in sets.items()}
        assert first["1"] == first["36"] == first["10s"], fs

    # offline segmentation of the whole record: the same beats, the same scores
    offline_scores = Scorer.from_file(beats_model, device="cpu").score(full.windows)
    streamed = {s["r_peak_seq"]: s["score"] for s in published["r360-10s-full"]}
    expected_peaks = [int(r) for r in full.r_peak[POLARITY_BEATS - 1:]]
    assert sorted(streamed) == expected_peaks
    np.testing.assert_allclose([streamed[r] for r in expected_peaks], offline_scores[POLARITY_BEATS - 1:],
                               rtol=1e-4, atol=1e-6)


def test_kill_9_and_restart_mid_stream_publish_the_same_r_peaks(broker, topic_prefix, tmp_path, record_100,
                                                                beats_model) -> None:
    signal, _ = at_rate(record_100, NATIVE_FS, 300.0)
    reference = [w.r_peak_seq for w in reference_beats(signal, NATIVE_FS)]
    records = list(input_records("s1", signal, NATIVE_FS, 36))
    half = len(records) // 2
    topics = Topics.for_prefix(topic_prefix).create(broker.bootstrap, partitions=1)
    env = monitor_env(broker.bootstrap, topics, beats_model)

    first = MonitorProcess(env, log_path=tmp_path / "first.log").start()
    try:
        produce(broker.bootstrap, topics.input, records[:half])
        before = {r for r in reference if r < half * 36 - 20 * NATIVE_FS}
        wait_for(lambda: before <= {json.loads(r.value)["r_peak_seq"]
                                    for r in consume_all(broker.bootstrap, topics.scores, idle_s=0.5)}, 120)
        wait_for(lambda: first.metric("ecg_monitor_offset_commits_total") >= 1, 30)  # the restart is mid-stream
    finally:
        first.kill()
    published_first = {json.loads(r.value)["r_peak_seq"] for r in consume_all(broker.bootstrap, topics.scores)}
    assert before <= published_first and len(published_first) < len(reference)  # killed mid-stream
    with MonitorProcess(env, log_path=tmp_path / "second.log") as second:
        produce(broker.bootstrap, topics.input, records[half:])
        published = consume_all(broker.bootstrap, topics.scores, min_count=len(reference), timeout_s=300)
        assert second.stop() == 0
    peaks = [json.loads(r.value)["r_peak_seq"] for r in published]
    assert set(peaks) == set(reference)
    assert len(peaks) < 2 * len(reference)  # the replay repeats the beats after the commit, not the stream
