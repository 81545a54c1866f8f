"""Signal quality: clean ECG passes at every common sampling rate; flat, lead-off, clipped and noisy fail."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from monitor.stream.quality import FLAT, LEAD_OFF, NOISE, SATURATION, check

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
def test_clipping_fails(fs):
    x = ecg(fs)
    assert check(np.clip(x, None, x.min() + 0.6 * np.ptp(x)), fs).reason == SATURATION
    assert check(x, fs, rails=(x.min() - 1, x.max() - 0.2 * np.ptp(x))).reason == SATURATION


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
