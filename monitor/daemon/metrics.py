"""Every Prometheus metric the monitor exports, defined in one place around an injected registry.

Naming: one prefix (`ecg_monitor_`), base units, `_total` counters, no per-sensor labels
(sensors can be many). The table in docs/metrics.md lists these; the Grafana dashboard and
the alert rules in deploy/ use only these names (a test checks that).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from monitor.stream.policy import TRIGGERS
from monitor.stream.quality import ARTEFACT, FLAT, LEAD_OFF, NOISE, SATURATION

QUALITY_REASONS = (LEAD_OFF, FLAT, SATURATION, NOISE, ARTEFACT)

# The *_created series double the exposition size and no dashboard uses them.
disable_created_metrics()

PREFIX = "ecg_monitor"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: RR intervals from 200 to 30 bpm: tachycardia, normal, bradycardia and pauses fall in different buckets.
RR_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.2, 1.5, 2.0)
#: Every `reason` of ecg_monitor_segments_started_total (monitor.stream.beat_windowing.SEGMENT_REASONS).
SEGMENT_REASONS = ("start", "gap", "reset", "jump", "fs_change")
#: Reconstruction-error buckets as multiples of the model's threshold, so the heatmap
#: reads the same for any model and the threshold is always a bucket edge.
ERROR_BUCKET_FACTORS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    """The monitor's metrics. Tests pass a fresh CollectorRegistry."""

    def __init__(self, registry: CollectorRegistry | None = None, threshold: float = 1.0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX
        self.build_info = Info(f"{p}_build", "Monitor version, model version and scoring device", registry=r)
        self.ready = Gauge(f"{p}_ready", "1 when /readyz answers 200: model loaded, partitions assigned, Kafka reachable, not stopping", registry=r)
        self.model_threshold = Gauge(f"{p}_model_threshold", "Anomaly threshold of the loaded model (score units)", registry=r)

        self.records = Counter(f"{p}_records_total", "Input records consumed", registry=r)
        self.samples = Counter(f"{p}_samples_total", "Samples accepted into sensor buffers", registry=r)
        self.invalid_records = Counter(f"{p}_invalid_records_total", "Input records rejected to the dead-letter topic, by reason", ["reason"], registry=r)
        self.sequence_gaps = Counter(f"{p}_sequence_gaps_total", "Gaps in a sensor's seq that reset its buffer", registry=r)
        self.duplicate_samples = Counter(f"{p}_duplicate_samples_total", "Samples dropped because their seq was already seen", registry=r)
        self.reordered_records = Counter(f"{p}_reordered_records_total", "Records that arrived out of seq order and were put back in order", registry=r)
        self.evicted_sensors = Counter(f"{p}_evicted_sensors_total", "Sensor buffers evicted for idleness or to bound memory", registry=r)
        self.segments_started = Counter(f"{p}_segments_started_total", "Sensor stream segments started (buffers restarted), by reason: start, gap, reset, jump, fs_change", ["reason"], registry=r)
        self.beats = Counter(f"{p}_beats_total", "Heartbeats detected and cut into windows (beat windowing)", registry=r)
        self.rr_interval = Histogram(f"{p}_rr_interval_seconds", "R-to-next-R interval of each beat window (60 / heart rate in bpm)", buckets=RR_BUCKETS, registry=r)

        self.windows_scored = Counter(f"{p}_windows_scored_total", "Windows scored", registry=r)
        self.anomalous_windows = Counter(f"{p}_anomalous_windows_total", "Scored windows above the threshold", registry=r)
        self.alerts = Counter(f"{p}_alerts_total", "Alerts published, by state", ["state"], registry=r)
        self.alert_triggers = Counter(f"{p}_alert_triggers_total", "Anomaly alerts opened, by the rule that opened them: aggregate, fast_run (beat windows: a ventricular tachycardia pattern), gross", ["trigger"], registry=r)
        self.scores_published = Counter(f"{p}_scores_published_total", "Per-window score records published to the scores topic", registry=r)
        self.dead_letters = Counter(f"{p}_dead_letters_published_total", "Records published to the dead-letter topic", registry=r)
        self.commits = Counter(f"{p}_offset_commits_total", "Successful offset commits", registry=r)
        self.kafka_errors = Counter(f"{p}_kafka_errors_total", "Kafka operations that failed and were retried, by operation", ["operation"], registry=r)
        # reliability round 2 (issue 12)
        self.unproducible_outputs = Counter(f"{p}_unproducible_outputs_total", "Output records that can never be produced (dead letters: dropped; alerts, scores: retried), by topic kind and reason", ["topic", "reason"], registry=r)
        self.non_finite_scores = Counter(f"{p}_non_finite_scores_total", "Windows whose score was not finite (skipped: no policy, no score record, not in the error histogram)", registry=r)
        self.evicted_samples = Counter(f"{p}_evicted_samples_total", "Buffered samples of evicted sensors that never completed a window", registry=r)
        self.backpressure_pauses = Counter(f"{p}_backpressure_pauses_total", "Times fetching paused because the pending-window queue was full", registry=r)
        self.pending_windows = Gauge(f"{p}_pending_windows", "Complete windows waiting to be scored", registry=r)
        self.buffered_bytes = Gauge(f"{p}_buffered_sample_bytes", "Bytes of samples held in sensor buffers, recent samples and reorder stashes", registry=r)
        self.rebalance_errors = Counter(f"{p}_rebalance_callback_errors_total", "Exceptions caught in rebalance callbacks (logged; the callback's state is reset)", registry=r)

        self.batch_size = Histogram(f"{p}_batch_size_windows", "Windows per scoring batch", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.scoring_latency = Histogram(f"{p}_scoring_latency_seconds", "Time to score one batch", buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_latency = Histogram(f"{p}_end_to_end_latency_seconds", "From the ts (epoch seconds of its first sample) of the record that completed a window to the broker's acknowledgement of the flush after the window was scored", buckets=LATENCY_BUCKETS, registry=r)
        self.reconstruction_error = Histogram(f"{p}_reconstruction_error", "Reconstruction error per scored window (score units)", buckets=[threshold * f for f in ERROR_BUCKET_FACTORS], registry=r)

        self.signal_quality_windows = Counter(f"{p}_signal_quality_windows_total", "Scored windows of bad signal quality (no anomaly alert), by reason", ["reason"], registry=r)
        self.state_restored_sensors = Counter(f"{p}_state_restored_sensors_total", "Sensor states restored from the changelog topic on partition assignment", registry=r)
        self.calibrating_sensors = Gauge(f"{p}_calibrating_sensors", "Sensors still learning their baseline (no ordinary alerts yet)", registry=r)
        self.consumer_lag = Gauge(f"{p}_consumer_lag_records", "Records behind the end of the assigned input partitions", registry=r)
        self.active_sensors = Gauge(f"{p}_active_sensors", "Sensors with a live window buffer", registry=r)
        self.assigned_partitions = Gauge(f"{p}_assigned_partitions", "Input partitions assigned to this instance", registry=r)
        self.last_processed = Gauge(f"{p}_last_processed_timestamp_seconds", "Unix time the last record was processed", registry=r)
        self.loop_heartbeat = Gauge(f"{p}_loop_heartbeat_timestamp_seconds", "Unix time of the last main-loop iteration", registry=r)

        for reason in _reject_reasons():
            self.invalid_records.labels(reason=reason)
        self.invalid_records.labels(reason="over_capacity")
        for reason in SEGMENT_REASONS:
            self.segments_started.labels(reason=reason)
        for state in ("firing", "resolved", "signal_quality"):
            self.alerts.labels(state=state)
        for trigger in TRIGGERS:
            self.alert_triggers.labels(trigger=trigger)
        for reason in QUALITY_REASONS:
            self.signal_quality_windows.labels(reason=reason)
        self.model_threshold.set(threshold)


def _reject_reasons() -> tuple[str, ...]:
    from monitor.stream.wire import REJECT_REASONS

    return REJECT_REASONS


def metric_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry can expose (with _total/_bucket/... suffixes)."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
    return names
