"""Online R-peak detection for one sensor: samples in (any record sizes), complete beats out.

A batch detector (sleepecg's Pan-Tompkins variant, chosen by `python -m bench.rpeaks`) is re-run on fixed,
seq-aligned steps. Step k owns the peaks in the slice [k*S, (k+1)*S) of the sensor's samples; it runs once
the samples up to (k+1)*S + G are in, over the window [(k+1)*S + G - W, (k+1)*S + G): the guard G keeps the
owned slice away from the window's end (where the detector has not seen the next beats yet, and its
search-back has not fired), the lead-in before the slice lets its adaptive thresholds settle. So what a
step commits depends only on the samples of its window, never on record sizes or arrival chunking.

Each detection is then moved to the dominant QRS deflection nearby, by a score that depends on three samples
only, until it stops moving: two windows that see the same beat put it on the same sample, so a beat near a
slice boundary is owned by one slice. A committed peak closer than the refractory period to the previous one
is dropped (a safety net for double-peaked complexes).

A slice is judged once the three windows that see it (with it at G, G + S and G + 2S from their ends) have
run: a peak is committed when at least two of them found it (within 50 ms). Started at an unlucky phase, one
window can take a P or T wave for a beat in noise; the vote removes that (noisy synthetic ECG at 50 bpm:
PPV 94% -> 100%).

A beat is complete when its next R peak is committed; it comes out with the samples `segment` needs to cut it.
`lowest_needed_seq` says which samples the detector still needs: a detector rebuilt by replaying from there
(same origin) commits the same peaks and completes the same beats from that point on, so this state never
has to be stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from monitor.stream.beats import BeatConvention, beat_extent

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Detect = Callable[[FloatArray, float], IntArray]


def sleepecg_detect(x: FloatArray, fs: float) -> IntArray:
    """sleepecg's detector (BSD-3-Clause): a Pan-Tompkins variant with a zero-phase 5-30 Hz band-pass."""
    from sleepecg.heartbeats import detect_heartbeats  # imported on first use: the package import is slow

    if len(x) < 2 or np.all(x == x[0]):
        return np.zeros(0, dtype=np.int64)  # sleepecg refuses flat signals: no beats there
    return np.asarray(detect_heartbeats(x, fs), dtype=np.int64)


@dataclass(frozen=True)
class DetectorConfig:
    """Step S, guard G and window W in seconds; beats longer than max_rr_s are not cut."""

    step_s: float = 1.0
    guard_s: float = 2.5  # > sleepecg's search-back horizon (1.66 RR) for heart rates above 40 bpm
    window_s: float = 10.0
    refractory_s: float = 0.2
    refine_s: float = 0.15  # the dominant deflection is searched this far either side of a detection
    max_rr_s: float = 3.0
    votes: int = 3  # windows that judge each slice (the slice at guard G, G + S, G + 2S from their ends)
    vote_tolerance_s: float = 0.05


@dataclass(frozen=True)
class BeatSpan:
    """A complete beat: its R peak, the next R peak, and the samples `segment` needs to cut it."""

    r_peak: int
    next_r_peak: int
    start_seq: int  # seq of samples[0]
    samples: FloatArray

    @property
    def rr_samples(self) -> int:
        return self.next_r_peak - self.r_peak


