"""The alert policy: k-of-n firing, m-normal resolution, and commits that make replays exact."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.stream.policy import (FIRING, RESOLVED, SIGNAL_QUALITY, AlertPolicy, ScorePolicy, ScorePolicyConfig,
                                   ScoreState)

A, N = True, False


def run(policy: AlertPolicy, flags, key=(0, "s"), first_offset: int = 0) -> list:
    return [policy.observe(key, flag, first_offset + i) for i, flag in enumerate(flags)]


def test_fires_on_k_of_n_and_does_not_refire_while_open():
    got = run(AlertPolicy(k=2, n=3, m=3), [N, A, N, A, A, A, N, A])
    assert got == [None, None, None, FIRING, None, None, None, None]


def test_a_single_anomaly_does_not_fire():
    assert run(AlertPolicy(k=2, n=3, m=3), [A, N, N, A, N, N, A]) == [None] * 7


def test_resolves_after_m_consecutive_normal_windows_and_needs_k_fresh_anomalies_to_refire():
    got = run(AlertPolicy(k=2, n=3, m=3), [A, A, N, N, A, N, N, N, A, N, A])
    assert got == [None, FIRING, None, None, None, None, None, RESOLVED, None, None, FIRING]


def test_k_equals_one_fires_on_the_first_anomalous_window():
    assert run(AlertPolicy(k=1, n=1, m=2), [N, A, A, N, N, A]) == [None, FIRING, None, None, RESOLVED, FIRING]


def test_sensors_are_independent():
    policy = AlertPolicy(k=2, n=2, m=1)
    assert policy.observe((0, "a"), A, 0) is None
    assert policy.observe((0, "b"), A, 1) is None
    assert policy.observe((0, "a"), A, 2) == FIRING
    assert policy.is_open((0, "a")) and not policy.is_open((0, "b"))


def test_invalid_parameters_are_refused():
    with pytest.raises(ValueError):
        AlertPolicy(k=4, n=3, m=1)


def test_an_open_stretch_holds_commits_at_its_first_window():
    policy = AlertPolicy(k=2, n=3, m=2)
    run(policy, [N, N, A, A, N], first_offset=100)  # stretch starts at offset 102
    assert policy.safe_offset(0, 200) == 102
    assert policy.safe_offset(0, 101) == 101
    assert policy.safe_offset(1, 200) == 200  # other partitions are not held


def test_a_closed_stretch_forbids_commits_inside_it():
    policy = AlertPolicy(k=2, n=3, m=2)
    # offsets 10..: N A A N N(resolved) N N -> idle after offset 14 (resolve clears history)
    run(policy, [N, A, A, N, N, N, N], first_offset=10)
    assert policy.safe_offset(0, 17) == 17
    assert policy.safe_offset(0, 15) == 15
    assert policy.safe_offset(0, 14) == 11 and policy.safe_offset(0, 12) == 11
    assert policy.safe_offset(0, 11) == 11
    policy.committed(0, 15)  # the stretch lies wholly below a commit: forgotten
    assert policy.safe_offset(0, 13) == 13


def test_a_long_stretch_stops_holding_commits():
    policy = AlertPolicy(k=1, n=1, m=1, max_hold_windows=5)
    run(policy, [A] * 12)  # the anchor slides every 5 windows: 0 -> 4 -> 9
    assert policy.safe_offset(0, 100) == 9


def test_forget_and_drop_release_holds():
    policy = AlertPolicy(k=1, n=1, m=1)
    policy.observe((0, "a"), A, 5)
    policy.observe((1, "b"), A, 7)
    policy.forget([(0, "a")])
    assert policy.safe_offset(0, 50) == 50 and policy.safe_offset(1, 50) == 7
    policy.drop_partitions({1})
    assert policy.safe_offset(1, 50) == 50 and len(policy) == 0


@settings(max_examples=300, deadline=None)
@given(sensors=st.lists(st.lists(st.booleans(), min_size=5, max_size=40), min_size=1, max_size=4),
       k_n=st.sampled_from([(1, 1), (2, 3), (3, 5), (2, 2)]), m=st.integers(1, 4), data=st.data())
def test_a_restart_from_the_safe_offset_re_derives_the_same_transitions(sensors, k_n, m, data):
    """Property: interleave sensors' windows (one record each, offset = position), stop after any
    prefix, commit the safe offset, replay from it with fresh state: every transition the replay
    emits is the one the uninterrupted run emitted for that window, and none is missing."""
    k, n = k_n
    schedule = data.draw(st.permutations([s for s, flags in enumerate(sensors) for _ in flags]))
    cursor = [0] * len(sensors)
    windows = []  # (offset, sensor, flag)
    for offset, s in enumerate(schedule):
        windows.append((offset, s, sensors[s][cursor[s]]))
        cursor[s] += 1
    original = AlertPolicy(k, n, m)
    expected, committed = {}, 0
    stop = data.draw(st.integers(0, len(windows)))
    for offset, s, flag in windows:
        if offset == stop:
            committed = original.safe_offset(0, offset)
        expected[offset] = original.observe((0, f"s{s}"), flag, offset)
    if stop == len(windows):
        committed = original.safe_offset(0, stop)
    replay = AlertPolicy(k, n, m)
    for offset, s, flag in windows:
        if offset >= committed:
            assert replay.observe((0, f"s{s}"), flag, offset) == expected[offset], offset


# -- the calibrated-score policy -------------------------------------------------------------

KEY = (0, "s")


def scores(policy: ScorePolicy, values, **flags) -> list:
    return [policy.observe(KEY, v, **flags) for v in values]


def test_mean_fires_above_fire_level_once_and_resolves_after_m_beats_below_resolve_level():
    policy = ScorePolicy(ScorePolicyConfig(aggregate="mean", window=3, fire_level=4, resolve_level=2, resolve_beats=2))
    got = scores(policy, [0, 6, 6, 6])
    assert policy.trigger(KEY) == "aggregate"
    got += scores(policy, [6, 0, 0, 0, 0, 0])
    # means: 0, 2, 4, 6 (fires), 6, 4, 2, 0 (1st below 2), 0 (2nd: resolves), 0
    assert got == [[], [], [], [FIRING], [], [], [], [], [RESOLVED], []]


def test_hysteresis_no_flapping_between_the_two_levels():
    policy = ScorePolicy(ScorePolicyConfig(window=1, fire_level=4, resolve_level=2, resolve_beats=1))
    got = scores(policy, [5, 3, 5, 3, 5, 1, 5])
    assert got == [[FIRING], [], [], [], [], [RESOLVED], [FIRING]]


def test_ewma_and_cusum_aggregates():
    ewma = ScorePolicy(ScorePolicyConfig(aggregate="ewma", alpha=0.5, fire_level=3, resolve_level=1))
    assert scores(ewma, [4, 4, 4]) == [[], [], [FIRING]]  # 2, 3, 3.5
    cusum = ScorePolicy(ScorePolicyConfig(aggregate="cusum", drift=1, fire_level=4, resolve_level=0.5))
    assert scores(cusum, [3, 3, 3]) == [[], [], [FIRING]]  # 2, 4, 6


def test_no_ordinary_alert_while_calibrating_but_a_run_of_gross_beats_fires():
    policy = ScorePolicy(ScorePolicyConfig(window=1, fire_level=2, resolve_level=1, resolve_beats=2, gross_beats=2))
    assert scores(policy, [9, 9, 9], calibrating=True) == [[], [], []]
    got = [policy.observe(KEY, 9, calibrating=True, gross=g) for g in (True, True, True, False, False)]
    assert got == [[], [FIRING], [], [], [RESOLVED]]
    policy.observe(KEY, 9, calibrating=True, gross=True)
    assert policy.observe(KEY, 9, calibrating=True, gross=True) == [FIRING] and policy.trigger(KEY) == "gross"


def test_bad_quality_beats_never_raise_anomaly_alerts_and_raise_rate_limited_signal_quality():
    config = ScorePolicyConfig(window=1, fire_level=2, resolve_level=1, quality_window=4, quality_bad_beats=2,
                               quality_interval_beats=10)
    policy = ScorePolicy(config)
    got = [policy.observe(KEY, 50, gross=True, good_quality=False) for _ in range(15)]
    assert got[1] == [SIGNAL_QUALITY] and got[11] == [SIGNAL_QUALITY]
    assert sum(len(t) for t in got) == 2 and not policy.is_open(KEY)


def test_a_fast_run_fires_when_the_mean_stays_under_the_fire_level_and_holds_the_alert_open():
    config = ScorePolicyConfig(window=3, fire_level=4, resolve_level=2, resolve_beats=2, fast_run_beats=3)
    policy = ScorePolicy(config)
    values = [0, 3, 3, 3, 3, 0, 0, 0]  # the mean never exceeds 4
    fast = [False, True, True, True, True, False, False, False]
    got = [policy.observe(KEY, v, fast_run_beat=f) for v, f in zip(values, fast, strict=True)]
    # fires on the third fast-run beat; means 1, 2, 3, 3, 2, 1 (1st below 2), 0 (2nd: resolves)
    assert got == [[], [], [], [FIRING], [], [], [], [RESOLVED]]
    assert policy.trigger(KEY) is None  # closed again
    policy.observe(KEY, 0, fast_run_beat=True)
    policy.observe(KEY, 0, fast_run_beat=True)
    assert policy.observe(KEY, 0, fast_run_beat=True) == [FIRING] and policy.trigger(KEY) == "fast_run"
    two_then_a_break = [True, True, False, True, True]  # never 3 in a row
    assert not any(ScorePolicy(config).observe(KEY, 0, fast_run_beat=f) for f in two_then_a_break)
    bad_beat_breaks_it = ScorePolicy(config)
    got = [bad_beat_breaks_it.observe(KEY, 0, fast_run_beat=True, good_quality=ok) for ok in (True, True, False, True)]
    assert not any(got)
    assert not any(ScorePolicy(config).observe(KEY, 0, fast_run_beat=True, calibrating=True) for _ in range(5))
    off = ScorePolicy(replace(config, fast_run_beats=0))
    assert not any(off.observe(KEY, 0, fast_run_beat=True) for _ in range(5))


def test_a_fast_run_beat_is_fast_and_unlike_the_sensors_usual_beat():
    config = ScorePolicyConfig(fast_run_level=2.5)
    assert config.fast_run_beat(3.0, True) and not config.fast_run_beat(2.0, True)
    assert not config.fast_run_beat(3.0, False) and not config.fast_run_beat(None, True)  # None: template calibrating
    got = config.fast_run_beat(np.array([3.0, np.nan, 1.0, 9.0]), np.array([True, True, True, False]))
    assert got.tolist() == [True, False, False, False]
    assert not replace(config, fast_run_beats=0).fast_run_beat(9.0, True)


def test_policy_state_round_trips_and_a_restored_sensor_continues_identically():
    config = ScorePolicyConfig(window=3, fire_level=3, resolve_level=1, fast_run_beats=3)
    values = [0.5, 4, 5, 6, 0, 0, 0, 0, 0, 0, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0, 0]
    fast = [False, True, True] + [False] * 15 + [True] * 3  # a fast run across the snapshot, and one after
    a, b = ScorePolicy(config), ScorePolicy(config)

    def observe(policy: ScorePolicy, part: slice) -> list:
        return [policy.observe(KEY, v, fast_run_beat=f) for v, f in zip(values[part], fast[part], strict=True)]

    observe(a, slice(0, 3))
    observe(b, slice(0, 3))
    assert b.snapshot(KEY)["fast_run"] == 2
    restored = ScorePolicy(config)
    restored.restore(KEY, json.loads(json.dumps(b.snapshot(KEY))))
    assert observe(a, slice(3, None)) == observe(restored, slice(3, None))
    assert a.snapshot(KEY) == restored.snapshot(KEY)
    assert ScoreState.from_dict(a.snapshot(KEY)) == a._states[KEY]


def test_invalid_policy_configs_are_refused():
    with pytest.raises(ValueError):
        ScorePolicyConfig(fire_level=1, resolve_level=2)
    with pytest.raises(ValueError):
        ScorePolicyConfig(aggregate="max")


def test_a_beats_input_is_its_shape_raised_to_the_weighted_template_plus_the_weighted_rhythm():
    """One rule for the daemon's floats and the trainer's arrays: a template still learning (None / NaN) and a
    window without rhythm leave the shape score alone."""
    config = ScorePolicyConfig(template_weight=0.5, rhythm_weight=0.25)
    assert config.beat_input(1.0) == 1.0
    assert config.beat_input(1.0, template=4.0) == 2.0  # 0.5 x 4 beats the shape score
    assert config.beat_input(3.0, template=4.0, rhythm=2.0) == 3.5
    assert config.beat_input(1.0, template=float("nan"), rhythm=None) == 1.0
    shape, template, rhythm = np.array([1.0, 3.0, 1.0]), np.array([4.0, 4.0, np.nan]), np.array([0.0, 2.0, 4.0])
    arrays = config.beat_input(shape, template, rhythm)
    assert arrays.tolist() == [config.beat_input(*row) for row in zip(shape, template, rhythm, strict=True)]
    assert ScorePolicyConfig(template_weight=0.0, rhythm_weight=0.0).beat_input(shape, template, rhythm) is shape
