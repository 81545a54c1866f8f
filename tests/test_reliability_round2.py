"""Reliability round 2 (issue 12) against the real daemon and broker (Tansu): sensor resets and a
bogus seq of 10**18, and a missing output topic at start-up.

- A sensor that reboots (seq starts again at 0, other samples) used to have every later record
  dropped as a duplicate until seq passed the old high-water mark; a record with seq 10**18
  blinded its sensor for good. Now each starts a new segment, the stream after the bogus record
  resumes where it was (mid-window), and every window is scored.
- With an output topic missing, the daemon used to block in send() for max_block_ms per record;
  now it is not ready (/readyz 503 names the topic), fetches nothing, stays live, and scores
  everything once the topic exists.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from support import (MonitorProcess, Topics, committed, consume_json, monitor_env, produce, stream_records,
                     untrained_model, wait_for)

from bench import tally
from monitor.stream.wire import encode_input
from monitor.tools.broker import create_topics

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.slow]

L, BEATS, CHUNK = 140, 6, 70


def signal(phase: float) -> np.ndarray:
    return np.sin(np.linspace(phase, phase + 2 * np.pi * BEATS, L * BEATS))


def test_a_reboot_and_a_seq_of_1e18_start_new_segments_and_every_window_is_scored(broker, tmp_path, topic_prefix):
    topics = Topics.for_prefix(topic_prefix).create(broker.bootstrap, partitions=1)
    env = monitor_env(broker.bootstrap, topics, untrained_model(tmp_path / "model.pt", "round2-test"))
    rebooting = list(stream_records({"reboot": signal(0.0)}, chunk=CHUNK))
    rebooted = list(stream_records({"reboot": signal(1.0)}, chunk=CHUNK))  # seq 0 again, other samples
    jumping = list(stream_records({"jump": signal(2.0)}, chunk=CHUNK))
    bogus = (b"jump", encode_input("jump", 10**18, [0.5]))
    half = len(jumping) // 2 + 1  # mid-window: the bogus record interrupts window 420
    records = rebooting + jumping[:half] + [bogus] + rebooted + jumping[half:]
    with MonitorProcess(env, log_path=tmp_path / "monitor.log") as daemon:
        produce(broker.bootstrap, topics.input, records)
        wait_for(lambda: committed(broker.bootstrap, env["MONITOR_GROUP_ID"], topics.input)[0] == len(records),
                 120, message=lambda: daemon.log_tail())
        resets = daemon.metric("ecg_monitor_segments_started_total", reason="reset")
        jumps = daemon.metric("ecg_monitor_segments_started_total", reason="jump")
        logged = [e for e in daemon.log_events() if e.get("msg") == "sensor seq restarted: new segment"]
        assert daemon.stop() == 0
    scores = consume_json(broker.bootstrap, topics.scores, idle_s=0.5)
    per_window = Counter((s["sensor_id"], s["window_start_seq"]) for s in scores)
    assert {w: n for w, n in per_window.items() if w[0] == "reboot"} == {("reboot", i * L): 2 for i in range(BEATS)}
    assert {w for w in per_window if w[0] == "jump"} == {("jump", i * L) for i in range(BEATS)}
    assert (resets, jumps) == (1, 1)  # the reboot; the jump (the next normal record resumes the stream)
    assert sorted(e["sensor_id"] for e in logged) == ["jump", "reboot"]  # once per sensor
    got = sum(min(n, 2) if sensor == "reboot" else 1 for (sensor, _), n in per_window.items())
    tally.record("sensor reboot and seq 1e18", records_tried=len(records), faults_injected=2,
                 windows_expected=3 * BEATS, windows_lost=3 * BEATS - got)


def test_a_missing_output_topic_is_not_ready_fetches_nothing_and_scores_everything_once_it_exists(
        broker, tmp_path, topic_prefix):
    topics = Topics.for_prefix(topic_prefix)
    create_topics(broker.bootstrap, {topics.input: 1, topics.alerts: 1, topics.dlq: 1, topics.state: 1},
                  compacted=(topics.state,))  # no scores topic yet
    env = monitor_env(broker.bootstrap, topics, untrained_model(tmp_path / "model.pt", "round2-test"),
                      MONITOR_TOPIC_CHECK_INTERVAL_S="1")
    records = list(stream_records({f"s{i}": signal(i) for i in range(2)}, chunk=CHUNK))
    daemon = MonitorProcess(env, log_path=tmp_path / "monitor.log").start(wait_ready=False)
    try:
        wait_for(lambda: daemon.get("/readyz")[0] == 503 and
                 topics.scores in json.loads(daemon.get("/readyz")[1] or "{}").get("missing_topics", []), 60,
                 message=lambda: daemon.log_tail())
        produce(broker.bootstrap, topics.input, records)
        time.sleep(5)
        assert daemon.metric("ecg_monitor_records_total") == 0  # paused: nothing fetched, nothing blocks
        assert daemon.get("/healthz")[0] == 200
        create_topics(broker.bootstrap, {topics.scores: 1})
        daemon.wait_ready(60)
        wait_for(lambda: committed(broker.bootstrap, env["MONITOR_GROUP_ID"], topics.input)[0] == len(records),
                 60, message=lambda: daemon.log_tail())
        assert daemon.stop() == 0
    finally:
        if daemon.returncode is None:
            daemon.kill()
    scored = {(s["sensor_id"], s["window_start_seq"]) for s in consume_json(broker.bootstrap, topics.scores,
                                                                           idle_s=0.5)}
    assert scored == {(f"s{i}", k * L) for i in range(2) for k in range(BEATS)}
    tally.record("output topic missing at start-up", records_tried=len(records), faults_injected=1,
                 windows_expected=2 * BEATS, windows_lost=2 * BEATS - len(scored))
