"""Decoding and validation of input records, and the dead letters built from rejected ones."""

from __future__ import annotations

import base64
import json

import pytest
from support import malformed_records

from monitor.stream.wire import REJECT_REASONS, DeadLetter, InvalidRecord, decode_input, encode_input


def test_a_valid_record_decodes():
    record = decode_input(b"s1", encode_input("s1", 140, [0.5, -1.25], ts=1.5, fs=140.0))
    assert (record.sensor_id, record.seq, record.values, record.ts, record.end_seq) == ("s1", 140, [0.5, -1.25], 1.5, 142)


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
