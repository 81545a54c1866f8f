"""Beats-mode benchmark: what beat windows cost beside fixed windows (`python -m bench.beats [--quick]`).

Record 100 of the MIT-BIH Arrhythmia Database, lead MLII, 360 Hz, in records of 36 samples (100 ms).

1. Segmenter cost: CPU seconds per second of signal on one core, of `BeatWindower` (online R-peak detector,
   polarity, segmenter) and of the detector alone, beside the fixed `Windower` (140 samples) on the same
   records, in alternating turns in this process (bench.timing.compare).
2. Maximum sustained load: a backlog of N sensors x T s of the record (each sensor starting elsewhere in it) is
   produced to the real broker (Tansu) before a daemon subprocess (the shipped model, MONITOR_WINDOWING=beats)
   starts; the rate is the slope of `ecg_monitor_windows_scored_total` between 10% and 90% of what it scores
   (a segment's first ~20 s only warm the detector and the polarity up, so the count is taken at the end).
   One input partition, so the daemon reads the sensors in lock step, as they were produced: with several,
   it read some partitions far ahead of others, and the 10%-90% span mixed sensors still warming up (no
   beats, all the samples) with sensors past it, which understated beats/s by a third.
   Sustained sensors = beats/s / the record's beats per second. The same backlog drained with
   MONITOR_WINDOWING=fixed is the baseline.
3. Latency at 25% and 50% of that maximum (quick: 50% only): real-time 360 Hz sensors (starts staggered over
   the detector's 1 s step).
   The record that completes a beat is known offline: `BeatWindower` on the same records emits the beat when it
   is fed it, whatever else the daemon does. Processing latency = the Kafka timestamp of the beat's score record
   minus the time that record was produced; signal delay = the signal between the beat's end and that record's
   end (the detector's guard and step: the beat waits for later samples, which arrive in real time).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.e2e import (TOPICS, CpuMeter, fresh_broker, paced_produce, process_ids, read_scores, running_daemon,
                       steady_span)
from bench.rpeaks import MITDB_100
from bench.timing import compare, percentile
from monitor.core.artefact import Artefact
from monitor.stream.beat_windowing import BeatWindower, convention_of
from monitor.stream.rpeaks import OnlineRPeakDetector
from monitor.stream.windowing import Windower
from monitor.stream.wire import InputRecord
from monitor.tools.harness import DaemonProcess
from monitor.tools.replay import SensorStream, load_record_streams, make_producer, replay
from trainer import recordings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL = REPO / "monitor" / "models" / "default.pt"
RECORD = MITDB_100.with_suffix(".hea")
LEAD = "MLII"
CHUNK = 36  # samples per input record: 100 ms at 360 Hz


@dataclass(frozen=True)
class Sizes:
    segmenter_seconds: float  # signal per turn of the segmenter comparison...
    turns: int                # ...and how many turns
    partitions: int
    drain_sensors: int
    drain_seconds: float      # signal per backlog sensor (the first ~20 s of each only warm up)
    latency_seconds: float    # one real-time run (no beat is scored in its first ~20 s)...
    loads: tuple[float, ...]  # ...at each of these fractions of the drain's maximum

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        if quick:
            return cls(segmenter_seconds=30, turns=2, partitions=2, drain_sensors=4, drain_seconds=40,
                       latency_seconds=30, loads=(0.5,))
        return cls(segmenter_seconds=300, turns=5, partitions=8, drain_sensors=200, drain_seconds=60,
                   latency_seconds=50, loads=(0.25, 0.5))


def records_of(stream: SensorStream, seconds: float) -> list[InputRecord]:
    """The first `seconds` of a stream as CHUNK-sample input records, as the replayer sends them."""
    n = int(seconds * stream.fs)
    return [InputRecord(sensor_id=stream.sensor_id, seq=seq, values=stream.values[seq:min(n, seq + CHUNK)].tolist(),
                        fs=stream.fs) for seq in range(0, n, CHUNK)]


# -- 1. segmenter cost -------------------------------------------------------------------------------------------

def signal_rate(feed: Callable[[], object], signal_s: float) -> float:
    """Seconds of signal per CPU second of `feed()`."""
    start = time.process_time()
    feed()
    return signal_s / (time.process_time() - start)


def segmenter_cost(artefact: Artefact, sizes: Sizes) -> dict:
    convention = convention_of(artefact.metadata.get("windowing"), "beats", artefact.window_length)
    assert convention is not None
    (stream,) = load_record_streams(RECORD, lead=LEAD)
    records = records_of(stream, sizes.segmenter_seconds)
    signal_s = sum(len(r.values) for r in records) / stream.fs

    def windower(make: Callable[[], BeatWindower | Windower]) -> Callable[[], float]:
        def feed() -> None:
            w = make()
            for offset, record in enumerate(records):
                w.add(0, offset, record)
        return lambda: signal_rate(feed, signal_s)

    def detector() -> None:
        d = OnlineRPeakDetector(stream.fs, convention)
        for record in records:
            d.push(record.seq, record.values)

    beats = windower(lambda: BeatWindower(convention))
    fixed = windower(lambda: Windower(artefact.window_length))
    counter = BeatWindower(convention)
    emitted = sum(len(counter.add(0, offset, r)[0]) for offset, r in enumerate(records))
    turns = compare(fixed, beats, sizes.turns)
    detector_rate = statistics.median(signal_rate(detector, signal_s) for _ in range(sizes.turns))
    return {
        "signal_seconds_per_turn": signal_s, "turns": sizes.turns, "beats_per_turn": emitted,
        "cpu_s_per_signal_s": {"beats": 1 / turns["variant_per_s"], "detector_alone": 1 / detector_rate,
                               "fixed": 1 / turns["baseline_per_s"]},
        "beats_vs_fixed_cost": 1 / turns["ratio"],
        "beats_vs_fixed_cost_range": [1 / turns["ratio_max"], 1 / turns["ratio_min"]],
        "sensors_per_core": {"beats": turns["variant_per_s"], "fixed": turns["baseline_per_s"]},
    }


# -- 2. drain ----------------------------------------------------------------------------------------------------

def beats_per_sensor_second() -> float:
    """Annotated beats of the record per second: what one sensor playing it produces, at steady state."""
    (record,) = recordings.read(RECORD, lead=LEAD)
    assert record.annotations is not None, "record 100 has its .atr"
    return len(record.annotations.samples) / record.duration_s


def poll_drain(daemon: DaemonProcess, records: int, timeout_s: float) -> list[tuple[float, float, float]]:
    """(time, windows scored, samples accepted) polls until every record is consumed and nothing more is
    scored for 2 s (the pending beats are out)."""
    polls: list[tuple[float, float, float]] = []
    deadline = time.monotonic() + timeout_s
    while True:
        m = daemon.metrics()
        polls.append((time.monotonic(), m.value("ecg_monitor_windows_scored_total"),
                      m.value("ecg_monitor_samples_total")))
        consumed = m.value("ecg_monitor_records_total") >= records
        if consumed and len(polls) > 8 and polls[-9][1] == polls[-1][1]:
            return polls
        if time.monotonic() > deadline:
            raise RuntimeError(f"the daemon consumed {m.value('ecg_monitor_records_total'):.0f} of {records} "
                               f"records in {timeout_s:.0f} s")
        time.sleep(0.25)


def drain(work: Path, windowing: str, streams: list[SensorStream], sizes: Sizes, threads: int,
          exit_codes: list[int]) -> dict:
    """Drain the backlog `streams` with MONITOR_WINDOWING=`windowing`: windows/s and samples/s, 10% to 90%."""
    with fresh_broker(work, f"drain-{windowing}", partitions=1) as broker:
        sent = replay(broker.bootstrap, TOPICS["input"], streams, rate="max", samples_per_message=CHUNK)
        with running_daemon(broker, work, f"drain-{windowing}", MODEL, "cpu", threads, exit_codes,
                            windowing=windowing) as daemon:
            cpu = CpuMeter(process_ids(daemon, broker))
            polls = poll_drain(daemon, sent.records, timeout_s=600)
            cores = cpu.cores()
    scored = polls[-1][1]
    span = steady_span([(t, n) for t, n, _ in polls], scored)
    i0, i1 = span if span is not None else (0, len(polls) - 1)
    (t0, n0, s0), (t1, n1, s1) = polls[i0], polls[i1]
    return {"windowing": windowing, "sensors": len(streams), "records": sent.records, "samples": sent.samples,
            "windows_scored": int(scored), "seconds": round(t1 - t0, 2),
            "basis": "10% to 90% of the windows scored" if span else "whole drain",
            "windows_per_s": (n1 - n0) / (t1 - t0), "samples_per_s": (s1 - s0) / (t1 - t0), "cpu_cores": cores}


# -- 3. latency --------------------------------------------------------------------------------------------------

def completions(convention, stream: SensorStream, seconds: float) -> dict[int, tuple[int, int]]:
    """r_peak_seq -> (end seq of the record that completes the beat, end seq of the beat), from a BeatWindower
    fed the records the paced producer sends."""
    windower = BeatWindower(convention)
    found: dict[int, tuple[int, int]] = {}
    for offset, record in enumerate(records_of(stream, seconds + 1)):
        for window in windower.add(0, offset, record)[0]:
            found[window.r_peak_seq] = (record.end_seq, window.end_seq)  # type: ignore[attr-defined]
    return found


def latency_run(work: Path, artefact: Artefact, sensors: int, sizes: Sizes, threads: int,
                exit_codes: list[int]) -> dict:
    """Real-time sensors at 360 Hz for latency_seconds on a fresh broker and daemon; every scored beat's
    processing latency and signal delay."""
    convention = convention_of(artefact.metadata.get("windowing"), "beats", artefact.window_length)
    distinct = min(sensors, 8)  # sensor i plays the record from the (i % 8)-th of 8 evenly spaced points
    starts = load_record_streams(RECORD, sensors=distinct, lead=LEAD, prefix="lat-")
    expected = [completions(convention, s, sizes.latency_seconds) for s in starts]
    streams = [dataclasses.replace(starts[i % distinct], sensor_id=f"lat-{i:05d}") for i in range(sensors)]
    name = f"latency-{sensors}"
    with fresh_broker(work, name, sizes.partitions) as broker, \
            running_daemon(broker, work, name, MODEL, "cpu", threads, exit_codes, windowing="beats") as daemon:
        cpu = CpuMeter(process_ids(daemon, broker))
        producer = make_producer(broker.bootstrap)
        produced = paced_produce(producer, TOPICS["input"], streams, sizes.latency_seconds, CHUNK, stagger_s=1.0)
        cores = cpu.cores()
        producer.close()
        due = {(s.sensor_id, r): (produced[(s.sensor_id, end)], (end - beat_end) / s.fs)
               for i, s in enumerate(streams) for r, (end, beat_end) in expected[i % distinct].items()
               if (s.sensor_id, end) in produced}
        scored = read_scores(broker.bootstrap, TOPICS["scores"], "lat-", len(due), timeout_s=60,
                             key=lambda score: (score.sensor_id, score.r_peak_seq or -1))
    processing = [scored[key] - ts for key, (ts, _) in due.items() if key in scored]
    delay = [d for key, (_, d) in due.items() if key in scored]
    total = [p + d for p, d in zip(processing, delay, strict=True)]
    return {"sensors": sensors, "seconds": sizes.latency_seconds, "beats_due": len(due),
            "beats_scored": len(processing), "cpu_cores": cores,
            "processing_ms": _quantiles(processing), "signal_delay_ms": _quantiles(delay),
            "total_ms": _quantiles(total)}


def _quantiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(1000 * percentile(values, q), 1) for q in (50, 99)} | {
        "max": round(1000 * max(values), 1) if values else float("nan")}


def _pair(quantiles: dict[str, float]) -> str:
    return f"{quantiles['p50']:,.0f} / {quantiles['p99']:,.0f}"


# -- run and report ----------------------------------------------------------------------------------------------

def run(quick: bool, threads: int = 1, work_dir: Path | None = None) -> dict:
    sizes = Sizes.for_run(quick)
    work = Path(work_dir or tempfile.mkdtemp(prefix="ecg-bench-beats-"))
    artefact = Artefact.load(MODEL)
    load_before = os.getloadavg()
    print("segmenter cost ...", flush=True)
    segmenter = segmenter_cost(artefact, sizes)
    exit_codes: list[int] = []
    streams = [dataclasses.replace(s, values=s.values[:int(sizes.drain_seconds * s.fs)])
               for s in load_record_streams(RECORD, sensors=sizes.drain_sensors, lead=LEAD, prefix="drain-")]
    print("drain, beats ...", flush=True)
    beats = drain(work, "beats", streams, sizes, threads, exit_codes)
    print("drain, fixed ...", flush=True)
    fixed = drain(work, "fixed", streams, sizes, threads, exit_codes)
    per_sensor = beats_per_sensor_second()
    sustained = beats["windows_per_s"] / per_sensor
    latency = []
    for load in sizes.loads:
        sensors = max(1, round(load * sustained))
        print(f"latency, {sensors} real-time sensors ...", flush=True)
        latency.append({"load": load, **latency_run(work, artefact, sensors, sizes, threads, exit_codes)})
    fs = streams[0].fs
    return {
        "meta": {"when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "quick": quick,
                 "cores": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()], "torch_threads": threads,
                 "record": f"mitdb 100, lead {LEAD}, {fs:g} Hz", "record_samples": CHUNK,
                 "model": str(MODEL.relative_to(REPO)), "model_version": artefact.model_version,
                 "partitions": sizes.partitions, "work_dir": str(work)},
        "segmenter": segmenter,
        "beats_per_sensor_second": per_sensor,
        "drain": {"beats": beats, "fixed": fixed,
                  "sustained_sensors": {"beats": sustained, "beats_by_samples": beats["samples_per_s"] / fs,
                                        "fixed": fixed["samples_per_s"] / fs},
                  "beats_vs_fixed_samples_per_s": beats["samples_per_s"] / fixed["samples_per_s"]},
        "latency": latency,
        "fixed_windows_last_published": fixed_published(),
        "daemon_exit_codes": exit_codes,
    }


def fixed_published() -> dict | None:
    """The fixed-window figures of the last published CPU run (ECG5000 at 140 Hz: one window per sensor-second)."""
    path = RESULTS / "cpu.json"
    if not path.is_file():
        return None
    cpu = json.loads(path.read_text())
    e2e = cpu["e2e"]
    half = next(row for row in e2e["latency"] if row["load"] == 0.5)
    return {"source": "bench/results/cpu.json", "when": cpu["meta"]["when"],
            "max_windows_per_s": e2e["max_windows_per_s"], "sensors_140hz": e2e["max_windows_per_s"],
            "p50_ms_at_half_load": half["p50_ms"], "p99_ms_at_half_load": half["p99_ms"]}


def report(r: dict) -> str:
    seg, drained, lat, meta = r["segmenter"], r["drain"], r["latency"], r["meta"]
    cost = seg["cpu_s_per_signal_s"]
    low, high = seg["beats_vs_fixed_cost_range"]
    b, f = drained["beats"], drained["fixed"]
    sustained = drained["sustained_sensors"]
    pub = r["fixed_windows_last_published"]
    lines = [
        "# Beats mode benchmark", "",
        f"`python -m bench.beats{' --quick' if meta['quick'] else ''}`, {meta['when']}; {meta['record']}, "
        f"records of {meta['record_samples']} samples; model `{meta['model']}`; {meta['cores']} cores shared with "
        f"other work (load average {' '.join(map(str, meta['loadavg_before']))} before, "
        f"{' '.join(map(str, meta['loadavg_after']))} after): the figures are noisy. "
        "[docs/benchmarks.md](../../docs/benchmarks.md#beats-mode) says what they mean.", "",
        "## Segmenter cost (one core, in-process)", "",
        "| windowing | CPU s per s of signal | 360 Hz sensors per core |", "|---|---|---|",
        f"| beats (detector + polarity + segmenter) | {cost['beats']:.5f} | {1 / cost['beats']:,.0f} |",
        f"| detector alone | {cost['detector_alone']:.5f} | {1 / cost['detector_alone']:,.0f} |",
        f"| fixed 140-sample windows (baseline) | {cost['fixed']:.5f} | {1 / cost['fixed']:,.0f} |", "",
        f"Beats cost {seg['beats_vs_fixed_cost']:.1f}x fixed windows (median of {seg['turns']} alternating turns, "
        f"{low:.1f}x to {high:.1f}x), on {seg['signal_seconds_per_turn']:.0f} s of signal per turn "
        f"({seg['beats_per_turn']} beats scored).", "",
        "## Maximum sustained load (daemon subprocess, real broker, backlog drained)", "",
        "| windowing | windows/s | samples/s | 360 Hz sensors sustained | daemon cores | sensors per daemon core "
        "| backlog |",
        "|---|---|---|---|---|---|---|",
        f"| beats | {b['windows_per_s']:,.0f} | {b['samples_per_s']:,.0f} | **{sustained['beats']:,.0f}** "
        f"(by samples: {sustained['beats_by_samples']:,.0f}) | {b['cpu_cores']['daemon']} | "
        f"{sustained['beats'] / b['cpu_cores']['daemon']:,.0f} | "
        f"{b['sensors']} x {b['samples'] // b['sensors'] / 360:.0f} s |",
        f"| fixed (baseline) | {f['windows_per_s']:,.0f} | {f['samples_per_s']:,.0f} | {sustained['fixed']:,.0f} | "
        f"{f['cpu_cores']['daemon']} | {sustained['fixed'] / f['cpu_cores']['daemon']:,.0f} | "
        f"{f['sensors']} x {f['samples'] // f['sensors'] / 360:.0f} s |", "",
        "Daemon cores: CPU seconds per second of the whole drain; the machine's other work leaves it less than a "
        "core, so sensors per daemon core is the figure to compare across runs.", "",
        f"Sustained sensors in beats mode = beats/s / {r['beats_per_sensor_second']:.3f} beats per sensor-second "
        f"(record 100's annotated beats per second); by samples = samples/s / 360. Beats mode drains "
        f"{drained['beats_vs_fixed_samples_per_s']:.2f}x the samples/s of fixed windows.", "",
        "## Latency, real-time sensors (one run per load, each on a fresh broker and daemon)", "",
        "| load | sensors | processing p50 / p99 ms | signal delay p50 / p99 ms | beat's end -> score p50 / p99 ms "
        "| beats scored / due | cores: daemon, broker, load generator |",
        "|---|---|---|---|---|---|---|",
        *(f"| {row['load']:.0%} | {row['sensors']} | {_pair(row['processing_ms'])} | {_pair(row['signal_delay_ms'])} "
          f"| {_pair(row['total_ms'])} | {row['beats_scored']} / {row['beats_due']} | "
          + ", ".join(str(v) for v in row["cpu_cores"].values()) + " |" for row in lat), "",
        "Processing: from the time the record that completes a beat is produced to its score record's Kafka "
        "timestamp. Signal delay: the signal between the beat's end and the end of that record (the detector's "
        f"guard and steps; no hardware shortens it). Each run lasts {lat[0]['seconds']:.0f} s; its first ~20 s "
        "only warm the sensors up.",
    ]
    if pub:
        lines += ["", f"Fixed windows, last published run ({pub['source']}, {pub['when']}, ECG5000 at 140 Hz, one "
                  f"window per sensor-second): {pub['sensors_140hz']:,.0f} sensors sustained; p50/p99 "
                  f"{pub['p50_ms_at_half_load']}/{pub['p99_ms_at_half_load']} ms at half load."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.beats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (about a minute): code paths only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the daemon (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    results = run(args.quick, args.threads)
    name = "quick-beats" if args.quick else "beats"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0 if all(code == 0 for code in results["daemon_exit_codes"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
