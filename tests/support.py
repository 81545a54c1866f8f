"""Helpers for tests that run the monitor daemon as a subprocess against a real broker.

Shared by the daemon, deploy and reliability suites; import as `from tests.support import ...`
(or `from support import ...` from inside tests/). Typical use:

    topics = Topics.for_prefix(topic_prefix)
    topics.create(broker.bootstrap, partitions=3)
    env = monitor_env(broker.bootstrap, topics, trained_model, MONITOR_MAX_BATCH="8")
    with MonitorProcess(env, log_path=tmp_path / "monitor.log") as monitor:
        produce(broker.bootstrap, topics.input, stream_records({"s1": beats}, chunk=70))
        wait_for(lambda: monitor.metric("ecg_monitor_windows_scored_total") >= len(beats), 60)
        alerts = consume_all(broker.bootstrap, topics.alerts)
        assert monitor.stop() == 0
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from scipy.signal import resample_poly

from monitor.core.artefact import Artefact
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.stream.wire import encode_input
from monitor.tools import harness
from monitor.tools.broker import create_topics, free_port
from monitor.tools.harness import DaemonProcess, Metrics, sample_key  # noqa: F401 - part of this module's API

REPO = Path(__file__).resolve().parents[1]

Record = tuple[bytes | None, bytes]  # (key, value) as produced to Kafka


# -- data --------------------------------------------------------------------------------------

def load_ecg5000(data_dir: Path, files: tuple[str, ...] = ("TEST",)) -> tuple[np.ndarray, np.ndarray]:
    """(beats (n, 140) float32, class labels (n,) int; 1 = normal) from the UCR text files."""
    parts = [np.loadtxt(Path(data_dir) / f"ECG5000_{name}.txt", dtype=np.float64) for name in files]
    table = np.concatenate(parts)
    return table[:, 1:].astype(np.float32), table[:, 0].astype(int)


def usual_beat(length: int = 140) -> np.ndarray:
    """A synthetic beat window: a sharp QRS near its start and a wide T wave, the shape a template learns."""
    t = np.linspace(0, 1, length)
    return np.exp(-0.5 * ((t - 0.1) / 0.02) ** 2) + 0.3 * np.exp(-0.5 * ((t - 0.4) / 0.06) ** 2)


def at_rate(record: tuple[np.ndarray, np.ndarray], fs: int,
            seconds: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The conftest `record_100` fixture's (signal, beat samples) at 360 Hz, cut to its first `seconds`
    (all of it if None) and resampled to `fs` Hz, the beats moved to the nearest sample."""
    signal, beats = record
    if seconds is not None:
        signal, beats = signal[: int(seconds * 360)], beats[beats < int(seconds * 360)]
    if fs == 360:
        return signal, beats
    return resample_poly(signal, fs, 360), np.round(beats * fs / 360).astype(np.int64)


def untrained_model(path: Path, model_version: str = "untrained-test") -> Path:
    """Save a tiny untrained autoencoder (seed 0, threshold 1.0) at `path`: for daemon tests that
    assert delivery and offsets, not detection."""
    config = ModelConfig(embedding_dim=4, hidden_dim=8)
    torch.manual_seed(0)
    return Artefact(config, LSTMAutoencoder(config).state_dict(), threshold=1.0,
                    normalisation={"kind": "zscore"}, model_version=model_version).save(path)


# -- topics and settings -----------------------------------------------------------------------

@dataclass(frozen=True)
class Topics:
    input: str
    alerts: str
    dlq: str
    scores: str
    state: str  # the compacted changelog of per-sensor state: partitioned like the input

    @classmethod
    def for_prefix(cls, prefix: str) -> Topics:
        return cls(f"{prefix}.samples", f"{prefix}.alerts", f"{prefix}.dlq", f"{prefix}.scores", f"{prefix}.state")

    def create(self, bootstrap: str, partitions: int = 3) -> Topics:
        create_topics(bootstrap, {self.input: partitions, self.alerts: 1, self.dlq: 1, self.scores: 1,
                                  self.state: partitions}, compacted=(self.state,))
        return self


