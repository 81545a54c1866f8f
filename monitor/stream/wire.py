"""The wire formats: the one place that defines what goes over Kafka.

Input records come in on the input topic, keyed by sensor id. Alerts, per-window
scores and dead letters go out. Everything is UTF-8 JSON; see docs/wire-formats.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

#: Default cap on the size of one input record; the settings can change it.
MAX_RECORD_BYTES = 1 << 20

#: Every reason a record can be rejected for. A closed set, so it is safe as a metric label.
REJECT_REASONS = (
    "oversized",
    "not_json",
    "schema",
    "non_finite",
    "empty_values",
    "key_mismatch",
)

#: Sample positions are published as window bounds, which consumers read as 64-bit integers.
INT64_MAX = 2**63 - 1
#: The largest |sample| accepted. Samples are scored as float32: a value beyond 3.4e38 (finite in
#: JSON) becomes inf, and from about 1e19 up the per-window normalisation's sum of squares
#: overflows, so the window scores NaN (never an alert) or as a flat line. 1e15 keeps that sum
#: finite for windows up to 3e8 samples, and is far beyond any ECG unit (mV, uV, ADC counts).
SAMPLE_ABS_MAX = 1e15


def _printable(sensor_id: str) -> str:
    # A newline, an escape sequence or an invisible character in an id would forge log lines,
    # alert texts and metric labels; str.isprintable() refuses control, format and separator
    # characters (all but the plain space).
    if not sensor_id.isprintable():
        raise PydanticCustomError("control_characters", "must not contain control, format or separator characters")
    return sensor_id


def _scorable(values: list[float]) -> list[float]:
    if max(values) > SAMPLE_ABS_MAX or min(values) < -SAMPLE_ABS_MAX:
        raise PydanticCustomError("non_finite", "a value is beyond +-1e15: in float32 its window would not "
                                                "score as a finite number")
    return values


SensorId = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_printable)]


class InputRecord(BaseModel):
    """One chunk of one sensor's stream: `values[i]` is sample number `seq + i`."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False, strict=False)

    sensor_id: SensorId
    seq: Annotated[int, Field(ge=0, le=INT64_MAX, strict=True)]
    values: Annotated[list[Annotated[float, Field(strict=True)]], Field(min_length=1), AfterValidator(_scorable)]
    ts: Annotated[float | None, Field(description="epoch seconds of the first sample")] = None
    fs: Annotated[float | None, Field(gt=0, description="sampling rate in Hz")] = None

    @model_validator(mode="after")
    def _end_within_int64(self) -> InputRecord:
        if self.end_seq > INT64_MAX:
            raise PydanticCustomError("seq_range", "seq + len(values) must not exceed the int64 range")
        return self

    @property
    def end_seq(self) -> int:
        """One past the seq of the last sample."""
        return self.seq + len(self.values)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class InvalidRecord(ValueError):
    """A record that cannot be accepted; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_input(key: bytes | None, value: bytes | None, max_bytes: int = MAX_RECORD_BYTES) -> InputRecord:
    """Validate one Kafka record into an InputRecord, or raise InvalidRecord with a reason."""
    if value is None:
        raise InvalidRecord("not_json", "record has no value (tombstone)")
    if len(value) > max_bytes:
        raise InvalidRecord("oversized", f"{len(value)} bytes > limit of {max_bytes}")
    try:
        record = InputRecord.model_validate_json(value)
    except ValidationError as exc:
        raise InvalidRecord(*_reason_for(exc)) from None
    if key is not None and key != record.sensor_id.encode():
        raise InvalidRecord("key_mismatch", f"key {key[:64]!r} != sensor_id {record.sensor_id[:64]!r}")
    return record


def _reason_for(exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in errors[:3])
    kind = first["type"]
    if kind in ("json_invalid", "json_type"):
        return "not_json", detail
    if kind in ("finite_number", "non_finite"):
        return "non_finite", detail
    if kind == "too_short" and first["loc"] == ("values",):
        return "empty_values", detail
    return "schema", detail


#: the rule that opened a firing alert (monitor.stream.policy's triggers)
AlertTrigger = Literal["aggregate", "fast_run", "gross"]


class AlertRecord(BaseModel):
    """An alert opening (`firing`) or closing (`resolved`) for one sensor, or a one-shot
    `signal_quality` alert (bad signal: lead off, flat, saturated, noisy, motion artefact; `quality` says which)."""

    model_config = ConfigDict(frozen=True)

    alert_id: str
    sensor_id: str
    state: Literal["firing", "resolved", "signal_quality"]
    window_start_seq: int
    window_end_seq: int
    score: float  # the window's reconstruction error
    threshold: float  # the model's threshold
    model_version: str
    detected_at: float
    # Beat windows (null for fixed windows): the beat's R peak, as a sample index in the sensor's stream, and its
    # R-to-next-R interval in seconds; window_start_seq/window_end_seq are then the beat's span.
    r_peak_seq: int | None = None
    rr_s: float | None = None
    # Round 2 (absent in older records): the sensor's calibrated score of the window, and the
    # reconstruction error at which its calibrated score reaches the policy's fire level.
    calibrated_score: float | None = None
    calibrated_threshold: float | None = None
    quality: str | None = None  # the window's signal-quality problem, if any
    # Beat windows: how premature the beat came (monitor.stream.rhythm; the policy adds rhythm_weight x it)
    rhythm_score: float | None = None
    # Beat windows: how far the beat is from the sensor's own usual beat, in its robust SDs (monitor.stream.template;
    # the policy takes the larger of it and calibrated_score); null while the sensor calibrates
    template_score: float | None = None
    # Firing alerts: the rule that opened it: "aggregate" (the mean of recent calibrated scores over the fire
    # level), "fast_run" (beat windows: fast beats in a row unlike the sensor's usual beat) or "gross"
    trigger: AlertTrigger | None = None

    @staticmethod
    def make_id(sensor_id: str, window_start_seq: int, state: str, partition: int, offset: int) -> str:
        """Deterministic, so a redelivered alert can be de-duplicated downstream: the input position
        (partition, offset) of the record that completed the window tells apart windows with the same
        start seq in two segments of a sensor (a device that rebooted counts from 0 again)."""
        return f"{sensor_id}:{window_start_seq}:{state}@{partition}:{offset}"

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class ScoreRecord(BaseModel):
    """One scored window, published when the scores topic is on."""

    model_config = ConfigDict(frozen=True)

    sensor_id: str
    window_start_seq: int
    window_end_seq: int
    score: float  # the window's reconstruction error
    threshold: float  # the model's threshold
    anomalous: bool  # score > threshold (the calibrated policy decides alerts)
    model_version: str
    scored_at: float
    # Beat windows (null for fixed windows): as in AlertRecord.
    r_peak_seq: int | None = None
    rr_s: float | None = None
    # Round 2 (absent in older records): per-sensor calibration (monitor.stream.calibration).
    calibrated_score: float | None = None
    calibration: Literal["calibrating", "calibrated"] | None = None
    calibrated_threshold: float | None = None  # error at which the calibrated score reaches the fire level
    quality: str | None = None  # lead_off, flat, saturation, noise or artefact when the signal is bad
    rhythm_score: float | None = None  # beat windows: as in AlertRecord
    template_score: float | None = None  # beat windows: as in AlertRecord

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


#: Most bytes of a rejected record's value that its dead letter carries (MONITOR_DLQ_MAX_VALUE_BYTES);
#: a longer value is cut to this prefix and identified by its size and SHA-256.
DEAD_LETTER_VALUE_BYTES = 64 * 1024
#: The largest cap the settings accept: even then a dead letter stays far below the producer's
#: max_request_size (1 MiB by default), so producing it can never fail for its size.
DEAD_LETTER_VALUE_BYTES_LIMIT = 256 * 1024
#: Most bytes of the record's key carried, in the body and as the dead letter's own Kafka key.
DEAD_LETTER_KEY_BYTES = 1024
#: Most characters of the rejection detail carried.
DEAD_LETTER_DETAIL_CHARS = 1000


def dead_letter_max_bytes(max_value_bytes: int = DEAD_LETTER_VALUE_BYTES) -> int:
    """An upper bound on one encoded dead letter (body only; its headers add < 300 bytes)."""
    # JSON escapes a control character as 6 bytes; a topic name has at most 249 characters.
    text = 6 * (DEAD_LETTER_DETAIL_CHARS + 249 + max(map(len, REJECT_REASONS)))
    return _base64_len(max_value_bytes) + _base64_len(DEAD_LETTER_KEY_BYTES) + text + 1024


def _base64_len(n: int) -> int:
    return 4 * -(-n // 3)


#: The bound at the default cap.
DEAD_LETTER_MAX_BYTES = dead_letter_max_bytes()


class DeadLetter(BaseModel):
    """A rejected input record, with where it came from and why it was refused.

    Size policy: it carries the whole key and value when they are small, else their first
    DEAD_LETTER_KEY_BYTES / `max_value_bytes` bytes, with the original sizes and the value's
    SHA-256; so a dead letter is at most `dead_letter_max_bytes()` and can always be produced.
    The full record stays on the source topic at `source_offset` until retention removes it."""

    model_config = ConfigDict(frozen=True)

    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    key_b64: str | None
    value_b64: str | None
    rejected_at: float
    # Absent from dead letters written before the size cap (then the value was always whole).
    key_size: int | None = None
    value_size: int | None = None
    value_sha256: str | None = None
    value_truncated: bool = False

    @classmethod
    def of(cls, error: InvalidRecord, topic: str, partition: int, offset: int,
           key: bytes | None, value: bytes | None, max_value_bytes: int = DEAD_LETTER_VALUE_BYTES) -> DeadLetter:
        return cls(
            reason=error.reason,
            detail=error.detail[:DEAD_LETTER_DETAIL_CHARS],
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            key_b64=_b64(None if key is None else key[:DEAD_LETTER_KEY_BYTES]),
            value_b64=_b64(None if value is None else value[:max_value_bytes]),
            rejected_at=time.time(),
            key_size=None if key is None else len(key),
            value_size=None if value is None else len(value),
            value_sha256=None if value is None else hashlib.sha256(value).hexdigest(),
            value_truncated=value is not None and len(value) > max_value_bytes,
        )

    def key(self) -> bytes | None:
        """The key carried (its first DEAD_LETTER_KEY_BYTES bytes): the dead letter's own Kafka key."""
        return None if self.key_b64 is None else base64.b64decode(self.key_b64)

    def value_prefix(self) -> bytes | None:
        """The value carried: the whole value, or its first bytes when `value_truncated`."""
        return None if self.value_b64 is None else base64.b64decode(self.value_b64)

    def original_value(self) -> bytes | None:
        """The rejected record's value; ValueError when the dead letter carries only a prefix."""
        if self.value_truncated:
            raise ValueError(f"value truncated to {len(self.value_prefix() or b'')} of {self.value_size} bytes; "
                             f"the record is at {self.source_topic}/{self.source_partition}/{self.source_offset}")
        return self.value_prefix()

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers, so operators can filter the DLQ without parsing values."""
        return [("dlq.reason", self.reason.encode()),
                ("dlq.source", f"{self.source_topic}/{self.source_partition}/{self.source_offset}".encode())]


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def encode_input(sensor_id: str, seq: int, values: Iterable[float], ts: float | None = None,
                 fs: float | None = None) -> bytes:
    """Fast path for producers (the replayer): plain json, no model round trip."""
    record = {"sensor_id": sensor_id, "seq": int(seq), "values": [float(v) for v in values]}
    if ts is not None:
        record["ts"] = ts
    if fs is not None:
        record["fs"] = fs
    return json.dumps(record, separators=(",", ":")).encode()
