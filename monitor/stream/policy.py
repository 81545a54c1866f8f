"""Alert policies. `ScorePolicy` (below) is the daemon's, on calibrated beat scores. `AlertPolicy`
is round 1's, which the daemon no longer uses: trainer/streams.py keeps it as the baseline that
the calibrated policy is compared with. Per sensor, it fires on k of the last n windows and
resolves after m normal windows:

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from monitor.stream.windowing import SensorKey

Score = TypeVar("Score", float, np.ndarray)
Flag = TypeVar("Flag", bool, np.ndarray)

FIRING, RESOLVED = "firing", "resolved"
#: the rule that opened an anomaly alert (`ScorePolicy.trigger`; the alert record's `trigger`)
AGGREGATE_TRIGGER, FAST_RUN_TRIGGER, GROSS_TRIGGER = "aggregate", "fast_run", "gross"
TRIGGERS = (AGGREGATE_TRIGGER, FAST_RUN_TRIGGER, GROSS_TRIGGER)


@dataclass(slots=True)
class _State:
    flags: deque[bool]  # anomalous? for the last n windows
    open: bool = False
    normal_run: int = 0
    anchor: int | None = None  # first offset of the first window of the current stretch
    held: int = 0  # windows since the anchor


@dataclass
class AlertPolicy:
    """Round 1's k-of-n policy (see the module docstring). Not used by the daemon (it runs
    `ScorePolicy`); kept as the baseline for trainer/streams.py's comparisons."""

    k: int = 2
    n: int = 3
    m: int = 3
    max_hold_windows: int = 1000
    _states: dict[SensorKey, _State] = field(default_factory=dict)
    _anchors: dict[int, dict[str, int]] = field(default_factory=dict)  # partition -> {sensor_id: anchor offset}
    # partition -> [(start, end)] of closed stretches
    _spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

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
            assert st.anchor is not None  # only called on an anchored stretch
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


# -- the calibrated-score policy (round 2) -------------------------------------------------------

SIGNAL_QUALITY = "signal_quality"
AGGREGATES = ("mean", "ewma", "cusum")


@dataclass(frozen=True)
class ScorePolicyConfig:
    """An aggregate of recent calibrated scores with hysteresis; see `ScorePolicy`.

    The defaults are the operating point that `trainer.streams.choose_operating_point` picked for
    a budget of 1 false alert per sensor-hour on ECG5000 validation streams (the mean of the last
    3 scores over 2.9; the same choice on three stream seeds); a model's own report should carry
    its own curve and point.
    """

    aggregate: str = "mean"  # "mean" of the last `window` scores, "ewma" (alpha) or "cusum" (drift)
    window: int = 3
    alpha: float = 0.5
    drift: float = 1.0
    fire_level: float = 2.9
    resolve_level: float = 1.45
    resolve_beats: int = 5  # m: the aggregate stays below resolve_level this long to resolve
    gross_beats: int = 2  # this many consecutive gross beats fire at any time (also while calibrating)
    quality_window: int = 10  # beats over which bad signal quality is counted
    quality_bad_beats: int = 5  # bad beats among them that raise a signal_quality alert
    quality_interval_beats: int = 300  # at most one signal_quality alert per this many beats
    #: a beat's input is its calibrated shape score + rhythm_weight x its rhythm score (monitor.stream.rhythm;
    #: beat windows only, 0 for fixed windows); 0 scores shape alone
    rhythm_weight: float = 0.5
    #: beat windows: the shape input is the larger of the calibrated shape score and template_weight x the beat's
    #: score against the sensor's own template (monitor.stream.template); 0 scores the autoencoder's shape alone
    template_weight: float = 0.7
    #: beat windows: also fire on this many consecutive good beats that are each fast (monitor.stream.rhythm: over
    #: 100 a minute and early against the sensor's rhythm) and unlike the sensor's usual beat (template score at
    #: least `fast_run_level`): ventricular tachycardia, whose beats the mean over a few beats can average below
    #: the fire level; 0 turns the rule off (as does template_weight 0, which computes no template score)
    fast_run_beats: int = 3
    fast_run_level: float = 2.5

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, not {self.aggregate!r}")
        if self.resolve_level > self.fire_level:
            raise ValueError(f"resolve_level {self.resolve_level} > fire_level {self.fire_level}")
        if min(self.window, self.resolve_beats, self.gross_beats, self.quality_bad_beats) < 1 \
                or self.quality_bad_beats > self.quality_window or not 0 < self.alpha <= 1 or self.rhythm_weight < 0 \
                or self.template_weight < 0 or self.fast_run_beats < 0:
            raise ValueError(f"invalid policy config {self}")

    def beat_input(self, shape: Score, template: Score | None = None, rhythm: Score | None = None) -> Score:
        """The policy's input for a window: its calibrated shape score, raised to template_weight x its template
        score where it has one (None or NaN: the template still learns), plus rhythm_weight x its rhythm score.
        One beat's floats in the daemon, or a stream's arrays in the trainer (trainer.streams.policy_input)."""
        if template is not None and self.template_weight:
            shape = np.fmax(shape, self.template_weight * template)
        if rhythm is not None and self.rhythm_weight:
            shape = shape + self.rhythm_weight * rhythm
        return shape

    def fast_run_beat(self, template: Score | None, fast: Flag) -> Flag:
        """Whether a beat counts towards a fast run (`fast_run_beats`): fast, and its template score (None or NaN:
        the template still learns) at least `fast_run_level`. One beat's values in the daemon, or a stream's arrays
        in the trainer."""
        unlike: np.ndarray = np.asarray(False)
        if template is not None and self.fast_run_beats:
            unlike = np.nan_to_num(np.asarray(template, dtype=np.float64), nan=-np.inf) >= self.fast_run_level
        if isinstance(fast, np.ndarray):
            return np.asarray(np.logical_and(fast, unlike), dtype=bool)
        return bool(fast and unlike.all())


