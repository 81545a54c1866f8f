"""Which beat convention reproduces ECG5000? The evidence behind BeatConvention's defaults (docs/beats.md).

    python -m bench.convention

ECG5000's normal beats are measured (where the QRS extremum sits, what the last samples show), then MIT-BIH
record 100 is cut by candidate conventions (R-to-next-R with a pre-R offset as a fraction of RR or in seconds;
fixed windows around R) and each mean beat, z-normalised, is correlated with ECG5000's mean normal beat, with
and without a polarity flip. Writes bench/results/convention.json and docs/beats.png.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from bench.rpeaks import BEAT_SYMBOLS, MITDB_100, RESULTS
from monitor.stream.beats import BeatConvention, segment

ECG5000 = MITDB_100.parents[1] / "ECG5000"
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "beats.png"


def ecg5000_normal() -> np.ndarray:
    data = np.vstack([np.loadtxt(ECG5000 / f"ECG5000_{part}.txt") for part in ("TRAIN", "TEST")])
    return data[data[:, 0] == 1, 1:]


def qrs_width(beat: np.ndarray, at: int) -> int:
    """Samples around the extremum below half its depth."""
    half, lo, hi = beat[at] / 2, at, at
    while lo > 0 and beat[lo - 1] < half:
        lo -= 1
    while hi < len(beat) - 1 and beat[hi + 1] < half:
        hi += 1
    return hi - lo + 1


def ecg5000_facts(beats: np.ndarray) -> dict[str, object]:
    nadir = beats.argmin(axis=1)
    width = np.array([qrs_width(b, int(a)) for b, a in zip(beats, nadir, strict=True)])
    late_peak = 90 + beats[:, 90:125].argmax(axis=1)  # the largest wave of the last third (P wave)
    return {
        "normal_beats": len(beats),
        "qrs_nadir_index_p5_p50_p95": np.percentile(nadir, [5, 50, 95]).tolist(),
        "mean_beat_min_index": int(beats.mean(axis=0).argmin()),
        "mean_beat_min": float(beats.mean(axis=0).min()),
        "mean_beat_max": float(beats.mean(axis=0).max()),
        "share_last_sample_falls": float(np.mean(beats[:, 139] < beats[:, 138])),
        "median_last_step": float(np.median(beats[:, 139] - beats[:, 138])),
        "qrs_half_width_p5_p50_p95": np.percentile(width, [5, 50, 95]).tolist(),
        "spearman_nadir_vs_qrs_width": float(stats.spearmanr(nadir, width)[0]),
        "spearman_late_peak_to_end_vs_qrs_width": float(stats.spearmanr(140 - late_peak, width)[0]),
    }


def mitdb_100(lead: int) -> tuple[np.ndarray, float, np.ndarray]:
    import wfdb

    record = wfdb.rdrecord(str(MITDB_100))
    ann = wfdb.rdann(str(MITDB_100), "atr")
    peaks = np.array([s for s, c in zip(ann.sample, ann.symbol, strict=True) if c in BEAT_SYMBOLS], dtype=np.int64)
    return record.p_signal[:, lead].astype(np.float64), float(record.fs), peaks


def fixed_windows(x: np.ndarray, fs: float, peaks: np.ndarray, pre_s: float, width_s: float) -> np.ndarray:
    """Windows of width_s starting pre_s before R, band-passed, flipped and z-scored like the beats."""
    convention = BeatConvention(pre_r=0.0)
    pre, width = int(round(pre_s * fs)), int(round(width_s * fs))
    # a fixed window is an R-to-"R" span of constant length starting pre samples earlier
    starts = peaks[1:-1] - pre
    pairs = [segment(x, fs, [s, s + width], convention, polarity=1).windows for s in starts[::3]]
    return np.concatenate([p for p in pairs if len(p)])


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    normal = ecg5000_normal()
    target = normal.mean(axis=0)
    facts = ecg5000_facts(normal)
    rows: list[dict[str, Any]] = []
    chosen = BeatConvention()
    for lead, name in ((0, "MLII"), (1, "V5")):
        x, fs, peaks = mitdb_100(lead)
        for pre_r in (0.0, 0.01, 3 / 140, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15):
            beats = segment(x, fs, peaks, replace(chosen, pre_r=pre_r), polarity=1)
            mean = beats.windows.mean(axis=0)
            rows.append({"lead": name, "convention": f"R-to-R, pre-R {pre_r:.3f} RR", "flipped": corr(mean, target),
                         "as_is": corr(-mean, target), "per_beat_flipped": float(np.mean(
                             [corr(b, target) for b in beats.windows[::5]]))})
        for pre_s in (0.05, 0.1, 0.2, 0.25, 0.3):
            for width_s in (0.6, 0.8, 1.0):
                mean = fixed_windows(x, fs, peaks, pre_s, width_s).mean(axis=0)
                rows.append({"lead": name, "convention": f"fixed {width_s:.1f} s from R - {pre_s:.2f} s",
                             "flipped": corr(mean, target), "as_is": corr(-mean, target), "per_beat_flipped": None})
        facts[f"mitdb100_{name}_median_rr_s"] = float(np.median(np.diff(peaks)) / fs)
    rows.sort(key=lambda r: -float(r["flipped"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "convention.json").write_text(json.dumps({"ecg5000": facts, "mitdb100": rows}, indent=1) + "\n")
    for row in rows:
        print(f"{row['lead']:5} {row['convention']:32} flipped {row['flipped']:+.3f}  as is {row['as_is']:+.3f}")
    print(json.dumps(facts, indent=1))
    draw(target, chosen)


def draw(target: np.ndarray, chosen: BeatConvention) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, fs, peaks = mitdb_100(0)
    beats = segment(x, fs, peaks, chosen, polarity=1)  # MLII's QRS is positive: flipped to the convention's
    fixed = fixed_windows(x, fs, peaks, 0.25, 0.8)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(target, label="ECG5000 mean normal beat (chf07, 250 Hz)", color="black")
    ax.plot(beats.windows.mean(axis=0), label="MIT-BIH 100 MLII, R-to-R, pre-R 3/140 RR, flipped")
    ax.plot(fixed.mean(axis=0), label="MIT-BIH 100 MLII, fixed 0.8 s from R - 0.25 s, flipped", alpha=0.6, ls="--")
    ax.axvline(round(chosen.pre_r * chosen.length), color="grey", lw=0.5)
    ax.set_xlabel("sample of 140")
    ax.set_ylabel("z-score")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    FIGURE.parent.mkdir(exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


if __name__ == "__main__":
    main()
