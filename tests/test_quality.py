"""Signal quality: clean ECG passes at every common sampling rate; flat, lead-off, clipped and noisy fail."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from monitor.stream.quality import (FLAT, LEAD_OFF, NOISE, SATURATION, QualityConfig, check, check_many,
                                    check_segments)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import neurokit2 as nk

RATES = [125, 250, 360, 500, 1000]


def ecg(fs: int, seconds: float = 10, heart_rate: int = 70, seed: int = 1) -> np.ndarray:
    return np.asarray(nk.ecg_simulate(duration=seconds, sampling_rate=fs, heart_rate=heart_rate, random_state=seed))


@pytest.mark.parametrize("fs", RATES)
@pytest.mark.parametrize("heart_rate", [50, 70, 120])
def test_clean_ecg_passes(fs, heart_rate):
    assert check(ecg(fs, heart_rate=heart_rate), fs).ok


@pytest.mark.parametrize("fs", RATES)
def test_one_beat_and_baseline_wander_pass(fs):
    x = ecg(fs)
    assert check(x[:fs], fs).ok
    wander = 0.5 * np.sin(2 * np.pi * 0.2 * np.arange(len(x)) / fs)  # breathing
    assert check(x + wander, fs).ok


@pytest.mark.parametrize("fs", RATES)
def test_flat_line_fails(fs):
    flat = 0.3 + 1e-4 * np.random.default_rng(0).standard_normal(10 * fs)
    assert check(flat, fs).reason == FLAT


@pytest.mark.parametrize("fs", RATES)
def test_lead_off_fails(fs):
    x = ecg(fs)
    pinned = np.concatenate([x[: len(x) // 2], np.full(len(x) - len(x) // 2, 5.0)])  # input at the rail
    assert check(pinned, fs).reason == LEAD_OFF
    with_nan = x.copy()
    with_nan[fs] = np.nan
    assert check(with_nan, fs).reason == LEAD_OFF


@pytest.mark.parametrize("fs", RATES)
def test_a_smooth_extremum_shorter_than_clip_s_is_not_saturation(fs):
    """Saturation is a time at the extreme, whatever the rate: a wave that stays within the tolerance of its
    peak for 90% of clip_s passes at every rate and sampling phase (counting samples instead, three samples
    of it at 125 Hz, 16 ms apart end to end, read as 24 ms)."""
    config = QualityConfig()
    theta = np.arccos(1 - 2 * config.clip_tolerance)  # a cosine's range is 2: within tolerance while |phase| <= theta
    hz = theta / (np.pi * 0.9 * config.clip_s)
    t = np.arange(2 * fs) / fs
    for phase in np.linspace(0, 2 * np.pi, 12, endpoint=False):
        assert check(np.cos(2 * np.pi * hz * t + phase), fs, config).reason != SATURATION


@pytest.mark.parametrize("fs", RATES)
def test_clipping_fails(fs):
    x = ecg(fs)
    assert check(np.clip(x, None, x.min() + 0.6 * np.ptp(x)), fs).reason == SATURATION
    # the same peaks beyond a known rail (an ADC's limit), for about 30 ms at every rate
    assert check(x, fs, rails=(x.min() - 1, x.min() + 0.6 * np.ptp(x))).reason == SATURATION


@pytest.mark.parametrize("fs", RATES)
def test_heavy_noise_fails(fs):
    x = ecg(fs)
    rng = np.random.default_rng(0)
    t = np.arange(len(x)) / fs
    assert check(x + 0.25 * np.ptp(x) * rng.standard_normal(len(x)), fs).reason == NOISE  # EMG-like
    assert check(x + 0.3 * np.ptp(x) * np.sin(2 * np.pi * 50 * t), fs).reason == NOISE  # mains


def test_light_noise_passes():
    fs = 360
    x = ecg(fs)
    assert check(x + 0.03 * np.ptp(x) * np.random.default_rng(0).standard_normal(len(x)), fs).ok


def test_a_batch_gives_each_segment_its_own_verdict():
    """The daemon checks a whole batch at once; every window must get exactly what it gets alone
    (same reason, same noise index to the last bit), whatever else is in the batch."""
    rng = np.random.default_rng(2)
    beats = [ecg(140, seconds=1, seed=s)[:140] for s in range(12)]
    bad = [0.3 + 1e-4 * rng.standard_normal(140), np.where(np.arange(140) < 70, beats[0], beats[0][70]),
           np.clip(beats[1], None, beats[1].min() + 0.5 * np.ptp(beats[1])),
           beats[2] + 0.5 * rng.standard_normal(140), np.full(140, np.nan)]
    segments = [*beats, *bad, ecg(360, seconds=2), ecg(360, seconds=2, seed=3) + rng.standard_normal(720)]
    rates = [140.0] * (len(beats) + len(bad)) + [360.0, 360.0]
    alone = [check(s, fs) for s, fs in zip(segments, rates, strict=True)]
    together = check_segments(segments, rates)
    assert [q.reason for q in together] == [q.reason for q in alone]
    assert {q.reason for q in alone} == {None, LEAD_OFF, FLAT, SATURATION, NOISE}
    np.testing.assert_array_equal([q.hf_ratio for q in together], [q.hf_ratio for q in alone])
    assert [q.reason for q in check_many(np.stack(segments[:-2]), 140.0)] == [q.reason for q in alone[:-2]]
