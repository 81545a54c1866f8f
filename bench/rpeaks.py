"""R-peak detector benchmark: accuracy against cardiologist annotations and CPU cost, per sampling rate.

    python -m bench.rpeaks [--quick]
    python -m bench.rpeaks --data DIR

Detectors: neurokit2's (each with its own cleaning where neurokit2 has one) and sleepecg's. Accuracy on MIT-BIH
record 100 (both leads at 360 Hz, MLII resampled to 125/250/500 Hz with resample_poly, MLII with added noise)
and on synthetic ECG (neurokit2.ecg_simulate) at several rates and heart rates, with and without noise.
A detection matches an annotated beat (beat symbols only) within 150 ms, one to one. CPU cost is process time
per hour of signal, on one core. Writes bench/results/rpeaks.md and rpeaks.json.

With `--data DIR`, every detector on every annotated WFDB record under DIR instead, at its own rate and on the lead
`ecg-trainer evaluate` reads (the 48 other patients of docs/model-card.md: about 30 minutes on one core): pooled Se /
PPV, the worst record and how many records fall below 99%. Writes bench/results/rpeaks-records.md and .json.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import signal as sps

RESULTS = Path(__file__).resolve().parent / "results"
MITDB_100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "mitdb-100" / "100"
BEAT_SYMBOLS = frozenset("NLRBAaJSVrFejnE/fQ?")
TOLERANCE_S = 0.150
#: beats in the first and last 5 s are not scored: the online detector completes a beat 2.5 + 1 s + one RR late
EDGE_S = 5.0
RATES = (125, 250, 360, 500)

Detector = Callable[[np.ndarray, float], np.ndarray]

#: neurokit2 methods that have a matching ecg_clean method; the others get neurokit2's default cleaning
_NK_CLEAN = {"neurokit", "pantompkins1985", "hamilton2002", "elgendi2010", "engzeemod2012"}
NK_METHODS = (
    "neurokit",
    "pantompkins1985",
    "hamilton2002",
    "elgendi2010",
    "engzeemod2012",
    "christov2004",
    "rodrigues2021",
    "kalidas2017",
    "nabian2018",
    "zong2003",
    "manikandan2012",
)


def _neurokit(method: str) -> Detector:
    def detect(x: np.ndarray, fs: float) -> np.ndarray:
        import neurokit2 as nk

        cleaned = nk.ecg_clean(x, sampling_rate=fs, method=method if method in _NK_CLEAN else "neurokit")
        _, info = nk.ecg_peaks(cleaned, sampling_rate=fs, method=method)
        return np.asarray(info["ECG_R_Peaks"], dtype=np.int64)

    return detect


def _sleepecg(x: np.ndarray, fs: float) -> np.ndarray:
    from sleepecg.heartbeats import detect_heartbeats

    return np.asarray(detect_heartbeats(x, fs), dtype=np.int64)


def _online(x: np.ndarray, fs: float) -> np.ndarray:
    """The daemon's path: sleepecg re-run on 1 s steps by OnlineRPeakDetector, fed 10 s records."""
    from monitor.stream.beats import BeatConvention
    from monitor.stream.rpeaks import OnlineRPeakDetector

    detector = OnlineRPeakDetector(fs, BeatConvention())
    record = int(10 * fs)
    beats = [b for seq in range(0, len(x), record) for b in detector.push(seq, x[seq : seq + record])]
    return np.array([b.r_peak for b in beats] + [b.next_r_peak for b in beats[-1:]], dtype=np.int64)


def detectors() -> dict[str, Detector]:
    out = {f"nk:{m}": _neurokit(m) for m in NK_METHODS}
    out["sleepecg"] = _sleepecg
    out["online (sleepecg, monitor.stream.rpeaks)"] = _online
    return out


@dataclass
class Score:
    detector: str
    case: str
    fs: float
    beats: int
    tp: int
    fn: int
    fp: int
    cpu_s_per_hour: float

    @property
    def se(self) -> float:
        return self.tp / max(1, self.tp + self.fn)

    @property
    def ppv(self) -> float:
        return self.tp / max(1, self.tp + self.fp)


