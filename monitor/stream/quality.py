"""Fast signal-quality checks on a raw ECG segment (a beat or a few seconds), pure numpy.

Flat line, lead-off, saturation and heavy noise are not arrhythmias: beats from a bad segment are
scored but must not raise anomaly alerts (monitor.stream.policy.ScorePolicy takes the flag).

Checks, in the order they are reported (the first that fails names the reason):

- ``lead_off``: non-finite samples, or the same value held for `hold_s` seconds (a disconnected
  input is pinned at a rail, at zero, or at its last value; a live ECG never repeats a sample
  for 100 ms at 12 bits or more);
- ``flat``: peak-to-peak below `min_ptp` (signal units; 0.05 mV by default): no cardiac activity
  visible (could also be asystole, which this monitor cannot tell from a loose electrode);
- ``saturation``: the signal sits at its extreme (or a given rail) for `clip_s` seconds, first sample to last:
  an amplifier clipping its input; a real R peak touches its maximum for a sample or two. Measured as a span,
  not a count of samples: a smooth extremum stays within the tolerance for a time, and a count of k samples
  read as k/fs seconds let three samples of a broad wave at 128 Hz (15.6 ms) pass for 23 ms (the 48 MIT-BIH
  patients resampled to 128 Hz had 0.8% of their beats flagged so, 0.1% as a span; at 360 Hz 0.01%);
- ``noise``: share of the power above `hf_cutoff_hz` (EMG, motion, mains) in the total
  power above `baseline_hz`; ECG power is mostly below 40 Hz. This is the idea of Zhao &
  Zhang's pSQI (QRS band vs. wide band), as in neurokit2's ``ecg_quality(method="zhao2018")``,
  which costs 17-70 ms per 10 s segment there (R-peak detection included), too slow for the
  daemon's hot path; one rFFT costs tens of microseconds.

One more reason is decided per sensor, not here: ``artefact``, a beat unlike the sensor's usual beat and unlike
its last beats, in a burst of such beats (electrode motion, whose power lies in the ECG's own band:
monitor.stream.template).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

LEAD_OFF, FLAT, SATURATION, NOISE = "lead_off", "flat", "saturation", "noise"
ARTEFACT = "artefact"  # decided by the sensor's template (monitor.stream.template), not by `check`


@dataclass(frozen=True)
class QualityConfig:
    hold_s: float = 0.1  # lead-off: a value repeated this long
    min_ptp: float = 0.05  # flat: peak-to-peak below this (signal units: mV for most ECG)
    clip_s: float = 0.02  # saturation: at the extreme or a rail this long, first sample to last
    clip_tolerance: float = 0.002  # share of the range counted as "at the extreme"
    hf_cutoff_hz: float = 40.0
    baseline_hz: float = 0.5
    max_hf_ratio: float = 0.2  # noise: more than this share of the power above hf_cutoff_hz


class Quality(NamedTuple):
    ok: bool
    reason: str | None  # lead_off, flat, saturation or noise; None when ok
    hf_ratio: float  # the noise index (nan when not computed)


def check(values: np.ndarray, fs: float, config: QualityConfig | None = None,
          rails: tuple[float, float] | None = None) -> Quality:
    """Quality of one segment sampled at `fs` Hz; `rails`: the ADC's limits when known."""
    return check_many(np.asarray(values, dtype=np.float64).reshape(1, -1), fs, config, rails)[0]


def check_segments(segments: Sequence[np.ndarray], rates: Sequence[float],
                   config: QualityConfig | None = None) -> list[Quality]:
    """Quality of each segment at its rate. Segments of one length and rate are checked together
    (`check_many`): a batch of fixed windows costs one set of numpy calls instead of one per window."""
    groups: dict[tuple[int, float], list[int]] = {}
    for i, (segment, fs) in enumerate(zip(segments, rates, strict=True)):
        groups.setdefault((len(segment), fs), []).append(i)
    out: list[Quality] = [_LEAD_OFF] * len(segments)
    for (_, fs), rows in groups.items():
        for i, quality in zip(rows, check_many(np.stack([segments[i] for i in rows]), fs, config), strict=True):
            out[i] = quality
    return out


