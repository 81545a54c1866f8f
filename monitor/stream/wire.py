"""The wire formats: the one place that defines what goes over Kafka.

Input records come in on the input topic, keyed by sensor id. Alerts, per-window
scores and dead letters go out. Everything is UTF-8 JSON; see README "Wire formats".
"""

from __future__ import annotations

import base64
import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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

SensorId = Annotated[str, Field(min_length=1, max_length=256)]


class InputRecord(BaseModel):
    """One chunk of one sensor's stream: `values[i]` is sample number `seq + i`."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False, strict=False)

    sensor_id: SensorId
    seq: Annotated[int, Field(ge=0, strict=True)]
    values: Annotated[list[Annotated[float, Field(strict=True)]], Field(min_length=1)]
    ts: Annotated[float | None, Field(description="epoch seconds of the first sample")] = None
    fs: Annotated[float | None, Field(gt=0, description="sampling rate in Hz")] = None

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
    if kind == "finite_number":
        return "non_finite", detail
    if kind == "too_short" and first["loc"] == ("values",):
        return "empty_values", detail
    return "schema", detail


class AlertRecord(BaseModel):
    """An alert opening (`firing`) or closing (`resolved`) for one sensor."""

    model_config = ConfigDict(frozen=True)

    alert_id: str
    sensor_id: str
    state: Literal["firing", "resolved"]
    window_start_seq: int
    window_end_seq: int
    score: float
    threshold: float
    model_version: str
    detected_at: float

    @staticmethod
    def make_id(sensor_id: str, window_start_seq: int, state: str) -> str:
        """Deterministic, so a redelivered alert can be de-duplicated downstream."""
        return f"{sensor_id}:{window_start_seq}:{state}"

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class ScoreRecord(BaseModel):
    """One scored window, published when the scores topic is on."""

    model_config = ConfigDict(frozen=True)

    sensor_id: str
    window_start_seq: int
    window_end_seq: int
    score: float
    threshold: float
    anomalous: bool
    model_version: str
    scored_at: float

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class DeadLetter(BaseModel):
    """A rejected input record, with where it came from and why it was refused."""

    model_config = ConfigDict(frozen=True)

    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    key_b64: str | None
    value_b64: str | None
    rejected_at: float

    @classmethod
    def of(cls, error: InvalidRecord, topic: str, partition: int, offset: int,
           key: bytes | None, value: bytes | None) -> "DeadLetter":
        return cls(
            reason=error.reason,
            detail=error.detail[:1000],
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            key_b64=_b64(key),
            value_b64=_b64(value),
            rejected_at=time.time(),
        )

    def original_value(self) -> bytes | None:
        return None if self.value_b64 is None else base64.b64decode(self.value_b64)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers, so operators can filter the DLQ without parsing values."""
        return [("dlq.reason", self.reason.encode()), ("dlq.source", f"{self.source_topic}/{self.source_partition}/{self.source_offset}".encode())]


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def encode_input(sensor_id: str, seq: int, values, ts: float | None = None, fs: float | None = None) -> bytes:
    """Fast path for producers (the replayer): plain json, no model round trip."""
    record = {"sensor_id": sensor_id, "seq": int(seq), "values": [float(v) for v in values]}
    if ts is not None:
        record["ts"] = ts
    if fs is not None:
        record["fs"] = fs
    return json.dumps(record, separators=(",", ":")).encode()