def match(detected: np.ndarray, truth: np.ndarray, tolerance: int, n: int, edge: int) -> tuple[int, int, int]:
    """(tp, fn, fp): each annotated beat takes the nearest unused detection within the tolerance.

    Only beats and detections in [edge, n - edge) are counted (a beat near the ends cannot be completed by
    the online detector, and batch detectors are not meant to be judged on half-seen beats); matching uses
    them all, so a detection just inside the edge of a beat just outside it is not a false positive.
    """
    detected = np.sort(detected)
    used = np.zeros(len(detected), dtype=bool)
    hit = np.zeros(len(truth), dtype=bool)
    for j, t in enumerate(truth):
        lo, hi = np.searchsorted(detected, [t - tolerance, t + tolerance + 1])
        candidates = [i for i in range(lo, hi) if not used[i]]
        if candidates:
            used[min(candidates, key=lambda i: abs(int(detected[i]) - int(t)))] = True
            hit[j] = True
    scored_truth = (truth >= edge) & (truth < n - edge)
    scored_found = (detected >= edge) & (detected < n - edge)
    tp = int((hit & scored_truth).sum())
    return tp, int(scored_truth.sum()) - tp, int((~used & scored_found).sum())


def run_case(name: str, detect: Detector, case: str, x: np.ndarray, fs: int, truth: np.ndarray) -> Score:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            detect(x[: int(10 * fs)], fs)  # imports, caches and JIT out of the timing
        except Exception:  # judged on the whole case below
            pass
    start = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = detect(x, fs)
        except Exception:  # a detector that fails on a case scores zero there rather than stopping the run
            found = np.zeros(0, dtype=np.int64)
    cpu = time.process_time() - start
    tp, fn, fp = match(found, truth, int(round(TOLERANCE_S * fs)), len(x), int(EDGE_S * fs))
    return Score(name, case, fs, tp + fn, tp, fn, fp, cpu * 3600.0 * fs / len(x))


def record_100(lead: int, seconds: float | None) -> tuple[np.ndarray, float, np.ndarray]:
    import wfdb

    sampto = None if seconds is None else int(seconds * 360)
    record = wfdb.rdrecord(str(MITDB_100), sampto=sampto)
    ann = wfdb.rdann(str(MITDB_100), "atr", sampto=sampto)
    truth = np.array([s for s, c in zip(ann.sample, ann.symbol, strict=True) if c in BEAT_SYMBOLS], dtype=np.int64)
    return record.p_signal[:, lead].astype(np.float64), float(record.fs), truth


def resample(x: np.ndarray, fs: float, truth: np.ndarray, fs_out: int) -> tuple[np.ndarray, np.ndarray]:
    if fs_out == fs:
        return x, truth
    return sps.resample_poly(x, fs_out, int(fs)), np.round(truth * fs_out / fs).astype(np.int64)