@dataclass
class ScoreState:
    """One sensor's policy state (small, bounded: at most `window` + `quality_window` entries)."""

    recent: list[float] = field(default_factory=list)  # last `window` scores (mean only)
    value: float = 0.0  # the aggregate
    open: bool = False
    below: int = 0  # consecutive fed beats with the aggregate below resolve_level (while open)
    gross_run: int = 0
    quality: list[bool] = field(default_factory=list)  # bad? for the last quality_window beats
    quality_cooldown: int = 0  # beats before another signal_quality alert may be raised
    fast_run: int = 0  # consecutive fed beats of a fast run (`ScorePolicyConfig.fast_run_beat`)
    trigger: str | None = None  # the rule that opened the open alert (None while closed)

    def to_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "value": self.value, "open": self.open, "below": self.below,
                "gross_run": self.gross_run, "quality": [int(b) for b in self.quality],
                "quality_cooldown": self.quality_cooldown, "fast_run": self.fast_run, "trigger": self.trigger}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreState:
        return cls([float(x) for x in data["recent"]], float(data["value"]), bool(data["open"]),
                   int(data["below"]), int(data["gross_run"]), [bool(b) for b in data["quality"]],
                   int(data["quality_cooldown"]), int(data.get("fast_run", 0)),  # absent before the fast-run rule
                   data.get("trigger"))


