"""The monitor's settings: environment (prefix MONITOR_) and `.env`, validated at start-up.
The README's "Configuration" table lists every field here with its default."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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
    session_timeout_ms: int = Field(10_000, ge=1000)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    max_poll_records: int = Field(2000, ge=1)
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts reading")

    # Model and scoring
    model_path: Path = Field(Path("models/ecg-lstm-ae.pt"), description="Model artefact from `trainer fit`")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: int = Field(512, ge=1, le=65536, description="Most windows scored in one batch")
    max_wait_ms: int = Field(10, ge=0, le=60_000, description="Longest a complete window waits for its batch")
    hop: int | None = Field(None, ge=1, description="Samples between window starts; empty = window length")
    max_record_bytes: int = Field(1 << 20, ge=64, description="Larger input records go to the dead-letter topic")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU; empty = torch default")

    # Alert policy: fire when k of the last n windows are anomalous, resolve after m normal in a row
    alert_k: int = Field(2, ge=1)
    alert_n: int = Field(3, ge=1)
    resolve_m: int = Field(3, ge=1)

    # Sensor state
    sensor_idle_timeout_s: float = Field(600.0, gt=0, description="Evict a sensor's buffer after this long without data")
    max_sensors: int = Field(200_000, ge=1, description="Bound on live sensor buffers; the idlest are evicted beyond it")
    reorder_slots: int = Field(4, ge=0, description="Records per sensor held while waiting for a missing earlier record")
    reorder_timeout_s: float = Field(2.0, gt=0, description="A missing record not seen by then is a gap")
    replay_max_windows: int = Field(1000, ge=1, description="Longest alert episode (windows) held uncommitted so a restart re-derives the same alert ids")

    # HTTP, logging, lifecycle
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9108, ge=0, le=65535)
    healthz_max_age_s: float = Field(30.0, gt=0, description="/healthz fails when the loop has not turned for this long")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    shutdown_timeout_s: float = Field(20.0, gt=0, description="Budget for a graceful stop on SIGTERM/SIGINT")

    @model_validator(mode="after")
    def _check(self) -> "MonitorSettings":
        if self.alert_k > self.alert_n:
            raise ValueError(f"alert_k ({self.alert_k}) must be <= alert_n ({self.alert_n})")
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError("security_protocol SASL_* needs MONITOR_SASL_MECHANISM")
        topics = [self.input_topic, self.alerts_topic, self.dlq_topic] + ([self.scores_topic] if self.scores_topic else [])
        if len(set(topics)) != len(topics):
            raise ValueError(f"input, alerts, dead-letter and scores topics must differ: {topics}")
        return self

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
    (the commands then exit with status 2)."""
    try:
        return MonitorSettings(_env_file=env_file)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}")
        return None
