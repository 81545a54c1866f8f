"""Fast signal-quality checks on a raw ECG segment (a beat or a few seconds), pure numpy.

Flat line, lead-off, saturation and heavy noise are not arrhythmias: beats from a bad segment are
scored but must not raise anomaly alerts (monitor.stream.policy.ScorePolicy takes the flag).

Checks, in the order they are reported (the first that fails names the reason):

- ``lead_off``: non-finite samples, or the same value held for `hold_s` seconds (a disconnected
  input is pinned at a rail, at zero, or at its last value; a live ECG never repeats a sample
  for 100 ms at 12 bits or more);
- ``flat``: peak-to-peak below `min_ptp` (signal units; 0.05 mV by default): no cardiac activity
  visible (could also be asystole, which this monitor cannot tell from a loose electrode);
- ``saturation``: the signal sits at its extreme (or a given rail) for `clip_s` seconds in all:
  an amplifier clipping its input; a real R peak touches its maximum for a sample or two;
- ``noise``: share of the power above `hf_cutoff_hz` (EMG, motion, mains) in the total
  power above `baseline_hz`; ECG power is mostly below 40 Hz. This is the idea of Zhao &
  Zhang's pSQI (QRS band vs. wide band), as in neurokit2's ``ecg_quality(method="zhao2018")``,
  which costs 17-70 ms per 10 s segment there (R-peak detection included), too slow for the
  daemon's hot path; one rFFT costs tens of microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

LEAD_OFF, FLAT, SATURATION, NOISE = "lead_off", "flat", "saturation", "noise"


@dataclass(frozen=True)
class QualityConfig:
    hold_s: float = 0.1  # lead-off: a value repeated this long
    min_ptp: float = 0.05  # flat: peak-to-peak below this (signal units: mV for most ECG)
    clip_s: float = 0.02  # saturation: this long at the extreme or a rail, in all
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
    c = config or QualityConfig()
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) < 2 or not np.isfinite(x).all() or longest_hold(x) >= c.hold_s * fs:
        return Quality(False, LEAD_OFF, float("nan"))
    if np.ptp(x) < c.min_ptp:
        return Quality(False, FLAT, float("nan"))
    if clipped_samples(x, c.clip_tolerance, rails) >= max(c.clip_s * fs, 3):
        return Quality(False, SATURATION, float("nan"))
    ratio = hf_ratio(x, fs, c.hf_cutoff_hz, c.baseline_hz)
    if ratio > c.max_hf_ratio:
        return Quality(False, NOISE, ratio)
    return Quality(True, None, ratio)


def longest_hold(x: np.ndarray) -> int:
    """Length of the longest run of exactly equal consecutive samples."""
    changes = np.flatnonzero(np.diff(x) != 0)
    bounds = np.concatenate(([-1], changes, [len(x) - 1]))
    return int(np.diff(bounds).max())


def clipped_samples(x: np.ndarray, tolerance: float, rails: tuple[float, float] | None = None) -> int:
    """The longest run of consecutive samples at the segment's top or bottom (within `tolerance`
    of its range), or beyond given rails: a clipped signal sits on a plateau, a peak passes."""
    lo, hi = (float(x.min()), float(x.max())) if rails is None else rails
    margin = tolerance * (hi - lo)
    return max(_longest_true(x >= hi - margin), _longest_true(x <= lo + margin))


def _longest_true(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return int((np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).max())


def hf_ratio(x: np.ndarray, fs: float, cutoff_hz: float = 40.0, baseline_hz: float = 0.5) -> float:
    """Share of the power above `cutoff_hz` in the power above `baseline_hz` (0 when none)."""
    spectrum = np.abs(np.fft.rfft(x - x.mean())) ** 2
    freqs = np.fft.rfftfreq(len(x), d=1.0 / fs)
    total = float(spectrum[freqs >= baseline_hz].sum())
    return float(spectrum[freqs >= cutoff_hz].sum()) / total if total > 0 else 0.0


__all__ = ["FLAT", "LEAD_OFF", "NOISE", "SATURATION", "Quality", "QualityConfig", "check", "clipped_samples",
           "hf_ratio", "longest_hold"]
