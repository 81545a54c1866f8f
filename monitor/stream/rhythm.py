"""Per-sensor rhythm score: how much earlier than this sensor's usual rhythm a beat came.

The shape score (the autoencoder's calibrated reconstruction error) cannot see an arrhythmia whose
beats have a normal shape: atrial premature beats, a supraventricular run, the onset of atrial
fibrillation. What marks them is timing, and timing carries across patients without training: a
beat is *premature* when its interval from the previous R peak is short against the median of the
intervals before it (the ratio is about 1 for every patient in sinus rhythm, whatever the rate).

    ratio = interval / median(previous `history` intervals)
    score = max(0, (location - ratio) / scale)

`location` and `scale` are the sensor's own robust centre and spread of the ratio, learnt over its
first `warmup_beats` beats like the shape baseline (monitor.stream.calibration.robust_baseline,
with a floor `min_scale`: a metronome-regular sensor would otherwise turn a 5% early beat into a
huge score), so a patient whose rate varies a lot from beat to beat (sinus arrhythmia) needs a
larger jump than a regular one. The score is one-sided: a late beat (a compensatory pause, a
missed detection) is not by itself evidence of an arrhythmia.

The alert policy's input for a beat is its shape input (the calibrated shape score, or the template
score where larger: monitor.stream.template) plus `rhythm_weight` (a `ScorePolicyConfig` field, 0.5
by default) times its rhythm score: premature *and* abnormal beats (ventricular ectopy) add up, a
premature beat of normal shape (atrial ectopy) counts for half, and a run of them fires. Why the sum
at half weight: on the 48 other patients of the MIT-BIH Arrhythmia Database the autoencoder alone
scored ventricular beats against normal ones at a median per-patient AUROC of 0.80 (below chance for
10 of 26 patients with ventricular ectopy), because a beat's window spans its R peak to the next (the
ECG5000 convention): a premature beat's own window holds its compensatory pause. At weight 0.5 the
false alerts on their normal stretches stayed at 0.16 per hour while the runs of 3+ ectopic beats
with an alert open rose from 7 to 52 of 414 (docs/model-card.md, "Other patients").

A beat is also *fast* when its interval is under `fast_interval_s` (a rate over 100 beats a minute, the
textbook floor of ventricular tachycardia) and under `fast_ratio` times the median of the intervals before it
(early against this sensor's own rhythm, so a sinus tachycardia that is the patient's usual rate is not): the
alert policy fires on a run of fast beats that are each unlike the sensor's usual beat
(`ScorePolicyConfig.fast_run_beats`).

An interval longer than `max_interval_s`, or an R peak at or before the previous one (a new
segment, a device reset), restarts the interval history; until `history` intervals are known the
score is 0. The spread is fixed after the warm-up (runs of premature beats must not widen it). The state is a
few numbers (plus the warm-up buffer while it lasts), round-trips exactly through
`to_dict`/`from_dict`, and is deterministic.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from monitor.stream.calibration import robust_baseline

__all__ = ["RhythmConfig", "RhythmState", "RhythmScore", "RhythmScores", "Rhythm", "score_times"]


@dataclass(frozen=True)
class RhythmConfig:
    history: int = 8  # intervals whose median is the beat's reference
    warmup_beats: int = 150  # ratios the sensor learns its spread on (score 0 meanwhile)
    min_scale: float = 0.04  # floor of the spread: 20% early then scores 5 at most
    max_interval_s: float = 3.0  # a longer interval is a gap in the stream, not a beat
    fast_interval_s: float = 0.6  # a fast beat's interval is shorter than this (over 100 beats a minute) ...
    fast_ratio: float = 0.9  # ... and than this share of the median of the `history` intervals before it

    def __post_init__(self) -> None:
        if self.history < 1 or self.warmup_beats < 3 or self.min_scale <= 0 or self.max_interval_s <= 0 \
                or self.fast_interval_s <= 0 or self.fast_ratio <= 0:
            raise ValueError(f"invalid rhythm config {self}")


class RhythmScore(NamedTuple):
    """One beat's rhythm: how premature it came (`score`) and whether it is fast (module docstring)."""

    score: float
    fast: bool = False


