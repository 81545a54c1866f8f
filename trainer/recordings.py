"""Continuous ECG recordings for the trainer: WFDB records and single-lead CSV / Parquet / NPY signals.

A recording goes through exactly what the daemon does to a sensor's stream: the daemon's own beat windower
(`monitor.stream.beat_windowing.BeatWindower`: R peaks by `OnlineRPeakDetector`, the polarity of each beat
from the median QRS of its last 15, beats cut by the shared segmenter `monitor.stream.beats.segment` in the
convention), fed the whole signal as one record of a sensor whose seq starts at 0. Both are invariant to the
record sizes, so a model trained here sees the beats the daemon will score, and `evaluate` scores the same
beats as a stream of the recording through the daemon (the first 14 beats only set the polarity there too).

With WFDB reference annotations (`.atr`), each detected beat takes the AAMI class (N, S, V, F, Q) of the
reference beat within 150 ms of its R peak; detections that match no reference beat are UNMATCHED. Without
annotations every beat is labelled normal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import wfdb
from wfdb.processing import compare_annotations

from monitor.stream import quality
from monitor.stream.beat_windowing import BeatWindow, BeatWindower
from monitor.stream.beats import BeatConvention, Beats, Polarity, estimate_polarity
from monitor.stream.rpeaks import OnlineRPeakDetector
from monitor.stream.wire import InputRecord
from trainer.data import BeatOrigin, DataError, Dataset, digest
from trainer.streams import AAMI  # MIT-BIH beat symbol -> AAMI class; other symbols are not beats

AAMI_NAMES = {"N": "normal", "S": "supraventricular ectopic", "V": "ventricular ectopic", "F": "fusion",
              "Q": "paced / unclassifiable"}
NORMAL = "N"
VENTRICULAR = "V"
#: Label of a detected beat that matches no reference beat (a false detection, or an unannotated beat).
UNMATCHED = "-"
#: A detection matches a reference beat within this distance (the usual R-peak scoring tolerance).
TOLERANCE_S = 0.15
SIGNAL_SUFFIXES = (".csv", ".parquet", ".pq", ".npy")
#: Table columns that hold time or indices, never the signal.
INDEX_COLUMNS = {"time", "t", "timestamp", "ts", "seq", "index", "sample", "label"}


@dataclass(frozen=True)
class Annotations:
    """Reference beats: R-peak sample indices and their AAMI classes."""

    samples: np.ndarray  # (n,) int64, increasing
    classes: np.ndarray  # (n,) str


@dataclass(frozen=True)
class Recording:
    name: str
    signal: np.ndarray  # (n,) float64, one lead
    fs: float
    lead: str
    annotations: Annotations | None = None

    @property
    def duration_s(self) -> float:
        return len(self.signal) / self.fs


@dataclass(frozen=True)
class RecordingBeats:
    """A recording cut into beats, with every R peak the detector committed."""

    recording: Recording
    beats: Beats
    labels: np.ndarray  # (n_beats,) AAMI class of each beat, UNMATCHED, or NORMAL without annotations
    r_peaks: np.ndarray  # all committed R peaks (a beat needs two, and its margin inside the signal)
    polarity: Polarity


# -- reading -----------------------------------------------------------------------------------------------

def is_recording(path: Path | None, fs: float | None = None) -> bool:
    """A WFDB record (`.hea`, or a directory holding them, also in subdirectories), or a signal file read as
    one lead with `fs` (CSV/Parquet without `fs` stay tables of windows, trainer.data's format)."""
    if path is None:
        return False
    path = Path(path)
    if path.suffix.lower() == ".hea" or (path.is_dir() and bool(wfdb_headers(path))):
        return True
    return fs is not None and path.suffix.lower() in SIGNAL_SUFFIXES


def read(path: Path, *, fs: float | None = None, lead: str | None = None) -> list[Recording]:
    """Every recording at `path`: one `.hea` record, each record under a directory (sorted by path: a database
    as PhysioNet serves it, or one folder per record), or a signal file."""
    path = Path(path)
    if path.is_dir():
        headers = wfdb_headers(path)
        if not headers:
            raise DataError(f"{path}: no WFDB records (.hea) in this directory")
        return [read_wfdb(h, lead) for h in headers]
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix.lower() == ".hea":
        return [read_wfdb(path, lead)]
    if path.suffix.lower() in SIGNAL_SUFFIXES:
        if fs is None:
            raise DataError(f"{path}: a signal file needs its sampling rate: --fs (TRAINER_FS)")
        return [read_signal(path, fs, lead)]
    raise DataError(f"{path}: not a recording (expected .hea, a directory of WFDB records, .csv, .parquet or .npy)")


def wfdb_headers(directory: Path) -> list[Path]:
    """Every WFDB header (.hea) under `directory`, sorted, following linked folders (a database is often linked
    in rather than copied; Path.rglob skips links before Python 3.13), each real folder once."""
    seen, found = set(), []
    for root, folders, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            folders.clear()
            continue
        seen.add(real)
        found += [Path(root) / name for name in files if name.lower().endswith(".hea")]
    return sorted(found)


def read_wfdb(header: Path, lead: str | None = None) -> Recording:
    """One lead of a WFDB record (default: the first) and its `.atr` reference beats when present."""
    base = str(Path(header).with_suffix(""))
    try:
        record = wfdb.rdrecord(base)
    except (OSError, ValueError) as exc:
        raise DataError(f"{header}: cannot read the WFDB record ({exc})") from None
    names = list(record.sig_name or [])
    if lead is not None and lead not in names:
        raise DataError(f"{header}: no lead {lead!r} (leads: {', '.join(names)})")
    channel = names.index(lead) if lead is not None else 0
    signal = np.asarray(record.p_signal[:, channel], dtype=np.float64)
    _check_signal(Path(header), signal)
    annotations = None
    if Path(base + ".atr").is_file():
        annotations = aami_annotations(wfdb.rdann(base, "atr"))
    return Recording(f"{Path(base).name}:{names[channel]}", signal, float(record.fs), names[channel], annotations)


def aami_annotations(ann: wfdb.Annotation) -> Annotations:
    """The beat annotations of a WFDB annotation set, as AAMI classes (non-beat symbols dropped)."""
    symbols = np.asarray(ann.symbol, dtype=object)
    samples = np.asarray(ann.sample, dtype=np.int64)
    is_beat = np.asarray([s in AAMI for s in symbols], dtype=bool)
    classes = np.asarray([AAMI[s] for s in symbols[is_beat]], dtype=object)
    return Annotations(samples[is_beat], classes)


def read_signal(path: Path, fs: float, lead: str | None = None) -> Recording:
    """One lead from a CSV/Parquet column (`lead`, or the only numeric non-index column) or a 1-D .npy
    (a 2-D one: samples along axis 0, `lead` a column number)."""
    if not fs > 0:
        raise DataError(f"{path}: fs must be > 0, got {fs}")
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim == 2 and lead is not None and lead.isdigit() and int(lead) < array.shape[1]:
            array, name = array[:, int(lead)], lead
        elif array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1):
            array, name = array.reshape(-1), "0"
        else:
            raise DataError(f"{path}: shape {array.shape}: a single lead needs a 1-D array (or --lead COLUMN)")
        signal = np.asarray(array, dtype=np.float64)
    else:
        frame = pd.read_parquet(path) if path.suffix.lower() != ".csv" else pd.read_csv(path)
        numeric = [c for c in frame.select_dtypes("number").columns if str(c).strip().lower() not in INDEX_COLUMNS]
        if lead is not None:
            if lead not in frame.columns:
                raise DataError(f"{path}: no column {lead!r} (columns: {', '.join(map(str, frame.columns))})")
            name = lead
        elif len(numeric) == 1:
            name = str(numeric[0])
        else:
            raise DataError(f"{path}: {len(numeric)} signal columns ({', '.join(map(str, numeric))}): "
                            "choose one with --lead NAME")
        signal = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
    _check_signal(path, signal)
    return Recording(f"{path.stem}:{name}", signal, float(fs), name)


