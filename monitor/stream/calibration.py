"""Per-sensor calibration of reconstruction errors: each sensor is scored against its own normal.

A sensor's normal error level differs from the training data's (another patient, another lead,
another amplifier), and mostly by a *factor*, so the calibration works on log errors:

    score = (log(error) - location) / scale

where `location` and `scale` are a robust centre and spread (median and normal-consistent MAD)
of this sensor's normal log errors. A score of 3 means "3 robust SDs above this sensor's normal".

Lifecycle of one sensor's state:

1. **calibrating** (the first `warmup_beats` beats, 150 = 2.5 min at 60 bpm): the log errors are
   buffered; scores are taken against the model's prior (the artefact's validation error stats),
   and the policy raises only *gross* alerts (see `Calibrated.gross`).
2. At the end of the warm-up the baseline is the sigma-clipped median/MAD of the buffer: median and
   MAD, drop beats further than `clip` scales away, repeat. The median survives up to half of
   the beats being ectopic; clipping then removes ectopic beats that are clearly apart, so a
   third of ectopic beats moves the baseline little (tests/test_calibration.py measures it).
3. **calibrated**: location and scale adapt slowly by stochastic approximation of the median and
   of the MAD (each beat nudges them by `adapt_rate` scales towards its side), from beats whose
   score is at most `update_gate` and whose signal quality is good, so anomalous runs do not
   teach the baseline. A drift of d scales is followed in about d / adapt_rate beats.

Gross rule (any time, documented for the alarm design): a beat is *gross* when its raw error is
above `gross_multiple` (3) times the model's global threshold; the policy fires on a run of
gross beats even while the sensor calibrates.

The state is a few numbers plus, only while calibrating, the warm-up buffer (at most
`warmup_beats` floats), and round-trips exactly through `to_dict`/`from_dict` (JSON floats
round-trip), so a restored sensor continues bit for bit. Everything is deterministic: the same
errors in the same order give the same state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

#: MAD -> standard deviation for normally distributed data.
MAD_TO_SD = 1.4826
#: The 95th percentile of a standard normal (to read a scale off p50 and p95).
Z95 = 1.6449
#: Errors below this are treated as this (log of zero).
MIN_ERROR = 1e-12

CALIBRATING, CALIBRATED = "calibrating", "calibrated"


@dataclass(frozen=True)
class Prior:
    """The model-level baseline (log units) that seeds every sensor, and the model's threshold."""

    location: float
    scale: float
    threshold: float

    @classmethod
    def from_errors(cls, errors: Sequence[float] | np.ndarray, threshold: float) -> Prior:
        """From the model's validation errors of normal beats."""
        location, scale = robust_baseline(np.log(np.maximum(np.asarray(errors, dtype=np.float64), MIN_ERROR)))
        return cls(location, scale, float(threshold))

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], threshold: float) -> Prior:
        """From an artefact's `metadata["validation_errors"]` (p50 and p95 of normal errors)."""
        p50, p95 = float(stats["p50"]), float(stats["p95"])
        if not 0 < p50 < p95:
            raise ValueError(f"need 0 < p50 < p95 in the validation error stats, got p50={p50} p95={p95}")
        return cls(math.log(p50), (math.log(p95) - math.log(p50)) / Z95, float(threshold))


@dataclass(frozen=True)
class CalibrationConfig:
    warmup_beats: int = 150
    clip: float = 3.0  # warm-up: sigma-clipping distance, in scales
    adapt_rate: float = 0.005  # after warm-up: step of the median/MAD trackers, in scales
    update_gate: float = 3.0  # beats scoring above this do not adapt the baseline
    min_scale_ratio: float = 0.5  # scale floor, as a share of the prior's (no division by ~0)
    gross_multiple: float = 3.0  # gross beat: error > gross_multiple * model threshold

    def __post_init__(self) -> None:
        if self.warmup_beats < 3 or self.clip <= 0 or not 0 < self.adapt_rate < 1 or self.min_scale_ratio <= 0:
            raise ValueError(f"invalid calibration config {self}")


