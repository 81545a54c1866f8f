"""The monitor's settings: environment (prefix MONITOR_) and `.env`, validated at start-up.
The table in docs/configuration.md lists every field here with its default (a test checks)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from monitor.stream.wire import DEAD_LETTER_VALUE_BYTES, DEAD_LETTER_VALUE_BYTES_LIMIT

#: The default model, shipped as package data (its model card: docs/model-card.md).
SHIPPED_MODEL_PATH = Path(__file__).resolve().parents[1] / "models" / "default.pt"
#: The settings that name Kafka topics (scores_topic may be empty: off).
TOPIC_SETTINGS = ("input_topic", "alerts_topic", "dlq_topic", "scores_topic", "state_topic")
#: Kafka's rule for topic names (besides "." and ".."); an illegal name would only fail at the first send.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class MonitorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MONITOR_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", frozen=True)

    # Kafka connection
    bootstrap_servers: str = Field("localhost:9092", description="Comma-separated Kafka bootstrap servers")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    client_id: str = Field("ecg-monitor", description="Kafka client id (shows in broker logs and quotas)")

    # Topics and group
    group_id: str = Field("ecg-monitor", min_length=1)
    input_topic: str = Field("ecg.samples", min_length=1)
    alerts_topic: str = Field("ecg.alerts", min_length=1)
    dlq_topic: str = Field("ecg.samples.dlq", min_length=1)
    scores_topic: str = Field("", description="Publish every window's score here; empty = off")
    state_topic: str = Field("ecg.monitor.state", min_length=1,
                             description="Compacted changelog of per-sensor state; as many partitions as the input")
    session_timeout_ms: int = Field(10_000, ge=1000)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    max_poll_records: int = Field(2000, ge=1)
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts reading")

    # Model and scoring
    model_path: Path | None = Field(None, description="Model artefact from `trainer fit`; empty = the model "
                                                     "shipped with the package (monitor/models/default.pt)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: int = Field(512, ge=1, le=65536, description="Most windows scored in one batch")
    max_wait_ms: int = Field(10, ge=0, le=60_000, description="Longest a complete window waits for its batch")
    hop: int | None = Field(None, ge=1, description="Samples between window starts; empty = window length")
    windowing: Literal["auto", "fixed", "beats"] = Field(
        "auto", description="Windows to score: auto = the artefact's convention, fixed (every L samples) or beats")
    default_fs: float | None = Field(None, gt=0, description="Sampling rate (Hz) of records without fs: beat windows "
                                     "need one (empty = such records are dead-lettered); the quality check of fixed "
                                     "windows assumes it (empty = a window a second)")
    max_record_bytes: int = Field(1 << 20, ge=64, description="Larger input records go to the dead-letter topic")
    dlq_max_value_bytes: int = Field(DEAD_LETTER_VALUE_BYTES, ge=0, le=DEAD_LETTER_VALUE_BYTES_LIMIT,
                                     description="Most bytes of a rejected record a dead letter carries")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU; empty = torch default")

    # Calibrated alert policy: empty = the artefact's operating point (its "policy"), else the defaults
    alert_fire_level: float | None = Field(None, gt=0, description="Fire when the aggregate of calibrated "
                                                                   "scores exceeds this")
    alert_resolve_level: float | None = Field(None, ge=0, description="Resolve when the aggregate stays below this")
    alert_resolve_beats: int | None = Field(None, ge=1, description="... for this many beats")
    alert_gross_beats: int | None = Field(None, ge=1, description="Consecutive gross beats that fire at any time")
    alert_rhythm_weight: float | None = Field(None, ge=0, description="Beat models: weight of the rhythm "
                                              "(prematurity) score added to the calibrated score; 0 = shape only")
    alert_template_weight: float | None = Field(None, ge=0, description="Beat models: the shape score is the larger "
                                                "of the autoencoder's and this times the template score (distance "
                                                "from the sensor's own usual beat); 0 = the autoencoder's alone")
    alert_fast_run_beats: int | None = Field(None, ge=0, description="Beat models: also fire on this many "
                                             "consecutive beats that are each fast (over 100/min and early) and "
                                             "unlike the sensor's usual beat; 0 = off")
    alert_fast_run_level: float | None = Field(None, ge=0, description="Beat models: the template score from which "
                                               "a fast beat counts towards a fast run")
    calibration_warmup_beats: int | None = Field(None, ge=3, description="Beats a new sensor calibrates on; "
                                                                         "empty = 150")
    quality_gating: bool = Field(True, description="Check each window's signal quality (its raw samples; a "
                                                   "beat's likeness to the sensor's usual and last beats: motion "
                                                   "artefacts); bad ones raise no anomaly alert")

    # Sensor state
    sensor_idle_timeout_s: float = Field(600.0, gt=0,
                                         description="Evict a sensor's buffer after this long without data")
    max_sensors: int = Field(200_000, ge=1,
                             description="Bound on live sensor buffers; at it, MONITOR_EVICT_MIN_IDLE_S decides "
                                         "whether a new sensor evicts an idle one or is refused (over_capacity)")
    reorder_slots: int = Field(4, ge=0,
                               description="Records per sensor held while waiting for a missing earlier record")
    reorder_timeout_s: float = Field(2.0, gt=0, description="A missing record not seen by then is a gap")
    state_idle_timeout_s: float = Field(86_400.0, gt=0, description="Drop a sensor's calibration after this "
                                                                    "long without data (tombstone)")

    # HTTP, logging, lifecycle
    # Loopback by default: a daemon started on a host does not expose its endpoints to the network
    # unless asked. Containers set 0.0.0.0 (the images, deploy/k8s and compose do) for probes and scrapes.
    metrics_host: str = Field("127.0.0.1", min_length=1, description="Address the HTTP server binds to")
    metrics_port: int = Field(9108, ge=0, le=65535)
    healthz_max_age_s: float = Field(30.0, gt=0,
                                     description="/healthz fails when the loop has not turned for this long")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout_s: float = Field(20.0, gt=0, description="Budget for a graceful stop on SIGTERM/SIGINT")

    # -- reliability round 2 (issue 12): progress, resets, bounds, eviction --------------------------
    progress_timeout_s: float = Field(300.0, gt=0, description="/healthz fails when there is work (lag or pending "
                                                               "output) but no commit has advanced for this long")
    max_seq_gap: int = Field(1_000_000, ge=1, description="A seq further ahead than this many samples starts a "
                                                          "new segment at once (no reorder wait)")
    reorder_max_bytes: int = Field(1 << 16, ge=0, description="Bytes of samples (float32) a sensor's reorder "
                                                              "stash may hold")
    max_pending_windows: int = Field(4096, ge=1, description="Pending windows at which fetching pauses "
                                                             "(resumes below half)")
    evict_min_idle_s: float = Field(60.0, gt=0, description="At max_sensors, a sensor idle this long may be "
                                                            "evicted for a new one; else the new one is refused")
    topic_check_interval_s: float = Field(10.0, gt=0, description="How often the output topics' existence is "
                                                                  "checked (not ready while one is missing)")

    @field_validator(*TOPIC_SETTINGS)
    @classmethod
    def _topic_name(cls, name: str, info: Any) -> str:
        if name == "" and info.field_name == "scores_topic":
            return name
        if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError("not a Kafka topic name: 1-249 characters from [a-zA-Z0-9._-], not '.' or '..'")
        return name

    # The messages name settings, never values: load_settings prints them (secrets stay unprinted).
    @model_validator(mode="after")
    def _check(self) -> MonitorSettings:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError("security_protocol SASL_* needs MONITOR_SASL_MECHANISM")
        topics = [getattr(self, name) for name in TOPIC_SETTINGS if getattr(self, name)]
        if len(set(topics)) != len(topics):
            raise ValueError("the input, alerts, dead-letter, scores and state topics must differ")
        return self

    @property
    def model_file(self) -> Path:
        """The artefact to load: MONITOR_MODEL_PATH, else the model shipped with the package."""
        return self.model_path or SHIPPED_MODEL_PATH

    def kafka_common(self) -> dict[str, Any]:
        """Connection options shared by consumer, producer and admin client (kafka-python names)."""
        options: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                options[name] = str(getattr(self, name))
        if self.ssl_password:
            options["ssl_password"] = self.ssl_password.get_secret_value()
        return options


def load_settings(env_file: str | Path | None) -> MonitorSettings | None:
    """The settings from the environment and `env_file`; None after printing why they are invalid
    to stderr (the commands then exit with status 2)."""
    try:
        return MonitorSettings(_env_file=env_file)
    except ValidationError as exc:
        print(f"invalid settings:\n{describe_errors(exc)}", file=sys.stderr)
        return None


def describe_errors(exc: ValidationError) -> str:
    """One line per error: the variable and the message, never the value. (pydantic's own text
    quotes the input, and for a model-level error that input is every setting, passwords too.)"""
    lines = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        field = ".".join(map(str, error["loc"]))
        lines.append(f"  {'MONITOR_' + field.upper() if field else 'settings'}: {error['msg']}")
    return "\n".join(lines)
