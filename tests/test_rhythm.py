"""The per-sensor rhythm score (monitor.stream.rhythm): premature beats score, a regular or a slowly varying
rhythm does not, gaps and resets restart it, and its state round-trips exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitor.stream.rhythm import Rhythm, RhythmConfig, RhythmScore, RhythmState, score_times

CONFIG = RhythmConfig(history=8, warmup_beats=20, min_scale=0.04)


def beat_times(intervals: list[float] | np.ndarray, start: float = 0.0) -> np.ndarray:
    return start + np.concatenate([[0.0], np.cumsum(intervals)])


def sinus(n: int, rate_s: float = 0.8, jitter: float = 0.02, seed: int = 0) -> np.ndarray:
    return rate_s * (1 + np.random.default_rng(seed).normal(0, jitter, n))


def test_a_regular_rhythm_scores_nothing_and_a_premature_beat_scores_by_how_early_it_came():
    intervals = list(sinus(60))
    intervals[40] *= 0.6  # 40% early (a premature beat) ...
    intervals[41] *= 1.4  # ... then the compensatory pause
    intervals[50] *= 0.85  # 15% early
    scores = score_times(beat_times(intervals), config=CONFIG).score
    assert scores[41] > 5 and 0 < scores[51] < scores[41]
    assert scores[42] == 0  # a late beat is no evidence by itself
    others = np.delete(scores, [41, 51])
    assert others.max() < 3


def test_nothing_scores_before_the_warm_up_has_learnt_the_sensors_spread():
    intervals = list(sinus(40))
    intervals[10] *= 0.5
    assert score_times(beat_times(intervals), config=CONFIG).score[: CONFIG.history + CONFIG.warmup_beats].max() == 0


def test_a_sensor_whose_rate_varies_a_lot_needs_a_larger_jump():
    config = RhythmConfig(history=8, warmup_beats=100, min_scale=0.04)
    steady, varying = sinus(160, jitter=0.01, seed=1), sinus(160, jitter=0.15, seed=1)
    steady[140] = varying[140] = 0.8 * 0.75  # 25% early against the mean interval
    early_in_steady = score_times(beat_times(steady), config=config).score[141]
    assert early_in_steady > 1.5 * score_times(beat_times(varying), config=config).score[141] > 0


def test_a_fast_beat_is_over_100_a_minute_and_early_against_the_sensors_own_rhythm():
    intervals = [0.8] * 30 + [0.5] * 3  # a run at 120/min out of 75/min: fast
    intervals += [0.8] * 20 + [0.7]  # early (ratio 0.875) but 86/min: not fast
    intervals += [0.8] * 20 + [0.55] * 30  # a rate that goes up and stays: fast until the median follows it
    fast = score_times(beat_times(intervals), config=CONFIG).fast
    assert np.flatnonzero(fast[:54]).tolist() == [31, 32, 33]  # beat i ends interval i - 1
    assert not fast[54]
    tachycardia = np.flatnonzero(fast[75:]) + 75
    assert tachycardia.tolist() == [75, 76, 77, 78, 79]  # once most of the last 8 intervals are fast, none is early
    bad = np.zeros(len(intervals) + 1, dtype=bool)
    assert not score_times(beat_times(intervals), good_quality=bad, config=CONFIG).fast.any()  # bad beats never are


def test_a_gap_or_a_reset_restarts_the_interval_history():
    rhythm, state = Rhythm(CONFIG), RhythmState()
    for t in beat_times(sinus(40)):
        rhythm.update(state, float(t))
    last = state.last_r
    assert last is not None
    assert rhythm.update(state, last + 10.0) == RhythmScore(0.0) and state.intervals == []  # a 10 s gap
    assert rhythm.update(state, 1.0) == RhythmScore(0.0) and state.intervals == []  # the stream went back (a reset)
    assert state.scale > 0  # the learnt spread stays


def test_a_bad_quality_beat_scores_zero_and_changes_nothing():
    rhythm, state = Rhythm(CONFIG), RhythmState()
    for t in beat_times(sinus(40)):
        rhythm.update(state, float(t))
    before = state.to_dict()
    assert rhythm.update(state, (state.last_r or 0) + 0.3, good_quality=False) == RhythmScore(0.0)
    assert state.to_dict() == before


def test_the_state_round_trips_through_json_and_continues_bit_for_bit():
    times = beat_times(sinus(60, seed=3))
    rhythm, state = Rhythm(CONFIG), RhythmState()
    for t in times[:15]:  # still in the warm-up: the buffer goes along
        rhythm.update(state, float(t))
    copy = RhythmState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert [rhythm.update(copy, float(t)) for t in times[15:]] == [rhythm.update(state, float(t)) for t in times[15:]]
    assert len(state.warmup) == 0 and len(state.intervals) == CONFIG.history  # bounded after the warm-up


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError):
        RhythmConfig(history=0)
    with pytest.raises(ValueError):
        RhythmConfig(min_scale=0)
