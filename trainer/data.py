"""Loading windows: ECG5000 in UCR .txt / .tsv / .arff layout, generic CSV / Parquet, or a download.

Everything ends up as a `Dataset`: float windows (n, length, features), string labels, and a
digest of the parsed values, so the same data in any layout has the same digest.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pooch

from monitor.stream.beats import as_recorded

ECG5000_URL = "https://timeseriesclassification.com/aeon-toolkit/ECG5000.zip"
ECG5000_SHAPE = (5000, 140, 1)
ECG5000_LABELS = frozenset({"1", "2", "3", "4", "5"})
#: `digest()` of TRAIN followed by TEST, computed from the reference copy (see SOURCE.md).
ECG5000_DIGEST = "f0922ffebd037096be92ae2ce573406b5ce925e2c893e651cb5fd6e7cbd1614a"
ECG5000_CLASSES = {"1": "Normal", "2": "R-on-T PVC", "3": "PVC", "4": "SP or EB", "5": "Unclassified beat"}
UCR_SUFFIXES = (".txt", ".tsv", ".arff")


class DataError(ValueError):
    """Data that cannot be used; the message names the file and the cause."""


@dataclass(frozen=True)
class BeatOrigin:
    """Where each beat of a Dataset cut from recordings came from, so validation streams can be made of one
    patient each, at his own rate, with his beats the way up his lead records them (the template score
    compares them so in the daemon)."""

    recording: np.ndarray  # (n,) int, index into `names`
    names: tuple[str, ...]
    rr_s: np.ndarray  # (n,) the beat's R-R interval
    flipped: np.ndarray  # (n,) bool: negated to the convention's QRS sign for the model

    def take(self, rows: np.ndarray) -> BeatOrigin:
        return BeatOrigin(self.recording[rows], self.names, self.rr_s[rows], self.flipped[rows])

    def recorded(self, windows: np.ndarray) -> np.ndarray:
        """`windows` (these beats, in the model's orientation) the way up the lead records them."""
        return as_recorded(windows, self.flipped)


@dataclass(frozen=True)
class Dataset:
    windows: np.ndarray  # (n, window_length, n_features) float64
    labels: np.ndarray  # (n,) str; all equal to the normal label when the source has none
    source: str
    digest: str
    origin: BeatOrigin | None = None  # beats cut from recordings; None for windows (ECG5000, tables)

    def take(self, rows: np.ndarray, source: str) -> Dataset:
        """A subset of the rows, under a new source description (the digest stays the whole data's)."""
        origin = None if self.origin is None else self.origin.take(rows)
        return Dataset(self.windows[rows], self.labels[rows], source, self.digest, origin)

    @property
    def window_length(self) -> int:
        return self.windows.shape[1]

    @property
    def n_features(self) -> int:
        return self.windows.shape[2]


def digest(windows: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the parsed values (float64, C order), the shape and the labels."""
    h = hashlib.sha256()
    h.update(str(windows.shape).encode())
    h.update(np.ascontiguousarray(windows, dtype="<f8").tobytes())
    h.update("\n".join(map(str, labels)).encode())
    return h.hexdigest()


def load(path: Path | None, *, cache_dir: Path | None = None, label_column: str = "label",
         n_features: int = 1, normal_label: str = "1", verify_digest: bool = True) -> Dataset:
    """Load a UCR directory or a CSV/Parquet file; with no path, download ECG5000."""
    if path is None:
        path = download_ecg5000(cache_dir or Path("."))
    path = Path(path)
    if path.is_dir():
        return load_ucr_dir(path, verify_digest=verify_digest)
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix.lower() in (".csv", ".parquet", ".pq"):
        return load_table(path, label_column=label_column, n_features=n_features, normal_label=normal_label)
    raise DataError(f"{path}: unknown data format (expected a UCR directory, .csv or .parquet)")


def load_ucr_dir(directory: Path, verify_digest: bool = True) -> Dataset:
    """Merge <name>_TRAIN and <name>_TEST (in that order) from a UCR directory."""
    parts = []
    for split in ("TRAIN", "TEST"):
        matches = sorted(p for p in directory.rglob(f"*_{split}.*") if p.suffix.lower() in UCR_SUFFIXES)
        if not matches:
            raise DataError(f"{directory}: no *_{split}.txt, .tsv or .arff file")
        best = min(matches, key=lambda p: UCR_SUFFIXES.index(p.suffix.lower()))
        parts.append(load_ucr_file(best))
    windows = np.concatenate([w for w, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    data = Dataset(windows, labels, str(directory), digest(windows, labels))
    if _is_ecg5000(directory):
        validate_ecg5000(data, verify_digest)
    return data


def load_ucr_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One UCR file -> (windows (n, length, 1), labels). The label is the first column
    (.txt/.tsv) or the last attribute (.arff)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".arff":
            values, labels = _read_arff(path)
        else:
            text = path.read_text(encoding="utf-8")
            tab = suffix == ".tsv"
            _check_field_counts(path, text, "\t" if tab else None)
            frame = pd.read_csv(io.StringIO(text), sep="\t" if tab else r"\s+", header=None, dtype=float)
            labels, values = frame.iloc[:, 0].to_numpy(), frame.iloc[:, 1:].to_numpy()
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse ({_reason(exc)})") from None
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] < 2:
        raise DataError(f"{path}: no windows found")
    _check_finite(path, values)
    return values[:, :, None].astype(np.float64), _label_strings(path, labels)


def _check_field_counts(path: Path, text: str, sep: str | None) -> None:
    """Every line must have as many fields as the first (pandas would pad short rows with NaN)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty file, no windows found")
    counts = np.array([len(ln.strip().split(sep)) for ln in lines])
    expected = np.bincount(counts).argmax()  # the most common count
    bad = np.flatnonzero(counts != expected)
    if len(bad):
        raise DataError(f"{path}: wrong column count: line {bad[0] + 1} has {counts[bad[0]]} fields, "
                        f"expected {expected}")


def _read_arff(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Minimal dense ARFF reader: numeric attributes, the last one is the class."""
    lines = path.read_text(encoding="utf-8", errors="strict").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().lower() == "@data"), None)
    if start is None:
        raise ValueError("no @data section")
    n_attributes = sum(1 for ln in lines[:start] if ln.strip().lower().startswith("@attribute"))
    rows = [ln for ln in lines[start + 1:] if ln.strip() and not ln.lstrip().startswith("%")]
    frame = pd.DataFrame([r.split(",") for r in rows])
    if frame.shape[1] != n_attributes:
        raise ValueError(f"rows have {frame.shape[1]} fields, the header declares {n_attributes} attributes")
    values = frame.iloc[:, :-1].apply(pd.to_numeric, errors="raise").to_numpy(dtype=float)
    labels = frame.iloc[:, -1].str.strip().str.strip("'\"").to_numpy()
    return values, labels


def load_table(path: Path, label_column: str = "label", n_features: int = 1, normal_label: str = "1") -> Dataset:
    """CSV or Parquet, one window per row: an optional label column, then the values,
    channel-major (all samples of channel 0, then channel 1, ...). Without a label column
    every window is normal."""
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read ({_reason(exc)})") from None
    if frame.empty:
        raise DataError(f"{path}: no windows found")
    labels = frame.pop(label_column).to_numpy() if label_column in frame.columns else None
    if frame.shape[1] == 0 or frame.shape[1] % n_features:
        raise DataError(f"{path}: {frame.shape[1]} value columns do not divide into {n_features} channel(s)")
    try:
        values = frame.apply(pd.to_numeric, errors="raise").to_numpy(dtype=float)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: non-numeric value column ({exc})") from None
    _check_finite(path, values)
    windows = values.reshape(len(values), n_features, -1).transpose(0, 2, 1).copy()
    if labels is None:
        labels = np.full(len(values), normal_label, dtype=object)
    else:
        labels = _label_strings(path, labels)
        if normal_label not in set(labels):
            raise DataError(f"{path}: no window has the normal label {normal_label!r} (labels: "
                            f"{sorted(set(labels))[:10]}); set normal_label (TRAINER_NORMAL_LABEL)")
    return Dataset(windows, labels, str(path), digest(windows, labels))


def _check_finite(path: Path, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{path}: {int(bad.sum())} NaN/inf value(s), first in window {row} column {col}")


def _label_strings(path: Path, labels: np.ndarray) -> np.ndarray:
    """Labels as strings; whole-number floats (UCR's 1.0000000e+00) become "1"."""
    out = []
    for i, label in enumerate(labels):
        if label is None or (isinstance(label, float) and not np.isfinite(label)) or str(label).strip() == "":
            raise DataError(f"{path}: window {i} has an empty or NaN label")
        if isinstance(label, (float, np.floating)) and float(label).is_integer():
            label = int(label)
        out.append(str(label).strip())
    return np.asarray(out, dtype=object)


def _reason(exc: Exception) -> str:
    """The first line of an exception's message (parsers can print whole files), or its type."""
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _is_ecg5000(directory: Path) -> bool:
    return any(p.name.upper().startswith("ECG5000_") for p in directory.rglob("ECG5000_*"))


def validate_ecg5000(data: Dataset, verify_digest: bool = True) -> None:
    """Shapes, label set and digest of a parsed ECG5000 copy."""
    if data.windows.shape != ECG5000_SHAPE:
        raise DataError(f"{data.source}: ECG5000 should have shape {ECG5000_SHAPE}, got {data.windows.shape}")
    unknown = set(data.labels) - ECG5000_LABELS
    if unknown:
        raise DataError(f"{data.source}: unknown ECG5000 labels {sorted(unknown)} (expected 1-5)")
    if verify_digest and data.digest != ECG5000_DIGEST:
        raise DataError(f"{data.source}: ECG5000 values differ from the reference copy (digest "
                        f"{data.digest[:12]}... != {ECG5000_DIGEST[:12]}...); the download may be corrupt: "
                        "delete it and retry, or set TRAINER_VERIFY_DIGEST=false for a modified copy")


def default_cache_dir() -> Path:
    """$ECG_MONITOR_CACHE, else the user's cache directory (~/.cache/ecg-monitor on Linux): the one
    default for the ECG5000 download (trainer, replayer, demo) and the demo's model and logs."""
    override = os.environ.get("ECG_MONITOR_CACHE")
    return Path(override) if override else Path(pooch.os_cache("ecg-monitor"))


def holds_ecg5000(directory: Path) -> bool:
    """Whether `directory` already holds an ECG5000 copy (its test split, at any depth: `load` searches so)."""
    return directory.is_dir() and any(directory.rglob("ECG5000_TEST.*"))


def download_ecg5000(cache_dir: Path) -> Path:
    """Fetch and unzip ECG5000 into cache_dir once (pooch caches it); return the directory.
    Integrity is checked on the parsed values (ECG5000_DIGEST), not the zip bytes."""
    target = Path(cache_dir) / "ECG5000"
    if holds_ecg5000(target):
        return target
    try:
        pooch.retrieve(ECG5000_URL, known_hash=None, fname="ECG5000.zip", path=cache_dir,
                       processor=pooch.Unzip(extract_dir="ECG5000"), progressbar=False)
    except Exception as exc:  # requests/urllib/OS errors all mean "no copy"
        raise DataError(f"could not download ECG5000 from {ECG5000_URL} ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); for a local copy pass --data DIR or set TRAINER_DATA") from None
    return target
