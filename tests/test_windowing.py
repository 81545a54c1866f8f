"""Per-sensor windowing: alignment, records with many samples, duplicates, reordering, gaps, bounds."""

from __future__ import annotations

import numpy as np
from fakes import FakeClock
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.stream.windowing import SensorLimit, Windower
from monitor.stream.wire import InputRecord

L = 8



def rec(seq: int, values, sensor: str = "s1") -> InputRecord:
    return InputRecord(sensor_id=sensor, seq=seq, values=[float(v) for v in values])


def feed(w: Windower, chunks, partition: int = 0, first_offset: int = 0):
    """Feed (seq, values) chunks at consecutive offsets; returns all windows."""
    out = []
    for i, (seq, values) in enumerate(chunks):
        windows, _ = w.add(partition, first_offset + i, rec(seq, values))
        out.extend(windows)
    return out


def chunked(stream: np.ndarray, sizes, start: int = 0):
    chunks, pos = [], 0
    for size in sizes:
        if pos >= len(stream):
            break
        chunks.append((start + pos, stream[pos:pos + size]))
        pos += size
    return chunks


STREAM = np.arange(100, dtype=np.float32)


def starts(windows):
    return [w.start_seq for w in windows]


def test_back_to_back_windows_are_aligned_and_hold_the_right_samples():
    windows = feed(Windower(L), chunked(STREAM, [L] * 20))
    assert starts(windows) == list(range(0, 96, L))
    for window in windows:
        np.testing.assert_array_equal(window.values, STREAM[window.start_seq:window.start_seq + L])
        assert window.values.dtype == np.float32 and window.end_seq == window.start_seq + L


def test_one_record_with_many_samples_completes_many_windows():
    w = Windower(L)
    windows = feed(w, [(0, STREAM[:43])])
    assert starts(windows) == [0, 8, 16, 24, 32]
    assert w.buffered((0, "s1")) == (40, 43)  # 3 samples of the next window are buffered
    assert all(win.first_offset == 0 and win.last_offset == 0 for win in windows)


def test_first_record_mid_window_starts_at_the_next_aligned_window():
    windows = feed(Windower(L), chunked(STREAM[5:], [3] * 40, start=5))
    assert starts(windows)[0] == 8
    np.testing.assert_array_equal(windows[0].values, STREAM[8:16])


def test_overlapping_windows_with_hop():
    windows = feed(Windower(L, hop=4), chunked(STREAM, [5] * 10))  # samples 0..49
    assert starts(windows) == list(range(0, 42, 4))
    for window in windows:
        np.testing.assert_array_equal(window.values, STREAM[window.start_seq:window.start_seq + L])


def test_hop_longer_than_window_skips_samples():
    windows = feed(Windower(L, hop=10), chunked(STREAM, [7] * 10))
    assert starts(windows) == [0, 10, 20, 30, 40, 50, 60]


def test_duplicates_are_dropped_and_counted():
    w = Windower(L)
    chunks = chunked(STREAM[:32], [6] * 6)
    windows = feed(w, chunks[:3] + [chunks[1], chunks[2]] + chunks[3:])  # two records re-sent
    assert starts(windows) == [0, 8, 16, 24]
    assert w.stats.duplicate_samples == 12 and w.stats.samples == 32
    overlap, _ = w.add(0, 99, rec(28, STREAM[28:40]))  # 4 old samples, 8 new
    assert starts(overlap) == [32]
    assert w.stats.duplicate_samples == 16


def test_reordered_records_are_put_back_in_order():
    w = Windower(L)
    chunks = chunked(STREAM[:48], [6] * 8)
    order = [0, 2, 1, 3, 5, 6, 4, 7]  # two holes, each filled late
    windows = feed(w, [chunks[i] for i in order])
    assert starts(windows) == [0, 8, 16, 24, 32, 40]
    for window in windows:
        np.testing.assert_array_equal(window.values, STREAM[window.start_seq:window.start_seq + L])
    assert w.stats.reordered_records == 3 and w.stats.gaps == 0


def test_gap_resets_the_buffer_when_the_stash_overflows():
    w = Windower(L, reorder_slots=2)
    chunks = chunked(STREAM, [4] * 25)
    del chunks[3]  # samples 12..15 never arrive
    windows = feed(w, chunks)
    assert w.stats.gaps == 1
    # window [8, 16) is lost; the next full window after the gap is [16, 24)
    assert starts(windows) == [0] + list(range(16, 96, 8))
    np.testing.assert_array_equal(windows[1].values, STREAM[16:24])


