"""Reliability of the loop itself (issue 12), in-process over the fake clients in fake time: poison
outputs, missing output topics, non-finite scores, backpressure, sensors above max_sensors,
failing and slow rebalance callbacks. (The same cases against the real broker and daemon are in
test_reliability_round2.py.)"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
from fakes import FakeClock, FakeConsumer, FakeProducer, FakeScorer
from kafka.errors import MessageSizeTooLargeError, TopicAuthorizationFailedError
from prometheus_client import CollectorRegistry

from monitor.daemon.http import Health
from monitor.daemon.loop import REBALANCE_BUDGET_S, Monitor
from monitor.daemon.metrics import Metrics
from monitor.daemon.settings import MonitorSettings
from monitor.stream.wire import encode_input

L = 4
TOPIC, SCORES, ALERTS, DLQ = "in", "scores", "alerts", "dlq"


class Scorer(FakeScorer):
    """FakeScorer (window mean), NaN for windows of 7.0, and slow (fake time) when told."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(L)
        self.artefact = SimpleNamespace(metadata={})
        self.clock, self.seconds_per_batch = clock, 0.0

    def score(self, windows: np.ndarray) -> np.ndarray:
        self.clock.now += self.seconds_per_batch
        errors = super().score(windows)
        errors[errors == 7.0] = np.nan
        return errors


class Rig:
    def __init__(self, producer: FakeProducer | None = None, partitions: int = 1, **overrides: Any) -> None:
        values: dict[str, Any] = dict(input_topic=TOPIC, scores_topic=SCORES, alerts_topic=ALERTS, dlq_topic=DLQ,
                                      max_batch=3, max_wait_ms=10, shutdown_timeout_s=20.0)
        values.update(overrides)
        self.settings = MonitorSettings(_env_file=None, **values)  # type: ignore[call-arg]
        self.clock = FakeClock(1000.0)
        self.consumer = FakeConsumer(TOPIC, partitions, max_poll_records=self.settings.max_poll_records)
        self.producer = producer or FakeProducer()
        self.scorer = Scorer(self.clock)
        self.health = Health(max_age_s=30.0, model_loaded=True, clock=self.clock)
        self.metrics = Metrics(CollectorRegistry(), threshold=self.scorer.threshold)
        self.monitor = Monitor(self.settings, self.scorer, self.consumer, self.producer,  # type: ignore[arg-type]
                               self.metrics, self.health, clock=self.clock, sleep=self.clock.sleep)
        self.monitor.subscribe()
        self.consumer.rebalance(range(partitions))
        self.seq: dict[str, int] = {}

    def produce(self, sensor: str, n: int, level: float = 0.0, partition: int = 0) -> None:
        seq = self.seq.get(sensor, 0)
        self.consumer.append(partition, sensor.encode(), encode_input(sensor, seq, [level] * n))
        self.seq[sensor] = seq + n

    def steps(self, count: int, dt: float = 0.05) -> None:
        for _ in range(count):
            self.clock.now += dt
            self.monitor.step()

    def scored(self) -> list[tuple[str, int]]:
        return [(r["sensor_id"], r["window_start_seq"]) for r in map(json.loads, (v for _, v in
                                                                                   self.producer.delivered(SCORES)))]

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value


class RefusingProducer(FakeProducer):
    """send() raises for one topic, as kafka-python does for a record over max_request_size."""

    def __init__(self, topic: str, error: Exception) -> None:
        super().__init__()
        self.refused_topic, self.error = topic, error

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None, **kw: Any) -> Any:
        if topic == self.refused_topic:
            raise self.error
        return super().send(topic, value, key, headers, **kw)


def test_a_dead_letter_that_can_never_be_produced_is_counted_dropped_and_consumption_goes_on():
    """Before: the send was retried forever and no offset was ever committed again."""
    rig = Rig(RefusingProducer(DLQ, MessageSizeTooLargeError("1.2 MB > max_request_size")))
    rig.produce("a", 4)
    rig.consumer.append(0, b"poison", b"\xff not json")
    rig.produce("a", 4)
    rig.steps(40)
    assert rig.scored() == [("a", 0), ("a", 4)]
    assert rig.consumer.group_committed == {0: 3}
    assert rig.metric("ecg_monitor_unproducible_outputs_total", topic="dlq", reason="too_large") == 1
    assert rig.health.healthz()[0]