def check_many(segments: np.ndarray, fs: float, config: QualityConfig | None = None,
               rails: tuple[float, float] | None = None) -> list[Quality]:
    """Quality of each row of `segments` (n, length), all sampled at `fs` Hz; the same as `check`
    row by row. Every test runs on every row; the first that fails names the reason."""
    c = config or QualityConfig()
    x = np.asarray(segments, dtype=np.float64)
    if x.shape[1] < 2:
        return [_LEAD_OFF] * len(x)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows are lead-off whatever these give
        failed = [~np.isfinite(x).all(axis=1) | (longest_holds(x) >= c.hold_s * fs),
                  np.ptp(x, axis=1) < c.min_ptp,
                  clipped_runs(x, c.clip_tolerance, rails) >= max(c.clip_s * fs + 1, 3)]  # k samples span (k-1)/fs
        ratios = hf_ratios(x, fs, c.hf_cutoff_hz, c.baseline_hz)
    failed.append(ratios > c.max_hf_ratio)
    codes = np.select(failed, [1, 2, 3, 4], 0).tolist()
    return [_LEAD_OFF if code == 1 else _FLAT if code == 2 else _SATURATED if code == 3 else
            Quality(code == 0, None if code == 0 else NOISE, ratio)
            for code, ratio in zip(codes, ratios.tolist(), strict=True)]


_LEAD_OFF = Quality(False, LEAD_OFF, float("nan"))
_FLAT = Quality(False, FLAT, float("nan"))
_SATURATED = Quality(False, SATURATION, float("nan"))


def longest_holds(x: np.ndarray) -> np.ndarray:
    """Per row, the length of the longest run of exactly equal consecutive samples."""
    return _longest_runs(np.diff(x, axis=1) == 0) + 1


def clipped_runs(x: np.ndarray, tolerance: float, rails: tuple[float, float] | None = None) -> np.ndarray:
    """Per row, the longest run of consecutive samples at the row's top or bottom (within
    `tolerance` of its range), or beyond given rails: a clipped signal sits on a plateau, a peak passes."""
    if rails is None:
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    else:
        lo, hi = rails
    margin = tolerance * (hi - lo)
    runs: np.ndarray = np.maximum(_longest_runs(x >= hi - margin), _longest_runs(x <= lo + margin))
    return runs


def _longest_runs(mask: np.ndarray) -> np.ndarray:
    """Per row of a 2-d boolean array, the length of its longest run of True (0 when none)."""
    positions = np.arange(1, mask.shape[1] + 1)
    # At each position, the (1-based) position of the last False at or before it; 0 before the first.
    last_false = np.maximum.accumulate(np.where(mask, 0, positions), axis=1)
    runs: np.ndarray = (positions - last_false).max(axis=1)
    return runs


def hf_ratios(x: np.ndarray, fs: float, cutoff_hz: float = 40.0, baseline_hz: float = 0.5) -> np.ndarray:
    """Per row, the share of the power above `cutoff_hz` in the power above `baseline_hz` (0 when none)."""
    spectrum = np.abs(np.fft.rfft(x - x.mean(axis=1, keepdims=True), axis=1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[1], d=1.0 / fs)
    total, high = _row_sums(spectrum[:, freqs >= baseline_hz]), _row_sums(spectrum[:, freqs >= cutoff_hz])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios: np.ndarray = np.where(total > 0, high / total, 0.0)
    return ratios


def _row_sums(x: np.ndarray) -> np.ndarray:
    """Each row summed as a 1-d array is (pairwise): `sum(axis=1)` adds in another order, and its
    last bits would then depend on how many segments were checked together."""
    return np.fromiter((row.sum() for row in x), dtype=np.float64, count=len(x))


__all__ = ["ARTEFACT", "FLAT", "LEAD_OFF", "NOISE", "SATURATION", "Quality", "QualityConfig", "check", "check_many",
           "check_segments", "clipped_runs", "hf_ratios", "longest_holds"]
