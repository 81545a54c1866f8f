"""Reliability: a poison record whose dead letter used to be too large to produce.

A 900 KB non-JSON value (and, separately, a 900 KB key) on the input topic, among good records,
against the real daemon and broker: the dead letters carry a capped prefix with the original size
and SHA-256, so they are produced; every good window is scored; the committed offset moves past
the poison records; SIGTERM ends cleanly. Before the cap, the dead letter (the value base64-encoded,
~1.2 MB) exceeded the producer's max_request_size and no offset was ever committed again.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from support import (MonitorProcess, Topics, committed, consume_all, monitor_env, produce, stream_records,
                     untrained_model, wait_for)

from bench import tally
from monitor.stream.wire import DEAD_LETTER_KEY_BYTES, DEAD_LETTER_MAX_BYTES, DEAD_LETTER_VALUE_BYTES, DeadLetter

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.slow]

BEATS_PER_SENSOR = 6


def test_a_900_kb_poison_record_is_dead_lettered_capped_and_consumption_goes_on(broker, tmp_path, topic_prefix):
    topics = Topics.for_prefix(topic_prefix).create(broker.bootstrap, partitions=1)
    model = untrained_model(tmp_path / "model.pt", "poison-test")
    env = monitor_env(broker.bootstrap, topics, model)
    wave = np.sin(np.linspace(0, 2 * np.pi, 140))
    good = list(stream_records({f"s{i}": np.tile(wave, BEATS_PER_SENSOR) for i in range(2)}, chunk=70))
    huge_value = (b"\xff" + bytes(range(256)) * 3516)[:900_000]
    poison = [(b"poison-value", huge_value), (b"k" * 900_000, b"not json either")]
    half = len(good) // 2
    with MonitorProcess(env, log_path=tmp_path / "monitor.log") as daemon:
        produce(broker.bootstrap, topics.input, good[:half] + poison + good[half:])
        total = len(good) + len(poison)
        wait_for(lambda: daemon.metric("ecg_monitor_windows_scored_total") >= 2 * BEATS_PER_SENSOR, 120,
                 message=lambda: daemon.log_tail())
        letters = consume_all(broker.bootstrap, topics.dlq, min_count=2, timeout_s=60)
        wait_for(lambda: committed(broker.bootstrap, env["MONITOR_GROUP_ID"], topics.input) == (total, total), 60,
                 message=lambda: f"committed {committed(broker.bootstrap, env['MONITOR_GROUP_ID'], topics.input)}")
        assert daemon.stop() == 0
    tally.record("900 KB poison records", records_tried=total, faults_injected=len(poison),
                 windows_expected=2 * BEATS_PER_SENSOR, windows_lost=0)

    assert len(letters) == 2 and all(len(r.value) <= DEAD_LETTER_MAX_BYTES for r in letters)
    by_key = {r.key: DeadLetter.model_validate_json(r.value) for r in letters}
    value_letter = by_key[b"poison-value"]
    assert value_letter.reason == "not_json" and value_letter.value_truncated
    assert value_letter.value_prefix() == huge_value[:DEAD_LETTER_VALUE_BYTES]
    assert (value_letter.value_size, value_letter.value_sha256) == (len(huge_value),
                                                                    hashlib.sha256(huge_value).hexdigest())
    key_letter = by_key[b"k" * DEAD_LETTER_KEY_BYTES]  # the dead letter's own key is capped too
    assert key_letter.key_size == 900_000 and key_letter.original_value() == b"not json either"
