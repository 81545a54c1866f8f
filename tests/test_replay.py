"""The replayer: stream construction (ground truth), the wire output, the rate, the CLI."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import wfdb
from kafka import KafkaConsumer

from monitor.cli import main as cli_main
from monitor.tools.replay import (BEAT_LENGTH, NORMAL_CLASS, build_ecg_streams, load_beat_pool, load_record_streams,
                                  load_signal_streams, replay, resolve_rate, whole_beats)
from monitor.stream.wire import InputRecord, decode_input
from trainer import recordings


@pytest.fixture(scope="module")
def pool(ecg_data_dir):
    return load_beat_pool(ecg_data_dir)


def consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Every record of `topic`, waiting until `expected` have arrived."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=1000)
    records, deadline = [], time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(consumer)
    finally:
        consumer.close()
    return records


def by_sensor(records: list[InputRecord]) -> dict[str, list[InputRecord]]:
    grouped = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.sensor_id, r.seq)):
        grouped[record.sensor_id].append(record)
    return grouped


def test_anomalous_sensors_get_runs_of_anomalous_beats_and_the_others_only_normal_beats(pool):
    streams = build_ecg_streams(pool, sensors=20, anomalous_fraction=0.25, beats_per_sensor=40, seed=3,
                                runs_per_sensor=2)
    assert [s.sensor_id for s in streams][:2] == ["patient-0000", "patient-0001"]
    assert sum(s.anomalous for s in streams) == 5
    normal_rows = {row.tobytes() for row in pool.normal}
    for stream in streams:
        beats = stream.values.reshape(-1, BEAT_LENGTH)
        assert len(beats) == 40 and stream.fs == 140.0
        is_normal = stream.beat_labels == NORMAL_CLASS
        # every normal-labelled beat is a normal ECG5000 beat, every other one an anomalous beat
        assert all(row.tobytes() in normal_rows for row in beats[is_normal])
        assert not any(row.tobytes() in normal_rows for row in beats[~is_normal])
        if not stream.anomalous:
            assert is_normal.all()
            continue
        assert len(stream.anomalous_ranges) == 2
        for start, end in stream.anomalous_ranges:
            assert start % BEAT_LENGTH == 0 and end % BEAT_LENGTH == 0  # windows line up with beats
            assert 4 <= (end - start) // BEAT_LENGTH <= 6
            first, last = start // BEAT_LENGTH, end // BEAT_LENGTH
            assert is_normal[first - 2:first].all() and is_normal[last:last + 2].all()
        assert (~is_normal).sum() == sum(e - s for s, e in stream.anomalous_ranges) // BEAT_LENGTH


def test_stream_beats_come_from_the_held_out_test_part_of_the_protocol_split(pool, ecg_data_dir):
    from trainer.data import load
    from trainer.split import split

    parts = split(load(ecg_data_dir))
    fitted_on = {row.tobytes() for row in np.concatenate([parts.train.windows, parts.val.windows])[:, :, 0]}
    streams = build_ecg_streams(pool, sensors=10, anomalous_fraction=0.5, beats_per_sensor=30, seed=5)
    beats = np.concatenate([s.values.reshape(-1, BEAT_LENGTH) for s in streams])
    assert len(beats) == 300 and not any(beat.tobytes() in fitted_on for beat in beats)


def test_streams_are_deterministic_per_seed(pool):
    first = build_ecg_streams(pool, sensors=6, anomalous_fraction=0.5, beats_per_sensor=15, seed=7)
    again = build_ecg_streams(pool, sensors=6, anomalous_fraction=0.5, beats_per_sensor=15, seed=7)
    other = build_ecg_streams(pool, sensors=6, anomalous_fraction=0.5, beats_per_sensor=15, seed=8)
    assert all(np.array_equal(a.values, b.values) and a.anomalous_ranges == b.anomalous_ranges
               for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a.values, b.values) for a, b in zip(first, other, strict=True))


def test_too_short_streams_for_the_runs_are_refused(pool):
    with pytest.raises(ValueError, match="too few"):
        build_ecg_streams(pool, sensors=2, anomalous_fraction=1.0, beats_per_sensor=8)


@pytest.mark.kafka
def test_replayed_records_decode_with_the_monitor_input_model(broker, pool, topic_prefix):
    streams = build_ecg_streams(pool, sensors=4, anomalous_fraction=0.5, beats_per_sensor=10, seed=1)
    topic = f"{topic_prefix}.samples"
    broker.create_topics({topic: 3})
    before = time.time()
    summary = replay(broker.bootstrap, topic, streams, rate="max", samples_per_message=32)
    assert summary.records == 4 * 44 and summary.samples == 4 * 1400 and summary.errors == 0  # 1400 = 43*32 + 24

    messages = consume(broker.bootstrap, topic, summary.records)
    records = [decode_input(m.key, m.value) for m in messages]
    assert len(records) == summary.records
    for stream in streams:
        mine = by_sensor(records)[stream.sensor_id]
        assert [r.seq for r in mine] == list(range(0, 1400, 32))
        assert np.array_equal(np.concatenate([r.values for r in mine]), stream.values)
        assert all(r.fs == 140.0 and before <= r.ts <= time.time() for r in mine)


@pytest.mark.kafka
@pytest.mark.parametrize("rate, beats", [(700.0, 10), ("realtime", 4)])
def test_replay_keeps_the_requested_rate(broker, pool, topic_prefix, rate, beats):
    streams = build_ecg_streams(pool, sensors=3, anomalous_fraction=0.0, beats_per_sensor=beats, seed=2)
    per_sensor = resolve_rate(rate, streams)
    expected_s = beats * BEAT_LENGTH / per_sensor  # 2 s at 700/s, 4 s in real time (140/s)
    topic = f"{topic_prefix}.rate"
    summary = replay(broker.bootstrap, topic, streams, rate=rate, samples_per_message=35)
    assert summary.seconds == pytest.approx(expected_s, rel=0.1)
    assert summary.samples_per_second_per_sensor == pytest.approx(per_sensor, rel=0.1)

    # the records themselves are spread over the schedule, not sent in one burst at the end
    records = [decode_input(m.key, m.value) for m in consume(broker.bootstrap, topic, summary.records)]
    for mine in by_sensor(records).values():
        elapsed = mine[-1].ts - mine[0].ts
        scheduled = (mine[-1].seq - mine[0].seq) / per_sensor
        assert elapsed == pytest.approx(scheduled, rel=0.1)


@pytest.mark.kafka
def test_duration_repeats_the_streams_with_increasing_seq(broker, pool, topic_prefix):
    streams = build_ecg_streams(pool, sensors=2, anomalous_fraction=0.0, beats_per_sensor=2, seed=4)
    topic = f"{topic_prefix}.loop"
    summary = replay(broker.bootstrap, topic, streams, rate=1400.0, samples_per_message=70, duration=1.0, loop=True)
    assert summary.seconds == pytest.approx(1.0, abs=0.2)
    assert summary.samples // 2 == pytest.approx(1400, rel=0.15)  # 1 s at 1400/s: five passes of 280 samples
    records = [decode_input(m.key, m.value) for m in consume(broker.bootstrap, topic, summary.records)]
    for stream in streams:
        mine = by_sensor(records)[stream.sensor_id]
        assert [r.seq for r in mine] == list(range(0, 70 * len(mine), 70))
        values = np.concatenate([r.values for r in mine])
        assert np.array_equal(values, np.resize(stream.values, len(values)))


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npy"])
def test_signal_files_become_one_stream_per_column(tmp_path, suffix):
    pd = pytest.importorskip("pandas")
    t = np.arange(500) / 250.0
    a, b = np.sin(2 * np.pi * t), np.cos(2 * np.pi * t)
    path = tmp_path / f"signal{suffix}"
    if suffix == ".npy":
        np.save(path, np.stack([a, b], axis=1))
    else:
        frame = pd.DataFrame({"time": t, "lead_i": a, "lead_ii": b})
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    streams = load_signal_streams(path, sensors=3, fs=250.0)
    assert [s.sensor_id for s in streams] == ["sensor-0000", "sensor-0001", "sensor-0002"]
    assert np.allclose(streams[0].values, a) and np.allclose(streams[1].values, b)
    assert np.allclose(streams[2].values, a)  # round-robin over the channels
    assert all(s.fs == 250.0 and not s.anomalous for s in streams)


@pytest.mark.kafka
def test_cli_replays_and_prints_a_summary(broker, ecg_data_dir, topic_prefix, tmp_path, capsys):
    topic = f"{topic_prefix}.cli"
    truth = tmp_path / "truth.json"
    code = cli_main(["replay", "--bootstrap-servers", broker.bootstrap, "--topic", topic, "--data", str(ecg_data_dir),
                     "--sensors", "4", "--anomalous-fraction", "0.5", "--beats-per-sensor", "12", "--rate", "max",
                     "--samples-per-message", "70", "--no-progress", "--truth-out", str(truth)])
    assert code == 0
    assert "sent 96 records (6,720 samples) from 4 sensors" in capsys.readouterr().out
    ground_truth = json.loads(truth.read_text())
    assert sum(s["anomalous"] for s in ground_truth) == 2
    records = [decode_input(m.key, m.value) for m in consume(broker.bootstrap, topic, 96)]
    assert {r.sensor_id for r in records} == {s["sensor_id"] for s in ground_truth}


RECORD_100 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mitdb-100" / "100.hea"


@pytest.mark.skipif(not RECORD_100.is_file(), reason="MIT-BIH record 100 not available")
def test_a_wfdb_record_streams_at_its_own_rate_with_each_sensor_starting_elsewhere():
    streams = load_record_streams(RECORD_100, sensors=4, lead="V5")
    signal = wfdb.rdrecord(str(RECORD_100.with_suffix("")), channel_names=["V5"]).p_signal[:, 0]
    beats = recordings.read(RECORD_100)[0].annotations.samples
    lo, hi = beats[0] - 36, beats[-1] - 36  # whole beats: 0.1 s before the first R peak to as far before the last
    signal = signal[lo:hi]
    n = len(signal)
    assert all(s.fs == 360.0 and len(s) == n for s in streams)
    for i, stream in enumerate(streams):
        start = i * (n // 4)
        assert np.array_equal(stream.values[: n - start], signal[start:])  # then it wraps round to the start
    # record 100's one ventricular beat (sample 546792) and its 33 atrial premature beats are the ground truth
    assert any(l0 <= 546792 - lo < h0 for l0, h0 in streams[0].anomalous_ranges)
    assert len(streams[0].anomalous_ranges) == 34  # 34 non-normal beats, none adjacent
    with pytest.raises(ValueError, match=r"RECORD\.hea"):
        load_record_streams(RECORD_100.with_suffix(".dat"))


@pytest.mark.skipif(not RECORD_100.is_file(), reason="MIT-BIH record 100 not available")
def test_a_record_replayed_in_a_loop_joins_its_end_to_its_start_with_a_real_rr_interval():
    """No made-up beat where a sensor wraps round: the interval across the join is the record's last one."""
    record = recordings.read(RECORD_100)[0]
    looped = whole_beats(record)
    beats, fs = record.annotations.samples, record.fs
    assert looped.annotations.samples[0] == round(0.1 * fs) and len(looped.annotations.samples) == len(beats) - 1
    across = len(looped.signal) - looped.annotations.samples[-1] + looped.annotations.samples[0]
    assert across == beats[-1] - beats[-2]
    assert np.array_equal(looped.signal, record.signal[beats[0] - round(0.1 * fs):beats[-1] - round(0.1 * fs)])


