"""Per-sensor calibration through the real daemon and broker (Tansu): the calibrated baselines live
in the state topic, so they survive a kill -9 and move with their partition in a rebalance.

Sensors stream normal ECG5000 beats with a short warm-up (MONITOR_CALIBRATION_WARMUP_BEATS), so
they are calibrated after a few seconds of stream. Each score record carries the sensor's phase
and calibrated threshold (the error at which its calibrated score reaches the fire level); a
sensor that lost its state would start calibrating again, from the model's prior.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from support import MonitorProcess, Topics, consume_all, load_ecg5000, monitor_env, produce, stream_records, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

WARMUP = 20
SENSORS = 6
L = 140
CHUNK = 70
#: After a restore, the next window's threshold differs from the last one before by one step of
#: the slow adaptation (CalibrationConfig.adapt_rate: 0.5% of a scale), far less than this.
STEP_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def normal_beats(ecg_data_dir) -> np.ndarray:
    x, labels = load_ecg5000(ecg_data_dir, ("TEST",))
    return x[labels == 1]


def beat_streams(beats: np.ndarray, n_beats: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"patient-{i:02d}": beats[rng.integers(len(beats), size=n_beats)] for i in range(SENSORS)}


def records(beats: np.ndarray, first_beat: int, n_beats: int, seed: int) -> Iterable[tuple[bytes, bytes]]:
    return stream_records(beat_streams(beats, n_beats, seed), chunk=CHUNK, seq0=first_beat * L)


def score_records(bootstrap: str, topic: str, min_count: int) -> list[Any]:
    return sorted(consume_all(bootstrap, topic, min_count=min_count, idle_s=0.5), key=lambda r: r.offset)


def all_windows_scored(bootstrap: str, topic: str, n_beats: int) -> list[dict] | None:
    """The decoded score records once every sensor's windows 0..n_beats-1 were scored, else None."""
    decoded = [json.loads(r.value) | {"_offset": r.offset} for r in score_records(bootstrap, topic, 0)]
    seen = {(s["sensor_id"], s["window_start_seq"]) for s in decoded}
    return decoded if len(seen) >= SENSORS * n_beats else None


def last_per_sensor(scores: list[dict]) -> dict[str, dict]:
    last: dict[str, dict] = {}
    for s in scores:
        if s["window_start_seq"] >= last.get(s["sensor_id"], {}).get("window_start_seq", -1):
            last[s["sensor_id"]] = s
    return last


def assert_continues(before: dict[str, dict], after: list[dict]) -> None:
    """No score after the event says calibrating, and each sensor's first new window has (up to one
    adaptation step) the calibrated threshold it had before."""
    assert {s["calibration"] for s in after} == {"calibrated"}
    for sensor, last in before.items():
        later = sorted((s for s in after
                        if s["sensor_id"] == sensor and s["window_start_seq"] > last["window_start_seq"]),
                       key=lambda s: s["window_start_seq"])
        assert later, sensor
        first = later[0]
        ratio = first["calibrated_threshold"] / last["calibrated_threshold"]
        assert abs(ratio - 1) < STEP_TOLERANCE, (sensor, last, first)


def test_calibrated_thresholds_survive_kill_9(broker, normal_beats, trained_model, tmp_path):
    topics = Topics.for_prefix(f"calib{time.time_ns() % 10**9}").create(broker.bootstrap, partitions=2)
    env = monitor_env(broker.bootstrap, topics, trained_model, MONITOR_CALIBRATION_WARMUP_BEATS=WARMUP)
    n_before = WARMUP + 15
    produce(broker.bootstrap, topics.input, records(normal_beats, 0, n_before, seed=1))
    first = MonitorProcess(env, log_path=tmp_path / "first.log").start()
    try:
        scores = wait_for(lambda: all_windows_scored(broker.bootstrap, topics.scores, n_before), 90,
                          message=lambda: first.log_text()[-2000:])
    finally:
        first.kill()  # SIGKILL: no flush, no commit, no revoke
    before = last_per_sensor(scores)
    assert len(before) == SENSORS and {s["calibration"] for s in before.values()} == {"calibrated"}
    prior = {s["calibrated_threshold"] for s in scores if s["window_start_seq"] == 0}
    assert len(prior) == 1  # every sensor starts from the model's prior, then learns its own baseline
    assert all(s["calibrated_threshold"] not in prior for s in before.values())
    last_offset = max(s["_offset"] for s in scores)

    n_after = 10
    produce(broker.bootstrap, topics.input, records(normal_beats, n_before, n_after, seed=2))
    with MonitorProcess(env, log_path=tmp_path / "second.log") as second:
        scores = wait_for(lambda: all_windows_scored(broker.bootstrap, topics.scores, n_before + n_after), 90,
                          message=lambda: second.log_text()[-2000:])
        assert second.metric("ecg_monitor_state_restored_sensors_total") == SENSORS
        assert second.metric("ecg_monitor_calibrating_sensors") == 0
        assert second.stop() == 0
    after = [s for s in scores if s["_offset"] > last_offset]
    assert_continues(before, after)
    # a window scored both before the kill and again after it (its state had not reached the
    # changelog) gets the same calibrated threshold: the restored state is the one it had
    earlier = {(s["sensor_id"], s["window_start_seq"]): s for s in scores if s["_offset"] <= last_offset}
    for s in after:
        twin = earlier.get((s["sensor_id"], s["window_start_seq"]))
        if twin is not None:
            assert s["calibrated_threshold"] == pytest.approx(twin["calibrated_threshold"], rel=1e-5)


def test_the_new_owner_of_a_partition_continues_with_its_sensors_state(broker, normal_beats, trained_model, tmp_path):
    topics = Topics.for_prefix(f"rebal{time.time_ns() % 10**9}").create(broker.bootstrap, partitions=2)
    env = monitor_env(broker.bootstrap, topics, trained_model, MONITOR_CALIBRATION_WARMUP_BEATS=WARMUP)
    n_before = WARMUP + 10
    produce(broker.bootstrap, topics.input, records(normal_beats, 0, n_before, seed=3))
    with MonitorProcess(env, log_path=tmp_path / "a.log") as a:
        scores = wait_for(lambda: all_windows_scored(broker.bootstrap, topics.scores, n_before), 90,
                          message=lambda: a.log_text()[-2000:])
        before = last_per_sensor(scores)
        assert {s["calibration"] for s in before.values()} == {"calibrated"}
        last_offset = max(s["_offset"] for s in scores)
        b_env = monitor_env(broker.bootstrap, topics, trained_model, MONITOR_CALIBRATION_WARMUP_BEATS=WARMUP)
        assert b_env["MONITOR_GROUP_ID"] == env["MONITOR_GROUP_ID"]  # a second member of the same group
        with MonitorProcess(b_env, log_path=tmp_path / "b.log") as b:  # ready: B owns a partition
            wait_for(lambda: a.metric("ecg_monitor_assigned_partitions") == 1, 60)
            n_after = 10
            produce(broker.bootstrap, topics.input, records(normal_beats, n_before, n_after, seed=4))
            scores = wait_for(lambda: all_windows_scored(broker.bootstrap, topics.scores, n_before + n_after), 90,
                              message=lambda: b.log_text()[-2000:])
            restored_by_b = b.metric("ecg_monitor_state_restored_sensors_total")
            assert b.stop() == 0
        assert a.stop() == 0
    assert restored_by_b >= 1  # B took over a partition with calibrated sensors on it
    assert_continues(before, [s for s in scores if s["_offset"] > last_offset])