def synthetic(fs: int, heart_rate: int, seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ecgsyn ECG and its R peaks (the clean signal's beat maxima)."""
    import neurokit2 as nk

    x = np.asarray(nk.ecg_simulate(duration=seconds, sampling_rate=fs, heart_rate=heart_rate, noise=0.0,
                                   method="ecgsyn", random_state=seed), dtype=np.float64)
    peaks, _ = sps.find_peaks(x, distance=int(0.6 * 60 / heart_rate * fs), prominence=0.5 * np.ptp(x))
    return x, peaks.astype(np.int64)


def add_noise(x: np.ndarray, fs: float, white_mv: float, seed: int) -> np.ndarray:
    """White noise plus 0.3 Hz baseline wander and 50 Hz mains at a third of the white level each."""
    rng = np.random.default_rng(seed)
    t = np.arange(len(x)) / fs
    drift = 3 * white_mv * np.sin(2 * np.pi * 0.3 * t) + white_mv / 3 * np.sin(2 * np.pi * 50 * t)
    return x + rng.normal(0.0, white_mv, len(x)) + drift


def run(quick: bool) -> list[Score]:
    seconds = 300.0 if quick else None
    scores: list[Score] = []
    dets = detectors()
    mlii, fs, truth = record_100(0, seconds)
    v5, _, _ = record_100(1, seconds)
    cases: list[tuple[str, np.ndarray, int, np.ndarray]] = []
    for rate in RATES:
        x, t = resample(mlii, fs, truth, rate)
        cases.append(("mitdb100 MLII", x, rate, t))
    cases.append(("mitdb100 V5", v5, int(fs), truth))
    for white in (0.1, 0.25):
        cases.append((f"mitdb100 MLII + noise {white} mV", add_noise(mlii, fs, white, 1), int(fs), truth))
    for rate in (125, 250, 500):
        for hr in (50, 80, 140):
            x, t = synthetic(rate, hr, 30.0 if quick else 120.0, seed=hr)
            cases.append((f"ecgsyn {hr} bpm", x, rate, t))
            cases.append((f"ecgsyn {hr} bpm + noise 0.15", add_noise(x, rate, 0.15, hr), rate, t))
    for case, x, rate, t in cases:
        for name, detect in dets.items():
            scores.append(run_case(name, detect, case, x, rate, t))
    return scores


def run_records(directory: Path) -> list[Score]:
    """Every detector on every annotated record under `directory` (`trainer.recordings`: the lead evaluate reads)."""
    from trainer import recordings

    dets = detectors()
    scores: list[Score] = []
    for header in recordings.wfdb_headers(directory):
        record = recordings.read_wfdb(header)
        if record.annotations is None:
            continue
        truth = record.annotations.samples
        for name, detect in dets.items():
            scores.append(run_case(name, detect, record.name, record.signal, int(record.fs), truth))
    return scores


def records_summary(scores: list[Score], floor: float = 0.99) -> dict[str, dict[str, Any]]:
    """Per detector over the records: pooled Se / PPV, the worst record of each, and records below `floor`."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(s.detector for s in scores):
        mine = [s for s in scores if s.detector == name]
        tp, fn, fp = (sum(getattr(s, k) for s in mine) for k in ("tp", "fn", "fp"))
        pooled = Score(name, "pooled", 0.0, tp + fn, tp, fn, fp, 0.0)
        worst_se, worst_ppv = min(mine, key=lambda s: s.se), min(mine, key=lambda s: s.ppv)
        out[name] = {"records": len(mine), "se": pooled.se, "ppv": pooled.ppv,
                     "worst_se": worst_se.se, "worst_se_record": worst_se.case,
                     "worst_ppv": worst_ppv.ppv, "worst_ppv_record": worst_ppv.case,
                     "records_below": sum(s.se < floor or s.ppv < floor for s in mine),
                     "cpu_s_per_hour": float(np.mean([s.cpu_s_per_hour for s in mine]))}
    return out


def records_markdown(scores: list[Score], directory: Path) -> str:
    rows = records_summary(scores)
    n = next(iter(rows.values()))["records"] if rows else 0
    lines = [f"# R-peak detectors on {n} annotated records", "",
             f"Written by `python -m bench.rpeaks --data {directory.name}`. Se / PPV in %, 150 ms tolerance, each "
             "record at its own rate on the lead `ecg-trainer evaluate` reads; CPU = process seconds per hour of "
             "signal (one core, this machine, shared). The daemon's detector is the online one.", "",
             "| detector | pooled Se / PPV | worst Se (record) | worst PPV (record) | records with Se or PPV < 99% "
             "| CPU s/h |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(rows.items(), key=lambda kv: -(kv[1]["se"] + kv[1]["ppv"])):
        lines.append(f"| {name} | {100 * r['se']:.2f} / {100 * r['ppv']:.2f} | {100 * r['worst_se']:.2f} "
                     f"({r['worst_se_record']}) | {100 * r['worst_ppv']:.2f} ({r['worst_ppv_record']}) | "
                     f"{r['records_below']} of {r['records']} | {r['cpu_s_per_hour']:.2f} |")
    return "\n".join(lines) + "\n"


def summary(scores: list[Score]) -> dict[str, dict[str, float]]:
    """Per detector: the worst Se and PPV over the record-100 cases and over the synthetic ones, mean CPU."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(s.detector for s in scores):
        mine = [s for s in scores if s.detector == name]
        real = [s for s in mine if s.case.startswith("mitdb100 MLII") and "noise" not in s.case]
        noisy = [s for s in mine if "mitdb100" in s.case and "noise" in s.case]
        syn = [s for s in mine if s.case.startswith("ecgsyn")]
        out[name] = {
            "min_se_mitdb": min(s.se for s in real),
            "min_ppv_mitdb": min(s.ppv for s in real),
            "min_se_noisy": min(s.se for s in noisy),
            "min_ppv_noisy": min(s.ppv for s in noisy),
            "min_se_synthetic": min(s.se for s in syn),
            "min_ppv_synthetic": min(s.ppv for s in syn),
            "cpu_s_per_hour_360": next(s.cpu_s_per_hour for s in real if s.fs == 360),
        }
    return out


def markdown(scores: list[Score], quick: bool) -> str:
    lines = [
        "# R-peak detectors" + (" (quick run: 5 min of record 100, 30 s synthetic)" if quick else ""),
        "",
        "Written by `python -m bench.rpeaks`. Se / PPV in %, 150 ms tolerance; CPU = process seconds per hour",
        "of signal (one core, this machine, shared).",
        "",
        "## Record 100, MLII, per sampling rate (Se / PPV, CPU s per hour)",
        "",
        "| detector | " + " | ".join(f"{r} Hz" for r in RATES) + " | V5 360 Hz |",
        "| --- | " + " | ".join("---" for _ in RATES) + " | --- |",
    ]
    for name in dict.fromkeys(s.detector for s in scores):
        cells = []
        for rate in RATES:
            s = next(s for s in scores if s.detector == name and s.case == "mitdb100 MLII" and s.fs == rate)
            cells.append(f"{100 * s.se:.2f} / {100 * s.ppv:.2f}, {s.cpu_s_per_hour:.2f} s")
        v5 = next(s for s in scores if s.detector == name and s.case == "mitdb100 V5")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * v5.se:.2f} / {100 * v5.ppv:.2f} |")
    lines += ["", "## Worst case over conditions (Se / PPV)", "",
              "| detector | record 100 (4 rates) | record 100 + noise | ecgsyn (3 rates x 3 HR, +- noise) | CPU s/h |",
              "| --- | --- | --- | --- | --- |"]
    for name, row in summary(scores).items():
        lines.append(
            f"| {name} | {100 * row['min_se_mitdb']:.2f} / {100 * row['min_ppv_mitdb']:.2f} "
            f"| {100 * row['min_se_noisy']:.2f} / {100 * row['min_ppv_noisy']:.2f} "
            f"| {100 * row['min_se_synthetic']:.2f} / {100 * row['min_ppv_synthetic']:.2f} "
            f"| {row['cpu_s_per_hour_360']:.2f} |"
        )
    lines += ["", "## Every case", "", "| case | fs | detector | beats | TP | FN | FP |", "| --- " * 7 + "|"]
    for s in scores:
        lines.append(f"| {s.case} | {s.fs:g} | {s.detector} | {s.beats} | {s.tp} | {s.fn} | {s.fp} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 minutes of record 100 and 30 s synthetic")
    parser.add_argument("--data", type=Path, metavar="DIR", help="every annotated WFDB record under DIR instead "
                        "(writes rpeaks-records.*)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.data is not None:
        scores = run_records(args.data)
        (RESULTS / "rpeaks-records.json").write_text(json.dumps(
            {"scores": [asdict(s) for s in scores], "summary": records_summary(scores)}, indent=1) + "\n")
        (RESULTS / "rpeaks-records.md").write_text(records_markdown(scores, args.data))
        print((RESULTS / "rpeaks-records.md").read_text())
        return
    scores = run(args.quick)
    stem = "rpeaks-quick" if args.quick else "rpeaks"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"scores": [asdict(s) for s in scores], "summary": summary(scores)}, indent=1) + "\n"
    )
    (RESULTS / f"{stem}.md").write_text(markdown(scores, args.quick))
    print((RESULTS / f"{stem}.md").read_text().split("## Every case")[0])


if __name__ == "__main__":
    main()
