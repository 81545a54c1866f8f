"""Soak test (a benchmark, not CI): the daemon (`python -m monitor run`, a subprocess) against the
real broker (Tansu) for a long time under mixed traffic, watching for leaks and lost windows.

    python -m bench.soak --minutes 30            # results in bench/results/soak.md and soak.json

Traffic, in 0.25 s ticks of one 35-sample record per live sensor (140 Hz):
- good: ECG-like beats (a sine per beat with noise) from `--sensors` live sensors;
- coming and going: every 10 s a few sensors leave for good (their last partial window is never
  complete, and they are evicted after MONITOR_SENSOR_IDLE_TIMEOUT_S) and new ones join;
- resets: every 10 s a few sensors reboot (seq starts again at 0, other samples);
- pauses: every 10 s one sensor goes quiet mid-window for PAUSE_S (longer than the idle timeout: it is
  evicted) and then goes on with the seq that continues it; its windows must all be scored;
- bad: about 2% of records are malformed (not JSON, wrong schema, a 10**18 seq jump record);
- bursts: every 60 s, 5 s of every sensor's records are sent at once (a gateway catching up).

The daemon runs with MONITOR_SENSOR_IDLE_TIMEOUT_S=20 and MONITOR_STATE_IDLE_TIMEOUT_S=300 (defaults
600 s and a day), scaled down with the churn so that both per-sensor tables reach their steady size within
the run: the per-sensor state (calibration and policy, about 5 KB a sensor while it calibrates, 1.7 KB
after) is kept for every sensor seen in the last MONITOR_STATE_IDLE_TIMEOUT_S, so at the default it grows
for a day before it levels off.

Measured every 10 s: the daemon's RSS (/proc), windows scored, offset commits, pending windows,
buffered sample bytes, live sensors, sensors still calibrating (most of the per-sensor state here: a soak
sensor lives about 100 windows, less than the 150-window warm-up). At the end: every complete window
sent is looked up on the scores topic; a window is lost if it has fewer score records than segments that completed it.
RSS should be flat after warm-up (the slope over the second half is reported), commits should
advance in every interval, and windows lost should be 0.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bench.scorer import untrained_artefact
from monitor.core.model import ModelConfig
from monitor.stream.wire import encode_input
from monitor.tools.broker import EmbeddedBroker, free_port
from monitor.tools.harness import DaemonProcess, monitor_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
L, CHUNK, TICK_S, SAMPLE_S = 140, 35, 0.25, 10.0
TOPICS = {"input": "soak.samples", "alerts": "soak.alerts", "dlq": "soak.dlq", "scores": "soak.scores",
          "state": "soak.state"}
PARTITIONS = 4
SENSOR_IDLE_S, STATE_IDLE_S = 20, 300  # scaled down with the churn (see the module doc)
PAUSE_S = 35  # > SENSOR_IDLE_S: a paused sensor is evicted and resumes


@dataclass
class Sensor:
    name: str
    seq: int = 0
    phase: float = 0.0

    def record(self, rng: np.random.Generator) -> bytes:
        t = (self.seq + np.arange(CHUNK)) * 2 * np.pi / L + self.phase
        values = np.sin(t) + 0.05 * rng.normal(size=CHUNK)
        value = encode_input(self.name, self.seq, values.tolist(), ts=time.time())
        self.seq += CHUNK
        return value


@dataclass
class Traffic:
    """What was sent: complete windows per (sensor, start seq), with multiplicity (resets)."""

    rng: np.random.Generator
    live: dict[str, Sensor] = field(default_factory=dict)
    windows: Counter[tuple[str, int]] = field(default_factory=Counter)
    records: int = 0
    bad: int = 0
    resets: int = 0
    pauses: int = 0
    paused: dict[str, tuple[Sensor, float]] = field(default_factory=dict)  # name -> (sensor, resume at)
    joined: int = 0
    left: int = 0

    def join(self, count: int) -> None:
        for _ in range(count):
            self.joined += 1
            name = f"soak-{self.joined:05d}"
            self.live[name] = Sensor(name, phase=float(self.rng.uniform(0, 6)))

    def tick(self, producer: KafkaProducer) -> None:
        for sensor in self.live.values():
            producer.send(TOPICS["input"], key=sensor.name.encode(), value=sensor.record(self.rng))
            self.records += 1
            if sensor.seq % L == 0:  # a window just completed
                self.windows[(sensor.name, sensor.seq - L)] += 1
            if self.rng.random() < 0.02:
                producer.send(TOPICS["input"], key=sensor.name.encode(), value=self.bad_record(sensor))
                self.records += 1
                self.bad += 1

    def bad_record(self, sensor: Sensor) -> bytes:
        kind = self.rng.integers(3)
        if kind == 0:
            return b"\xff not json"
        if kind == 1:
            return json.dumps({"sensor_id": sensor.name, "seq": "x", "values": [1.0]}).encode()
        return encode_input(sensor.name, 10**18, [0.0])  # a bogus far jump (a new segment, then a reset)

    def pause(self, now: float) -> None:
        """One sensor in the middle of a window goes quiet for PAUSE_S; those whose pause is over go on."""
        for name, (_, resume_at) in list(self.paused.items()):
            if now >= resume_at:
                self.live[name] = self.paused.pop(name)[0]
        for sensor in [s for s in self.live.values() if s.seq % L][-1:]:
            self.paused[sensor.name] = (self.live.pop(sensor.name), now + PAUSE_S)
            self.pauses += 1

    def churn(self, count: int) -> None:
        """Some sensors leave, as many join, some reboot."""
        for name in random.Random(int(self.rng.integers(1 << 30))).sample(sorted(self.live), count):
            del self.live[name]
            self.left += 1
        self.join(count)
        for sensor in list(self.live.values())[:count]:
            if sensor.seq:
                sensor.seq, sensor.phase = 0, float(self.rng.uniform(0, 6))  # reboot: seq 0, other samples
                self.resets += 1


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


def sample(daemon: DaemonProcess, started: float) -> dict:
    m = daemon.metrics()
    return {"t_s": round(time.monotonic() - started, 1), "rss_mb": round(rss_bytes(daemon.pid) / 2**20, 2),
            "windows_scored": m.total("ecg_monitor_windows_scored_total"),
            "commits": m.total("ecg_monitor_offset_commits_total"),
            "pending_windows": m.total("ecg_monitor_pending_windows"),
            "buffered_kib": round(m.total("ecg_monitor_buffered_sample_bytes") / 1024, 1),
            "active_sensors": m.total("ecg_monitor_active_sensors"),
            "calibrating_sensors": m.total("ecg_monitor_calibrating_sensors"),
            "dead_letters": m.total("ecg_monitor_dead_letters_published_total"),
            "records": m.total("ecg_monitor_records_total")}


def read_scores(bootstrap: str) -> Counter[tuple[str, int]]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
    partitions = [TopicPartition(TOPICS["scores"], p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    seen: Counter[tuple[str, int]] = Counter()
    try:
        for record in consumer:
            score = json.loads(record.value)
            seen[(score["sensor_id"], score["window_start_seq"])] += 1
    finally:
        consumer.close()
    return seen


def slope_mb_per_hour(samples: list[dict]) -> float:
    half = samples[len(samples) // 2:]
    if len(half) < 2:
        return 0.0
    t = np.array([s["t_s"] for s in half]) / 3600
    return float(np.polyfit(t, np.array([s["rss_mb"] for s in half]), 1)[0])


def run(minutes: float, sensors: int, work: Path, out: Path) -> dict:
    rng = np.random.default_rng(0)
    model = untrained_artefact(ModelConfig(embedding_dim=8, hidden_dim=16)).save(work / "model.pt")
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        broker.create_topics({TOPICS["input"]: PARTITIONS, TOPICS["alerts"]: PARTITIONS, TOPICS["dlq"]: 1,
                              TOPICS["scores"]: PARTITIONS, TOPICS["state"]: PARTITIONS},
                             compacted=(TOPICS["state"],))
        env = monitor_env(bootstrap_servers=broker.bootstrap, input_topic=TOPICS["input"],
                          alerts_topic=TOPICS["alerts"], dlq_topic=TOPICS["dlq"], scores_topic=TOPICS["scores"],
                          state_topic=TOPICS["state"], group_id="soak", model_path=model, device="cpu",
                          metrics_host="127.0.0.1", metrics_port=free_port(), max_batch=64, torch_threads=1,
                          sensor_idle_timeout_s=SENSOR_IDLE_S, state_idle_timeout_s=STATE_IDLE_S,
                          log_level="WARNING", log_format="json")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
        traffic = Traffic(rng)
        traffic.join(sensors)
        samples: list[dict] = []
        with DaemonProcess(env, work / "daemon.log", cwd=REPO) as daemon:
            started = time.monotonic()
            next_tick = next_sample = next_churn = started
            next_burst = started + 60
            next_pause = started + 5.5  # between churns, records are whole windows apart: 5.5 s is mid-window
            while time.monotonic() - started < minutes * 60:
                now = time.monotonic()
                if now >= next_burst:  # a gateway catching up: 5 s of records at once
                    for _ in range(int(5 / TICK_S)):
                        traffic.tick(producer)
                    next_burst += 60
                if now >= next_churn:
                    traffic.churn(max(1, sensors // 10))
                    next_churn += 10
                if now >= next_pause:
                    traffic.pause(now)
                    next_pause += 10
                if now >= next_tick:
                    traffic.tick(producer)
                    next_tick += TICK_S
                if now >= next_sample:
                    samples.append(sample(daemon, started))
                    print(json.dumps(samples[-1]), flush=True)
                    next_sample += SAMPLE_S
                time.sleep(max(0.0, min(next_tick, next_sample) - time.monotonic()))
            producer.flush(30)
            deadline = time.monotonic() + 180  # drain: every record consumed and committed
            while time.monotonic() < deadline and sample(daemon, started)["records"] < traffic.records:
                time.sleep(2)
            time.sleep(5)
            samples.append(sample(daemon, started))
            final = {"evicted_samples": daemon.metrics().total("ecg_monitor_evicted_samples_total")}
            exit_code = daemon.stop()
        producer.close()
        seen = read_scores(broker.bootstrap)
    lost = sum(max(0, n - seen.get(w, 0)) for w, n in traffic.windows.items())
    intervals = list(zip(samples, samples[1:], strict=False))
    result = {
        "minutes": minutes, "sensors_live": sensors, "sensors_joined": traffic.joined, "sensors_left": traffic.left,
        "records_sent": traffic.records, "bad_records": traffic.bad, "resets": traffic.resets,
        "pauses_evicted_and_resumed": traffic.pauses,
        "windows_expected": sum(traffic.windows.values()), "windows_lost": lost,
        "score_records": sum(seen.values()), "exit_code": exit_code,
        "rss_mb_first": samples[0]["rss_mb"], "rss_mb_max": max(s["rss_mb"] for s in samples),
        "rss_mb_last": samples[-1]["rss_mb"], "rss_slope_mb_per_hour_second_half": round(slope_mb_per_hour(samples), 2),
        "rss_mb_second_half_min_max": [min(s["rss_mb"] for s in samples[len(samples) // 2:]),
                                       max(s["rss_mb"] for s in samples[len(samples) // 2:])],
        "sensor_idle_timeout_s": SENSOR_IDLE_S, "state_idle_timeout_s": STATE_IDLE_S,
        "calibrating_sensors_max": max(s.get("calibrating_sensors", 0) for s in samples),
        "evicted_samples_dropped": final["evicted_samples"],
        # The documented bound per sensor (docs/windowing-and-delivery.md): 4L + 8L bytes of samples
        # plus a reorder stash of at most MONITOR_REORDER_MAX_BYTES (64 KiB); the usual case has no stash.
        "buffered_bytes_per_sensor_max": round(max(s["buffered_kib"] * 1024 / max(1.0, s["active_sensors"])
                                                   for s in samples), 1),
        "documented_bytes_per_sensor_without_stash": 12 * L,
        "intervals_without_commit": sum(1 for a, b in intervals if b["commits"] <= a["commits"]),
        "intervals": len(intervals), "samples": samples,
    }
    write(result, out)
    return result


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| {s['t_s']:.0f} | {s['rss_mb']:.1f} | {s['windows_scored']:.0f} | {s['commits']:.0f} | "
                     f"{s['pending_windows']:.0f} | {s['buffered_kib']:.1f} | {s['active_sensors']:.0f} | "
                     f"{s.get('calibrating_sensors', 0):.0f} |"
                     for s in result["samples"])
    summary = {k: v for k, v in result.items() if k != "samples"}
    (out / "soak.md").write_text(
        f"# Soak test ({result['minutes']:g} min)\n\n`python -m bench.soak --minutes {result['minutes']:g}`: the "
        "daemon against Tansu under mixed good, bad, reset and bursty traffic with sensors coming and going "
        "(see bench/soak.py).\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()) +
        "\n\n| t (s) | RSS (MB) | windows scored | commits | pending windows | buffered KiB | live sensors | "
        "calibrating sensors |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n" + rows + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--sensors", type=int, default=40, help="live sensors at any time")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = run(args.minutes, args.sensors, args.work_dir or Path(tmp), args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