def test_an_alert_that_can_never_be_produced_holds_the_commit_and_fails_liveness_after_the_progress_timeout():
    rig = Rig(RefusingProducer(ALERTS, TopicAuthorizationFailedError("no ACL")), progress_timeout_s=60.0)
    rig.health.progressed()
    for _ in range(200):  # anomalous windows until an alert fires (ScorePolicy needs a few)
        rig.produce("a", 4, level=1.0)
    rig.steps(50)
    assert rig.metric("ecg_monitor_unproducible_outputs_total", topic="alerts", reason="unauthorized") == 1
    committed = dict(rig.consumer.group_committed)
    rig.steps(100, dt=1.0)  # 100 s without progress: the alert is retried, nothing more is committed
    assert rig.consumer.group_committed == committed
    healthy, body = rig.health.healthz()
    assert not healthy and body["no_progress_s"] >= 60.0


def test_a_missing_output_topic_is_not_ready_and_pauses_fetching_until_it_exists():
    rig = Rig()
    rig.consumer.topics_present = {TOPIC, ALERTS, SCORES}  # the dead-letter topic is missing
    rig.produce("a", 4)
    rig.consumer.append(0, b"bad", b"not json")
    rig.steps(20)
    ready, body = rig.health.readyz()
    assert not ready and body["missing_topics"] == [DLQ]
    assert rig.consumer.paused_partitions == {0}
    rig.consumer.topics_present = None  # created
    rig.steps(20, dt=1.0)
    assert rig.health.readyz()[0] and rig.consumer.paused_partitions == set()
    assert rig.scored() == [("a", 0)] and len(rig.producer.delivered(DLQ)) == 1
    assert rig.consumer.group_committed == {0: 2}


def test_non_finite_scores_are_counted_and_skipped_and_the_error_histogram_stays_finite():
    """Before: a NaN score counted as normal and the histogram's sum stayed NaN forever."""
    rig = Rig()
    for level in (0.0, 7.0, 0.0):
        rig.produce("a", 4, level=level)
    rig.steps(20)
    assert rig.scored() == [("a", 0), ("a", 8)]
    assert rig.metric("ecg_monitor_non_finite_scores_total") == 1
    assert np.isfinite(rig.metric("ecg_monitor_reconstruction_error_sum"))
    assert rig.consumer.group_committed == {0: 3}


def test_a_backlog_of_large_records_keeps_pending_windows_bounded_and_commits_advancing():
    """Before: each step polled up to max_poll_records records but scored one batch."""
    rig = Rig(max_poll_records=500, max_batch=4, max_pending_windows=16)
    for _ in range(300):
        rig.produce("a", 10 * L)  # ten windows per record
    most, commits = 0, []
    for _ in range(2000):
        rig.steps(1)
        most = max(most, len(rig.monitor.batcher))
        commits.append(rig.consumer.group_committed.get(0, 0))
        if rig.consumer.lag() == 0 and not len(rig.monitor.batcher):
            break
    assert most <= 16 + 10  # the bound plus one record's windows
    assert rig.metric("ecg_monitor_backpressure_pauses_total") >= 1
    assert len(set(commits)) > 10 and commits == sorted(commits)  # commits advance all along
    rig.steps(30)
    assert len(rig.scored()) == 3000 and rig.consumer.group_committed == {0: 300}


