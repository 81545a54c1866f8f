"""Online R-peak detection: the same peaks and beats whatever the record sizes, after a restart, at any rate."""

from __future__ import annotations

import numpy as np
import pytest
from support import at_rate

from monitor.stream.beats import BeatConvention, segment
from monitor.stream.rpeaks import BeatSpan, OnlineRPeakDetector

CONVENTION = BeatConvention()

pytest.importorskip("sleepecg")


def stream(signal: np.ndarray, fs: float, record_size: int, start: int = 0, **kwargs) -> tuple[
    OnlineRPeakDetector, list[BeatSpan]
]:
    detector = OnlineRPeakDetector(fs, CONVENTION, start_seq=start, **kwargs)
    out: list[BeatSpan] = []
    for seq in range(start, len(signal), record_size):
        out.extend(detector.push(seq, signal[seq : seq + record_size]))
    return detector, out


def se_ppv(found: np.ndarray, truth: np.ndarray, fs: float, n: int) -> tuple[float, float]:
    """Matched within 150 ms; the first and last 5 s are left out (a beat there cannot be completed)."""
    edge, tol = int(5 * fs), int(0.15 * fs)
    truth = truth[(truth >= edge) & (truth < n - edge)]
    found = found[(found >= edge - tol) & (found < n - edge + tol)]
    distance = np.abs(found[:, None] - truth[None, :]) if len(found) else np.zeros((0, len(truth)))
    hits_truth = (distance <= tol).any(axis=0).sum()
    hits_found = (distance <= tol).any(axis=1).sum()
    return hits_truth / len(truth), hits_found / max(1, len(found))


def r_peaks(beats: list[BeatSpan]) -> np.ndarray:
    return np.array([b.r_peak for b in beats] + [b.next_r_peak for b in beats[-1:]], dtype=np.int64)


@pytest.mark.parametrize("fs", [360, 125, 250, 500])
def test_five_minutes_of_record_100_at_any_rate(record_100, fs: int) -> None:
    signal, truth = at_rate(record_100, fs, seconds=300)
    _, beats = stream(signal, fs, record_size=int(10 * fs))
    se, ppv = se_ppv(r_peaks(beats), truth, fs, len(signal))
    assert se >= 0.995 and ppv >= 0.995


@pytest.mark.slow
@pytest.mark.parametrize("fs", [360, 125, 250, 500])
def test_all_of_record_100_at_any_rate(record_100, fs: int) -> None:
    signal, truth = at_rate(record_100, fs)
    _, beats = stream(signal, fs, record_size=int(10 * fs))
    se, ppv = se_ppv(r_peaks(beats), truth, fs, len(signal))
    assert se >= 0.995 and ppv >= 0.995


def test_record_size_does_not_change_the_beats(record_100) -> None:
    signal, _ = at_rate(record_100, 360, seconds=120)
    _, reference = stream(signal, 360, record_size=3600)
    for size in (1, 36, 777):
        _, beats = stream(signal, 360, record_size=size)
        assert [(b.r_peak, b.next_r_peak, b.start_seq) for b in beats] == [
            (b.r_peak, b.next_r_peak, b.start_seq) for b in reference
        ]
        assert all(np.array_equal(a.samples, b.samples) for a, b in zip(beats, reference, strict=True))


def test_redelivered_samples_are_skipped(record_100) -> None:
    signal, _ = at_rate(record_100, 360, seconds=60)
    detector = OnlineRPeakDetector(360, CONVENTION)
    beats: list[BeatSpan] = []
    for seq in range(0, len(signal), 1000):
        beats.extend(detector.push(max(0, seq - 500), signal[max(0, seq - 500) : seq + 1000]))
    _, reference = stream(signal, 360, record_size=1000)
    assert [b.r_peak for b in beats] == [b.r_peak for b in reference]
    with pytest.raises(ValueError, match="gap"):
        detector.push(len(signal) + 5, signal[:10])


@pytest.mark.parametrize("crash_after_s", [17, 33.5, 61])
def test_replay_from_the_lowest_needed_seq_gives_the_same_beats(record_100, crash_after_s: float) -> None:
    """Nothing is stored: a detector rebuilt from the replayed samples continues exactly."""
    signal, _ = at_rate(record_100, 360, seconds=120)
    crash = int(crash_after_s * 360)
    first = OnlineRPeakDetector(360, CONVENTION)
    before: list[BeatSpan] = []
    for seq in range(0, crash, 36):
        before.extend(first.push(seq, signal[seq : min(seq + 36, crash)]))
    resume = first.lowest_needed_seq
    assert resume <= before[-1].next_r_peak
    _, after = stream(signal, 360, record_size=36, start=resume)
    _, reference = stream(signal, 360, record_size=36)
    emitted = {b.r_peak for b in before}
    new = [b.r_peak for b in after if b.r_peak not in emitted]
    assert new == [b.r_peak for b in reference if b.r_peak not in emitted]
    assert new and new[0] == before[-1].next_r_peak  # the pending beat is completed, nothing skipped


def test_memory_is_bounded(record_100) -> None:
    signal, _ = at_rate(record_100, 360, seconds=300)
    detector = OnlineRPeakDetector(360, CONVENTION)
    most = 0
    for seq in range(0, len(signal), 360):
        detector.push(seq, signal[seq : seq + 360])
        most = max(most, detector.buffered_samples)
    cfg = detector.config
    bound = (cfg.window_s + cfg.votes * cfg.step_s + CONVENTION.margin_s + cfg.max_rr_s + 1.0) * 360
    assert most <= bound
    assert detector.lowest_needed_seq >= len(signal) - bound


def test_streamed_beats_match_the_offline_segmenter(record_100) -> None:
    """Trainer and daemon agree bit for bit: the streamed samples cut the same beat as the whole recording."""
    signal, _ = at_rate(record_100, 250, seconds=90)
    _, beats = stream(signal, 250, record_size=25)
    peaks = r_peaks(beats)
    offline = segment(signal, 250, peaks, CONVENTION, polarity=1)
    online = np.concatenate([
        segment(b.samples, 250, [b.r_peak, b.next_r_peak], CONVENTION, offset=b.start_seq, polarity=1).windows
        for b in beats
    ])
    assert len(offline) >= len(beats) - 1
    keep = np.isin([b.r_peak for b in beats], offline.r_peak)
    assert np.array_equal(online[keep], offline.windows)


def test_a_flat_or_silent_stream_gives_no_beats() -> None:
    detector = OnlineRPeakDetector(250, CONVENTION)
    assert detector.push(0, np.zeros(250 * 30)) == []
    assert detector.buffered_samples <= 250 * 12


def test_an_inverted_lead_gives_the_same_r_peaks(record_100) -> None:
    """Peaks sit on the most prominent QRS extremum, up or down: a lead with negative QRS is found alike."""
    signal, _ = at_rate(record_100, 250, seconds=120)
    _, upright = stream(signal, 250, record_size=250)
    _, inverted = stream(-signal, 250, record_size=250)
    assert [b.r_peak for b in inverted] == [b.r_peak for b in upright]


def test_joining_a_stream_late_agrees_with_a_detector_that_saw_it_all(record_100) -> None:
    signal, _ = at_rate(record_100, 360, seconds=90)
    _, reference = stream(signal, 360, record_size=360)
    _, late = stream(signal, 360, record_size=360, start=12_345)
    assert late and [b.r_peak for b in late] == [b.r_peak for b in reference if b.r_peak >= late[0].r_peak]
    assert late[0].r_peak < 12_345 + 12 * 360  # after one window of lead-in
