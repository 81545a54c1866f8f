"""The alert policy: per sensor, fire on k of the last n windows, resolve after m normal windows.

- closed -> firing: the window is anomalous and at least `k` of the last `n` windows
  (this one included) are anomalous. An open alert does not fire again.
- firing -> resolved: `m` consecutive normal windows. Resolving clears the history, so the
  next alert needs `k` fresh anomalous windows.

A sensor is *idle* when it is closed and none of its last n-1 windows was anomalous: its state
then equals a fresh one. Between idle points (a *stretch*) the state depends on history, so a
restart must replay the whole stretch to re-derive the same transitions (and alert ids).
The policy therefore keeps, per partition, the offsets that commits must respect:

- an open stretch holds the commit at or below the first offset of its first window;
- a closed stretch forbids committing inside (first offset of its first window, first offset
  of its last window], because a replay starting there would begin mid-stretch with fresh state.

`safe_offset` applies both, so after any restart every sensor's replay starts from an idle
state and re-emits only alerts with the ids they had before. A stretch longer than
`max_hold_windows` stops holding commits back (its anchor slides forward), which bounds the
replay; a crash during such a long episode can re-fire it under a new id.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from monitor.stream.windowing import SensorKey

FIRING, RESOLVED = "firing", "resolved"


@dataclass(slots=True)
class _State:
    flags: deque  # anomalous? for the last n windows
    open: bool = False
    normal_run: int = 0
    anchor: int | None = None  # first offset of the first window of the current stretch
    held: int = 0  # windows since the anchor


@dataclass
class AlertPolicy:
    k: int = 2
    n: int = 3
    m: int = 3
    max_hold_windows: int = 1000
    _states: dict = field(default_factory=dict)  # SensorKey -> _State
    _anchors: dict = field(default_factory=dict)  # partition -> {sensor_id: anchor offset}
    _spans: dict = field(default_factory=dict)  # partition -> [(start, end)] of closed stretches

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n or self.m < 1:
            raise ValueError(f"need 1 <= k <= n and m >= 1, got k={self.k} n={self.n} m={self.m}")

    def observe(self, key: SensorKey, anomalous: bool, first_offset: int) -> str | None:
        """Feed one scored window (in seq order per sensor); returns "firing", "resolved" or None."""
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State(deque(maxlen=self.n))
        if anomalous and st.anchor is None:
            self._set_anchor(key, st, first_offset)
        st.flags.append(anomalous)
        transition = None
        if not st.open:
            if anomalous and sum(st.flags) >= self.k:
                st.open, st.normal_run, transition = True, 0, FIRING
        else:
            st.normal_run = 0 if anomalous else st.normal_run + 1
            if st.normal_run >= self.m:
                st.open, transition = False, RESOLVED
                st.flags.clear()
        if st.anchor is not None:
            self._after_window(key, st, first_offset)
        return transition

    def _after_window(self, key: SensorKey, st: _State, first_offset: int) -> None:
        st.held += 1
        recent = sum(st.flags) - (st.flags[0] if len(st.flags) == self.n else 0)  # last n-1
        if not st.open and recent == 0:  # idle again: the stretch is closed
            self._spans.setdefault(key[0], []).append((st.anchor, first_offset))
            self._clear_anchor(key, st)
        elif st.held >= self.max_hold_windows:
            self._set_anchor(key, st, first_offset)  # slide: bounded replay, inexact state

    def _set_anchor(self, key: SensorKey, st: _State, offset: int) -> None:
        st.anchor, st.held = offset, 0
        self._anchors.setdefault(key[0], {})[key[1]] = offset

    def _clear_anchor(self, key: SensorKey, st: _State) -> None:
        st.anchor = None
        anchors = self._anchors.get(key[0], {})
        anchors.pop(key[1], None)

    def is_open(self, key: SensorKey) -> bool:
        st = self._states.get(key)
        return bool(st and st.open)

    # -- commit support ------------------------------------------------------------------------

    def safe_offset(self, partition: int, candidate: int) -> int:
        """The highest offset <= candidate from which a replay re-derives every sensor's state."""
        offset = min([candidate, *self._anchors.get(partition, {}).values()])
        spans = self._spans.get(partition, [])
        moved = True
        while moved:
            moved = False
            for start, end in spans:
                if start < offset <= end:
                    offset, moved = start, True
        return offset

    def committed(self, partition: int, offset: int) -> None:
        """Forget closed stretches that lie wholly below a committed offset (commits only go up)."""
        if partition in self._spans:
            self._spans[partition] = [(s, e) for s, e in self._spans[partition] if e >= offset]

    # -- forgetting ----------------------------------------------------------------------------

    def forget(self, keys: list[SensorKey]) -> None:
        """Drop evicted sensors (a sensor that comes back starts fresh)."""
        for key in keys:
            st = self._states.pop(key, None)
            if st is not None and st.anchor is not None:
                self._clear_anchor(key, st)

    def drop_partitions(self, partitions: set[int]) -> None:
        for key in [k for k in self._states if k[0] in partitions]:
            del self._states[key]
        for partition in partitions:
            self._anchors.pop(partition, None)
            self._spans.pop(partition, None)

    def __len__(self) -> int:
        return len(self._states)