def monitor_env(bootstrap: str, topics: Topics, model_path: Path, *, scores: bool = True,
                group_id: str | None = None, **overrides: Any) -> dict[str, str]:
    """MONITOR_* environment for a test daemon: the given broker and topics, a free metrics port,
    short group timeouts (Tansu joins take about the rebalance timeout) and small batches.
    Keyword overrides use the env names, e.g. MONITOR_MAX_BATCH="1"."""
    return harness.monitor_env(
        bootstrap_servers=bootstrap,
        group_id=group_id or f"{topics.input}.monitor",
        model_path=model_path,
        input_topic=topics.input,
        alerts_topic=topics.alerts,
        dlq_topic=topics.dlq,
        scores_topic=topics.scores if scores else "",
        state_topic=topics.state,
        device="cpu",
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        session_timeout_ms=6000,
        max_poll_interval_ms=6000,
        max_batch=64,
        max_wait_ms=20,
        torch_threads=1,
        shutdown_timeout_s=20,
        log_format="json",
        **overrides,
    )


# -- the daemon as a subprocess ----------------------------------------------------------------

class MonitorProcess(DaemonProcess):
    """monitor.tools.harness.DaemonProcess with the tests' defaults: run from the repository root,
    logging to /tmp/monitor-PORT.log unless `log_path` is given. `start()` and `with` wait for
    /readyz; stop() sends SIGTERM (or another signal) and returns the exit code; kill() is SIGKILL."""

    def __init__(self, env: Mapping[str, str], log_path: Path | None = None, args: Iterable[str] = ("run",)) -> None:
        log = Path(log_path) if log_path else Path(f"/tmp/monitor-{env['MONITOR_METRICS_PORT']}.log")
        super().__init__(env, log, command=list(args), cwd=REPO)


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a /metrics page as {'name{label="v",...}': value} (labels sorted)."""
    return Metrics.parse(text)


# -- producing and consuming -------------------------------------------------------------------

def stream_records(streams: Mapping[str, np.ndarray], chunk: int, *, seq0: int = 0,
                   ts: bool = True) -> Iterable[Record]:
    """Input records for many sensors, interleaved round-robin chunk by chunk (as live sensors
    would send them). `streams` maps sensor id -> samples (any shape; flattened, e.g. beats
    (n, 140) back to back). `ts` stamps each record with the time it is generated, which feeds
    the end-to-end latency metric. A generator: pace it by consuming it slowly."""
    flat = {sensor: np.asarray(values, dtype=np.float64).ravel() for sensor, values in streams.items()}
    longest = max((len(v) for v in flat.values()), default=0)
    for start in range(0, longest, chunk):
        for sensor, values in flat.items():
            if start < len(values):
                stamp = time.time() if ts else None
                yield sensor.encode(), encode_input(sensor, seq0 + start, values[start:start + chunk], ts=stamp)


def produce(bootstrap: str, topic: str, records: Iterable[Record], pace_s: float = 0.0) -> int:
    """Send (key, value) records and flush; `pace_s` sleeps between records. Returns the count."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    count = 0
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value)
            count += 1
            if pace_s:
                time.sleep(pace_s)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
    return count


