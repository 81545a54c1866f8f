"""Idle eviction against the real daemon and broker (Tansu), issue 12: an evicted sensor's partial window is
kept in its state record, so the commit moves past its records and the window is still scored when the
sensor resumes with the seq that continues it, in the same daemon and after a restart.

Before: the partial window's samples were dropped (ecg_monitor_evicted_samples_total) and the commit moved
past them, so a sensor that went quiet for MONITOR_SENSOR_IDLE_TIMEOUT_S and then went on lost that window.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from support import (MonitorProcess, Topics, committed, consume_json, monitor_env, produce, stream_records,
                     untrained_model, wait_for)

from bench import tally

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.slow]

L, BEATS, CHUNK = 140, 4, 70
CUT = 5 * CHUNK  # each sensor pauses 2.5 windows in: in the middle of window 280


def signal(phase: float) -> np.ndarray:
    return np.sin(np.linspace(phase, phase + 2 * np.pi * BEATS, L * BEATS))


def test_evicted_sensors_that_resume_lose_no_window_also_across_a_restart(broker, tmp_path, topic_prefix):
    topics = Topics.for_prefix(topic_prefix).create(broker.bootstrap, partitions=1)
    env = monitor_env(broker.bootstrap, topics, untrained_model(tmp_path / "model.pt", "eviction-test"),
                      MONITOR_SENSOR_IDLE_TIMEOUT_S="2")
    streams = {"same-daemon": signal(0.0), "after-restart": signal(1.0)}
    before = list(stream_records({s: v[:CUT] for s, v in streams.items()}, chunk=CHUNK))
    resumed = {s: list(stream_records({s: v[CUT:]}, chunk=CHUNK, seq0=CUT)) for s, v in streams.items()}
    group = env["MONITOR_GROUP_ID"]
    sent = 0

    def all_committed() -> bool:
        return committed(broker.bootstrap, group, topics.input)[0] == sent

    with MonitorProcess(env, log_path=tmp_path / "monitor-1.log") as daemon:
        sent += produce(broker.bootstrap, topics.input, before)
        wait_for(lambda: daemon.metric("ecg_monitor_evicted_sensors_total") == 2 and all_committed(), 60,
                 message=lambda: daemon.log_tail())  # the commit passed the partial windows' records
        sent += produce(broker.bootstrap, topics.input, resumed["same-daemon"])
        wait_for(all_committed, 60, message=lambda: daemon.log_tail())
        dropped = daemon.metric("ecg_monitor_evicted_samples_total")
        assert daemon.stop() == 0
    with MonitorProcess(env, log_path=tmp_path / "monitor-2.log") as daemon:
        sent += produce(broker.bootstrap, topics.input, resumed["after-restart"])
        wait_for(all_committed, 60, message=lambda: daemon.log_tail())
        dropped += daemon.metric("ecg_monitor_evicted_samples_total")
        assert daemon.stop() == 0
    scores = consume_json(broker.bootstrap, topics.scores, idle_s=0.5)
    per_window = Counter((s["sensor_id"], s["window_start_seq"]) for s in scores)
    expected = {(sensor, i * L) for sensor in streams for i in range(BEATS)}
    assert set(per_window) == expected  # window 280 of each sensor included: scored after it resumed
    assert dropped == 0
    tally.record("idle eviction, resume and restart", records_tried=sent, faults_injected=3,
                 windows_expected=len(expected), windows_lost=len(expected - set(per_window)))