@pytest.mark.kafka
@pytest.mark.skipif(not RECORD_100.is_file(), reason="MIT-BIH record 100 not available")
def test_cli_replays_a_wfdb_record_with_records_of_the_requested_duration(broker, topic_prefix, capsys):
    topic = f"{topic_prefix}.record"
    before = time.time()
    code = cli_main(["replay", "--bootstrap-servers", broker.bootstrap, "--topic", topic, "--source", str(RECORD_100),
                     "--sensors", "3", "--offset-s", "60", "--record-ms", "100", "--rate", "3600",
                     "--duration", "0.5", "--no-progress"])
    assert code == 0
    sent = int(capsys.readouterr().out.split("sent ")[1].split(" records")[0].replace(",", ""))
    records = [decode_input(m.key, m.value) for m in consume(broker.bootstrap, topic, sent)]
    assert len(records) == sent >= 3 * 10
    signal = wfdb.rdrecord(str(RECORD_100.with_suffix("")), channels=[0]).p_signal[:, 0]
    first_beat = recordings.read(RECORD_100)[0].annotations.samples[0]  # the replay starts 0.1 s before it
    grouped = by_sensor(records)
    assert sorted(grouped) == ["patient-0000", "patient-0001", "patient-0002"]
    for i, mine in enumerate(grouped.values()):
        assert [r.seq for r in mine] == list(range(0, 36 * len(mine), 36))  # 100 ms at 360 Hz
        assert all(r.fs == 360.0 and len(r.values) == 36 and before <= r.ts <= time.time() for r in mine)
        values = np.concatenate([r.values for r in mine])
        start = first_beat - 36 + i * 60 * 360  # sensor i starts i minutes into the record's whole beats
        assert np.allclose(values, signal[start:start + len(values)])


