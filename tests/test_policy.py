"""The alert policy: k-of-n firing, m-normal resolution, and commits that make replays exact."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.stream.policy import FIRING, RESOLVED, AlertPolicy

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
