"""Beat augmentation for patient-independent training.

Every transform mimics a difference between patients, leads or recordings that a normal beat
may show and an anomaly detector should not care about: a slightly different heart-rate shape
(time warp), where the window starts relative to the R peak (shift), residual baseline wander,
the size of the repolarisation (T wave) relative to the QRS and, optionally, its sign (leads differ:
with the QRS made negative, the T wave is upright in some leads and inverted in others), and noise.
Beats are re-z-scored afterwards, as the beat convention z-scores every beat. Nothing here flips
the QRS: polarity is fixed per recording by the segmenter, and an inverted QRS must stay anomalous.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Augmentation:
    """Strengths of each transform (0 switches it off); drawn independently per beat."""

    time_warp: float = 0.1  # largest stretch of the middle of the beat, as a fraction of its length
    shift: float = 0.02  # largest start offset, as a fraction of the beat
    wander: float = 0.3  # largest baseline sine amplitude, in beat standard deviations
    repolarisation_scale: float = 0.3  # largest relative gain of everything after the QRS
    repolarisation_flip: float = 0.0  # probability of inverting everything after the QRS
    noise: float = 0.05  # largest white-noise standard deviation, in beat standard deviations
    qrs_end: float = 0.15  # where the QRS ends in the window (ECG5000-like windows: R at ~2%)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: no transform at all (beats only re-z-scored): for a source whose own morphology must stay sharp
NONE = Augmentation(time_warp=0.0, shift=0.0, wander=0.0, repolarisation_scale=0.0, noise=0.0)


def augment(beats: np.ndarray, rng: np.random.Generator, spec: Augmentation = Augmentation()) -> np.ndarray:
    """Augmented copies of z-scored beats, shape (n, length) or (n, length, 1), float32, z-scored."""
    x = np.asarray(beats, dtype=np.float64)
    shape = x.shape
    x = x.reshape(len(x), -1)
    n, length = x.shape
    t = np.linspace(0.0, 1.0, length)
    x = _warp(x, t, rng.uniform(-spec.time_warp, spec.time_warp, (n, 1)),
              rng.uniform(-spec.shift, spec.shift, (n, 1)))
    wander = spec.wander * rng.uniform(-1, 1, (n, 1))
    x = x + wander * np.sin(2 * np.pi * (rng.uniform(0.1, 0.6, (n, 1)) * t + rng.random((n, 1))))
    after_qrs = 1 / (1 + np.exp(-(t - spec.qrs_end) * 60))  # smooth step at the end of the QRS
    gain = 1 + rng.uniform(-spec.repolarisation_scale, spec.repolarisation_scale, (n, 1))
    gain = np.where(rng.random((n, 1)) < spec.repolarisation_flip, -gain, gain)
    x = x * (1 + (gain - 1) * after_qrs)
    x = x + rng.normal(0.0, 1.0, x.shape) * (spec.noise * rng.random((n, 1)))
    x = (x - x.mean(axis=1, keepdims=True)) / np.maximum(x.std(axis=1, ddof=1, keepdims=True), 1e-6)
    out: np.ndarray = x.reshape(shape).astype(np.float32)
    return out


def _warp(x: np.ndarray, t: np.ndarray, stretch: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Resample each row at a smooth monotonic warp of time (|stretch| <= 0.3 keeps it monotonic)."""
    length = x.shape[1]
    warped = np.clip(t + stretch * 2 / np.pi * np.sin(np.pi * t) + shift, 0.0, 1.0) * (length - 1)
    left = np.minimum(np.floor(warped).astype(int), length - 2)
    frac = warped - left
    lo = np.take_along_axis(x, left, axis=1)
    hi = np.take_along_axis(x, left + 1, axis=1)
    warped_x: np.ndarray = lo * (1 - frac) + hi * frac
    return warped_x