def test_above_max_sensors_residents_are_scored_and_newcomers_dead_lettered_nothing_lost():
    """Before: round-robin sensors above max_sensors evicted each other; few windows completed."""
    rig = Rig(max_sensors=3, evict_min_idle_s=30.0)
    for _ in range(4):
        for i in range(5):
            rig.produce(f"s{i}", L // 2)
    rig.steps(40)
    assert sorted(rig.scored()) == [(f"s{i}", s) for i in range(3) for s in (0, 4)]
    letters = [json.loads(v) for _, v in rig.producer.delivered(DLQ)]
    assert len(letters) == 8 and {x["reason"] for x in letters} == {"over_capacity"}
    assert rig.metric("ecg_monitor_evicted_sensors_total") == 0
    assert rig.consumer.group_committed == {0: 20}


def test_an_exception_in_a_rebalance_callback_is_caught_and_no_window_is_lost():
    rig = Rig(partitions=2, max_batch=10, max_wait_ms=1000)
    rig.produce("a", 6)
    rig.steps(3)
    take = rig.monitor.batcher.take

    def broken() -> list:
        raise ValueError("injected")

    rig.monitor.batcher.take = broken  # type: ignore[method-assign]
    rig.produce("a", 2)
    rig.steps(1)
    rig.consumer.rebalance([0, 1])  # the revocation fails inside poll(): caught, not raised
    rig.monitor.batcher.take = take  # type: ignore[method-assign]
    assert rig.metric("ecg_monitor_rebalance_callback_errors_total") == 1
    rig.steps(30, dt=0.5)
    assert rig.scored() == [("a", 0), ("a", 4)]


def test_revocation_work_inside_poll_is_bounded_in_time():
    rig = Rig(max_batch=2, max_wait_ms=60_000, max_pending_windows=1000)
    for _ in range(50):
        rig.produce("a", L)
    rig.steps(3)
    assert len(rig.monitor.batcher) >= 40
    rig.scorer.seconds_per_batch = 1.0  # slow scoring
    started = rig.clock.now
    rig.consumer.rebalance([0])
    assert rig.clock.now - started <= REBALANCE_BUDGET_S + 1.0
    rig.scorer.seconds_per_batch = 0.0
    rig.steps(100, dt=0.5)
    assert sorted(set(rig.scored())) == [("a", s) for s in range(0, 50 * L, L)]  # the rest re-read


def test_a_sensor_evicted_while_its_alert_is_open_gets_a_resolved_alert():
    """Before: the evicted sensor's open alert was never resolved."""
    rig = Rig(sensor_idle_timeout_s=30.0, quality_gating=False, max_batch=64)
    for level in [0.1] * 180 + [1.0] * 20:  # calibrates on 0.1, then ten times that
        rig.produce("a", L, level=level)
    rig.steps(50)
    states = [json.loads(v)["state"] for _, v in rig.producer.delivered(ALERTS)]
    assert states == ["firing"]
    rig.steps(40, dt=1.0)  # the sensor goes quiet past its idle timeout: evicted
    alerts = [json.loads(v) for _, v in rig.producer.delivered(ALERTS)]
    assert [a["state"] for a in alerts] == ["firing", "resolved"] and not rig.monitor.states.policy.is_open((0, "a"))
    assert [a["trigger"] for a in alerts] == ["aggregate", None]  # the rule that opened it; a resolution has none
    assert rig.metric("ecg_monitor_alert_triggers_total", trigger="aggregate") == 1
    assert rig.metric("ecg_monitor_alert_triggers_total", trigger="fast_run") == 0
    assert rig.consumer.group_committed == {0: 200}


def test_alerts_at_the_same_window_start_in_two_segments_of_a_sensor_have_different_ids():
    """Before: the id was sensor:start:state, so a device that rebooted (seq from 0 again) and alerted at
    the same place repeated an earlier alert's id, and a consumer that de-duplicates by id dropped it."""
    rig = Rig(quality_gating=False, max_batch=64)
    for _ in range(2):  # two segments: the second starts at seq 0 again, a reset
        rig.seq["a"] = 0
        for level in [0.1] * 180 + [1.0] * 20 + [0.1] * 20:  # calibrates (first segment), fires, resolves
            rig.produce("a", L, level=level)
        rig.steps(80)
    alerts = [json.loads(v) for _, v in rig.producer.delivered(ALERTS)]
    where = [(a["state"], a["window_start_seq"]) for a in alerts]
    assert [state for state, _ in where] == ["firing", "resolved"] * 2 and where[:2] == where[2:]  # the same places
    assert len({a["alert_id"] for a in alerts}) == 4