def test_a_hole_older_than_the_reorder_timeout_is_a_gap():
    clock = FakeClock()
    w = Windower(L, reorder_slots=4, reorder_timeout_s=2.0, clock=clock)
    assert starts(feed(w, [(0, STREAM[:6]), (10, STREAM[10:26])])) == []  # 6..9 missing
    clock.now = 1.0
    assert w.sweep() == ([], [])
    clock.now = 2.5
    windows, evicted = w.sweep()
    assert starts(windows) == [16] and evicted == [] and w.stats.gaps == 1


def test_sensors_and_partitions_are_independent():
    w = Windower(L)
    a, _ = w.add(0, 0, rec(0, STREAM[:8], "a"))
    b, _ = w.add(1, 0, rec(0, STREAM[:5], "a"))  # same sensor id on another partition: its own state
    c, _ = w.add(0, 1, rec(0, STREAM[:8], "b"))
    assert [(x.partition, x.sensor_id) for x in a + b + c] == [(0, "a"), (0, "b")]
    assert len(w) == 3
    w.drop_partitions({0})
    assert len(w) == 1 and w.buffered((1, "a")) == (0, 5)


def test_needed_offsets_cover_buffered_and_stashed_records():
    w = Windower(L)
    w.add(0, 10, rec(0, STREAM[:5]))  # partial window from offset 10
    w.add(0, 11, rec(0, STREAM[:5], "other"))
    assert w.needed_offsets() == {0: 10}
    windows, _ = w.add(0, 12, rec(5, STREAM[5:12]))  # completes [0, 8); buffers 8..11 from offset 12
    assert windows[0].first_offset == 10 and windows[0].last_offset == 12
    assert w.needed_offsets() == {0: 11}
    w.add(0, 13, rec(20, STREAM[20:24], "other"))  # stashed ahead of a hole
    w.add(0, 14, rec(16, STREAM[16:18]))
    assert w.needed_offsets() == {0: 11}
    w.add(0, 15, rec(5, STREAM[5:8], "other"))  # completes "other"'s first window
    assert w.needed_offsets() == {0: 12}


def test_idle_sensors_are_evicted_and_memory_is_bounded():
    clock = FakeClock()
    w = Windower(L, max_sensors=3, idle_timeout_s=10.0, evict_min_idle_s=4.0, clock=clock)
    for i in range(3):
        w.add(0, i, rec(0, STREAM[:3], f"s{i}"))
    clock.now = 5.0
    w.add(0, 3, rec(3, STREAM[3:4], "s0"))  # s0 is now the most recent
    _, evicted = w.add(0, 4, rec(0, STREAM[:3], "s3"))
    assert evicted == [(0, "s1")] and len(w) == 3
    clock.now = 14.0
    _, evicted = w.sweep()
    assert evicted == [(0, "s2")]
    assert w.stats.evicted_sensors == 2


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(1, 20), min_size=30, max_size=60),
       hop=st.sampled_from([None, 3, 8, 11]),
       data=st.data())
def test_same_windows_whatever_the_chunking_duplicates_and_local_reordering(sizes, hop, data):
    """Property: any chunking, re-sent records and swaps of neighbours give the in-order windows."""
    chunks = chunked(STREAM, sizes)
    reference = feed(Windower(L, hop=hop), chunks)
    shuffled = list(chunks)
    for i in data.draw(st.lists(st.integers(0, len(chunks) - 2), max_size=5)):
        shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    for i in sorted(data.draw(st.lists(st.integers(0, len(chunks) - 1), max_size=5)), reverse=True):
        shuffled.insert(i + 1, shuffled[i])  # a re-sent record right after the original
    if shuffled[0] != chunks[0]:
        shuffled.insert(0, chunks[0])  # the stream's start must come first, or it is a later start
    w = Windower(L, hop=hop, reorder_slots=8)
    got = feed(w, shuffled)
    assert starts(got) == starts(reference)
    for a, b in zip(got, reference, strict=True):
        np.testing.assert_array_equal(a.values, b.values)
    assert w.stats.gaps == 0


# -- sensor resets, jumps, redelivery, bounds (issue 12) -------------------------------------------

BEAT = np.sin(np.linspace(0, 6, 4 * L)).astype(np.float32)  # 4 windows of a sensor's signal


def test_a_reboot_that_restarts_seq_at_0_starts_a_new_segment_and_every_window_is_scored():
    """Before: every record after the reboot was dropped as a duplicate until seq passed the old
    high-water mark (half the windows never scored)."""
    w = Windower(L)
    before = feed(w, chunked(BEAT * 2, [4] * 8))  # seq 0..31: 4 windows, then the device reboots
    after = feed(w, chunked(BEAT, [4] * 8), first_offset=8)  # seq 0..31 again, other samples
    assert starts(before) == starts(after) == [0, 8, 16, 24]
    for window in after:
        np.testing.assert_array_equal(window.values, BEAT[window.start_seq:window.end_seq])
    assert w.stats.reset_segments == 1 and w.stats.duplicate_samples == 0
    assert [(s.reason, s.previous_next_seq, s.seq) for s in w.new_segments] == [("reset", 32, 0)]


