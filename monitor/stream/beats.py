"""Beat segmentation: a continuous single-lead ECG and its R peaks in, beat windows of the model's length out.

The convention reproduces ECG5000 (docs/beats.md has the evidence): a beat spans one R-to-next-R interval,
starting a fixed fraction of that interval before its R peak, so the R peak always lands on the same output
index; it is band-pass filtered, interpolated to `length` samples, given the convention's QRS polarity and
z-normalised.

Determinism: a beat depends only on the samples in a fixed margin around it. Each beat filters its own
slice [start - margin, end + margin] with a zero-phase filter, then interpolates; the slice is located by
absolute sample index (seq), so the trainer (whole recording) and the daemon (a bounded per-sensor buffer
that starts anywhere) cut bit-identical beats from the same samples.

Polarity is never decided per beat (that would make an inverted ventricular beat look normal): it is one
sign per recording or sensor, estimated once by `estimate_polarity` from its first beats (or known from the
lead) and passed to `segment`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import signal as sps

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

Polarity = Literal[-1, 1]


@dataclass(frozen=True)
class BeatConvention:
    """How beats are cut; stored in the model artefact as its windowing convention.

    pre_r: the beat starts this fraction of its RR interval before its R peak (ECG5000: ~3/140, the QRS
    extremum sits on output sample 3). The beat ends where the next one starts, one RR later.
    band_hz / filter_order: zero-phase Butterworth band-pass applied to each beat's slice (margin_s either side)
    before interpolation. The 40 Hz top also keeps linear interpolation to 140 samples alias-free for RR
    up to 140 / (2 * 40) = 1.75 s (heart rates above 34 bpm).
    qrs_polarity: sign of the dominant QRS deflection the model was trained on (ECG5000: negative).
    normalise: "zscore" per beat (mean 0, sample std 1, as ECG5000), or "none".
    """

    kind: Literal["beats"] = "beats"
    length: int = 140
    pre_r: float = 3 / 140
    band_hz: tuple[float, float] = (0.5, 40.0)
    filter_order: int = 2
    margin_s: float = 1.0
    qrs_polarity: Polarity = -1
    normalise: Literal["zscore", "none"] = "zscore"

    def __post_init__(self) -> None:
        if self.length < 2 or not 0.0 <= self.pre_r < 1.0 or self.margin_s < 0.0:
            raise ValueError(f"invalid beat convention: {self}")
        low, high = self.band_hz
        if not 0.0 < low < high:
            raise ValueError(f"band_hz must be 0 < low < high, got {self.band_hz}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["band_hz"] = list(self.band_hz)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BeatConvention:
        if data.get("kind") != "beats":
            raise ValueError(f"not a beat convention: {data!r}")
        fields = dict(data)
        if "band_hz" in fields:
            low, high = fields["band_hz"]
            fields["band_hz"] = (float(low), float(high))
        return cls(**fields)

    def margin(self, fs: float) -> int:
        """Samples of context filtered on each side of a beat."""
        return int(round(self.margin_s * fs))


@dataclass(frozen=True)
class Beats:
    """Beats cut from one signal; beat i spans R peak i to R peak i + 1 of the input."""

    windows: npt.NDArray[np.float32]  # (n, length)
    r_peak: IntArray  # (n,) sample index of each beat's R peak
    start: IntArray  # (n,) the span [start, end) in sample indices (its real-valued ends rounded down);
    end: IntArray  # (n,) consecutive beats tile the signal when their RR intervals are equal
    rr_s: FloatArray  # (n,) R-to-next-R interval in seconds
    flipped: npt.NDArray[np.bool_]  # (n,) whether each beat was negated to the convention's QRS sign

    def __len__(self) -> int:
        return len(self.r_peak)

    def recorded_windows(self) -> npt.NDArray[np.float32]:
        """The windows the way up the lead records them (the per-sensor template compares beats so: a polarity
        estimate that changes sign along a recording with a balanced QRS must not look like a change of shape)."""
        return as_recorded(self.windows, self.flipped).astype(np.float32)


def as_recorded(windows: npt.NDArray[Any], flipped: npt.NDArray[np.bool_]) -> npt.NDArray[Any]:
    """Beat windows (n, ...) the way up the lead records them: negated back where `flipped` to the convention."""
    out: npt.NDArray[Any] = np.where(flipped.reshape(-1, *[1] * (windows.ndim - 1)), -windows, windows)
    return out


def beat_extent(r_peak: int, next_r: int, fs: float, convention: BeatConvention) -> tuple[int, int]:
    """Sample range [lo, hi) a beat needs, margin included: what a streaming caller must keep buffered."""
    rr = next_r - r_peak
    start = r_peak - convention.pre_r * rr
    margin = convention.margin(fs)
    return int(np.floor(start)) - margin, int(np.floor(start + rr)) + 2 + margin


def segment(
    signal: npt.ArrayLike,
    fs: float,
    r_peaks: npt.ArrayLike,
    convention: BeatConvention,
    *,
    offset: int = 0,
    polarity: Polarity | None = None,
) -> Beats:
    """Cut one beat per consecutive pair of R peaks.

    signal: one lead; signal[k] is the sample with index offset + k (a daemon's buffer starts anywhere).
    r_peaks: increasing sample indices (in the same absolute indexing); the last one only closes a beat.
    polarity: the recording's dominant QRS sign (see `estimate_polarity`); beats are flipped when it differs
    from the convention's. None leaves the signal as it is.
    Beats whose span plus margin is not entirely inside the signal are skipped, so every beat that comes
    out depends only on its own neighbourhood.
    """
    x = np.asarray(signal, dtype=np.float64)
    peaks = np.asarray(r_peaks, dtype=np.int64)
    sign = 1.0 if polarity is None or polarity == convention.qrs_polarity else -1.0
    band = bandpass(fs, convention.band_hz, convention.filter_order)
    rows: list[FloatArray] = []
    kept: list[int] = []
    for i in range(len(peaks) - 1):
        r, nxt = int(peaks[i]), int(peaks[i + 1])
        if nxt <= r:
            raise ValueError("r_peaks must be strictly increasing")
        lo, hi = beat_extent(r, nxt, fs, convention)
        if lo < offset or hi > offset + len(x):
            continue
        rows.append(_cut(x[lo - offset : hi - offset], lo, r, nxt, band, convention))
        kept.append(i)
    idx = np.asarray(kept, dtype=np.int64)
    r0, r1 = peaks[idx], peaks[idx + 1]
    rr = (r1 - r0).astype(np.float64)
    start = np.floor(r0 - convention.pre_r * rr).astype(np.int64)
    windows = np.asarray(rows, dtype=np.float64).reshape(len(rows), convention.length) * sign
    return Beats(
        windows=windows.astype(np.float32),
        r_peak=r0,
        start=start,
        end=np.floor(r0 - convention.pre_r * rr + rr).astype(np.int64),
        rr_s=rr / fs,
        flipped=np.full(len(rows), sign < 0),
    )


def _cut(piece: FloatArray, lo: int, r: int, nxt: int, band: BandPass, convention: BeatConvention) -> FloatArray:
    """Filter one beat's own slice (sample index lo onwards), interpolate its span, normalise."""
    filtered = band.zero_phase(piece)
    rr = nxt - r
    # sample positions of the output, relative to the slice; endpoint excluded: the next beat starts there
    t = (r - convention.pre_r * rr - lo) + np.arange(convention.length) * (rr / convention.length)
    # linear interpolation: the span is a real-valued interval (no integer resampling ratio exists for
    # an arbitrary RR), the band-pass already removed what could alias, and it is what ECG5000 used
    beat: FloatArray = np.interp(t, np.arange(len(piece), dtype=np.float64), filtered)
    if convention.normalise == "zscore":
        std = float(beat.std(ddof=1))
        beat = (beat - beat.mean()) / (std if std > 0.0 else 1.0)
    return beat


@dataclass(frozen=True, eq=False)  # arrays: compared and hashed by identity
class BandPass:
    """A Butterworth band-pass as second-order sections, with what `scipy.signal.sosfiltfilt` would recompute
    on every call: its initial conditions and its padding. Every beat is filtered on its own slice, so per beat
    that recomputation (a linear solve per section) cost as much as the filtering itself."""

    sos: FloatArray
    zi: FloatArray  # sosfilt_zi(sos): the steady state for a unit step
    edge: int  # samples of odd extension at each end (sosfiltfilt's default padlen)

    @classmethod
    def design(cls, fs: float, band_hz: tuple[float, float], order: int) -> BandPass:
        low, high = band_hz
        high = min(high, 0.45 * fs)  # a low sampling rate cannot carry the top of the band
        sos: FloatArray = sps.butter(order, [low, high], btype="bandpass", fs=fs, output="sos")
        taps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
        return cls(sos, sps.sosfilt_zi(sos), 3 * taps)

    def zero_phase(self, x: FloatArray) -> FloatArray:
        """Forward-backward filtering of a 1-D signal: bit for bit `sosfiltfilt(self.sos, x)`."""
        x = np.asarray(x, dtype=np.float64)
        n = self.edge
        if len(x) <= n:
            raise ValueError(f"The length of the input vector x must be greater than padlen, which is {n}.")
        ext = np.concatenate((2 * x[:1] - x[n:0:-1], x, 2 * x[-1:] - x[-2 : -(n + 2) : -1]))  # odd extension
        y, _ = sps.sosfilt(self.sos, ext, zi=self.zi * ext[:1])
        y, _ = sps.sosfilt(self.sos, y[::-1], zi=self.zi * y[-1:])
        out: FloatArray = y[::-1][n:-n]
        return out


@lru_cache(maxsize=32)
def bandpass(fs: float, band_hz: tuple[float, float], order: int) -> BandPass:
    return BandPass.design(fs, band_hz, order)


def qrs_band(fs: float) -> BandPass:
    """5-30 Hz, where the QRS decides a lead's polarity: P and T waves and the baseline do not vote."""
    return bandpass(fs, (5.0, 30.0), 2)


def estimate_polarity(
    signal: npt.ArrayLike,
    fs: float,
    r_peaks: npt.ArrayLike,
    *,
    offset: int = 0,
    n_beats: int = 30,
) -> Polarity:
    """The recording's dominant QRS sign, from the median of its first `n_beats` beats.

    Compute it once per recording or sensor (for instance from the first 30 beats) and keep it: a per-beat
    decision would flip an inverted ventricular beat into a normal-looking one.
    """
    x = np.asarray(signal, dtype=np.float64)
    peaks = np.asarray(r_peaks, dtype=np.int64)[:n_beats] - offset
    half = max(1, int(round(0.06 * fs)))  # the QRS lasts about 120 ms
    peaks = peaks[(peaks >= half) & (peaks + half < len(x))]
    if len(peaks) == 0:
        raise ValueError("no complete QRS complex to estimate the polarity from")
    lo, hi = int(peaks[0]) - half, int(peaks[-1]) + half + 1
    filtered = qrs_band(fs).zero_phase(x[lo:hi])
    qrs = np.stack([filtered[p - lo - half : p - lo + half + 1] for p in peaks])
    median = np.median(qrs, axis=0)
    return 1 if median.max() >= -median.min() else -1