def _check_signal(path: Path, signal: np.ndarray) -> None:
    if len(signal) == 0:
        raise DataError(f"{path}: empty signal")
    bad = ~np.isfinite(signal)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} NaN/inf sample(s), first at sample {int(np.argmax(bad))}")


# -- beats -------------------------------------------------------------------------------------------------

def detect_r_peaks(signal: np.ndarray, fs: float, convention: BeatConvention) -> np.ndarray:
    """The R peaks the daemon's detector commits on this signal (streamed from seq 0 in one record)."""
    detector = OnlineRPeakDetector(fs, convention)
    spans = detector.push(0, signal)
    # every committed peak opens or closes a beat, except one between two dropped (over-long) beats
    peaks = {s.r_peak for s in spans} | {s.next_r_peak for s in spans}
    return np.asarray(sorted(peaks), dtype=np.int64)


def stream_beats(recording: Recording, convention: BeatConvention) -> Beats:
    """The beats the daemon's windower cuts from this recording streamed as one sensor from seq 0."""
    windower = BeatWindower(convention)
    record = InputRecord(sensor_id="recording", seq=0, values=recording.signal.tolist(), fs=recording.fs)
    windows = [w for w in windower.add(0, 0, record)[0] if isinstance(w, BeatWindow)]
    return Beats(windows=np.asarray([w.values for w in windows], dtype=np.float32).reshape(-1, convention.length),
                 r_peak=np.asarray([w.r_peak_seq for w in windows], dtype=np.int64),
                 start=np.asarray([w.start_seq for w in windows], dtype=np.int64),
                 end=np.asarray([w.span_end for w in windows], dtype=np.int64),
                 rr_s=np.asarray([w.rr_s for w in windows], dtype=np.float64),
                 flipped=np.asarray([w.flipped for w in windows], dtype=bool))


