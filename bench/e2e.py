"""End-to-end benchmark: the daemon (`python -m monitor run`, a subprocess) against the real
broker (Tansu), fed by the replayer and a paced producer.

1. Raw scorer: windows/s of `Scorer.score` at the daemon's max batch, in this process.
2. Maximum sustained rate: a backlog of ECG streams from many sensors is produced before the
   daemon starts; the daemon drains it; the rate is the slope of `windows_scored_total`
   between 10% and 90% of the backlog (start-up and tail excluded).
3. Memory, on the same daemon: partial windows from new sensors until 10k sensors are live;
   RSS from /proc and the per-sensor slope between two sensor counts.
4. Latency at 25/50/75% of that maximum: real-time sensors (140 Hz, 35-sample records, starts
   staggered over one window so windows do not all complete at once); one sensor = one window/s.
   Latency of a window = Kafka timestamp of its score record (set when the daemon hands it to its
   producer, right after scoring) minus the production time of the window's last record. The
   scores topic is read after each run, so reading costs nothing during it. Each load is a few
   short runs, each on a fresh broker and daemon, pooled: the in-memory test broker's cost per
   fetch grows with the size of its topics (at half load its CPU went from 0.23 to 0.57 cores
   over 30 s while the daemon's stayed flat, and p99 latency rose with it), which Kafka's does
   not, so a long run would measure the test broker more than the daemon.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer

from bench.scorer import untrained_artefact
from bench.timing import percentile, rate
from monitor.core.artefact import Artefact
from monitor.core.model import ModelConfig
from monitor.core.scoring import Scorer
from monitor.stream.wire import ScoreRecord, encode_input
from monitor.tools.broker import EmbeddedBroker, free_port
from monitor.tools.harness import DaemonError, DaemonProcess, monitor_env
from monitor.tools.replay import (BeatPool, SensorStream, build_ecg_streams, load_beat_pool, make_producer,
                                  replay)

REPO = Path(__file__).resolve().parents[1]
FS = 140.0
CHUNK = 35  # samples per input record: 0.25 s at 140 Hz, four records per 140-sample window
MAX_BATCH = 512  # the daemon's default MONITOR_MAX_BATCH
LOADS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Sizes:
    partitions: int
    backlog_sensors: int
    backlog_seconds: float    # backlog size: about this many seconds of the raw scorer's rate...
    backlog_beats: tuple[int, int]  # ...within these bounds on windows per backlog sensor
    run_seconds: float        # length of one latency run...
    runs_per_load: int        # ...and how many, each on a fresh broker and daemon
    memory_sensors: tuple[int, int]  # live-sensor counts for the RSS slope; the second is "10k"
    raw_seconds: float

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        if quick:
            return cls(partitions=2, backlog_sensors=10, backlog_seconds=0.0, backlog_beats=(12, 12),
                       run_seconds=3.0, runs_per_load=1, memory_sensors=(100, 200), raw_seconds=0.2)
        return cls(partitions=8, backlog_sensors=1000, backlog_seconds=40.0, backlog_beats=(12, 60),
                   run_seconds=10.0, runs_per_load=3, memory_sensors=(5000, 10_000), raw_seconds=3.0)

    def beats_per_sensor(self, raw_rate: float) -> int:
        low, high = self.backlog_beats
        return int(min(high, max(low, round(raw_rate * self.backlog_seconds / self.backlog_sensors))))


def wait_metric(daemon: DaemonProcess, name: str, at_least: float, timeout_s: float) -> float:
    """Poll until sample `name` reaches `at_least` or `timeout_s` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = daemon.metric(name)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


