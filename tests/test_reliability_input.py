"""Reliability: bad input. The decoder is fuzzed with random bytes, random JSON, record-shaped
JSON with wrong fields and byte-level mutations of good records. Whatever comes in, the result
is a valid InputRecord or InvalidRecord with a reason from REJECT_REASONS, never another
exception, and every rejected record makes a dead letter that carries its reason and bytes.
The same through the real broker (10k bad records among good ones) is in test_reliability_daemon.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import tally
from monitor.stream.wire import (DEAD_LETTER_MAX_BYTES, DEAD_LETTER_VALUE_BYTES, SAMPLE_ABS_MAX, INT64_MAX,
                                 MAX_RECORD_BYTES, REJECT_REASONS, DeadLetter, InputRecord, InvalidRecord,
                                 decode_input, dead_letter_max_bytes, encode_input)

pytestmark = pytest.mark.reliability

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    tally.record("decoder fuzz", records_tried=COUNTS["tried"], faults_injected=COUNTS["rejected"])


def check(key: bytes | None, value: bytes | None, max_bytes: int = MAX_RECORD_BYTES) -> InputRecord | None:
    """Decode one record and check the contract; returns the record, or None when rejected."""
    COUNTS["tried"] += 1
    try:
        record = decode_input(key, value, max_bytes)
    except InvalidRecord as error:
        COUNTS["rejected"] += 1
        assert error.reason in REJECT_REASONS
        assert error.detail
        letter = DeadLetter.of(error, "ecg.samples", 3, 1812, key, value)
        encoded = letter.to_bytes()
        assert len(encoded) <= DEAD_LETTER_MAX_BYTES
        back = DeadLetter.model_validate_json(encoded)
        assert back.reason == error.reason
        if value is not None and len(value) > DEAD_LETTER_VALUE_BYTES:
            assert back.value_truncated and back.value_prefix() == value[:DEAD_LETTER_VALUE_BYTES]
            assert (back.value_size, back.value_sha256) == (len(value), hashlib.sha256(value).hexdigest())
        else:
            assert back.original_value() == value
        assert dict(letter.headers())["dlq.reason"] == error.reason.encode()
        return None
    assert value is not None and len(value) <= max_bytes
    assert record.sensor_id.isprintable() and 0 <= record.seq < record.end_seq <= INT64_MAX
    assert all(math.isfinite(v) and abs(v) <= SAMPLE_ABS_MAX for v in record.values)
    assert key is None or key == record.sensor_id.encode()
    assert decode_input(key, record.to_bytes()) == record
    return record


keys = st.none() | st.just(b"patient-1") | st.binary(max_size=16)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25)

good_or_bad_number = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**30, 10**30)
                      | st.text(max_size=5) | st.none() | st.booleans())
record_shaped = st.fixed_dictionaries(
    {
        "sensor_id": st.just("patient-1") | st.text(max_size=300) | st.integers() | st.none(),
        "seq": st.integers(-5, 2**70) | st.floats() | st.text(max_size=5) | st.booleans() | st.none(),
        "values": (st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=40)
                   | st.lists(good_or_bad_number, max_size=40) | json_values),
    },
    optional={"ts": good_or_bad_number, "fs": good_or_bad_number, "extra": json_values},
)


@FUZZ
@given(key=keys, value=st.binary(max_size=2048))
def test_random_bytes_never_crash_the_decoder(key, value):
    check(key, value)


@FUZZ
@given(key=keys, value=json_values)
def test_random_json_never_crashes_the_decoder(key, value):
    check(key, json.dumps(value, allow_nan=True).encode())


@FUZZ
@given(key=st.none() | st.just(b"patient-1") | st.just(b"patient-2"), fields=record_shaped)
def test_record_shaped_json_is_accepted_or_rejected_with_a_reason(key, fields):
    record = check(key, json.dumps(fields, allow_nan=True).encode())
    if record is not None:  # accepted only when every field really was valid
        assert fields["sensor_id"] == record.sensor_id
        assert type(fields["seq"]) is int and fields["seq"] == record.seq
        assert [float(v) for v in fields["values"]] == record.values


@FUZZ
@given(data=st.data(), n_values=st.integers(1, 60))
def test_mutated_good_records_are_accepted_or_rejected_with_a_reason(data, n_values):
    value = bytearray(encode_input("patient-1", 140, [0.25] * n_values, ts=1764000000.25, fs=140.0))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(value) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if action == "flip":
            value[at] ^= data.draw(st.integers(1, 255))
        elif action == "delete":
            del value[at]
        elif action == "insert":
            value[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del value[at:]
        if not value:
            break
    check(b"patient-1", bytes(value))


@pytest.mark.parametrize("value, reason", [
    (None, "not_json"),
    (b"", "not_json"),
    (b"\xff\xfe\x00garbage", "not_json"),
    (b"[" * 100_000, "not_json"),
    (b'{"sensor_id":"patient-1","seq":1,"values":[1e400]}', "non_finite"),
    (b'{"sensor_id":"patient-1","seq":1,"values":[NaN]}', "non_finite"),
    (b'{"sensor_id":"patient-1","seq":1,"values":[]}', "empty_values"),
    (b'{"sensor_id":"patient-1","seq":-1,"values":[1]}', "schema"),
    (b'{"sensor_id":"patient-1","seq":' + b"9" * 5000 + b',"values":[1]}', "not_json"),
    (b'{"sensor_id":"patient-2","seq":1,"values":[1]}', "key_mismatch"),
])
def test_known_bad_records_get_their_reason(value, reason):
    with pytest.raises(InvalidRecord) as error:
        decode_input(b"patient-1", value)
    assert error.value.reason == reason
    check(b"patient-1", value)


@FUZZ
@given(n_values=st.integers(1, 400), limit=st.integers(64, 4096))
def test_oversized_records_are_rejected_whatever_they_hold(n_values, limit):
    value = encode_input("patient-1", 0, [1.0] * n_values)
    record = check(b"patient-1", value, max_bytes=limit)
    assert (record is None) == (len(value) > limit)
    garbage = b"\x00" * (limit + 1)
    with pytest.raises(InvalidRecord) as error:
        decode_input(b"patient-1", garbage, max_bytes=limit)
    assert error.value.reason == "oversized"
    check(b"patient-1", garbage, max_bytes=limit)


@FUZZ
@given(key=st.none() | st.binary(max_size=5000), value=st.none() | st.binary(max_size=300_000),
       detail=st.text(max_size=3000), cap=st.integers(0, 300_000), topic=st.text("abc.-_", min_size=1, max_size=249))
def test_every_dead_letter_fits_its_size_bound(key, value, detail, cap, topic):
    letter = DeadLetter.of(InvalidRecord("oversized", detail), topic, 2**31 - 1, INT64_MAX, key, value,
                           max_value_bytes=cap)
    assert len(letter.to_bytes()) <= dead_letter_max_bytes(cap)
    assert sum(len(k) + len(v) for k, v in letter.headers()) < 300