class RhythmScores(NamedTuple):
    """A stream's `RhythmScore`s as arrays."""

    score: np.ndarray
    fast: np.ndarray


@dataclass
class RhythmState:
    """One sensor's rhythm; `to_dict()` is what a changelog record carries."""

    last_r: float | None = None  # the previous beat's R peak, in seconds of the sensor's stream
    intervals: list[float] = field(default_factory=list)  # the last `history` intervals, seconds
    beats: int = 0  # ratios seen (saturates at the warm-up length)
    location: float = 1.0
    scale: float = 0.0  # 0 until the warm-up ends
    warmup: list[float] = field(default_factory=list)  # ratios, only while calibrating

    def to_dict(self) -> dict[str, Any]:
        return {"last_r": self.last_r, "intervals": list(self.intervals), "beats": self.beats,
                "location": self.location, "scale": self.scale, "warmup": list(self.warmup)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RhythmState:
        last_r = data.get("last_r")
        return cls(None if last_r is None else float(last_r), [float(x) for x in data.get("intervals", [])],
                   int(data.get("beats", 0)), float(data.get("location", 1.0)), float(data.get("scale", 0.0)),
                   [float(x) for x in data.get("warmup", [])])


class Rhythm:
    """Pure functions of the config over per-sensor `RhythmState`s."""

    def __init__(self, config: RhythmConfig | None = None) -> None:
        self.config = config or RhythmConfig()

    def update(self, state: RhythmState, r_peak_s: float, good_quality: bool = True) -> RhythmScore:
        """The rhythm of the beat whose R peak is at `r_peak_s` (seconds in the sensor's stream), then
        learn from it. A bad-quality beat scores 0 and changes nothing: its R peak may be noise, so the
        next interval is measured from the last good beat (a long interval, never a premature one)."""
        if not good_quality:
            return RhythmScore(0.0)
        interval = None if state.last_r is None else r_peak_s - state.last_r
        state.last_r = r_peak_s
        if interval is None or not 0 < interval <= self.config.max_interval_s:
            state.intervals = []  # a gap or a new segment: the rhythm before it says nothing now
            return RhythmScore(0.0)
        score, fast = 0.0, False
        if len(state.intervals) == self.config.history:
            ratio = interval / statistics.median(state.intervals)  # 8 floats: 10x faster than numpy's
            if state.scale > 0:
                score = max(0.0, (state.location - ratio) / state.scale)
            fast = interval < self.config.fast_interval_s and ratio < self.config.fast_ratio
            self._learn(state, ratio)
        state.intervals = (state.intervals + [interval])[-self.config.history:]
        return RhythmScore(score, fast)

    def calibrating(self, state: RhythmState) -> bool:
        return state.beats < self.config.warmup_beats

    def _learn(self, state: RhythmState, ratio: float) -> None:
        if not self.calibrating(state):
            return  # the spread is fixed after the warm-up: premature runs must not widen it
        # 4 decimals (the spread's floor is 0.04): the buffer goes into every changelog record while the sensor
        # calibrates, and full float reprs made those records a third larger (beats-mode drain 10% slower)
        state.warmup.append(round(ratio, 4))
        state.beats += 1
        if state.beats == self.config.warmup_beats:
            location, scale = robust_baseline(np.asarray(state.warmup))
            state.location, state.scale = location, max(scale, self.config.min_scale)
            state.warmup = []


def score_times(r_peaks_s: np.ndarray, good_quality: np.ndarray | None = None,
                config: RhythmConfig | None = None) -> RhythmScores:
    """The rhythm of every beat of one sensor's stream (R peaks in seconds, in order; bad-quality beats
    score 0, are not fast and teach nothing), from a fresh state: what the daemon computes beat by beat (the
    trainer's stream evaluation uses it)."""
    rhythm, state = Rhythm(config), RhythmState()
    times = np.asarray(r_peaks_s, dtype=np.float64)
    good = np.ones(len(times), dtype=bool) if good_quality is None else np.asarray(good_quality, dtype=bool)
    beats = [rhythm.update(state, float(t), bool(ok)) for t, ok in zip(times, good, strict=True)]
    return RhythmScores(np.array([b.score for b in beats], dtype=np.float64),
                        np.array([b.fast for b in beats], dtype=bool))
