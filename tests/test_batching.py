"""Micro-batching: bounded by size and by the oldest window's wait, oldest first."""

from __future__ import annotations

import numpy as np
from fakes import FakeClock

from monitor.stream.batching import Batcher
from monitor.stream.windowing import Window


def window(partition: int, sensor: str, start: int, first_offset: int, created: float) -> Window:
    return Window(partition, sensor, start, np.zeros(4, np.float32), first_offset, first_offset, None, created)


def test_a_full_batch_is_due_at_once_and_leaves_oldest_first():
    clock = FakeClock(100.0)
    batcher = Batcher(max_batch=3, max_wait_s=1.0, clock=clock)
    batcher.extend([window(0, "a", i * 4, i, clock.now) for i in range(5)])
    assert batcher.due() and batcher.wait_s() == 0.0
    assert [w.start_seq for w in batcher.take()] == [0, 4, 8]
    assert not batcher.due() and len(batcher) == 2


def test_a_partial_batch_is_due_when_its_oldest_window_waited_max_wait():
    clock = FakeClock(100.0)
    batcher = Batcher(max_batch=10, max_wait_s=0.05, clock=clock)
    assert batcher.wait_s() is None and not batcher.due()
    batcher.extend([window(0, "a", 0, 0, clock.now)])
    clock.now += 0.03
    batcher.extend([window(0, "b", 0, 1, clock.now)])
    assert not batcher.due() and abs(batcher.wait_s() - 0.02) < 1e-9
    clock.now += 0.021
    assert batcher.due() and len(batcher.take()) == 2 and batcher.take() == []


def test_needed_offsets_and_dropping_partitions():
    batcher = Batcher(max_batch=10, max_wait_s=1.0)
    batcher.extend([window(0, "a", 0, 7, 0.0), window(1, "b", 0, 3, 0.0), window(0, "c", 0, 5, 0.0)])
    assert batcher.needed_offsets() == {0: 5, 1: 3}
    batcher.drop_partitions({0})
    assert batcher.needed_offsets() == {1: 3} and len(batcher) == 1
