"""Reliability: faults injected into the running daemon, against the real broker (Tansu).

- kill -9 mid-stream, twice, then restart: every window is scored at least once, alert ids are
  the ones a clean run gives;
- two daemons in one group: both score; one is killed and the other takes its partitions;
- broker outage (20 s): /healthz stays 200 (the loop turns), /readyz is 503 until the broker is
  back, the process never exits, and scoring resumes;
- a burst of 10k bad records among good ones: each is dead-lettered with its reason, and the good
  windows are all scored.

"Lost" is measured on the scores topic (MONITOR_SCORES_TOPIC): a window is lost if no score
record for it ever appears. The model is a small untrained autoencoder whose threshold is placed
at the median score of ECG5000 test beats; normal beats are those scoring 3% or more below it,
anomalous ones 3% or more above, so float noise between batch sizes can never flip a flag and
the expected alert ids are exact. Its artefact carries the normal beats' error percentiles (the
calibration prior), each sensor calibrates on WARMUP normal beats before its first anomalous run,
and the expected alert ids are derived offline through the daemon's calibration and policy
(support.expected_calibrated_alert_ids). These tests check the daemon, not the model.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from support import (MonitorProcess, Topics, alert_keys, committed_records, consume_all, consume_json,
                     expected_calibrated_alert_ids, load_ecg5000, monitor_env, produce, stream_records, wait_for)

from bench import tally
from monitor.core.artefact import Artefact
from monitor.tools.broker import EmbeddedBroker, free_port
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.core.scoring import Scorer
from monitor.stream.wire import REJECT_REASONS, DeadLetter

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.slow]

WARMUP = 5  # normal beats each sensor calibrates on (MONITOR_CALIBRATION_WARMUP_BEATS) before a run
CHUNK = 35  # samples per record: four records per 140-sample window
SCORED = "ecg_monitor_windows_scored_total"


@dataclass
class Beats:
    model: Path
    scorer: Scorer
    normal: np.ndarray
    anomalous: np.ndarray
    window_length: int


@pytest.fixture(scope="module")
def beats(tmp_path_factory, ecg_data_dir) -> Beats:
    x, _ = load_ecg5000(ecg_data_dir, ("TEST",))
    x = x[:1500]
    config = ModelConfig(embedding_dim=8, hidden_dim=16)
    torch.manual_seed(0)
    draft = Artefact(config, LSTMAutoencoder(config).state_dict(), threshold=1.0,
                     normalisation={"kind": "zscore"}, model_version="reliability-untrained")
    errors = Scorer(draft, device="cpu").score(x)
    threshold = float(np.median(errors))
    normal_errors = errors[errors < 0.97 * threshold]
    stats = {"p50": float(np.percentile(normal_errors, 50)), "p95": float(np.percentile(normal_errors, 95))}
    artefact = replace(draft, threshold=threshold, metadata={"validation_errors": stats})
    path = artefact.save(tmp_path_factory.mktemp("model") / "model.pt")
    normal, anomalous = x[errors < 0.97 * threshold], x[errors > 1.03 * threshold]
    assert len(normal) >= 100 and len(anomalous) >= 100
    return Beats(path, Scorer.from_file(path, device="cpu"), normal, anomalous, config.window_length)


def make_streams(beats: Beats, sensors: int, per_sensor: int, seed: int):
    """sensor -> beats (WARMUP + per_sensor, L), and sensor -> anomalous flag per window. Every third
    sensor gets two runs of three anomalous beats after its warm-up (each fires an alert)."""
    rng = np.random.default_rng(seed)
    streams, flags = {}, {}
    for i in range(sensors):
        sensor = f"s{seed}-{i:03d}"
        flag = [False] * (WARMUP + per_sensor)
        if i % 3 == 0:
            for start in (WARMUP + 1 + i % 3, WARMUP + per_sensor // 2 + i % 4):
                flag[start:start + 3] = [True] * 3
        pools = [beats.anomalous if f else beats.normal for f in flag]
        streams[sensor] = np.stack([pool[rng.integers(len(pool))] for pool in pools])
        flags[sensor] = flag
    return streams, flags


def all_windows(flags: dict, window_length: int, first: int = 0) -> set[tuple[str, int]]:
    return {(s, i * window_length) for s, f in flags.items() for i in range(first, len(f))}


def scored(bootstrap: str, topic: str) -> list[dict]:
    return consume_json(bootstrap, topic, idle_s=0.5)


def windows_of(scores: list[dict]) -> set[tuple[str, int]]:
    return {(s["sensor_id"], s["window_start_seq"]) for s in scores}


def wait_all_scored(bootstrap: str, topic: str, expected: set, timeout_s: float) -> list[dict]:
    """The score records once every expected window has one (or whatever is there at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        scores = scored(bootstrap, topic)
        if expected <= windows_of(scores) or time.monotonic() > deadline:
            return scores
        time.sleep(1.0)


def produce_in_background(bootstrap: str, topic: str, records: list, seconds: float):
    """Start producing `records` paced over about `seconds`; returns finish(), which waits and
    returns the count sent (re-raising the producer's error, if any)."""
    result: dict = {}

    def work() -> None:
        try:
            result["count"] = produce(bootstrap, topic, records, pace_s=seconds / len(records))
        except BaseException as exc:  # handed to the test by finish()
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()

    def finish(timeout_s: float = 90.0) -> int:
        thread.join(timeout_s)
        if "error" in result:
            raise result["error"]
        assert "count" in result, "the producer did not finish"
        return result["count"]

    return finish


def check_alerts(alerts: list[dict], beats: Beats, streams: dict, flags: dict) -> None:
    """Exactly the alert ids a clean run gives; a redelivered alert repeats id and content. (Which
    sensors alert is the untrained model's business: calibrated on 5 beats it misses a run or
    alerts on a normal sensor now and then; the ids must match whatever a clean run gives.)"""
    expected = expected_calibrated_alert_ids(beats.scorer, streams, warmup_beats=WARMUP)
    assert any(i.endswith(":firing") for i in expected)  # not vacuous
    assert alert_keys(alerts) == expected
    assert len({a["alert_id"] for a in alerts}) == len(expected)  # a redelivered alert repeats its id
    first: dict[str, dict] = {}
    for alert in alerts:
        seen = first.setdefault(alert["alert_id"], alert)
        for field in ("sensor_id", "state", "window_start_seq", "window_end_seq", "threshold", "model_version"):
            assert alert[field] == seen[field], (alert, seen)
        assert alert["score"] == pytest.approx(seen["score"], rel=1e-4)


# -- kill -9 -----------------------------------------------------------------------------------

def test_kill_9_mid_stream_twice_then_restart_loses_no_window_and_keeps_alert_ids(broker, beats, tmp_path,
                                                                                   topic_prefix):
    topics = Topics.for_prefix(topic_prefix).create(broker.bootstrap, partitions=3)
    env = monitor_env(broker.bootstrap, topics, beats.model, MONITOR_CALIBRATION_WARMUP_BEATS=WARMUP,
                      MONITOR_MAX_BATCH=16)
    streams, flags = make_streams(beats, sensors=24, per_sensor=20, seed=1)
    expected = all_windows(flags, beats.window_length)
    records = list(stream_records(streams, chunk=CHUNK))
    kills = 0
    for run in range(2):
        daemon = MonitorProcess(env, log_path=tmp_path / f"run{run}.log").start()
        if run == 0:
            finish = produce_in_background(broker.bootstrap, topics.input, records, seconds=12)
        wait_for(lambda daemon=daemon: daemon.metric(SCORED) >= len(expected) // 5, 90,
                 message=lambda daemon=daemon: daemon.log_text()[-2000:])
        assert daemon.kill() == -9
        kills += 1
        before = windows_of(scored(broker.bootstrap, topics.scores))
        assert len(before) < len(expected), "the kill came after everything was scored: not mid-stream"
    with MonitorProcess(env, log_path=tmp_path / "final.log") as daemon:
        assert finish() == len(records)
        scores = wait_all_scored(broker.bootstrap, topics.scores, expected, 120)
        alerts = consume_json(broker.bootstrap, topics.alerts)
        assert daemon.stop() == 0
    lost = expected - windows_of(scores)
    tally.record("kill -9 mid-stream", records_tried=len(records), faults_injected=kills,
                 windows_expected=len(expected), windows_lost=len(lost))
    assert not lost, sorted(lost)[:10]
    assert windows_of(scores) == expected
    check_alerts(alerts, beats, streams, flags)


# -- two daemons in one group ------------------------------------------------------------------

def test_two_daemons_share_the_partitions_and_one_takes_over_when_the_other_is_killed(broker, beats, tmp_path,
                                                                                      topic_prefix):
    topics = Topics.for_prefix(topic_prefix).create(broker.bootstrap, partitions=4)
    env = monitor_env(broker.bootstrap, topics, beats.model, MONITOR_CALIBRATION_WARMUP_BEATS=WARMUP,
                      MONITOR_MAX_BATCH=16)
    streams, flags = make_streams(beats, sensors=24, per_sensor=16, seed=2)
    expected = all_windows(flags, beats.window_length)
    records = list(stream_records(streams, chunk=CHUNK))
    half = len(records) // 2
    with MonitorProcess(env, log_path=tmp_path / "a.log") as a, \
            MonitorProcess({**env, "MONITOR_METRICS_PORT": str(free_port())}, log_path=tmp_path / "b.log") as b:
        assigned = "ecg_monitor_assigned_partitions"
        wait_for(lambda: a.metric(assigned) > 0 and b.metric(assigned) > 0
                 and a.metric(assigned) + b.metric(assigned) == 4, 60,
                 message="the partitions did not split between the two daemons")
        produce(broker.bootstrap, topics.input, records[:half])
        wait_for(lambda: a.metric(SCORED) > 0 and b.metric(SCORED) > 0, 60, message="both daemons should score")
        finish = produce_in_background(broker.bootstrap, topics.input, records[half:], seconds=6)
        assert a.kill() == -9
        wait_for(lambda: b.metric("ecg_monitor_assigned_partitions") == 4, 60,
                 message=lambda: "the survivor did not take over every partition:\n" + b.log_text()[-2000:])
        assert finish() == len(records) - half
        scores = wait_all_scored(broker.bootstrap, topics.scores, expected, 120)
        alerts = consume_json(broker.bootstrap, topics.alerts)
        assert b.stop() == 0
    lost = expected - windows_of(scores)
    tally.record("two daemons, one killed", records_tried=len(records), faults_injected=1,
                 windows_expected=len(expected), windows_lost=len(lost))
    assert not lost, sorted(lost)[:10]
    check_alerts(alerts, beats, streams, flags)


# -- broker outage -----------------------------------------------------------------------------

OUTAGE_S = 20.0
NOT_READY_WITHIN_S = 15.0  # the broker probe runs every 5 s and each Kafka call is bounded by 5 s
HEALTHZ_MAX_AGE_S = 10


def test_broker_outage_keeps_the_daemon_alive_and_healthy_but_not_ready_then_it_resumes(beats, tmp_path, topic_prefix):
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log").start()
    topics = Topics.for_prefix(topic_prefix)
    streams, flags = make_streams(beats, sensors=12, per_sensor=15, seed=3)
    before_windows = 9  # windows per sensor sent before the outage; the rest after it
    first = {s: v[:before_windows] for s, v in streams.items()}
    rest = {s: v[before_windows:] for s, v in streams.items()}
    try:
        topics.create(broker.bootstrap, partitions=3)
        env = monitor_env(broker.bootstrap, topics, beats.model, MONITOR_CALIBRATION_WARMUP_BEATS=WARMUP,
                          MONITOR_HEALTHZ_MAX_AGE_S=HEALTHZ_MAX_AGE_S)
        with MonitorProcess(env, log_path=tmp_path / "monitor.log") as daemon:
            records = produce(broker.bootstrap, topics.input, stream_records(first, chunk=CHUNK))
            expected_first = all_windows({s: f[:before_windows] for s, f in flags.items()}, beats.window_length)
            scores_first = wait_all_scored(broker.bootstrap, topics.scores, expected_first, 60)
            assert expected_first <= windows_of(scores_first)

            broker.stop()
            stopped = time.monotonic()
            polls = []  # (seconds since the stop, /healthz status, /readyz status)
            while time.monotonic() - stopped < OUTAGE_S:
                assert daemon.returncode is None, "the daemon exited during the outage:\n" + daemon.log_text()[-2000:]
                polls.append((time.monotonic() - stopped, daemon.get("/healthz")[0], daemon.get("/readyz")[0]))
                time.sleep(0.5)
            broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu.log").start()
            topics.create(broker.bootstrap, partitions=3)  # the in-memory broker came back empty
            assert all(health == 200 for _, health, _ in polls), polls
            not_ready = [t for t, _, ready in polls if ready == 503]
            assert not_ready and not_ready[0] <= NOT_READY_WITHIN_S, polls
            assert all(ready == 503 for t, _, ready in polls if t >= not_ready[0]), f"/readyz flapped: {polls}"

            wait_for(lambda: daemon.get("/readyz")[0] == 200, 90,
                     message=lambda: "not ready again after the outage:\n" + daemon.log_text()[-2000:])
            sent = produce(broker.bootstrap, topics.input,
                           stream_records(rest, chunk=CHUNK, seq0=before_windows * beats.window_length))
            records += sent
            expected_rest = all_windows(flags, beats.window_length, first=before_windows)
            scores_rest = wait_all_scored(broker.bootstrap, topics.scores, expected_rest, 90)
            assert daemon.metric("ecg_monitor_kafka_errors_total", operation="probe") > 0
            # Stop once it has committed everything: the broker came back with its topics recreated, and the
            # producer's first sends to them wait for fresh metadata (seconds); a stop in that wait outlives the
            # group's 6 s poll interval and ends unclean. An operator's topics are not recreated.
            wait_for(lambda: committed_records(broker.bootstrap, env["MONITOR_GROUP_ID"], topics.input, 3) >= sent,
                     60, message=lambda: "not all committed after the outage:\n" + daemon.log_text()[-2000:])
            assert daemon.returncode is None
            assert daemon.stop() == 0
    finally:
        broker.stop()
    lost = expected_rest - windows_of(scores_rest)
    tally.record("broker outage 20 s", records_tried=records, faults_injected=1,
                 windows_expected=len(expected_first) + len(expected_rest), windows_lost=len(lost))
    assert not lost, sorted(lost)[:10]


# -- a burst of bad records --------------------------------------------------------------------

BAD_RECORDS = 10_000
MAX_RECORD_BYTES = 4096


def bad_records(count: int) -> tuple[list[tuple[bytes, bytes]], Counter]:
    """`count` bad records, every reason in turn, keyed over many sensors (so every partition
    gets its share), and how many of each reason."""
    good = {"seq": 0, "values": [0.1, 0.2]}
    makers = {
        "oversized": lambda k: json.dumps({"sensor_id": k, **good, "pad": "x" * MAX_RECORD_BYTES}),
        "not_json": lambda k: f"{{{k} this is not json",
        "schema": lambda k: json.dumps({"sensor_id": k, **good, "seq": "twelve"}),
        "non_finite": lambda k: '{"sensor_id": "' + k + '", "seq": 0, "values": [0.1, NaN]}',
        "empty_values": lambda k: json.dumps({"sensor_id": k, **good, "values": []}),
        "key_mismatch": lambda k: json.dumps({"sensor_id": k + "-other", **good}),
    }
    assert set(makers) == set(REJECT_REASONS)
    out, reasons = [], Counter()
    for i in range(count):
        reason = REJECT_REASONS[i % len(REJECT_REASONS)]
        key = f"bad-{i % 97:02d}"
        out.append((key.encode(), makers[reason](key).encode()))
        reasons[reason] += 1
    return out, reasons


def test_a_burst_of_10k_bad_records_is_dead_lettered_and_does_not_stall_the_good_ones(broker, beats, tmp_path,
                                                                                      topic_prefix):
    topics = Topics.for_prefix(topic_prefix).create(broker.bootstrap, partitions=3)
    env = monitor_env(broker.bootstrap, topics, beats.model, MONITOR_CALIBRATION_WARMUP_BEATS=WARMUP,
                      MONITOR_MAX_RECORD_BYTES=MAX_RECORD_BYTES)
    streams, flags = make_streams(beats, sensors=12, per_sensor=12, seed=4)
    expected = all_windows(flags, beats.window_length)
    good = list(stream_records(streams, chunk=CHUNK))
    bad, reasons = bad_records(BAD_RECORDS)
    half = len(good) // 2
    with MonitorProcess(env, log_path=tmp_path / "monitor.log") as daemon:
        produce(broker.bootstrap, topics.input, good[:half] + bad + good[half:])
        scores = wait_all_scored(broker.bootstrap, topics.scores, expected, 120)
        letters = consume_all(broker.bootstrap, topics.dlq, min_count=BAD_RECORDS, timeout_s=120)
        alerts = consume_json(broker.bootstrap, topics.alerts)
        for reason, count in reasons.items():
            assert daemon.metric("ecg_monitor_invalid_records_total", reason=reason) == count
        assert daemon.stop() == 0
    lost = expected - windows_of(scores)
    tally.record("10k bad records burst", records_tried=len(good) + len(bad), faults_injected=len(bad),
                 windows_expected=len(expected), windows_lost=len(lost))
    assert not lost, sorted(lost)[:10]
    check_alerts(alerts, beats, streams, flags)

    dead = [DeadLetter.model_validate_json(r.value) for r in letters]
    assert len(dead) == BAD_RECORDS  # each exactly once: nothing was redelivered in this run
    assert Counter(d.reason for d in dead) == reasons
    for record, letter in zip(letters, dead, strict=True):
        assert dict(record.headers)["dlq.reason"] == letter.reason.encode()
    assert Counter((base64.b64decode(d.key_b64), d.original_value()) for d in dead) == Counter(bad)