class OnlineRPeakDetector:
    """Bounded, chunking-invariant R-peak detection for one sensor's stream of samples."""

    def __init__(
        self,
        fs: float,
        convention: BeatConvention,
        *,
        origin_seq: int = 0,
        start_seq: int | None = None,
        config: DetectorConfig | None = None,
        detect: Detect = sleepecg_detect,
    ) -> None:
        """origin_seq: the seq of the stream's very first sample (0 when a stream's seq starts at 0): windows
        never reach before it; keep it the same across restarts. start_seq: where the samples fed to this
        detector begin (a replay from an earlier detector's `lowest_needed_seq`, or where a late-joining
        consumer picks the stream up); defaults to the origin. Steps whose window would need samples before
        start_seq are skipped, so a detector started later agrees with one that saw everything."""
        self.fs = float(fs)
        self.convention = convention
        self.config = config or DetectorConfig()
        self._detect = detect
        cfg = self.config
        self._step = max(1, int(round(cfg.step_s * fs)))
        self._guard = int(round(cfg.guard_s * fs))
        self._window = max(self._step + self._guard, int(round(cfg.window_s * fs)))
        self._refine = max(1, int(round(cfg.refine_s * fs)))
        self._lag = max(1, int(round(0.05 * fs)))  # the refinement score's neighbours, either side
        self._refractory = int(round(cfg.refractory_s * fs))
        self._max_rr = int(round(cfg.max_rr_s * fs))
        self._origin = origin_seq
        start = origin_seq if start_seq is None else max(origin_seq, start_seq)
        self._next_window = self._first_slice(start)  # next step (window) to run
        self._next_slice = self._next_window  # next slice to commit, once its `votes` windows have run
        self._candidates: dict[int, list[int]] = {}  # window k -> its peaks, kept until its slices are judged
        self._vote_tolerance = int(round(cfg.vote_tolerance_s * fs))
        # samples [buffer_seq, expected_seq) live in _data[_head : _head + expected_seq - buffer_seq];
        # trimming only moves _head, appending compacts or grows _data when it is full (amortised O(1))
        self._data = np.zeros(max(1024, 2 * (self._window + self._step)), dtype=np.float64)
        self._head = 0
        self._buffer_seq = start
        self._expected_seq = start
        self._last_peak: int | None = None
        self.peaks_committed = 0
        self.beats_dropped = 0  # RR longer than max_rr_s (a pause, or missed beats): not cut

    # -- public ------------------------------------------------------------------------------------

    def push(self, seq: int, values: npt.ArrayLike) -> list[BeatSpan]:
        """Append a record's samples (seq of its first); returns the beats it completes.

        Samples already seen are skipped (redelivery); a record starting after the expected seq is a gap,
        which the caller handles by starting a new detector (a new segment).
        """
        x = np.asarray(values, dtype=np.float64).ravel()
        if seq > self._expected_seq:
            raise ValueError(f"gap: expected seq {self._expected_seq}, got {seq}")
        x = x[self._expected_seq - seq :]
        if len(x) == 0:
            return []
        self._append(x)
        beats: list[BeatSpan] = []
        while self._slice_end(self._next_window) + self._guard <= self._expected_seq:
            self._candidates[self._next_window] = self._window_peaks(self._next_window)
            self._next_window += 1
            if self._next_window - self._next_slice >= self.config.votes:
                beats.extend(self._judge_slice(self._next_slice))
                self._candidates.pop(self._next_slice, None)
                self._next_slice += 1
        self._trim()
        return beats

    @property
    def lowest_needed_seq(self) -> int:
        """Replaying from this seq (a detector with start_seq=it) rebuilds the state: nothing else is stored."""
        needed = self._window_start(self._next_slice)
        if self._last_peak is not None:
            # re-derive the pending beat's R peak, and keep what cutting that beat needs
            needed = min(needed, self._window_start(self._slice_of(self._last_peak)))
            needed = min(needed, self._pending_beat_low(self._last_peak))
        return max(self._origin, needed)

    def replay_seq(self, peak: int) -> int:
        """A detector replaying from this seq (start_seq=it) commits `peak` again: the start of the window of
        the step that owns it. A caller that must re-derive an older beat keeps its samples from here."""
        return max(self._origin, self._window_start(self._slice_of(peak)))

    @property
    def buffered_samples(self) -> int:
        return self._expected_seq - self._buffer_seq

    # -- steps -------------------------------------------------------------------------------------

    def _window_peaks(self, k: int) -> list[int]:
        """Step k: the detector over window k, each detection refined, close pairs resolved."""
        lo, hi = self._window_start(k), self._slice_end(k) + self._guard
        found = np.unique(self._detect(self._samples(lo, hi), self.fs)) + lo
        return self._resolve(sorted({self._refine_peak(int(p), lo, hi) for p in found}))

    def _judge_slice(self, j: int) -> list[BeatSpan]:
        """Commit the peaks of slice j that most of the windows j .. j + votes - 1 found (within 50 ms):
        one window, started at an unlucky phase, can take a P or T wave for a beat in noise; three rarely
        agree on it."""
        windows = [self._candidates.get(k, []) for k in range(j, j + self.config.votes)]
        majority = self.config.votes // 2 + 1
        owned = sorted({p for peaks in windows for p in peaks if self._slice_start(j) <= p < self._slice_end(j)})
        beats: list[BeatSpan] = []
        for peak in owned:
            votes = sum(any(abs(q - peak) <= self._vote_tolerance for q in peaks) for peaks in windows)
            if votes < majority:
                continue
            if self._last_peak is not None and peak - self._last_peak < self._refractory:
                continue
            beats.extend(self._commit(peak))
        return beats

    def _resolve(self, candidates: list[tuple[int, float]]) -> list[int]:
        """Of detections closer than the refractory period (a P or T wave taken for a beat), keep the most
        prominent: decided within one window, which sees both, so neighbouring slices agree."""
        kept: list[tuple[int, float]] = []
        for peak, prominence in candidates:
            if kept and peak - kept[-1][0] < self._refractory:
                if prominence > kept[-1][1]:
                    kept[-1] = (peak, prominence)
                continue
            kept.append((peak, prominence))
        return [peak for peak, _ in kept]

    def _commit(self, peak: int) -> list[BeatSpan]:
        previous, self._last_peak = self._last_peak, peak
        self.peaks_committed += 1
        if previous is None:
            return []
        if peak - previous > self._max_rr:
            self.beats_dropped += 1
            return []
        lo, hi = beat_extent(previous, peak, self.fs, self.convention)
        if lo < max(self._origin, self._buffer_seq) or hi > self._expected_seq:
            # the stream began inside its margin, or the margin after it is not in yet (a huge margin)
            self.beats_dropped += 1
            return []
        return [BeatSpan(previous, peak, lo, self._samples(lo, hi).copy())]

    def _refine_peak(self, p: int, window_lo: int, window_hi: int) -> tuple[int, float]:
        """Move a detection to the most prominent extremum within +-refine, until it stays.

        Prominence of x[n] over its neighbours at +-lag (50 ms): how far it stands above both, or below both.
        It depends on three raw samples, so it is the same whichever window found the beat, and it has no side
        lobes at +-lag (unlike x[n] minus their mean), so the walk stops on the R (or S) extremum itself.
        """
        prominence = 0.0
        for _ in range(8):
            lo = max(p - self._refine, window_lo + self._lag)
            hi = min(p + self._refine + 1, window_hi - self._lag)
            if hi <= lo:
                break
            mid = self._samples(lo, hi)
            before = self._samples(lo - self._lag, hi - self._lag)
            after = self._samples(lo + self._lag, hi + self._lag)
            score = np.maximum(mid - np.maximum(before, after), np.minimum(before, after) - mid)
            best = int(np.argmax(score))
            prominence = float(score[best])
            if lo + best == p:
                break
            p = lo + best
        return p, prominence

    # -- buffer and slice arithmetic ---------------------------------------------------------------

    def _samples(self, lo: int, hi: int) -> FloatArray:
        base = self._head - self._buffer_seq
        return self._data[base + lo : base + hi]

    def _append(self, x: FloatArray) -> None:
        used = self._expected_seq - self._buffer_seq
        if self._head + used + len(x) > len(self._data):
            data = self._data if used + len(x) <= len(self._data) // 2 else np.zeros(2 * (used + len(x)))
            data[:used] = self._data[self._head : self._head + used]
            self._data, self._head = data, 0
        self._data[self._head + used : self._head + used + len(x)] = x
        self._expected_seq += len(x)

    def _trim(self) -> None:
        keep_from = min(self.lowest_needed_seq, self._expected_seq)
        drop = keep_from - self._buffer_seq
        if drop > 0:
            self._head += drop
            self._buffer_seq = keep_from
            if self._expected_seq == self._buffer_seq:
                self._head = 0

    def _pending_beat_low(self, r_peak: int) -> int:
        """Earliest sample the beat starting at r_peak may need (its RR is not known yet: at most max_rr)."""
        lo, _ = beat_extent(r_peak, r_peak + self._max_rr, self.fs, self.convention)
        return lo - self._refine - self._lag

    def _slice_start(self, k: int) -> int:
        return k * self._step

    def _slice_end(self, k: int) -> int:
        return (k + 1) * self._step

    def _slice_of(self, seq: int) -> int:
        return seq // self._step

    def _window_start(self, k: int) -> int:
        return max(self._origin, self._slice_end(k) + self._guard - self._window)

    def _first_slice(self, start: int) -> int:
        """The slice holding the origin, or after a replay from `start` the first whose whole window is in."""
        first = self._slice_of(self._origin)
        if start <= self._origin:
            return first
        unclipped = -((self._guard - self._window - start) // self._step) - 1  # ceil((start + W - G) / S) - 1
        return max(first, unclipped)
