"""Per-sensor state and its changelog: round trip, replay, bounds, and the Monitor's restore over
fake Kafka clients (tests/fakes.py). The real broker: tests/test_calibration_daemon.py."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from kafka.errors import KafkaTimeoutError
from fakes import FakeClock, FakeConsumer, FakeProducer, FakeScorer
from support import usual_beat
from prometheus_client import CollectorRegistry

from monitor.daemon.loop import Monitor
from monitor.daemon.metrics import Metrics
from monitor.daemon.settings import MonitorSettings
from monitor.daemon.state_store import BeatInfo, SensorStates, policy_config, prior_of
from monitor.stream.calibration import CalibrationConfig, Calibrator, Prior
from monitor.stream.policy import ScorePolicy, ScorePolicyConfig
from monitor.stream.wire import encode_input

WARMUP = 5


def make_states(clock: FakeClock | None = None, model_version: str = "m1", policy: ScorePolicyConfig | None = None,
                **kwargs: Any) -> SensorStates:
    calibrator = Calibrator(Prior(math.log(0.1), 0.4, 0.3), CalibrationConfig(warmup_beats=WARMUP))
    return SensorStates(calibrator, ScorePolicy(policy or ScorePolicyConfig()), model_version,
                        clock=clock or FakeClock(), **kwargs)


def errors(n: int, seed: int = 0) -> list[float]:
    return list(np.exp(np.random.default_rng(seed).normal(math.log(0.05), 0.2, n)))


def feed(states: SensorStates, sensor: str, errs: list[float], seq0: int = 0, offset0: int = 0) -> list:
    return [states.apply((0, sensor), seq0 + 10 * i, offset0 + i, e, True) for i, e in enumerate(errs)]


def restored_from(states: SensorStates, **kwargs: Any) -> SensorStates:
    """A fresh store restored from everything `states` wrote to its changelog."""
    fresh = make_states(**kwargs)
    log = [(key, value) for partition, key, value in states.changes() if partition == 0]
    fresh.restore(0, log)
    return fresh


def test_a_restored_sensor_continues_bit_for_bit():
    original = make_states()
    feed(original, "a", errors(30))
    copy = restored_from(original)
    assert copy.calibrated_threshold((0, "a")) == original.calibrated_threshold((0, "a"))
    later = errors(40, seed=1)
    assert feed(copy, "a", later, seq0=300, offset0=30) == feed(original, "a", later, seq0=300, offset0=30)


def test_windows_the_state_already_reflects_are_skipped_on_replay():
    states = make_states()
    feed(states, "a", errors(10))  # windows at seq 0..90, offsets 0..9
    before = states.encode((0, "a"))
    assert states.apply((0, "a"), 90, 9, 5.0, True) is None  # the last applied one, replayed
    assert states.apply((0, "a"), 40, 4, 5.0, True) is None
    assert states.encode((0, "a")) == before
    assert states.apply((0, "a"), 100, 9, 0.05, True) is not None  # the next window of the same record
    # a device that restarted its seq: a lower seq, but a later offset: applied
    assert states.apply((0, "a"), 0, 50, 0.05, True) is not None


def test_a_sensor_calibrates_once_and_a_restore_does_not_start_it_over():
    states = make_states()
    phases = [o.phase for o in feed(states, "a", errors(WARMUP + 3))]
    assert phases[:WARMUP - 1] == ["calibrating"] * (WARMUP - 1) and set(phases[WARMUP - 1:]) == {"calibrated"}
    copy = restored_from(states)
    assert copy.calibrating() == 0
    assert feed(copy, "a", errors(1, seed=2), seq0=1000, offset0=100)[0].phase == "calibrated"


def test_the_last_record_per_sensor_wins_tombstones_delete_and_other_models_are_ignored():
    states = make_states()
    feed(states, "a", errors(8))
    feed(states, "b", errors(8))
    first = states.changes()
    feed(states, "a", errors(3, seed=3), seq0=100, offset0=20)
    second = states.changes()
    log = [(k, v) for _, k, v in first + second] + [(b"b", None)]
    fresh = make_states()
    assert fresh.restore(0, log) == 1  # b was deleted
    assert fresh.calibrated_threshold((0, "a")) == states.calibrated_threshold((0, "a"))
    assert fresh.calibrated_threshold((0, "b")) is None
    other = make_states(model_version="m2")
    assert other.restore(0, log) == 0  # another model's baseline means nothing for this one
    assert make_states().restore(0, [(b"a", b"not json"), (b"c", b'{"format": 1}')]) == 0


def test_idle_sensors_are_dropped_with_a_tombstone_and_the_store_is_bounded():
    clock = FakeClock()
    states = make_states(clock, idle_timeout_s=100.0, max_sensors=3)
    feed(states, "a", errors(2))
    clock.now += 50
    feed(states, "b", errors(2))
    states.changes()
    clock.now += 60
    assert states.sweep() == 1 and len(states) == 1
    assert states.changes() == [(0, b"a", None)]
    for sensor in "cdef":
        feed(states, sensor, errors(1))
    assert len(states) == 3 and states.calibrated_threshold((0, "b")) is None  # the idlest made room
    assert (0, b"b", None) in states.changes()


def test_a_reset_policy_reaches_the_changelog_and_the_calibration_stays():
    states = make_states()
    feed(states, "a", errors(WARMUP + 2))
    states.changes()
    threshold = states.calibrated_threshold((0, "a"))
    states.reset_policy((0, "a"))
    copy = restored_from(states)
    assert copy.policy.snapshot((0, "a")) is None and copy.calibrated_threshold((0, "a")) == threshold


def test_state_records_are_a_few_hundred_bytes_once_calibrated():
    states = make_states()
    feed(states, "sensor-0001", errors(WARMUP + 1))
    assert len(states.encode((0, "sensor-0001"))) < 400


def test_the_policy_comes_from_the_artefact_and_settings_override_it():
    scorer = SimpleNamespace(threshold=0.3, artefact=SimpleNamespace(metadata={
        "validation_errors": {"p50": 0.1, "p95": 0.3}, "policy": {"aggregate": "ewma", "fire_level": 3.5,
                                                                 "alpha": 0.3, "unknown_field": 1}}))
    config = policy_config(scorer, MonitorSettings(_env_file=None))  # type: ignore[arg-type,call-arg]
    assert (config.aggregate, config.fire_level, config.alpha) == ("ewma", 3.5, 0.3)
    config = policy_config(scorer, MonitorSettings(_env_file=None, alert_fire_level=4.0))  # type: ignore[arg-type,call-arg]
    assert config.fire_level == 4.0 and config.aggregate == "ewma"
    override = MonitorSettings(_env_file=None, alert_template_weight=0.0, alert_rhythm_weight=1.0)  # type: ignore[call-arg]
    config = policy_config(scorer, override)  # type: ignore[arg-type]
    assert (config.template_weight, config.rhythm_weight) == (0.0, 1.0)
    off = MonitorSettings(_env_file=None, alert_fast_run_beats=0, alert_fast_run_level=4.0)  # type: ignore[call-arg]
    assert (policy_config(scorer, off).fast_run_beats, policy_config(scorer, off).fast_run_level) == (0, 4.0)  # type: ignore[arg-type]
    assert config.fast_run_beats == ScorePolicyConfig().fast_run_beats  # an artefact without it: the default
    assert prior_of(scorer) == Prior.from_stats({"p50": 0.1, "p95": 0.3}, 0.3)  # type: ignore[arg-type]
    bare = prior_of(SimpleNamespace(threshold=0.3))  # type: ignore[arg-type]
    assert math.exp(bare.location + 1.6449 * bare.scale) == pytest.approx(0.3)


@pytest.mark.parametrize("gating", [True, False])
def test_motion_artefacts_are_bad_quality_only_with_quality_gating(gating: bool):
    """Beats unlike the usual one and unlike each other, after the warm-up: artefacts (no anomaly alert) under
    MONITOR_QUALITY_GATING, ordinary beats without it."""
    from monitor.daemon.state_store import build_states

    scorer = SimpleNamespace(threshold=0.3, model_version="m",
                             artefact=SimpleNamespace(metadata={"validation_errors": {"p50": 0.1, "p95": 0.3}}))
    states = build_states(scorer, MonitorSettings(_env_file=None, quality_gating=gating))  # type: ignore[arg-type,call-arg]
    rng = np.random.default_rng(3)
    smooth = np.exp(-0.5 * (np.arange(-12, 13) / 4) ** 2)
    noise = [np.convolve(rng.normal(size=140), smooth, "same") for _ in range(60)]
    windows = [usual_beat() + rng.normal(0, 0.03, 140) for _ in range(200)] + \
        [usual_beat() + 2 * (w - w.mean()) / w.std() for w in noise]
    outcomes = [states.apply((0, "s"), i, i, 0.1, True, BeatInfo(0.8 * i, 0.8, w)) for i, w in enumerate(windows)]
    artefacts = sum(bool(o and o.artefact) for o in outcomes[200:])
    assert artefacts > 40 if gating else artefacts == 0


# -- the Monitor over fake clients: changelog writes and restore ---------------------------------

L, TOPIC, STATE = 50, "in", "state"
SENSOR_PARTITION = {"a": 0, "b": 1, "c": 2}


class ArtefactScorer(FakeScorer):
    """FakeScorer (error = the window's mean) with an artefact's validation stats."""

    def __init__(self) -> None:
        super().__init__(L, threshold=0.5)
        self.artefact = SimpleNamespace(metadata={"validation_errors": {"p50": 0.2, "p95": 0.5}})


class FakeChangelog:
    """The changelog as the fake producer delivered it, read per partition; the first `fail`
    reads time out."""

    def __init__(self, producer: FakeProducer, fail: int = 0) -> None:
        self.producer = producer
        self.fail = fail
        self.reads: list[set[int]] = []

    def read(self, partitions: Any) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
        self.reads.append(set(partitions))
        if self.fail:
            self.fail -= 1
            raise KafkaTimeoutError("changelog not read to its end (fake)")
        records = zip(self.producer.partitions.get(STATE, []), self.producer.delivered(STATE), strict=True)
        out: dict[int, list[tuple[bytes | None, bytes | None]]] = {p: [] for p in partitions}
        for partition, (key, value) in records:
            if partition in out:
                out[partition].append((key, value))
        return out


def beat(level: float) -> list[float]:
    """A window whose error (its mean) is `level` and whose signal quality is good (a sine)."""
    return list(level + 0.5 * np.sin(2 * np.pi * 3 * np.arange(L) / L))


def make_monitor(consumer: FakeConsumer, producer: FakeProducer, clock: FakeClock,
                 changelog: FakeChangelog | None) -> Monitor:
    settings = MonitorSettings(_env_file=None, input_topic=TOPIC, scores_topic="scores", alerts_topic="alerts",  # type: ignore[call-arg]
                               dlq_topic="dlq", state_topic=STATE, max_batch=4, max_wait_ms=10,
                               calibration_warmup_beats=WARMUP, shutdown_timeout_s=20.0)
    monitor = Monitor(settings, ArtefactScorer(), consumer, producer,  # type: ignore[arg-type]
                      Metrics(CollectorRegistry(), threshold=0.5), changelog=changelog, clock=clock, sleep=clock.sleep)
    monitor.subscribe()
    consumer.rebalance([0, 1, 2])
    return monitor


def run_until_read(monitor: Monitor, consumer: FakeConsumer, clock: FakeClock) -> None:
    for _ in range(1000):
        if consumer.lag() == 0 and not len(monitor.batcher):
            break
        monitor.step()
        clock.now += 0.05
    monitor.checkpoint(force=True)
    monitor.checkpoint(force=True)


def scores(producer: FakeProducer) -> list[dict]:
    return [json.loads(v) for _, v in producer.delivered("scores")]


def test_the_monitor_writes_state_to_the_input_partition_and_a_new_owner_continues_with_it():
    clock, producer = FakeClock(1000.0), FakeProducer()
    consumer = FakeConsumer(TOPIC, 3)
    seq = dict.fromkeys(SENSOR_PARTITION, 0)

    def produce(sensor: str, level: float) -> None:
        consumer.append(SENSOR_PARTITION[sensor], sensor.encode(), encode_input(sensor, seq[sensor], beat(level)))
        seq[sensor] += L

    first = make_monitor(consumer, producer, clock, FakeChangelog(producer))
    rng = np.random.default_rng(0)
    for _ in range(12):
        for sensor in SENSOR_PARTITION:
            produce(sensor, float(rng.uniform(0.15, 0.25)))
    run_until_read(first, consumer, clock)
    before = {s["sensor_id"]: s for s in scores(producer)}  # the last score of each sensor
    assert {s["calibration"] for s in before.values()} == {"calibrated"}
    # every state record went to the partition of its sensor's input records
    state_keys = [k.decode() for k, _ in producer.delivered(STATE)]
    assert [SENSOR_PARTITION[k] for k in state_keys] == producer.partitions[STATE]
    # a crash after the changelog's flush but before any commit (the worst case: the state is
    # ahead of the committed offsets), then a new member of the group takes every partition
    n_before = len(scores(producer))
    again = FakeConsumer(TOPIC, 3, committed={}, logs=consumer.logs)
    changelog = FakeChangelog(producer)
    second = make_monitor(again, producer, clock, changelog)
    assert changelog.reads == [{0, 1, 2}]
    assert second.metrics.state_restored_sensors._value.get() == 3
    for sensor in SENSOR_PARTITION:
        produce(sensor, 0.2)
    run_until_read(second, again, clock)
    after = scores(producer)[n_before:]
    # the replayed windows were already reflected in the state: skipped, only the new ones scored
    assert sorted((s["sensor_id"], s["window_start_seq"]) for s in after) == \
        sorted((sensor, 12 * L) for sensor in SENSOR_PARTITION)
    assert {s["calibration"] for s in after} == {"calibrated"}  # nobody calibrates again
    for s in after:
        previous = before[s["sensor_id"]]["calibrated_threshold"]
        assert abs(s["calibrated_threshold"] / previous - 1) < 0.02  # one slow adaptation step at most


def test_without_the_changelog_a_restart_calibrates_again():
    """The counterpart of the test above: what the changelog saves the sensors from."""
    clock, producer = FakeClock(1000.0), FakeProducer()
    consumer = FakeConsumer(TOPIC, 3)
    for i in range(WARMUP + 2):
        consumer.append(0, b"a", encode_input("a", i * L, beat(0.2)))
    first = make_monitor(consumer, producer, clock, None)
    run_until_read(first, consumer, clock)
    consumer.append(0, b"a", encode_input("a", (WARMUP + 2) * L, beat(0.2)))
    second = make_monitor(FakeConsumer(TOPIC, 3, committed=consumer.group_committed, logs=consumer.logs),
                          producer, clock, None)
    run_until_read(second, second.consumer, clock)
    assert scores(producer)[-1]["calibration"] == "calibrating"


def test_a_failed_flush_sends_no_state_and_commits_nothing():
    clock, producer = FakeClock(1000.0), FakeProducer()
    consumer = FakeConsumer(TOPIC, 3)
    monitor = make_monitor(consumer, producer, clock, FakeChangelog(producer))
    for i in range(4):
        consumer.append(0, b"a", encode_input("a", i * L, beat(0.2)))
    producer.fail_flushes = 2  # the step's flushes (after scoring and on housekeeping) both fail
    monitor.step()
    assert len(scores(producer)) == 0 and producer.fail_flushes == 0
    assert producer.delivered(STATE) == [] and consumer.group_committed == {}
    run_until_read(monitor, consumer, clock)
    assert [k for k, _ in producer.delivered(STATE)] == [b"a"] and consumer.group_committed == {0: 4}


def test_partitions_whose_changelog_cannot_be_read_wait_paused_until_a_retry_restores_them():
    clock, producer = FakeClock(1000.0), FakeProducer()
    consumer = FakeConsumer(TOPIC, 3)
    for i in range(WARMUP + 2):
        consumer.append(0, b"a", encode_input("a", i * L, beat(0.2)))
    first = make_monitor(consumer, producer, clock, FakeChangelog(producer))
    run_until_read(first, consumer, clock)
    consumer.append(0, b"a", encode_input("a", (WARMUP + 2) * L, beat(0.2)))
    n_before = len(scores(producer))
    again = FakeConsumer(TOPIC, 3, committed={}, logs=consumer.logs)
    changelog = FakeChangelog(producer, fail=2)  # at assignment, and at the first housekeeping
    second = make_monitor(again, producer, clock, changelog)
    assert again.paused_partitions == {0, 1, 2}
    for _ in range(3):
        second.step()  # the first read failed: nothing is processed ...
    assert len(scores(producer)) == n_before
    clock.now += 1.0  # ... until housekeeping reads the changelog again
    run_until_read(second, again, clock)
    assert changelog.reads == [{0, 1, 2}] * 3 and again.paused_partitions == set()
    after = scores(producer)[n_before:]
    assert [(s["window_start_seq"], s["calibration"]) for s in after] == [((WARMUP + 2) * L, "calibrated")]


def test_a_beat_sensors_rhythm_feeds_the_policy_and_survives_a_restore():
    """Beat windows carry their R peak: a premature beat gets a rhythm score, which the policy adds at its
    weight, and the sensor's intervals and learnt spread come back from the changelog bit for bit."""
    rng = np.random.default_rng(5)
    r_peaks = np.cumsum(0.8 * (1 + rng.normal(0, 0.02, 400)))
    premature = 300
    r_peaks[premature:] -= 0.3  # beat 300 comes 0.3 s early (then the rhythm goes on)
    errs = errors(400)

    def beats(states: SensorStates, rows: range) -> list:
        return [states.apply((0, "b"), 10 * i, i, errs[i], True, BeatInfo(float(r_peaks[i]), 0.8, usual_beat()))
                for i in rows]

    no_template = ScorePolicyConfig(template_weight=0.0)  # the rhythm alone (every beat has the same shape)
    original = make_states(policy=no_template)
    first = beats(original, range(200))
    assert all(o.rhythm_score == 0 for o in first[:150])  # the rhythm's warm-up
    copy = restored_from(original, policy=no_template)
    rest = beats(original, range(200, 400))
    assert beats(copy, range(200, 400)) == rest
    assert rest[premature - 200].rhythm_score > 5 and max(o.rhythm_score for o in rest[101:]) < 3
    shape_only, default = make_states(policy=replace(no_template, rhythm_weight=0.0)), make_states(policy=no_template)
    beats(shape_only, range(premature + 1))
    upto = beats(default, range(premature + 1))
    window = ScorePolicyConfig().window  # the aggregate is the mean of the last `window` inputs
    added = default.policy.snapshot((0, "b"))["value"] - shape_only.policy.snapshot((0, "b"))["value"]
    assert added == pytest.approx(0.5 * sum(o.rhythm_score for o in upto[-window:]) / window)
    assert added > 1
    assert feed(make_states(), "fixed", errs[:5])[0].rhythm_score is None  # fixed windows have no rhythm


def test_a_beat_sensors_template_raises_the_policy_input_and_survives_a_restore():
    """Beat windows carry their values: a beat unlike the sensor's usual beat gets a template score, the policy
    takes the larger of it and the calibrated shape score, and the template comes back from the changelog bit
    for bit."""
    rng = np.random.default_rng(6)
    usual = usual_beat()
    windows = [usual + rng.normal(0, 0.03, 140) for _ in range(300)]
    odd = 280
    windows[odd] = -usual  # upside down: the shape score (errs) does not see it, the template does
    errs = errors(300)

    def beats(states: SensorStates, rows: range) -> list:
        return [states.apply((0, "b"), 10 * i, i, errs[i], True, BeatInfo(0.8 * i, 0.8, windows[i])) for i in rows]

    original = make_states()
    first = beats(original, range(200))
    assert all(o.template_score is None for o in first[:150])  # the template's warm-up
    copy = restored_from(original)
    assert "template" in json.loads(original.encode((0, "b")))
    rest = beats(original, range(200, 300))
    assert beats(copy, range(200, 300)) == rest
    assert rest[odd - 200].template_score > 10 > rest[odd - 201].template_score
    shape_only = make_states(policy=ScorePolicyConfig(template_weight=0.0))
    assert beats(shape_only, range(odd + 1))[-1].template_score is None
    default = make_states()
    upto = beats(default, range(odd + 1))
    window = ScorePolicyConfig().window  # the aggregate is the mean of the last `window` inputs
    weight = ScorePolicyConfig().template_weight
    inputs = [max(o.calibrated.score, weight * o.template_score) for o in upto[-window:]]
    assert default.policy.snapshot((0, "b"))["value"] == pytest.approx(sum(inputs) / window)
    assert inputs[-1] > upto[-1].calibrated.score + 5


def test_a_fast_run_of_beats_unlike_the_usual_one_fires_where_the_mean_would_not():
    """Three beats in a row that are each fast (over 100/min and early) and unlike the sensor's usual beat fire
    the alert (ventricular tachycardia); the same beats at the usual rate, or the rule off, do not."""
    rng = np.random.default_rng(7)
    usual = usual_beat()
    n, run = 260, range(240, 243)
    windows = [usual + rng.normal(0, 0.03, 140) for _ in range(n)]
    for i in run:
        windows[i] = -usual
    errs = errors(n)
    quiet = ScorePolicyConfig(fire_level=20.0, resolve_level=1.0, rhythm_weight=0.0)  # the mean cannot fire

    def firing(policy: ScorePolicyConfig, fast: bool) -> list[int]:
        states, t, out = make_states(policy=policy), 0.0, []
        for i in range(n):
            t += 0.45 if fast and i in run else 0.8
            outcome = states.apply((0, "b"), 10 * i, i, errs[i], True, BeatInfo(t, 0.8, windows[i]))
            if "firing" in outcome.transitions:
                out.append(i)
                assert outcome.trigger == "fast_run"  # the alert record says which rule opened it
        return out

    assert firing(quiet, fast=True) == [run[-1]]
    assert firing(quiet, fast=False) == []
    assert firing(replace(quiet, fast_run_beats=0), fast=True) == []
