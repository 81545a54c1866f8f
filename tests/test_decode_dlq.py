"""Decoding and validation of input records, and the dead letters built from rejected ones."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest
from support import malformed_records

from monitor.core.artefact import Artefact
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.core.scoring import Scorer
from monitor.stream.wire import (DEAD_LETTER_KEY_BYTES, DEAD_LETTER_MAX_BYTES, DEAD_LETTER_VALUE_BYTES, REJECT_REASONS,
                                 DeadLetter, InvalidRecord, decode_input, encode_input)


def test_a_valid_record_decodes():
    record = decode_input(b"s1", encode_input("s1", 140, [0.5, -1.25], ts=1.5, fs=140.0))
    assert (record.sensor_id, record.seq, record.values, record.ts, record.end_seq) == \
        ("s1", 140, [0.5, -1.25], 1.5, 142)


def test_malformed_records_cover_every_reason():
    assert set(malformed_records()) == set(REJECT_REASONS)


@pytest.mark.parametrize("reason", REJECT_REASONS)
def test_each_kind_of_malformed_record_is_rejected_with_its_reason(reason):
    key, value = malformed_records("p-7", max_bytes=4096)[reason]
    with pytest.raises(InvalidRecord) as caught:
        decode_input(key, value, max_bytes=4096)
    assert caught.value.reason == reason and caught.value.detail


@pytest.mark.parametrize("value, reason", [
    (None, "not_json"),  # a tombstone
    (b'{"sensor_id": "s", "seq": -1, "values": [1]}', "schema"),
    (b'{"sensor_id": "s", "seq": 1.5, "values": [1]}', "schema"),
    (b'{"sensor_id": "s", "seq": 0, "values": ["1"]}', "schema"),
    (b'{"sensor_id": "", "seq": 0, "values": [1]}', "schema"),
    (b'{"sensor_id": "s", "seq": 0, "values": [1e999]}', "non_finite"),
    (b'[1, 2, 3]', "schema"),
])
def test_more_bad_shapes(value, reason):
    with pytest.raises(InvalidRecord) as caught:
        decode_input(None, value)
    assert caught.value.reason == reason


def test_a_dead_letter_keeps_the_source_position_the_reason_and_the_original_bytes():
    key, value = malformed_records("p-7")["non_finite"]
    with pytest.raises(InvalidRecord) as caught:
        decode_input(key, value)
    letter = DeadLetter.of(caught.value, "ecg.samples", 3, 1812, key, value)
    decoded = json.loads(letter.to_bytes())
    assert decoded["reason"] == "non_finite" and decoded["source_topic"] == "ecg.samples"
    assert (decoded["source_partition"], decoded["source_offset"]) == (3, 1812)
    assert base64.b64decode(decoded["value_b64"]) == value and base64.b64decode(decoded["key_b64"]) == key
    assert DeadLetter.model_validate_json(letter.to_bytes()).original_value() == value
    assert dict(letter.headers()) == {"dlq.reason": b"non_finite", "dlq.source": b"ecg.samples/3/1812"}


# -- input validation: what would forge log lines, overflow int64 or turn into inf after float32 --

@pytest.mark.parametrize("sensor_id", ["p-7\nlevel=ERROR forged", "p-7\r", "p-\x00-7", "p-7\x1b[31m", "p-\x7f",
                                       "p-7\u2028forged", "p-7\u202eevil", "p\u200b7"])
def test_a_sensor_id_with_control_or_invisible_characters_is_rejected(sensor_id):
    value = json.dumps({"sensor_id": sensor_id, "seq": 0, "values": [1.0]}).encode()
    with pytest.raises(InvalidRecord) as caught:
        decode_input(None, value)
    assert caught.value.reason == "schema"
    assert "sensor_id" in caught.value.detail and "control" in caught.value.detail


def test_printable_sensor_ids_are_accepted():
    for sensor_id in ("patient-0042", "ward 3/bed 7", "Station_Ä.ü#1", "心电-1"):
        assert decode_input(sensor_id.encode(), encode_input(sensor_id, 0, [1.0])).sensor_id == sensor_id


INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("seq, values", [(-1, [1.0]), (INT64_MAX + 1, [1.0]), (2**70, [1.0]),
                                         (INT64_MAX, [1.0, 2.0])])  # its last sample would be past int64
def test_a_seq_outside_int64_is_rejected(seq, values):
    value = json.dumps({"sensor_id": "s", "seq": seq, "values": values}).encode()
    with pytest.raises(InvalidRecord) as caught:
        decode_input(None, value)
    assert caught.value.reason == "schema" and "seq" in caught.value.detail


def test_the_largest_int64_seq_is_accepted():
    assert decode_input(None, encode_input("s", INT64_MAX - 1, [1.0])).end_seq == INT64_MAX


@pytest.mark.parametrize("big", ["1e39", "-1e39", "3.5e38", "1.7e308",  # finite in JSON, inf in float32
                                 "3e38", "1e37", "-2e19", "1.1e15"])  # finite in float32, not its window's score
def test_values_too_large_to_score_are_rejected_as_non_finite(big):
    value = b'{"sensor_id": "s", "seq": 0, "values": [0.5, %s, 0.25]}' % big.encode()
    with pytest.raises(InvalidRecord) as caught:
        decode_input(None, value)
    assert caught.value.reason == "non_finite" and "float32" in caught.value.detail


def test_the_largest_scorable_values_are_accepted_and_score_finite():
    assert decode_input(None, encode_input("s", 0, [1e15, -1e15])).values == [1e15, -1e15]
    config = ModelConfig(embedding_dim=4, hidden_dim=8)
    scorer = Scorer(Artefact(config, LSTMAutoencoder(config).state_dict(), threshold=0.5,
                             normalisation={"kind": "zscore"}), device="cpu")
    wave = np.sin(np.linspace(0, 2 * np.pi, config.window_length))
    scores = scorer.score(np.stack([wave, wave * 1e15, np.where(wave > 0, 1e15, -1e15)]))
    assert np.isfinite(scores).all() and scores[1] == pytest.approx(scores[0], rel=1e-4)


# -- dead letters that can always be produced ------------------------------------------------------

#: kafka-python's default producer max_request_size (and Kafka's default message.max.bytes, about).
PRODUCER_MAX_REQUEST_SIZE = 1_048_576


def test_a_dead_letter_of_a_900_kb_record_is_capped_far_below_the_producer_limit():
    value = b"\xff" + bytes(range(256)) * (900_000 // 256)
    key = b"k" * 900_000
    error = InvalidRecord("not_json", "x" * 5000)
    letter = DeadLetter.of(error, "t" * 249, 2**31 - 1, INT64_MAX, key, value)
    encoded = letter.to_bytes()
    assert len(encoded) <= DEAD_LETTER_MAX_BYTES < PRODUCER_MAX_REQUEST_SIZE // 4
    assert sum(len(k) + len(v) for k, v in letter.headers()) < 1024
    assert len(letter.key() or b"") <= DEAD_LETTER_KEY_BYTES
    back = DeadLetter.model_validate_json(encoded)
    assert back.value_truncated and back.value_size == len(value)
    assert back.value_sha256 == hashlib.sha256(value).hexdigest()
    assert value.startswith(back.value_prefix()) and len(back.value_prefix()) == DEAD_LETTER_VALUE_BYTES
    assert (back.key_size, back.source_offset) == (len(key), INT64_MAX)
    with pytest.raises(ValueError, match="truncated"):
        back.original_value()


@pytest.mark.parametrize("cap", [0, 1, 1000])
def test_the_dead_letter_cap_is_configurable(cap):
    value = b"y" * 5000
    letter = DeadLetter.of(InvalidRecord("oversized", "big"), "ecg.samples", 0, 7, b"s", value, max_value_bytes=cap)
    assert letter.value_prefix() == value[:cap] and letter.value_truncated and letter.value_size == 5000


def test_a_small_record_travels_whole_in_its_dead_letter():
    value = b'{"sensor_id": "s", "seq": 0, "values": [NaN]}'
    letter = DeadLetter.of(InvalidRecord("non_finite", "NaN"), "ecg.samples", 1, 2, b"s", value)
    assert not letter.value_truncated and letter.original_value() == value
    assert letter.value_sha256 == hashlib.sha256(value).hexdigest() and letter.key() == b"s"
    tombstone = DeadLetter.of(InvalidRecord("not_json", "tombstone"), "ecg.samples", 1, 3, None, None)
    assert tombstone.original_value() is None and tombstone.value_size is None and tombstone.key() is None
