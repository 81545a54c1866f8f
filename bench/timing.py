"""Timing helpers for a noisy machine.

Absolute numbers move with whatever else the machine is doing, so every comparison is
made inside one run: the two sides are measured in alternating turns (A B, B A, A B, ...)
and the result is the median of the per-turn ratios. A slow spell then hits both sides
of a turn alike instead of one side of the whole comparison.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def rate(work: Callable[[], object], items: int, min_seconds: float) -> float:
    """Items per second of `work()` (which handles `items` items per call), calling it
    until at least `min_seconds` have passed. The caller warms up first."""
    calls = 0
    start = time.perf_counter()
    while True:
        work()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * items / elapsed


def compare(baseline: Callable[[], float], variant: Callable[[], float], turns: int) -> dict:
    """Measure two rates in alternating order; `variant / baseline` as the median per-turn ratio."""
    base, other = [], []
    for turn in range(turns):
        if turn % 2 == 0:
            base.append(baseline())
            other.append(variant())
        else:
            other.append(variant())
            base.append(baseline())
    ratios = [v / b for b, v in zip(base, other, strict=True)]
    return {
        "baseline_per_s": statistics.median(base),
        "variant_per_s": statistics.median(other),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "turns": turns,
    }


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    data = sorted(values)
    if not data:
        return float("nan")
    position = (len(data) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)
