"""The beat segmenter: ECG5000-shaped beats, identical whether cut from a whole recording or a buffer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import signal as sps
from support import at_rate

from monitor.stream.beats import BeatConvention, bandpass, beat_extent, estimate_polarity, qrs_band, segment

ECG5000_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "ECG5000" / "ECG5000_TRAIN.txt"


@pytest.fixture(scope="module")
def record_100(record_100: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, float, np.ndarray]:
    """The first 5 minutes of MIT-BIH record 100 (conftest's record_100): lead MLII, its rate, its annotated beats."""
    signal, peaks = at_rate(record_100, 360, seconds=300)
    return signal, 360.0, peaks


def test_convention_round_trips_through_the_artefact_dict() -> None:
    convention = BeatConvention(pre_r=0.05, band_hz=(1.0, 35.0))
    data = convention.to_dict()
    assert data["kind"] == "beats" and data["length"] == 140
    assert BeatConvention.from_dict(data) == convention
    with pytest.raises(ValueError):
        BeatConvention.from_dict({"kind": "fixed"})


def test_beats_are_zscored_with_the_r_peak_on_the_conventions_sample(record_100) -> None:
    signal, fs, peaks = record_100
    convention = BeatConvention()
    beats = segment(signal, fs, peaks, convention, polarity=estimate_polarity(signal, fs, peaks))
    assert beats.windows.shape == (len(peaks) - 3, 140)  # the first and last beat lack their filter margin
    assert np.allclose(beats.windows.mean(axis=1), 0.0, atol=1e-5)
    assert np.allclose(beats.windows.std(axis=1, ddof=1), 1.0, atol=1e-5)
    # record 100's MLII has a positive R; the convention's (ECG5000's) QRS is negative
    r_index = round(convention.pre_r * convention.length)
    assert np.median(np.argmin(beats.windows, axis=1)) == pytest.approx(r_index, abs=1)
    assert np.allclose(beats.rr_s, np.diff(peaks)[1:-1] / fs)
    assert np.all(np.abs((beats.end - beats.start) - beats.rr_s * fs) <= 1)


def test_polarity_is_one_sign_per_recording(record_100) -> None:
    signal, fs, peaks = record_100
    assert estimate_polarity(signal, fs, peaks) == 1
    assert estimate_polarity(-signal, fs, peaks) == -1
    convention = BeatConvention()
    as_is = segment(signal, fs, peaks[:20], convention)
    flipped = segment(-signal, fs, peaks[:20], convention, polarity=-1)
    assert np.array_equal(segment(signal, fs, peaks[:20], convention, polarity=1).windows, -as_is.windows)
    assert np.array_equal(flipped.windows, -as_is.windows)


def test_a_beat_depends_only_on_its_neighbourhood(record_100) -> None:
    """A buffer that starts anywhere cuts bit-identical beats: what makes trainer and daemon agree."""
    signal, fs, peaks = record_100
    convention = BeatConvention()
    offline = segment(signal, fs, peaks, convention, polarity=1)
    for i in (5, 100, 250):
        lo, hi = beat_extent(int(peaks[i]), int(peaks[i + 1]), fs, convention)
        for extra in (0, 1, 777):
            buffer = signal[lo - extra : hi + extra]
            streamed = segment(buffer, fs, peaks[i : i + 2], convention, offset=lo - extra, polarity=1)
            k = int(np.searchsorted(offline.r_peak, peaks[i]))
            assert np.array_equal(streamed.windows[0], offline.windows[k])
            assert (streamed.start[0], streamed.end[0]) == (offline.start[k], offline.end[k])
        short = segment(signal[lo + 1 : hi], fs, peaks[i : i + 2], convention, offset=lo + 1)
        assert len(short) == 0  # not enough context: skipped rather than cut differently


@pytest.mark.parametrize("fs_out", [125, 250, 500])
def test_beats_look_alike_at_any_sampling_rate(record_100, fs_out: int) -> None:
    from scipy.signal import resample_poly

    signal, fs, peaks = record_100
    convention = BeatConvention()
    native = segment(signal, fs, peaks[:60], convention, polarity=1)
    resampled = resample_poly(signal, fs_out, int(fs))
    scaled = np.round(peaks[:60] * fs_out / fs).astype(np.int64)
    other = segment(resampled, fs_out, scaled, convention, polarity=1)
    n = min(len(native), len(other))
    corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(native.windows[-n:], other.windows[-n:], strict=True)]
    assert np.median(corr) > 0.97


def test_ecg5000_has_the_conventions_polarity() -> None:
    """ECG5000's beats laid end to end: the estimated QRS sign is the convention's (negative)."""
    if not ECG5000_TRAIN.exists():
        pytest.skip("ECG5000 is not available")
    data = np.loadtxt(ECG5000_TRAIN)
    normal = data[data[:, 0] == 1, 1:][:40]
    r_peaks = np.arange(len(normal)) * 140 + round(BeatConvention().pre_r * 140)
    assert estimate_polarity(normal.ravel(), 140.0, r_peaks) == BeatConvention().qrs_polarity == -1


@pytest.mark.parametrize("fs", [128.0, 250.0, 360.0, 1000.0])
def test_the_cached_band_pass_filters_bit_for_bit_as_scipys_sosfiltfilt(fs: float) -> None:
    rng = np.random.default_rng(int(fs))
    for band in (qrs_band(fs), bandpass(fs, BeatConvention().band_hz, BeatConvention().filter_order)):
        for n in (band.edge + 1, 300, 4001):
            x = np.cumsum(rng.normal(size=n))  # a wandering baseline, as ECG has
            assert np.array_equal(band.zero_phase(x), sps.sosfiltfilt(band.sos, x))
        with pytest.raises(ValueError, match="padlen"):
            band.zero_phase(np.zeros(band.edge))