class ScorePolicy:
    """Per sensor, on calibrated beat scores (monitor.stream.calibration):

    - the aggregate (mean of the last `window` scores, EWMA, or CUSUM ``max(0, S + score - drift)``)
      is fed with good-quality, calibrated beats only;
    - closed -> firing: the aggregate exceeds `fire_level`, or `fast_run_beats` consecutive fed beats
      are each a fast-run beat (`ScorePolicyConfig.fast_run_beat`), or `gross_beats` consecutive gross
      beats arrive (the only way to fire while the sensor calibrates);
    - firing -> resolved: the aggregate stays below `resolve_level` for `resolve_beats` fed beats
      (with no gross or fast-run beat among them); the next alert then needs the aggregate to rise again
      (or another fast run);
    - bad-quality beats never feed the aggregate (scored, never an anomaly alert); when
      `quality_bad_beats` of the last `quality_window` beats are bad, a one-shot `signal_quality`
      alert is raised, at most one per `quality_interval_beats` beats.

    `observe` returns the transitions of this beat (usually none); alert ids stay deterministic
    when the caller names them by the beat and its input position (`AlertRecord.make_id`).
    The state of a sensor is restored with `restore(key, snapshot(key))` (e.g. from a changelog),
    so no replay of earlier beats is needed.
    """

    def __init__(self, config: ScorePolicyConfig | None = None) -> None:
        self.config = config or ScorePolicyConfig()
        self._states: dict[SensorKey, ScoreState] = {}

    def observe(self, key: SensorKey, score: float, *, calibrating: bool = False, gross: bool = False,
                good_quality: bool = True, fast_run_beat: bool = False) -> list[str]:
        c = self.config
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = ScoreState()
        transitions = self._quality(st, not good_quality)
        if not good_quality:
            st.gross_run = st.fast_run = 0
            return transitions
        st.gross_run = st.gross_run + 1 if gross else 0
        fast_run_beat = fast_run_beat and not calibrating
        st.fast_run = st.fast_run + 1 if fast_run_beat else 0
        if not calibrating:
            self._feed(st, score)
        if not st.open:
            trigger = self._opening_rule(st, calibrating)
            if trigger is not None:
                st.open, st.below, st.trigger = True, 0, trigger
                transitions.append(FIRING)
        else:
            st.below = st.below + 1 if st.value < c.resolve_level and not gross and not fast_run_beat else 0
            if st.below >= c.resolve_beats:
                st.open, st.trigger = False, None
                transitions.append(RESOLVED)
        return transitions

    def _opening_rule(self, st: ScoreState, calibrating: bool) -> str | None:
        """The rule that opens an alert at this beat, if any (only the gross rule while the sensor calibrates)."""
        c = self.config
        if st.gross_run >= c.gross_beats:
            return GROSS_TRIGGER
        if calibrating:
            return None
        if st.value > c.fire_level:
            return AGGREGATE_TRIGGER
        return FAST_RUN_TRIGGER if 0 < c.fast_run_beats <= st.fast_run else None

    def _feed(self, st: ScoreState, score: float) -> None:
        c = self.config
        if c.aggregate == "mean":
            st.recent = [*st.recent[-(c.window - 1):], score] if c.window > 1 else [score]
            # Until the window is full, missing beats count as 0 (a sensor's median beat).
            st.value = sum(st.recent) / c.window
        elif c.aggregate == "ewma":
            st.value = c.alpha * score + (1 - c.alpha) * st.value  # starts from 0, the median beat
        else:
            st.value = max(0.0, st.value + score - c.drift)

    def _quality(self, st: ScoreState, bad: bool) -> list[str]:
        c = self.config
        st.quality = [*st.quality[-(c.quality_window - 1):], bad] if c.quality_window > 1 else [bad]
        st.quality_cooldown = max(0, st.quality_cooldown - 1)
        if bad and st.quality_cooldown == 0 and sum(st.quality) >= c.quality_bad_beats:
            st.quality_cooldown = c.quality_interval_beats
            return [SIGNAL_QUALITY]
        return []

    def is_open(self, key: SensorKey) -> bool:
        st = self._states.get(key)
        return bool(st and st.open)

    def trigger(self, key: SensorKey) -> str | None:
        """The rule that opened the sensor's open alert (`AGGREGATE_TRIGGER`, `FAST_RUN_TRIGGER` or `GROSS_TRIGGER`);
        None while it has none."""
        st = self._states.get(key)
        return None if st is None else st.trigger

    def aggregate(self, key: SensorKey) -> float | None:
        st = self._states.get(key)
        return None if st is None else st.value

    def snapshot(self, key: SensorKey) -> dict[str, Any] | None:
        st = self._states.get(key)
        return None if st is None else st.to_dict()

    def restore(self, key: SensorKey, data: Mapping[str, Any]) -> None:
        self._states[key] = ScoreState.from_dict(data)

    def forget(self, keys: list[SensorKey]) -> None:
        for key in keys:
            self._states.pop(key, None)

    def drop_partitions(self, partitions: set[int]) -> None:
        for key in [k for k in self._states if k[0] in partitions]:
            del self._states[key]

    def __len__(self) -> int:
        return len(self._states)