def consume_all(bootstrap: str, topic: str, *, min_count: int = 0, timeout_s: float = 60.0,
                idle_s: float = 1.5) -> list[Any]:
    """Every record of a topic, read with a fresh group-less consumer from the beginning: polls
    until at least `min_count` records arrived and then nothing new came for `idle_s`.
    Returns kafka-python ConsumerRecords (use .key, .value, .partition, .offset, .headers)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        deadline = time.monotonic() + timeout_s
        partitions = None
        while not partitions:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {topic} does not exist")
                time.sleep(0.2)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        records: list[Any] = []
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
            if batch:
                last_new = time.monotonic()
            elif len(records) >= min_count and time.monotonic() - last_new >= idle_s:
                return records
        raise AssertionError(f"{topic}: {len(records)} records after {timeout_s}s, wanted >= {min_count}")
    finally:
        consumer.close()


def committed(bootstrap: str, group: str, topic: str) -> tuple[int | None, int]:
    """(the group's committed offset, the end offset) of partition 0. (Tansu's end offset can lag
    behind the last record's offset + 1, so compare the commit with the records sent.)"""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partition = TopicPartition(topic, 0)
        return consumer.committed(partition), consumer.end_offsets([partition])[partition]
    finally:
        consumer.close()


def committed_records(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """The group's committed offsets summed over the topic's partitions: the records it has committed, on a topic
    whose offsets start at 0."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        consumer.close()


def consume_json(bootstrap: str, topic: str, **kwargs: Any) -> list[dict]:
    """consume_all, values decoded from JSON."""
    return [json.loads(r.value) for r in consume_all(bootstrap, topic, **kwargs)]


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.25,
             message: str | Callable[[], str] = "condition") -> Any:
    """Poll until predicate() is truthy and return its value; AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s: {message() if callable(message) else message}")
        time.sleep(interval_s)


# -- bad input ---------------------------------------------------------------------------------

def malformed_records(sensor_id: str = "bad-sensor", max_bytes: int = 1 << 20) -> dict[str, Record]:
    """One record per rejection reason (monitor.stream.wire.REJECT_REASONS): reason -> (key, value).
    'oversized' is just over `max_bytes` (match MONITOR_MAX_RECORD_BYTES)."""
    key = sensor_id.encode()
    good = {"sensor_id": sensor_id, "seq": 0, "values": [0.1, 0.2]}
    padding = "x" * max_bytes
    return {
        "oversized": (key, json.dumps({**good, "pad": padding}).encode()),
        "not_json": (key, b"\xff\xfe this is not json {"),
        "schema": (key, json.dumps({**good, "seq": "twelve"}).encode()),
        "non_finite": (key, b'{"sensor_id": "%s", "seq": 0, "values": [0.1, NaN]}' % key),
        "empty_values": (key, json.dumps({**good, "values": []}).encode()),
        "key_mismatch": (b"someone-else", json.dumps(good).encode()),
    }


# -- expectations ------------------------------------------------------------------------------

def alert_key(sensor_id: str, window_start_seq: int, state: str) -> str:
    """What an alert is about, without the input position its id also carries (AlertRecord.make_id):
    tests compute the alerts a run must give offline, where there are no offsets."""
    return f"{sensor_id}:{window_start_seq}:{state}"


def alert_keys(alerts: Iterable[Mapping[str, Any]]) -> set[str]:
    return {alert_key(a["sensor_id"], a["window_start_seq"], a["state"]) for a in alerts}


def expected_calibrated_alert_ids(scorer: Any, streams: Mapping[str, np.ndarray], *, warmup_beats: int,
                                  seq0: int = 0) -> set[str]:
    """The alerts (`alert_key`s) the daemon must publish for sensors streaming these windows (sensor ->
    (n, L) windows back to back, each passing the signal-quality check): the windows scored
    offline with the same model, through the daemon's calibration and policy (the artefact's
    operating point, `warmup_beats` of calibration)."""
    from monitor.daemon.settings import MonitorSettings
    from monitor.daemon.state_store import build_states

    settings = MonitorSettings(_env_file=None, calibration_warmup_beats=warmup_beats)
    states, ids = build_states(scorer, settings), set()
    for sensor, windows in streams.items():
        length = windows.shape[1]
        for i, error in enumerate(scorer.score(windows).tolist()):
            outcome = states.apply((0, sensor), seq0 + i * length, i, error, True)
            for state in outcome.transitions if outcome else []:
                ids.add(alert_key(sensor, seq0 + i * length, state))
    return ids