class CpuMeter:
    """CPU time (user + system, all threads) of the daemon, the broker and this process (the load
    generator), from /proc: on a small machine they compete for the same cores."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start = (time.monotonic(), self._read())

    @staticmethod
    def _seconds(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def _read(self) -> dict[str, float]:
        return {name: self._seconds(pid) for name, pid in self.pids.items()}

    def cores(self) -> dict[str, float]:
        """Cores used by each process since the meter was made (CPU seconds per second)."""
        started, before = self._start
        elapsed = time.monotonic() - started
        return {name: round((now - before[name]) / elapsed, 2) for name, now in self._read().items()}


def raw_scorer_rate(artefact: Artefact, device: str, seconds: float) -> float:
    scorer = Scorer(artefact, device=device, max_batch=MAX_BATCH)
    windows = np.random.default_rng(0).normal(size=(MAX_BATCH, artefact.window_length)).astype(np.float32)
    scorer.score(windows)
    return rate(lambda: scorer.score(windows), MAX_BATCH, seconds)


def steady_span(counts: list[tuple[float, float]], total: float) -> tuple[int, int] | None:
    """Indices of the first and last (time, count) poll between 10% and 90% of `total` (start-up and
    tail excluded); None when fewer than three polls fall inside (a small backlog)."""
    inside = [i for i, (_, n) in enumerate(counts) if 0.1 * total <= n <= 0.9 * total]
    return (inside[0], inside[-1]) if len(inside) >= 3 else None


def measure_drain(daemon: DaemonProcess, total: int, timeout_s: float) -> dict:
    """Poll windows_scored_total until the whole backlog is scored; the rate is the slope
    between 10% and 90% of it (start-up and tail excluded)."""
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout_s
    while not samples or samples[-1][1] < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon scored {samples[-1][1]:.0f} of {total} backlog windows "
                               f"in {timeout_s:.0f} s")
        samples.append((time.monotonic(), daemon.metric("ecg_monitor_windows_scored_total")))
        time.sleep(0.25)
    span = steady_span(samples, total)
    if span is not None:  # enough polls for the steady part alone
        (t0, n0), (t1, n1) = samples[span[0]], samples[span[1]]
        basis = "10% to 90% of the backlog"
    else:  # a small backlog, perhaps scored before the first poll: from before readiness to the end
        (t0, n0), (t1, n1) = (daemon.last_not_ready_at, 0.0), samples[-1]
        basis = "whole backlog"
    return {"windows": total, "scored": int(samples[-1][1]), "seconds": round(t1 - t0, 3), "basis": basis,
            "windows_per_s": (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")}


def paced_produce(producer, topic: str, streams: list[SensorStream], seconds: float, chunk: int,
                  stagger_s: float) -> dict[tuple[str, int], float]:
    """Real-time sensors (each at its stream's fs, `chunk`-sample records) for `seconds`; sensor i
    starts i/N of `stagger_s` late, so window completions spread evenly over time. Returns
    (sensor, record end_seq) -> the time the record was handed to the producer (its ts)."""
    keys = [s.sensor_id.encode() for s in streams]
    due = [(stagger_s * i / len(streams), i, 0) for i in range(len(streams))]
    heapq.heapify(due)
    produced: dict[tuple[str, int], float] = {}
    # A full collection of this process's heap (the scorer benchmark ran here) would hold up the
    # producer's sender thread between a record's ts and its send, counted as the daemon's latency.
    gc.collect()
    gc.freeze()
    start = time.monotonic()
    while due:
        at, i, seq = heapq.heappop(due)
        if at >= seconds:
            continue
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        stream = streams[i]
        ts = time.time()
        producer.send(topic, key=keys[i], value=encode_input(stream.sensor_id, seq,
                                                             stream.chunk(seq, chunk, True).tolist(), ts=ts,
                                                             fs=stream.fs))
        produced[(stream.sensor_id, seq + chunk)] = ts
        heapq.heappush(due, (at + chunk / stream.fs, i, seq + chunk))
    producer.flush()
    return produced


def read_scores(bootstrap: str, topic: str, prefix: str, expected: int, timeout_s: float,
                key: Callable[[ScoreRecord], tuple[str, int]] = lambda s: (s.sensor_id, s.window_end_seq),
                ) -> dict[tuple[str, int], float]:
    """key(score) (default: sensor, window_end_seq) -> Kafka timestamp (s) of the first score
    record of each window of sensors whose id starts with `prefix`."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=1000)
    found: dict[tuple[str, int], float] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for message in consumer:
                if message.key and message.key.decode().startswith(prefix):
                    score = ScoreRecord.model_validate_json(message.value)
                    found.setdefault(key(score), message.timestamp / 1000)
                if len(found) >= expected:
                    break
    finally:
        consumer.close()
    return found


def latency_run(bootstrap: str, topics: dict, pool: BeatPool, load: float, max_rate: float, seconds: float,
                pids: dict[str, int], seed: int) -> dict:
    """One run at `load` x `max_rate` windows/s: the latency of every window it completes."""
    sensors = max(1, int(round(load * max_rate)))  # a 140 Hz sensor completes one window per second
    prefix = f"lat{int(load * 100)}-"
    producer = make_producer(bootstrap)
    started = time.monotonic()
    cpu = CpuMeter(pids)
    streams = build_ecg_streams(pool, sensors=sensors, anomalous_fraction=0.25, beats_per_sensor=30,
                                seed=seed, prefix=prefix)
    produced = paced_produce(producer, topics["input"], streams, seconds, CHUNK,
                             stagger_s=pool.normal.shape[1] / FS)
    production_s = time.monotonic() - started
    cores = cpu.cores()
    producer.close()
    length = pool.normal.shape[1]
    expected = {key: ts for key, ts in produced.items() if key[1] % length == 0}
    scored = read_scores(bootstrap, topics["scores"], prefix, len(expected), timeout_s=60 + seconds)
    return {"sensors": sensors, "windows": len(expected), "production_s": production_s, "cpu_cores": cores,
            "latencies": [scored[key] - ts for key, ts in expected.items() if key in scored]}


def _ms(values: list[float], q: float) -> float:
    return round(1000 * percentile(values, q), 1)


def latency_summary(load: float, max_rate: float, runs: list[dict]) -> dict:
    """The runs at one load, pooled; p99 of each run alone shows the spread."""
    latencies = [latency for run in runs for latency in run["latencies"]]
    windows = sum(run["windows"] for run in runs)
    return {
        "load": load,
        "sensors": runs[0]["sensors"],
        "runs": len(runs),
        "target_windows_per_s": round(load * max_rate, 1),
        "achieved_windows_per_s": round(windows / sum(run["production_s"] for run in runs), 1),
        "windows": windows,
        "windows_scored": len(latencies),
        "p50_ms": _ms(latencies, 50),
        "p99_ms": _ms(latencies, 99),
        "max_ms": round(1000 * max(latencies), 1) if latencies else float("nan"),
        "p99_ms_per_run": [_ms(run["latencies"], 99) for run in runs],
        "cpu_cores": {name: round(sum(run["cpu_cores"][name] for run in runs) / len(runs), 2)
                      for name in runs[0]["cpu_cores"]},
    }


def memory_phase(daemon: DaemonProcess, bootstrap: str, topic: str, targets: tuple[int, ...]) -> dict:
    """Add sensors holding half a window each until `targets` sensors are live; RSS at each."""
    producer = make_producer(bootstrap)
    points = []
    records = daemon.metric("ecg_monitor_records_total")
    added = 0
    values = [0.0] * CHUNK
    for target in targets:
        live = int(daemon.metric("ecg_monitor_active_sensors"))
        for i in range(added, added + max(0, target - live)):
            sensor = f"mem-{i:06d}"
            for seq in (0, CHUNK):  # 70 samples: half a window stays buffered
                producer.send(topic, key=sensor.encode(), value=encode_input(sensor, seq, values))
                records += 1
        added += max(0, target - live)
        producer.flush()
        wait_metric(daemon, "ecg_monitor_records_total", records, timeout_s=120)
        time.sleep(2.5)  # the active-sensor gauge is refreshed by once-a-second housekeeping
        points.append({"active_sensors": int(daemon.metric("ecg_monitor_active_sensors")),
                       "rss_bytes": rss_bytes(daemon.pid)})
    producer.close()
    (a, b) = points[0], points[-1]
    slope = (b["rss_bytes"] - a["rss_bytes"]) / max(1, b["active_sensors"] - a["active_sensors"])
    return {"points": points, "bytes_per_sensor": round(slope, 1),
            "rss_mib_at_last": round(b["rss_bytes"] / 2**20, 1), "active_sensors_at_last": b["active_sensors"]}


TOPICS = {"input": "bench.samples", "alerts": "bench.alerts", "dlq": "bench.dlq", "scores": "bench.scores"}


def process_ids(daemon: DaemonProcess, broker: EmbeddedBroker) -> dict[str, int]:
    """The processes whose CPU a CpuMeter reports: they share this machine's cores."""
    assert broker.process is not None, "the broker runs"
    return {"daemon": daemon.pid, "broker": broker.process.pid, "load generator": os.getpid()}


@contextlib.contextmanager
def fresh_broker(work: Path, name: str, partitions: int):
    """A new in-memory broker with the bench topics."""
    with EmbeddedBroker(log_path=work / f"tansu-{name}.log") as broker:
        broker.create_topics({TOPICS["input"]: partitions, TOPICS["alerts"]: partitions,
                              TOPICS["dlq"]: 1, TOPICS["scores"]: partitions,
                              "ecg.monitor.state": partitions}, compacted=("ecg.monitor.state",))
        yield broker


@contextlib.contextmanager
def running_daemon(broker: EmbeddedBroker, work: Path, name: str, model: Path, device: str,
                   threads: int | None, exit_codes: list[int], **settings: object):
    """A ready daemon on the bench topics (plus MONITOR_* `settings`); its exit code is appended to
    `exit_codes` when it stops."""
    env = monitor_env(settings, bootstrap_servers=broker.bootstrap, input_topic=TOPICS["input"],
                      alerts_topic=TOPICS["alerts"], dlq_topic=TOPICS["dlq"], scores_topic=TOPICS["scores"],
                      group_id="bench", model_path=model, device=device, metrics_host="127.0.0.1",
                      metrics_port=free_port(), max_batch=MAX_BATCH, sensor_idle_timeout_s=7200,
                      log_level="WARNING", torch_threads=threads)
    daemon = DaemonProcess(env, work / f"daemon-{name}.log", cwd=REPO).start()
    try:
        yield daemon
    finally:
        try:
            exit_codes.append(daemon.stop())
        except DaemonError:  # killed after the stop timeout: the results report its exit code
            exit_codes.append(daemon.returncode if daemon.returncode is not None else -9)


def run(quick: bool, device: str, model: Path | None, data_dir: Path, work_dir: Path | None = None,
        threads: int | None = None) -> dict:
    sizes = Sizes.for_run(quick)
    work = Path(work_dir or tempfile.mkdtemp(prefix="ecg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = untrained_artefact(ModelConfig()).save(work / "untrained.pt")
    artefact = Artefact.load(model)
    pool = load_beat_pool(data_dir)
    raw_before = raw_scorer_rate(artefact, device, sizes.raw_seconds)
    exit_codes: list[int] = []

    # Maximum rate, then memory: the backlog is on the broker before the daemon starts.
    with fresh_broker(work, "drain", sizes.partitions) as broker:
        streams = build_ecg_streams(pool, sensors=sizes.backlog_sensors, prefix="backlog-",
                                    beats_per_sensor=sizes.beats_per_sensor(raw_before))
        backlog = sum(len(s) // artefact.window_length for s in streams)
        produced = replay(broker.bootstrap, TOPICS["input"], streams, rate="max", samples_per_message=CHUNK)
        with running_daemon(broker, work, "drain", model, device, threads, exit_codes) as daemon:
            cpu = CpuMeter(process_ids(daemon, broker))
            drain = measure_drain(daemon, backlog, timeout_s=max(600.0, 20 * backlog / raw_before))
            drain["cpu_cores"] = cpu.cores()
            memory = memory_phase(daemon, broker.bootstrap, TOPICS["input"], sizes.memory_sensors)
            drained = daemon.metrics()
    max_rate = drain["windows_per_s"]
    #: errors of every label summed, over the drain daemon and each latency run's daemon
    totals = {name: drained.total(name) for name in ("ecg_monitor_invalid_records_total",
                                                     "ecg_monitor_kafka_errors_total")}
    raw_after = raw_scorer_rate(artefact, device, sizes.raw_seconds)

    # Latency: short runs, each on a fresh broker and daemon. The in-memory test broker gets
    # slower as its topics grow (see the module docstring); Kafka does not.
    latency = []
    for load in LOADS:
        runs = []
        for index in range(sizes.runs_per_load):
            name = f"latency-{int(load * 100)}-{index + 1}"
            with fresh_broker(work, name, sizes.partitions) as broker, \
                    running_daemon(broker, work, name, model, device, threads, exit_codes) as daemon:
                runs.append(latency_run(broker.bootstrap, TOPICS, pool, load, max_rate, sizes.run_seconds,
                                        process_ids(daemon, broker), seed=int(load * 100) + index))
                latest = daemon.metrics()
                for name in totals:
                    totals[name] += latest.total(name)
        latency.append(latency_summary(load, max_rate, runs))
    exit_code = max(exit_codes)
    raw = (raw_before + raw_after) / 2
    return {
        "device": device,
        "model_version": artefact.model_version,
        "model_config": artefact.config.to_dict(),
        "partitions": sizes.partitions,
        "torch_threads": threads or "default",
        "max_batch": MAX_BATCH,
        "backlog": {"sensors": sizes.backlog_sensors, "records": produced.records, "windows": backlog},
        "raw_scorer_windows_per_s": raw,
        "raw_scorer_before_after": [raw_before, raw_after],
        "drain": drain,
        "max_windows_per_s": max_rate,
        "ratio_to_raw_scorer": max_rate / raw,
        "latency_runs": {"per_load": sizes.runs_per_load, "seconds": sizes.run_seconds},
        "latency": latency,
        "memory": memory,
        "daemon": {"exit_code": exit_code,
                   "invalid_records": totals["ecg_monitor_invalid_records_total"],
                   "kafka_errors": totals["ecg_monitor_kafka_errors_total"],
                   "backlog_windows_scored": drained.value("ecg_monitor_windows_scored_total")},
        "work_dir": str(work),
    }


if __name__ == "__main__":  # python -m bench.e2e: a quick look without the rest
    print(json.dumps(run(quick=True, device="cpu", model=None,
                         data_dir=REPO.parent / "shared" / "data" / "ECG5000"), indent=2))
