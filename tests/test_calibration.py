"""Per-sensor calibration: robust warm-up baseline, slow adaptation that ignores anomalies,
exact state round trips, and the gross rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from monitor.stream.calibration import (CALIBRATED, CALIBRATING, CalibrationConfig, CalibrationState, Calibrator,
                                        Prior, robust_baseline)

PRIOR = Prior(location=math.log(0.16), scale=0.4, threshold=0.32)


def normal_errors(n: int, level: float = 0.3, spread: float = 0.3, seed: int = 0) -> np.ndarray:
    return np.exp(math.log(level) + spread * np.random.default_rng(seed).standard_normal(n))


def feed(cal: Calibrator, state: CalibrationState, errors) -> list:
    return [cal.update(state, float(e)) for e in errors]


def test_a_sensor_learns_its_own_level_and_spread_from_its_warm_up():
    cal = Calibrator(PRIOR, CalibrationConfig(warmup_beats=150))
    state = cal.new_state()
    out = feed(cal, state, normal_errors(150, level=0.3, spread=0.3))
    assert all(b.calibrating for b in out) and cal.phase(state) == CALIBRATED
    assert state.location == pytest.approx(math.log(0.3), abs=0.08)
    assert state.scale == pytest.approx(0.3, rel=0.2)
    after = cal.update(state, 0.3 * math.exp(3 * 0.3))  # 3 SDs above this sensor's normal
    assert not after.calibrating and after.score == pytest.approx(3, abs=0.5)


def test_a_third_of_ectopic_beats_barely_moves_the_baseline():
    errors = normal_errors(150, level=0.2, spread=0.25)
    errors[::3] = 1.5  # every third beat ectopic, with a clearly higher error
    location, scale = robust_baseline(np.log(errors))
    assert location == pytest.approx(math.log(0.2), abs=0.1)
    assert scale == pytest.approx(0.25, rel=0.3)
    plain = float(np.median(np.log(errors)))  # without clipping the median moves much more
    assert abs(plain - math.log(0.2)) > 2 * abs(location - math.log(0.2))


def test_while_calibrating_scores_use_the_prior_and_only_gross_beats_are_flagged():
    cal = Calibrator(PRIOR, CalibrationConfig(warmup_beats=10, gross_multiple=3))
    state = cal.new_state()
    first = cal.update(state, 0.16)
    assert first.calibrating and first.score == pytest.approx(0.0) and cal.phase(state) == CALIBRATING
    assert not cal.update(state, 0.9).gross  # < 3 x 0.32
    assert cal.update(state, 1.0).gross


def test_adaptation_follows_a_slow_drift_but_not_an_anomalous_run():
    config = CalibrationConfig(warmup_beats=100, adapt_rate=0.01)
    cal = Calibrator(PRIOR, config)
    state = cal.new_state()
    feed(cal, state, normal_errors(100, level=0.2, spread=0.2, seed=1))
    before = state.location
    feed(cal, state, np.full(50, 5.0))  # a long anomalous run: scores far above the gate
    assert state.location == before
    feed(cal, state, normal_errors(1500, level=0.2 * math.exp(0.3), spread=0.2, seed=2))  # +1.5 SD drift
    assert state.location == pytest.approx(before + 0.3, abs=0.08)


def test_bad_quality_beats_are_scored_but_teach_nothing():
    cal = Calibrator(PRIOR, CalibrationConfig(warmup_beats=10))
    state = cal.new_state()
    out = cal.update(state, 0.5, good_quality=False)
    assert out.score > 0 and state.beats == 0 and state.warmup == []


def test_a_non_finite_error_is_refused():
    cal = Calibrator(PRIOR)
    with pytest.raises(ValueError):
        cal.update(cal.new_state(), float("nan"))


def test_state_round_trips_through_json_exactly_and_is_deterministic():
    cal = Calibrator(PRIOR, CalibrationConfig(warmup_beats=50))
    errors = normal_errors(120, seed=3)
    a, b = cal.new_state(), cal.new_state()
    feed(cal, a, errors[:30])  # mid warm-up
    feed(cal, b, errors[:30])
    b = CalibrationState.from_dict(json.loads(json.dumps(b.to_dict())))
    assert feed(cal, a, errors[30:]) == feed(cal, b, errors[30:])
    assert a == b and a.warmup == []  # the buffer is dropped once calibrated
    assert len(json.dumps(a.to_dict())) < 200


def test_prior_from_artefact_stats():
    prior = Prior.from_stats({"p50": 0.16, "p95": 0.32}, threshold=0.32)
    assert prior.location == pytest.approx(math.log(0.16))
    assert prior.scale == pytest.approx(math.log(2) / 1.6449, rel=1e-4)
    with pytest.raises(ValueError):
        Prior.from_stats({"p50": 0.3, "p95": 0.2}, threshold=0.3)
