"""The replayer: sensor streams to Kafka in the input wire format (`python -m monitor replay`).

Three sources:
- ECG5000 beats (140 samples each, fs 140 Hz nominal), concatenated per sensor. A share of the
  sensors gets runs of consecutive anomalous beats; the others get only normal beats. Every
  stream starts at seq 0, so the monitor's windows [k*140, (k+1)*140) line up with beats.
- A CSV, Parquet or NumPy file holding a continuous signal (one sensor per numeric column,
  round-robin when there are more sensors than columns).
- A WFDB record (`RECORD.hea`), one lead, streamed at its own sampling rate: each sensor starts at a
  different point of the record (evenly spaced, wrapping round to its start), so many sensors replay
  one recording without being in phase.

The demo, the benchmark and the tests use the programmatic API: `build_ecg_streams`,
`load_signal_streams` and `replay`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import pandas as pd
from kafka import KafkaProducer
from tqdm import tqdm

from monitor.daemon.settings import MonitorSettings
from monitor.stream.wire import encode_input
from trainer.data import DataError, default_cache_dir, download_ecg5000, holds_ecg5000, load
from trainer.split import split

if TYPE_CHECKING:
    from trainer.recordings import Recording

BEAT_LENGTH = 140
ECG_FS = 140.0
NORMAL_CLASS = 1
#: ECG5000 beside the checkout (the workspace's shared/data, where the tests look too): read before downloading,
#: so the demo and the replayer run offline where a copy is at hand.
LOCAL_ECG5000 = Path(__file__).resolve().parents[3] / "shared" / "data" / "ECG5000"

#: samples/s per sensor, or "realtime" (each stream's fs) or "max" (no pacing).
Rate = float | Literal["realtime", "max"]
#: Called after each record is handed to the producer: (sensor_id, seq, n_samples, ts).
OnSend = Callable[[str, int, int, float], None]


@dataclass(frozen=True, eq=False)
class SensorStream:
    """One sensor's samples (`values[i]` has seq i) and its ground truth."""

    sensor_id: str
    values: np.ndarray
    fs: float
    #: [start, end) seq ranges of injected anomalies (empty for a normal sensor).
    anomalous_ranges: tuple[tuple[int, int], ...] = ()
    #: UCR class of each 140-sample beat (1 = normal); None for a file signal.
    beat_labels: np.ndarray | None = None

    @property
    def anomalous(self) -> bool:
        return bool(self.anomalous_ranges)

    def __len__(self) -> int:
        return len(self.values)

    def chunk(self, seq: int, n: int, loop: bool) -> np.ndarray:
        """Samples seq..seq+n; with `loop` the stream repeats forever (seq keeps increasing)."""
        size = len(self.values)
        if not loop:
            return self.values[seq:seq + n]
        start = seq % size
        if start + n <= size:
            return self.values[start:start + n]
        return np.take(self.values, np.arange(start, start + n), mode="wrap")

    def truth(self) -> dict:
        """JSON-safe ground truth, for `--truth-out` and reports."""
        return {"sensor_id": self.sensor_id, "anomalous": self.anomalous, "samples": len(self),
                "anomalous_ranges": [list(r) for r in self.anomalous_ranges]}


@dataclass(frozen=True)
class ReplaySummary:
    records: int
    samples: int
    sensors: int
    seconds: float
    errors: int = 0
    #: True when the replay was stopped early (stop event or Ctrl-C).
    interrupted: bool = False

    @property
    def rate(self) -> float:
        """Records per second."""
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_second_per_sensor(self) -> float:
        return self.samples_per_second / self.sensors if self.sensors else 0.0

    def describe(self) -> str:
        text = (f"sent {self.records:,} records ({self.samples:,} samples) from {self.sensors} sensors "
                f"in {self.seconds:.1f} s: {self.rate:,.0f} records/s, {self.samples_per_second:,.0f} samples/s "
                f"({self.samples_per_second_per_sensor:,.1f} per sensor)")
        if self.errors:
            text += f"; {self.errors} records FAILED to send"
        return text + (" (interrupted)" if self.interrupted else "")

    def to_dict(self) -> dict:
        return {"records": self.records, "samples": self.samples, "sensors": self.sensors,
                "seconds": round(self.seconds, 3), "records_per_second": round(self.rate, 1),
                "samples_per_second_per_sensor": round(self.samples_per_second_per_sensor, 1),
                "errors": self.errors, "interrupted": self.interrupted}