@pytest.mark.parametrize("command, flags", [("replay", ("RECORD.hea", "--lead", "--record-ms", "--offset-s")),
                                            ("demo", ("RECORD.hea", "--lead", "--record-ms"))])
def test_help_describes_wfdb_records(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in flags:
        assert flag in text, flag


def test_ecg5000_is_read_from_the_copy_beside_the_checkout_before_any_download(tmp_path, monkeypatch):
    """Offline, with no --data and no ECG5000_DIR, the demo and the replayer use ../shared/data/ECG5000 (where
    the tests find it too) instead of failing on the download; elsewhere they still download."""
    from monitor.tools import replay
    assert replay.LOCAL_ECG5000 == Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ECG5000"

    def no_network(cache_dir):
        raise replay.DataError("could not download ECG5000 (no network)")

    monkeypatch.setattr(replay, "download_ecg5000", no_network)
    local = tmp_path / "shared" / "data" / "ECG5000"
    local.mkdir(parents=True)
    monkeypatch.setattr(replay, "LOCAL_ECG5000", local)
    with pytest.raises(replay.DataError, match="ECG5000_DIR"):
        replay.ensure_data(None, tmp_path / "cache")  # an empty folder is not a copy
    (local / "ECG5000_TEST.txt").write_text("1 0.1 0.2\n")
    assert replay.ensure_data(None, tmp_path / "cache") == local
    assert replay.ensure_data(tmp_path / "given", tmp_path / "cache") == tmp_path / "given"