def cut(recording: Recording, convention: BeatConvention) -> RecordingBeats:
    """Beats as the daemon cuts them, labelled; every committed R peak (for R-peak scoring); the recording's
    dominant QRS sign (for the report: the daemon decides it per beat from the last 15)."""
    peaks = detect_r_peaks(recording.signal, recording.fs, convention)
    if len(peaks) < 2:
        raise DataError(f"{recording.name}: fewer than two R peaks detected in {recording.duration_s:.0f} s")
    beats = stream_beats(recording, convention)
    polarity = estimate_polarity(recording.signal, recording.fs, peaks)
    return RecordingBeats(recording, beats, label_beats(beats.r_peak, recording.annotations, recording.fs),
                          peaks, polarity)


def label_beats(r_peaks: np.ndarray, annotations: Annotations | None, fs: float) -> np.ndarray:
    """The class of the nearest reference beat within TOLERANCE_S of each R peak, else UNMATCHED;
    all NORMAL without annotations."""
    if annotations is None:
        return np.full(len(r_peaks), NORMAL, dtype=object)
    ref = annotations.samples
    if len(ref) == 0:
        return np.full(len(r_peaks), UNMATCHED, dtype=object)
    right = np.clip(np.searchsorted(ref, r_peaks), 1, len(ref) - 1) if len(ref) > 1 else np.zeros(len(r_peaks), int)
    left = np.maximum(right - 1, 0)
    nearest = np.where(np.abs(ref[left] - r_peaks) <= np.abs(ref[right] - r_peaks), left, right)
    close = np.abs(ref[nearest] - r_peaks) <= TOLERANCE_S * fs
    return np.where(close, annotations.classes[nearest], UNMATCHED).astype(object)


def sample_problems(cut_beats: RecordingBeats) -> list[str | None]:
    """Each beat's signal-quality problem on its raw samples (`monitor.stream.quality`), or None: the daemon's
    check of a beat window's span."""
    rec, beats = cut_beats.recording, cut_beats.beats
    spans = [rec.signal[start:end] for start, end in zip(beats.start, beats.end, strict=True)]
    return [q.reason for q in quality.check_segments(spans, [rec.fs] * len(spans))]


def rpeak_accuracy(cut_beats: RecordingBeats) -> dict[str, float | int]:
    """Sensitivity and positive predictivity of the committed R peaks against the reference beats
    (one-to-one matches within TOLERANCE_S). The detector commits a slice's peaks only once the last window
    that judges it has run, up to `guard_s + votes * step_s` after its start (4.5 s by default), so reference
    beats in the recording's last such seconds are not counted (a stream that ends there has no verdict yet)."""
    rec = cut_beats.recording
    if rec.annotations is None:
        raise DataError(f"{rec.name}: no reference annotations (.atr) to score R peaks against")
    config = OnlineRPeakDetector(rec.fs, BeatConvention()).config
    horizon = len(rec.signal) - (config.guard_s + config.votes * config.step_s) * rec.fs
    ref = rec.annotations.samples[rec.annotations.samples < horizon]
    test = cut_beats.r_peaks[cut_beats.r_peaks < horizon]
    result = compare_annotations(ref, test, int(round(TOLERANCE_S * rec.fs)))
    return {"reference": int(len(ref)), "detected": int(len(test)), "matched": int(result.tp),
            "missed": int(result.fn), "false": int(result.fp), "sensitivity": float(result.sensitivity),
            "ppv": float(result.positive_predictivity), "tolerance_ms": round(TOLERANCE_S * 1000)}


def to_dataset(cuts: list[RecordingBeats], convention: BeatConvention) -> Dataset:
    """Beat windows (n, length, 1) and labels: AAMI classes where annotated (UNMATCHED beats dropped: they
    are no reference beat), all normal otherwise. The digest covers the windows, labels and convention."""
    kept = [c.labels != UNMATCHED for c in cuts]
    if not any(k.any() for k in kept):
        raise DataError("no beats cut from the recordings")

    def joined(per_cut: Callable[[RecordingBeats], np.ndarray]) -> np.ndarray:
        """One array per recording, its kept beats, end to end."""
        return np.concatenate([per_cut(c)[k] for c, k in zip(cuts, kept, strict=True)])

    x = joined(lambda c: c.beats.windows).astype(np.float64)[:, :, None]
    y = joined(lambda c: c.labels).astype(object)
    origin = BeatOrigin(np.concatenate([np.full(k.sum(), i) for i, k in enumerate(kept)]).astype(np.int64),
                        tuple(c.recording.name for c in cuts), joined(lambda c: c.beats.rr_s),
                        joined(lambda c: c.beats.flipped))
    source = ", ".join(f"{c.recording.name} ({c.recording.fs:g} Hz, {c.recording.duration_s / 60:.1f} min)"
                       for c in cuts)
    return Dataset(x, y, f"beats of {source}", digest(x, y), origin)