# ---------------------------------------------------------------- ECG5000 streams

@dataclass(frozen=True)
class BeatPool:
    """Beats to build streams from: normal ones and anomalous ones with their UCR class."""

    normal: np.ndarray
    anomalous: np.ndarray
    anomalous_labels: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


def load_beat_pool(data_dir: str | os.PathLike, heldout: bool = True, **split_options) -> BeatPool:
    """ECG5000 beats, loaded and checked by the trainer's loader. With `heldout`, only the
    evaluation protocol's test part (normal-test plus the anomalous beats), so a model trained
    by the protocol never saw them; `split_options` (seed, val_fraction, test_fraction) go to
    trainer.split.split and should match the model's (its artefact records them)."""
    dataset = load(Path(data_dir))
    part = split(dataset, **split_options).test if heldout else dataset
    windows = part.windows[:, :, 0]  # Dataset and Part alike: (n, 140, 1)
    labels = np.asarray(part.labels).astype(np.int64)
    is_anomalous = labels != NORMAL_CLASS
    return BeatPool(normal=windows[~is_anomalous], anomalous=windows[is_anomalous],
                    anomalous_labels=labels[is_anomalous])


def sensor_ids(sensors: int, prefix: str = "patient-") -> list[str]:
    width = max(4, len(str(sensors - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(sensors)]


def build_ecg_streams(data: str | os.PathLike | BeatPool, sensors: int = 20, anomalous_fraction: float = 0.25,
                      beats_per_sensor: int = 60, seed: int = 0, run_length: tuple[int, int] = (4, 6),
                      runs_per_sensor: int = 1, prefix: str = "patient-", lead_in: int = 0) -> list[SensorStream]:
    """Concatenated ECG5000 beats, one stream per sensor.

    round(sensors * anomalous_fraction) sensors (picked at random) each get `runs_per_sensor`
    runs of run_length[0]..run_length[1] consecutive anomalous beats, with at least two normal
    beats before and after each run (so an open alert can resolve in between); the rest get
    only normal beats. Deterministic for a given seed and data. Runs of at least 4 beats let a
    k=2-of-n=3 alert policy fire even when the model misses one anomalous beat in a run. The first
    `lead_in` beats of every sensor are normal (time for the monitor to calibrate each sensor).
    """
    if sensors < 1:
        raise ValueError("sensors must be >= 1")
    if not 0.0 <= anomalous_fraction <= 1.0:
        raise ValueError(f"anomalous_fraction must be in [0, 1], got {anomalous_fraction}")
    lo, hi = run_length
    if not 1 <= lo <= hi:
        raise ValueError(f"bad run_length {run_length}")
    pool = data if isinstance(data, BeatPool) else load_beat_pool(data)
    rng = np.random.default_rng(seed)
    n_anomalous = int(round(sensors * anomalous_fraction))
    if n_anomalous and len(pool.anomalous) == 0:
        raise ValueError("no anomalous beats to inject")
    chosen = set(rng.choice(sensors, size=n_anomalous, replace=False).tolist())
    streams = []
    for index, sensor_id in enumerate(sensor_ids(sensors, prefix)):
        labels = np.full(beats_per_sensor, NORMAL_CLASS, dtype=np.int64)
        beats = pool.normal[rng.integers(0, len(pool.normal), size=beats_per_sensor)].copy()
        if index in chosen:
            for start, length in _place_runs(rng, beats_per_sensor - lead_in, runs_per_sensor, lo, hi):
                start += lead_in
                picks = rng.integers(0, len(pool.anomalous), size=length)
                beats[start:start + length] = pool.anomalous[picks]
                labels[start:start + length] = pool.anomalous_labels[picks] if len(pool.anomalous_labels) else 2
        streams.append(SensorStream(sensor_id=sensor_id, values=beats.reshape(-1), fs=ECG_FS,
                                    anomalous_ranges=_label_runs(labels), beat_labels=labels))
    return streams


def _place_runs(rng: np.random.Generator, beats: int, runs: int, lo: int, hi: int,
                margin: int = 2) -> list[tuple[int, int]]:
    """(first beat, length) of each run: one run per equal segment, `margin` normal beats around it."""
    segment = beats // runs if runs else 0
    if runs < 1 or segment < hi + 2 * margin:
        raise ValueError(f"{beats} beats per sensor are too few for {runs} run(s) of up to {hi} anomalous "
                         f"beats with {margin} normal beats around each: use at least {runs * (hi + 2 * margin)}")
    placed = []
    for r in range(runs):
        length = int(rng.integers(lo, hi + 1))
        offset = int(rng.integers(margin, segment - length - margin + 1))
        placed.append((r * segment + offset, length))
    return placed


def _label_runs(labels: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Seq ranges of consecutive anomalous beats."""
    ranges, start = [], None
    for i, label in enumerate(list(labels) + [NORMAL_CLASS]):
        if label != NORMAL_CLASS and start is None:
            start = i
        elif label == NORMAL_CLASS and start is not None:
            ranges.append((start * BEAT_LENGTH, i * BEAT_LENGTH))
            start = None
    return tuple(ranges)


# ---------------------------------------------------------------- file streams

SKIP_COLUMNS = {"time", "t", "timestamp", "ts", "seq", "index", "label"}


def load_signal_streams(path: str | os.PathLike, sensors: int = 1, fs: float = ECG_FS,
                        prefix: str = "sensor-") -> list[SensorStream]:
    """Streams from a continuous signal in a .csv, .parquet, .npy or .npz file.

    Each numeric column (NumPy: each column of a 2-D array, samples along axis 0) is one
    channel; sensor i replays channel i % channels. Columns named like a time or index
    (time, timestamp, seq, index, ...) are skipped. No ground truth: all streams are normal.
    """
    channels = _read_channels(Path(path))
    return [SensorStream(sensor_id=sid, values=channels[i % len(channels)], fs=fs)
            for i, sid in enumerate(sensor_ids(sensors, prefix))]


def _read_channels(path: Path) -> list[np.ndarray]:
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        loaded = np.load(path, allow_pickle=False)
        array = loaded[loaded.files[0]] if suffix == ".npz" else loaded
        array = np.asarray(array, dtype=np.float64)
        columns = [array] if array.ndim == 1 else list(array.T) if array.ndim == 2 else []
    elif suffix in (".csv", ".parquet", ".pq"):
        frame = pd.read_parquet(path) if suffix != ".csv" else pd.read_csv(path)
        numeric = frame.select_dtypes("number")
        columns = [numeric[c].to_numpy(dtype=np.float64) for c in numeric.columns
                   if str(c).strip().lower() not in SKIP_COLUMNS]
    else:
        raise ValueError(f"{path}: unknown signal file type {suffix!r} (use .csv, .parquet, .npy or .npz)")
    columns = [c[np.isfinite(c)] for c in columns]
    columns = [c for c in columns if len(c)]
    if not columns:
        raise ValueError(f"{path}: no numeric signal found (expected 1-D/2-D numbers or numeric columns)")
    return columns


# ---------------------------------------------------------------- WFDB records

def load_record_streams(path: str | os.PathLike, sensors: int = 1, lead: str | None = None,
                        prefix: str = "patient-", offset_s: float | None = None) -> list[SensorStream]:
    """One stream per sensor from a WFDB record's lead (default: the first): `record_streams` of the record
    trimmed to whole beats (`whole_beats`)."""
    # lazy: wfdb and scipy.signal take seconds to import, and only a WFDB source needs them
    from trainer import recordings

    if Path(path).suffix.lower() != ".hea":
        raise ValueError(f"{path}: a WFDB record is given by its header file (RECORD.hea)")
    record = whole_beats(recordings.read(Path(path), lead=lead)[0])
    return record_streams(record, sensors, prefix, offset_s)


def record_streams(record: Recording, sensors: int = 1, prefix: str = "patient-",
                   offset_s: float | None = None) -> list[SensorStream]:
    """One stream per sensor from a recording, at its fs, seq from 0.

    Sensor i starts `i * offset_s` seconds into the record (default: the record's length / sensors) and wraps
    round to its start, so every sensor plays the whole record once. Ground truth: the seq ranges of runs of
    non-normal reference beats (AAMI classes from the `.atr`), from 100 ms before a run's first R peak to the
    next normal R peak, when the record has annotations."""
    n = len(record.signal)
    step = n // sensors if offset_s is None else int(round(offset_s * record.fs))
    streams = []
    for i, sensor_id in enumerate(sensor_ids(sensors, prefix)):
        start = (i * step) % n
        streams.append(SensorStream(sensor_id=sensor_id, values=np.roll(record.signal, -start), fs=record.fs,
                                    anomalous_ranges=_annotated_runs(record, start)))
    return streams


def whole_beats(record: Recording, lead_in_s: float = 0.1) -> Recording:
    """An annotated recording from `lead_in_s` before its first R peak to as far before its last one, so that
    replayed in a loop its end joins its start where a beat begins: the interval across the join is the
    record's last R-R interval. Joined at an arbitrary sample, every stream that wrapped round got one beat of
    made-up timing and shape, which the rhythm score rightly alerted on. Unchanged without annotations."""
    ann = record.annotations
    if ann is None or len(ann.samples) < 2:
        return record
    lead_in = int(round(lead_in_s * record.fs))
    lo, hi = max(0, int(ann.samples[0]) - lead_in), int(ann.samples[-1]) - lead_in
    kept = (ann.samples >= lo) & (ann.samples < hi)
    return replace(record, signal=record.signal[lo:hi],
                   annotations=replace(ann, samples=ann.samples[kept] - lo, classes=ann.classes[kept]))


def _annotated_runs(record: Recording, start: int) -> tuple[tuple[int, int], ...]:
    """Seq ranges of runs of non-normal reference beats in a stream that starts at sample `start`."""
    if record.annotations is None:
        return ()
    n = len(record.signal)
    samples = (record.annotations.samples - start) % n
    order = np.argsort(samples)
    samples, abnormal = samples[order], record.annotations.classes[order] != "N"  # AAMI normal
    ranges = []
    lead_in = int(round(0.1 * record.fs))
    for first, end in zip(*_edges(abnormal), strict=True):
        ranges.append((max(0, int(samples[first]) - lead_in), int(samples[end]) if end < len(samples) else n))
    return tuple(ranges)


def _edges(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Starts and ends (exclusive) of the runs of True in `mask`."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()


# ---------------------------------------------------------------- replay

def resolve_rate(rate: Rate | str, streams: Sequence[SensorStream]) -> float | None:
    """Samples/s per sensor, or None for as fast as possible."""
    if rate == "max":
        return None
    if rate == "realtime":
        rates = {s.fs for s in streams}
        if len(rates) != 1:
            raise ValueError(f"'realtime' needs one sampling rate across streams, got {sorted(rates)}")
        return rates.pop()
    value = float(rate)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"rate must be 'realtime', 'max' or samples/s > 0, got {rate!r}")
    return value


def make_producer(bootstrap: str, **overrides):
    """A producer tuned for many small records (batching, short linger, leader acks)."""
    options = {"bootstrap_servers": bootstrap.split(","), "client_id": "ecg-replay", "acks": 1,
               "linger_ms": 5, "batch_size": 256 * 1024, "max_request_size": 4 << 20}
    options.update(overrides)
    return KafkaProducer(**options)


def replay(target, topic: str, streams: Sequence[SensorStream], rate: Rate | str = "realtime",
           samples_per_message: int = 35, duration: float | None = None, loop: bool = False,
           progress: bool = False, on_send: OnSend | None = None,
           stop: threading.Event | None = None) -> ReplaySummary:
    """Send `streams` to `topic`, key = sensor id; returns what was sent.

    `target` is a KafkaProducer (flushed, left open) or a bootstrap string (a producer is made
    and closed). Each tick sends the next `samples_per_message` samples of every sensor; ticks
    are paced on an absolute schedule so the rate does not drift, and the call returns when the
    schedule ends (sending 60 s of signal in real time takes 60 s). `ts` on each record is, as the
    wire format defines it, the epoch time of its first sample: on a paced replay that sample's
    place on the schedule (start + seq / rate, so a producer that falls behind does not hide the
    delay); with `max` there is no schedule and it is the time the record is produced. `loop`
    repeats the streams (seq keeps increasing) until `duration` or `stop`; without it each stream
    is sent once.
    """
    if samples_per_message < 1:
        raise ValueError("samples_per_message must be >= 1")
    if loop and duration is None and stop is None:
        raise ValueError("loop without duration or stop would never end")
    per_sensor = resolve_rate(rate, streams)
    interval = samples_per_message / per_sensor if per_sensor else 0.0
    producer = make_producer(target) if isinstance(target, str) else target
    keys = [s.sensor_id.encode() for s in streams]
    failed = [0]

    def count_error(_exc) -> None:
        failed[0] += 1

    total_ticks = None if loop else max((math.ceil(len(s) / samples_per_message) for s in streams), default=0)
    bar = _progress_bar(progress, total_ticks * len(streams) if total_ticks is not None else None)
    records = samples = tick = 0
    interrupted = False
    start, wall_start = time.monotonic(), time.time()
    try:
        while total_ticks is None or tick < total_ticks:
            if (stop is not None and stop.is_set()) or (duration is not None and time.monotonic() - start >= duration):
                interrupted = stop is not None and stop.is_set()
                break
            if interval:
                _sleep_until(start + tick * interval, stop)
            seq = tick * samples_per_message
            sent = 0
            for stream, key in zip(streams, keys, strict=True):
                chunk = stream.chunk(seq, samples_per_message, loop)
                if not len(chunk):
                    continue
                ts = wall_start + tick * interval if interval else time.time()  # the first sample's time
                producer.send(topic, key=key, value=encode_input(stream.sensor_id, seq, chunk.tolist(), ts=ts,
                                                                 fs=stream.fs)).add_errback(count_error)
                if on_send is not None:
                    on_send(stream.sensor_id, seq, len(chunk), ts)
                sent += 1
                samples += len(chunk)
            records += sent
            tick += 1
            if bar is not None:
                bar.update(sent)
        if interval and not interrupted:
            _sleep_until(start + tick * interval, stop)  # the last tick's samples last one interval
    finally:
        producer.flush()
        if isinstance(target, str):
            producer.close()
        if bar is not None:
            bar.close()
    return ReplaySummary(records=records, samples=samples, sensors=len(streams),
                         seconds=time.monotonic() - start, errors=failed[0], interrupted=interrupted)


def _sleep_until(deadline: float, stop: threading.Event | None) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        if stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)


def _progress_bar(enabled: bool, total: int | None) -> tqdm | None:
    if not enabled:
        return None
    return tqdm(total=total, unit="rec", unit_scale=True, desc="replay", file=sys.stderr, smoothing=0.1)


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--bootstrap-servers", default=env("MONITOR_BOOTSTRAP_SERVERS", "localhost:9092"),
                        help="Kafka bootstrap servers (env MONITOR_BOOTSTRAP_SERVERS); security options "
                             "come from the monitor's MONITOR_* settings")
    parser.add_argument("--topic", default=env("MONITOR_INPUT_TOPIC", "ecg.samples"),
                        help="input topic (env MONITOR_INPUT_TOPIC)")
    parser.add_argument("--source", default="ecg5000",
                        help="'ecg5000', a WFDB record (RECORD.hea, streamed at its own fs), or a "
                             ".csv/.parquet/.npy/.npz file holding a continuous signal (--fs)")
    parser.add_argument("--lead", default=None,
                        help="WFDB record: the lead (signal name) to stream; default: the first")
    parser.add_argument("--offset-s", type=float, default=None,
                        help="WFDB record: sensor i starts i * this many seconds into the record "
                             "(default: the record's length / sensors)")
    parser.add_argument("--data", default=env("ECG5000_DIR"),
                        help="directory with ECG5000_TRAIN.txt/ECG5000_TEST.txt (env ECG5000_DIR); "
                             "default: ../shared/data/ECG5000 beside the checkout, else a download to the cache")
    parser.add_argument("--sensors", type=int, default=20, help="number of sensors")
    parser.add_argument("--anomalous-fraction", type=float, default=0.25,
                        help="share of sensors that get runs of anomalous beats (ecg5000 only)")
    parser.add_argument("--beats-per-sensor", type=int, default=60, help="beats in each sensor's stream (ecg5000)")
    parser.add_argument("--runs-per-sensor", type=int, default=1, help="anomalous runs per anomalous sensor")
    parser.add_argument("--rate", default="realtime", type=parse_rate,
                        help="'realtime' (fs samples/s per sensor), 'max', or samples/s per sensor")
    parser.add_argument("--samples-per-message", type=int, default=35, help="samples in each record")
    parser.add_argument("--record-ms", type=float, default=None,
                        help="milliseconds of signal in each record (samples = this * fs / 1000, at least 1); "
                             "overrides --samples-per-message")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds to run; the streams repeat (seq keeps increasing) until then")
    parser.add_argument("--fs", type=float, default=ECG_FS, help="sampling rate of a signal file, Hz")
    parser.add_argument("--seed", type=int, default=0, help="random seed (which sensors, which beats)")
    parser.add_argument("--sensor-prefix", default="patient-", help="sensor ids are PREFIX0000, PREFIX0001, ...")
    parser.add_argument("--truth-out", type=Path, default=None,
                        help="write the ground truth (anomalous sensors and seq ranges) to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_streams(args: argparse.Namespace) -> list[SensorStream]:
    """The streams the CLI arguments describe."""
    if Path(args.source).suffix.lower() == ".hea":
        return load_record_streams(args.source, sensors=args.sensors, lead=args.lead, prefix=args.sensor_prefix,
                                   offset_s=args.offset_s)
    if args.source != "ecg5000":
        return load_signal_streams(args.source, sensors=args.sensors, fs=args.fs, prefix=args.sensor_prefix)
    return build_ecg_streams(ensure_data(args.data), sensors=args.sensors,
                             anomalous_fraction=args.anomalous_fraction, beats_per_sensor=args.beats_per_sensor,
                             seed=args.seed, runs_per_sensor=args.runs_per_sensor, prefix=args.sensor_prefix)


def ensure_data(data: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A directory holding ECG5000: the one given, else LOCAL_ECG5000 when it holds the data, else the trainer's
    download (into `cache_dir`, default the trainer's cache, ~/.cache/ecg-monitor on Linux)."""
    if data:
        return Path(data)
    if holds_ecg5000(LOCAL_ECG5000):
        return LOCAL_ECG5000
    try:
        return download_ecg5000(Path(default_cache_dir() if cache_dir is None else cache_dir))
    except DataError as exc:
        raise DataError(f"{exc} (the replayer and the demo also read ECG5000_DIR)") from None


def producer_options() -> dict:
    """Security options (SASL/SSL) from the monitor's settings, so one .env serves both."""
    options = MonitorSettings().kafka_common()
    options.pop("bootstrap_servers")
    options["client_id"] = "ecg-replay"
    return options


def parse_rate(text: str) -> Rate:
    """'realtime', 'max' or a positive number of samples/s per sensor (an argparse type)."""
    if text in ("realtime", "max"):
        return cast(Rate, text)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"rate must be 'realtime', 'max' or samples/s > 0, got {text!r}")
    return value


def samples_per_message(args: argparse.Namespace, streams: Sequence[SensorStream]) -> int:
    """--record-ms at the streams' sampling rate, else --samples-per-message."""
    if args.record_ms is None:
        return int(args.samples_per_message)
    rates = {s.fs for s in streams}
    if len(rates) != 1 or not args.record_ms > 0:
        raise ValueError(f"--record-ms needs a positive value and one sampling rate, got {args.record_ms} "
                         f"and {sorted(rates)}")
    return max(1, round(args.record_ms * rates.pop() / 1000))


def main(args: argparse.Namespace) -> int:
    try:
        streams = build_streams(args)
        rate = args.rate
        per_sensor = resolve_rate(rate, streams)
        args.samples_per_message = samples_per_message(args, streams)
    except (ValueError, OSError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    if args.truth_out:
        args.truth_out.write_text(json.dumps([s.truth() for s in streams], indent=1))
    anomalous = sum(s.anomalous for s in streams)
    pace = "as fast as possible" if per_sensor is None else f"{per_sensor:g} samples/s per sensor"
    print(f"replaying {len(streams)} sensors ({anomalous} with anomalies in their ground truth) to {args.topic} "
          f"at {args.bootstrap_servers}, {pace}, {args.samples_per_message} samples per record", file=sys.stderr)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    producer = make_producer(args.bootstrap_servers, **producer_options())
    try:  # the handlers only set a flag: replay() stops at the next tick, flushes and returns
        summary = replay(producer, args.topic, streams, rate=rate, samples_per_message=args.samples_per_message,
                         duration=args.duration, loop=args.duration is not None,
                         progress=not args.no_progress, stop=stop)
    finally:
        producer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary.describe())
    return 1 if summary.errors else 130 if summary.interrupted else 0