class Calibrated(NamedTuple):
    """One beat's calibrated score. `calibrating`: scored against the prior, no ordinary alerts."""

    score: float
    calibrating: bool
    gross: bool


@dataclass
class CalibrationState:
    """One sensor's state; `to_dict()` is what a changelog record carries."""

    beats: int = 0  # beats seen (saturates at the warm-up length; only the phase matters after)
    location: float = 0.0
    scale: float = 1.0
    warmup: list[float] = field(default_factory=list)  # log errors, only while calibrating

    def to_dict(self) -> dict[str, Any]:
        return {"beats": self.beats, "location": self.location, "scale": self.scale, "warmup": list(self.warmup)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationState:
        return cls(int(data["beats"]), float(data["location"]), float(data["scale"]),
                   [float(x) for x in data.get("warmup", [])])


class Calibrator:
    """Pure functions of (prior, config) over per-sensor `CalibrationState`s."""

    def __init__(self, prior: Prior, config: CalibrationConfig | None = None) -> None:
        self.prior = prior
        self.config = config or CalibrationConfig()
        self.min_scale = self.config.min_scale_ratio * prior.scale

    def new_state(self) -> CalibrationState:
        return CalibrationState(0, self.prior.location, self.prior.scale)

    def phase(self, state: CalibrationState) -> str:
        return CALIBRATING if state.beats < self.config.warmup_beats else CALIBRATED

    def threshold_error(self, state: CalibrationState, score: float) -> float:
        """The raw error that this sensor's baseline maps to `score` (for reports and metrics)."""
        return math.exp(state.location + score * state.scale)

    def update(self, state: CalibrationState, error: float, good_quality: bool = True) -> Calibrated:
        """Score one beat's error, then learn from it (warm-up buffer or slow adaptation).
        Bad-quality beats are scored but teach nothing."""
        if not math.isfinite(error):  # would poison the baseline and the aggregate for good
            raise ValueError(f"non-finite reconstruction error {error!r}")
        x = math.log(max(float(error), MIN_ERROR))
        calibrating = state.beats < self.config.warmup_beats
        score = (x - state.location) / state.scale
        gross = error > self.config.gross_multiple * self.prior.threshold
        if not good_quality:
            return Calibrated(score, calibrating, gross)
        if calibrating:
            state.warmup.append(x)
            state.beats += 1
            if state.beats == self.config.warmup_beats:
                location, scale = robust_baseline(np.asarray(state.warmup), self.config.clip)
                state.location, state.scale = location, max(scale, self.min_scale)
                state.warmup = []
        elif score <= self.config.update_gate:
            self._adapt(state, x)
        return Calibrated(score, calibrating, gross)

    def _adapt(self, state: CalibrationState, x: float) -> None:
        # Sign updates track the median of x and of |x - location| (the MAD) at a fixed pace in
        # scales, whatever the size of the deviation: bounded influence per beat.
        step = self.config.adapt_rate
        state.location += step * state.scale * _sign(x - state.location)
        half_width = state.scale / MAD_TO_SD  # the MAD that this scale implies
        state.scale = max(state.scale * math.exp(step * _sign(abs(x - state.location) - half_width)),
                          self.min_scale)


def _sign(v: float) -> float:
    return 1.0 if v > 0 else -1.0 if v < 0 else 0.0


def robust_baseline(values: np.ndarray, clip: float = 3.0, max_iter: int = 10) -> tuple[float, float]:
    """(median, MAD as SD) after iterative clipping at `clip` scales: robust to a minority of
    outliers even when they are many (a third of the beats ectopic)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values")
    kept = x
    for _ in range(max_iter):
        location = float(np.median(kept))
        scale = MAD_TO_SD * float(np.median(np.abs(kept - location)))
        if scale == 0.0:
            return location, 0.0
        inside = x[np.abs(x - location) <= clip * scale]
        if len(inside) == len(kept):
            break
        kept = inside
    return location, scale


__all__ = ["CALIBRATED", "CALIBRATING", "Calibrated", "CalibrationConfig", "CalibrationState", "Calibrator",
           "Prior", "robust_baseline"]
