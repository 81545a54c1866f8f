"""The per-sensor table both windowers keep: capacity, idle eviction, reorder-stash timeouts, commit offsets.

`Windower` (fixed windows) and `BeatWindower` (one window per beat) differ in what a sensor buffers, not in
how sensors come and go, so that part lives here once:

- at most `max_sensors` sensors: a new sensor evicts the least recently seen one only if that one has been idle
  for `evict_min_idle_s`; otherwise the new sensor is refused (`SensorLimit`, dead-lettered as over_capacity),
  so sensors above the limit never evict each other into starvation (issue 12);
- `sweep()` closes reorder holes older than `reorder_timeout_s` and evicts sensors idle for `idle_timeout_s`;
- `needed_offsets()` is, per partition, the earliest offset a sensor still needs (stashed or buffered).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from monitor.stream.wire import InvalidRecord

SensorKey = tuple[int, str]  # (partition, sensor_id)
OVER_CAPACITY = "over_capacity"


class SensorLimit(InvalidRecord):
    """A new sensor cannot be admitted: `max_sensors` live sensors, none idle long enough to evict.
    The daemon dead-letters the record (reason over_capacity), so its data stays on the broker."""

    def __init__(self, detail: str) -> None:
        super().__init__(OVER_CAPACITY, detail)


class Stashed(Protocol):
    """A record waiting in a sensor's reorder stash."""

    @property
    def seq(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def arrived(self) -> float: ...


class SensorState(Protocol):
    @property
    def last_seen(self) -> float: ...
    @property
    def stash(self) -> Sequence[Stashed]: ...


class TableStats(Protocol):
    evicted_sensors: int
    refused_records: int


S = TypeVar("S", bound=SensorState)
W = TypeVar("W")  # what a windower emits


class SensorTable(ABC, Generic[S, W]):
    """Sensors keyed by (partition, sensor_id), least recently seen first."""

    def __init__(self, stats: TableStats, *, max_sensors: int, idle_timeout_s: float, evict_min_idle_s: float,
                 reorder_timeout_s: float, clock: Callable[[], float]) -> None:
        self.max_sensors = max_sensors
        self.idle_timeout_s = idle_timeout_s
        self.evict_min_idle_s = min(evict_min_idle_s, idle_timeout_s)
        self.reorder_timeout_s = reorder_timeout_s
        self.clock = clock
        self._table_stats = stats
        self._sensors: OrderedDict[SensorKey, S] = OrderedDict()  # least recently seen first
        self._stashing: set[SensorKey] = set()  # sensors with a non-empty stash
        self._admit_evicted: list[SensorKey] = []  # evicted by admit(), returned by the next add()

    def __len__(self) -> int:
        return len(self._sensors)

    @abstractmethod
    def _close_hole(self, key: SensorKey, s: S, out: list[W]) -> None:
        """The hole before the sensor's stash will not be filled: apply the stash after a gap."""

    def _on_evict(self, key: SensorKey, s: S) -> None:
        """What a windower records about an evicted sensor (nothing by default)."""

    def _held_offsets(self, s: S) -> list[int]:
        """Offsets of the records whose samples the sensor holds, besides its stash (earliest first is enough)."""
        return []

    # -- capacity ------------------------------------------------------------------------------

    def admit(self, partition: int, sensor_id: str) -> None:
        """Make room for the sensor if it is new; raises SensorLimit when none can be made."""
        if (partition, sensor_id) not in self._sensors:
            self._admit_evicted += self._make_room(self.clock())

    def _take_admit_evicted(self) -> list[SensorKey]:
        evicted, self._admit_evicted = self._admit_evicted, []
        return evicted

    def _make_room(self, now: float) -> list[SensorKey]:
        """Room for one more sensor: evict the least recently seen if it has idled long enough."""
        if len(self._sensors) < self.max_sensors:
            return []
        key, oldest = next(iter(self._sensors.items()))
        if now - oldest.last_seen < self.evict_min_idle_s:
            self._table_stats.refused_records += 1
            raise SensorLimit(f"{self.max_sensors} sensors are live and none has idled "
                              f"{self.evict_min_idle_s:g} s")
        return [self._evict(key)]

    def _evict(self, key: SensorKey) -> SensorKey:
        s = self._sensors.pop(key)
        self._stashing.discard(key)
        self._table_stats.evicted_sensors += 1
        self._on_evict(key, s)
        return key

    # -- housekeeping --------------------------------------------------------------------------

    def sweep(self) -> tuple[list[W], list[SensorKey]]:
        """Close reorder holes that waited too long and evict idle sensors. Call about once a second."""
        now = self.clock()
        out: list[W] = []
        stale = [k for k in self._stashing
                 if now - min(item.arrived for item in self._sensors[k].stash) >= self.reorder_timeout_s]
        for key in stale:
            self._close_hole(key, self._sensors[key], out)
        evicted = []
        while self._sensors:
            key, sensor = next(iter(self._sensors.items()))
            if now - sensor.last_seen < self.idle_timeout_s:
                break
            evicted.append(self._evict(key))
        return out, evicted

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget the sensors of revoked partitions (their new owner replays from the commit)."""
        for key in [k for k in self._sensors if k[0] in partitions]:
            del self._sensors[key]
            self._stashing.discard(key)

    # -- commit support ------------------------------------------------------------------------

    def needed_offsets(self) -> dict[int, int]:
        """Per partition, the earliest offset of a record whose samples a sensor still holds or stashes."""
        needed: dict[int, int] = {}
        for (partition, _), s in self._sensors.items():
            offsets = [item.offset for item in s.stash] + self._held_offsets(s)
            if offsets:
                low = min(offsets)
                if low < needed.get(partition, low + 1):
                    needed[partition] = low
        return needed