def test_a_record_re_sent_below_the_expected_seq_is_still_a_duplicate_not_a_reset():
    w = Windower(L)
    chunks = chunked(BEAT, [4] * 8)
    windows = feed(w, chunks[:6] + [chunks[1], chunks[4]] + chunks[6:])  # re-sent out of order
    assert starts(windows) == [0, 8, 16, 24] and w.stats.reset_segments == 0
    assert w.stats.duplicate_samples == 8


def test_a_record_re_read_at_an_offset_already_consumed_is_a_redelivery():
    w = Windower(L)
    feed(w, [(0, BEAT[:4]), (4, BEAT[4:6])])
    windows, _ = w.add(0, 1, rec(0, BEAT[:8]))  # offset 1 again (other samples): Kafka order says re-read
    assert windows == [] and w.stats.reset_segments == 0 and w.buffered((0, "s1")) == (0, 6)


def test_a_stream_that_continues_at_offsets_started_again_is_not_a_redelivery():
    # a broker that lost its log (or a re-created topic) hands out offsets from 0 again
    w = Windower(L)
    feed(w, [(0, BEAT[:4])], first_offset=50)
    windows = feed(w, [(4, BEAT[4:8]), (8, BEAT[:8])], first_offset=0)
    assert starts(windows) == [0, 8] and w.stats.duplicate_samples == 0
    assert not feed(w, [(8, BEAT[:8])], first_offset=1)  # a real redelivery at the new offsets is still one
    assert w.stats.duplicate_samples == L


def test_one_record_with_seq_1e18_does_not_blind_the_sensor_nor_cost_a_window():
    """Before: the hole closed by jumping to 10**18 and every later normal record was a duplicate."""
    clock = FakeClock()
    w = Windower(L, max_seq_gap=10 * L, clock=clock)
    chunks = chunked(BEAT, [4] * 8)
    windows = feed(w, chunks[:3])  # mid-window: samples 8..11 of window [8, 16) are buffered
    bogus, _ = w.add(0, 3, rec(10**18, BEAT[:4]))
    assert w.needed_offsets() == {0: 2}  # the parked segment still holds the commit
    clock.now = 60.0
    w.sweep()
    windows += feed(w, chunks[3:], first_offset=4)  # the stream goes on where it was
    assert starts(bogus) == [] and starts(windows) == [0, 8, 16, 24]
    for window in windows:
        np.testing.assert_array_equal(window.values, BEAT[window.start_seq:window.end_seq])
    assert (w.stats.jump_segments, w.stats.reset_segments) == (1, 0)


def test_after_a_jump_a_record_that_does_not_continue_the_stream_is_a_reset():
    w = Windower(L, max_seq_gap=10 * L)
    feed(w, chunked(BEAT, [4] * 3))
    w.add(0, 3, rec(10**18, BEAT[:4]))
    windows = feed(w, chunked(BEAT * 3, [4] * 4), first_offset=4)  # seq 0 again: a reboot
    assert starts(windows) == [0, 8] and (w.stats.jump_segments, w.stats.reset_segments) == (1, 1)


def test_the_reorder_stash_is_bounded_in_bytes():
    w = Windower(L, reorder_slots=4, reorder_max_bytes=64)  # 16 float32 samples
    feed(w, [(0, STREAM[:4])])
    w.add(0, 1, rec(8, STREAM[8:20]))  # 12 samples (48 bytes): stashed
    assert w.stats.gaps == 0 and w.memory_bytes() <= 2 * L * 4 + L * 4 + 64
    w.add(0, 2, rec(20, STREAM[20:28]))  # 8 more would exceed 64 bytes: the hole is a gap now
    assert w.stats.gaps == 1 and w.memory_bytes() <= 3 * L * 4


def test_above_max_sensors_new_sensors_are_refused_instead_of_evicting_live_ones():
    """Before: round-robin sensors above max_sensors evicted each other and no window completed."""
    clock = FakeClock()
    w = Windower(L, max_sensors=3, evict_min_idle_s=30.0, clock=clock)
    windows, refused = [], 0
    for offset, (i, seq) in enumerate((i, seq) for seq in range(0, 4 * L, 4) for i in range(5)):
        clock.now += 0.1
        try:
            windows += w.add(0, offset, rec(seq, STREAM[seq:seq + 4], f"s{i}"))[0]
        except SensorLimit:
            refused += 1
    assert sorted({x.sensor_id for x in windows}) == ["s0", "s1", "s2"] and len(windows) == 12
    assert refused == 2 * 8 and w.stats.evicted_sensors == 0 and w.stats.refused_records == refused
