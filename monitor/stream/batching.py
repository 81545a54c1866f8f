"""Micro-batching of complete windows across sensors, bounded by a maximum size and wait.

Windows leave in arrival order, so each sensor's windows reach the alert policy in seq order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from monitor.stream.windowing import Window


class Batcher:
    def __init__(self, max_batch: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._pending: deque[Window] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def extend(self, windows: list[Window]) -> None:
        self._pending.extend(windows)

    def due(self) -> bool:
        """A batch should be scored now: it is full, or its oldest window has waited long enough."""
        return len(self._pending) >= self.max_batch or (
            bool(self._pending) and self.clock() - self._pending[0].created >= self.max_wait_s)

    def wait_s(self) -> float | None:
        """Seconds until the oldest window's wait runs out (0 when due); None when nothing is pending."""
        if not self._pending:
            return None
        if len(self._pending) >= self.max_batch:
            return 0.0
        return max(0.0, self._pending[0].created + self.max_wait_s - float(self.clock()))

    def take(self) -> list[Window]:
        """The next batch: up to max_batch windows, oldest first."""
        count = min(self.max_batch, len(self._pending))
        return [self._pending.popleft() for _ in range(count)]

    def needed_offsets(self) -> dict[int, int]:
        """Per partition, the earliest offset still needed by a pending window."""
        needed: dict[int, int] = {}
        for w in self._pending:
            if w.first_offset < needed.get(w.partition, w.first_offset + 1):
                needed[w.partition] = w.first_offset
        return needed

    def drop_partitions(self, partitions: set[int]) -> None:
        self._pending = deque(w for w in self._pending if w.partition not in partitions)
