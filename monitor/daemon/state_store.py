"""Per-sensor state (calibration, rhythm, template, alert policy) and its changelog topic, like a Kafka Streams
state store.

`SensorStates` holds, for every sensor of the assigned partitions, its calibration state
(monitor.stream.calibration), for a beat sensor its rhythm (monitor.stream.rhythm) and its beat template
(monitor.stream.template), its policy state
(monitor.stream.policy.ScorePolicy) and a replay marker: the start seq of the last window applied
and the highest input offset among the windows applied. Each batch's changed sensors are written
to a compacted changelog topic, keyed by sensor id and on the *same partition number* as their
input records, so the owner of input partition p restores its sensors by reading changelog
partition p to the end (`ChangelogReader`), never a local file.

Delivery (see `Monitor._flush`): the changelog records of a batch are produced only after a flush
acknowledged the batch's alerts and scores, and the input offsets are committed only after a
second flush acknowledged the changelog records. So a restored state is never behind the
committed offset, and everything it reflects was delivered. It may be *ahead* (a crash between the
second flush and the commit): the replayed windows it already reflects are recognised by the
marker (start seq <= marker seq and completing offset <= marker offset) and skipped: no second
update of the baseline, no second alert, deterministic. A window from a sensor whose seq went back
(a device reset) comes at a higher offset, so it is applied.

Evicted sensors' partial windows: the windower evicts a sensor idle for MONITOR_SENSOR_IDLE_TIMEOUT_S (or
to make room) and hands its partial window (seq and fewer than one window of float32 samples) to
`keep_partial`, so it goes out with the next changes(), before the commit moves past its records. When the
sensor comes back with the seq that continues it, the windower takes the window up again (`partial`); the
first window applied after that clears it.

Bounded: a sensor not seen for `idle_timeout_s` (or the idlest beyond `max_sensors`) is dropped
and a tombstone deletes it from the changelog (compaction then removes it). A changelog record
written by another model version is ignored on restore: a baseline of another model's errors
means nothing for this one.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError

from monitor.core.scoring import Scorer
from monitor.daemon.kafka_io import make_consumer
from monitor.daemon.settings import MonitorSettings
from monitor.stream.calibration import (CALIBRATED, CALIBRATING, Calibrated, CalibrationConfig, CalibrationState,
                                        Calibrator, Prior)
from monitor.stream.policy import ScorePolicy, ScorePolicyConfig
from monitor.stream.rhythm import Rhythm, RhythmState
from monitor.stream.template import Template, TemplateConfig, TemplateScore, TemplateState
from monitor.stream.windowing import Partial, SensorKey

log = logging.getLogger("monitor.daemon.state_store")

#: Version of the changelog value format.
STATE_FORMAT = 1
#: Spread (log units) of the fallback prior when an artefact has no validation error stats.
FALLBACK_PRIOR_SCALE = 0.5
#: z of the 95th percentile: the fallback prior puts the model threshold there (as the trainer does).
Z95 = 1.6449

Change = tuple[int, bytes, bytes | None]  # (partition, key, value; None = tombstone)


@dataclass
class _Sensor:
    calibration: CalibrationState
    seq: int  # start seq of the last window applied
    offset: int  # highest completing offset among the windows applied
    last_seen: float
    partial: Partial | None = None  # the partial window it held when the windower evicted it
    rhythm: RhythmState = field(default_factory=RhythmState)  # beat sensors: its R-R intervals (monitor.stream.rhythm)
    template: TemplateState = field(default_factory=TemplateState)  # beat sensors: its usual beat (.template)


class BeatInfo(NamedTuple):
    """What a beat window adds to its error: its R peak in seconds of the sensor's stream (the rhythm score), its
    R-R interval and its values the way up the lead records them (the template score)."""

    r_peak_s: float
    rr_s: float
    values: np.ndarray


class Outcome(NamedTuple):
    """One window's calibrated score and its policy transitions."""

    calibrated: Calibrated
    transitions: list[str]
    phase: str  # "calibrating" or "calibrated" after this window
    calibrated_threshold: float  # the raw error at which this sensor's score reaches the fire level
    rhythm_score: float | None = None  # beat windows: how premature the beat was (None for fixed windows)
    template_score: float | None = None  # beat windows: how far from the sensor's usual beat (None: calibrating)
    artefact: bool = False  # beat windows: unlike the usual beat and unlike the last ones (monitor.stream.template)
    trigger: str | None = None  # the rule that opened the sensor's open alert (ScorePolicy.trigger)


class SensorStates:
    def __init__(self, calibrator: Calibrator, policy: ScorePolicy, model_version: str, *,
                 idle_timeout_s: float = 86_400.0, max_sensors: int = 200_000, template: Template | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.calibrator = calibrator
        self.policy = policy
        self.rhythm = Rhythm()  # beat sensors' prematurity (the policy weighs it: rhythm_weight)
        #: beat sensors' distance from their own usual beat (policy: template_weight), and motion artefacts
        self.template = template or Template()
        self.model_version = model_version
        self.idle_timeout_s = idle_timeout_s
        self.max_sensors = max_sensors
        self.clock = clock
        self._sensors: OrderedDict[SensorKey, _Sensor] = OrderedDict()  # least recently seen first
        self._dirty: set[SensorKey] = set()
        self._deleted: set[SensorKey] = set()

    def __len__(self) -> int:
        return len(self._sensors)

    # -- scoring ---------------------------------------------------------------------------------

    def apply(self, key: SensorKey, start_seq: int, offset: int, error: float, good_quality: bool,
              beat: BeatInfo | None = None) -> Outcome | None:
        """Calibrate and run the policy on one window (a beat window with its `BeatInfo`, for the rhythm and
        template scores); None when the state already reflects it (a replay after a crash between the
        changelog's flush and the commit)."""
        sensor = self._sensors.get(key)
        if sensor is not None and start_seq <= sensor.seq and offset <= sensor.offset:
            return None
        if sensor is None:
            sensor = self._add(key, start_seq, offset)
        else:
            self._sensors.move_to_end(key)
            sensor.seq, sensor.offset, sensor.last_seen = start_seq, max(offset, sensor.offset), self.clock()
            # Its first window since it came back completed the kept partial window (or the stream went on
            # elsewhere, a reset or a gap, and the windower started afresh): either way it is not needed again.
            sensor.partial = None
        config = self.policy.config
        template = TemplateScore(None) if beat is None or config.template_weight == 0 else \
            self.template.update(sensor.template, beat.values, beat.rr_s, good_quality)
        good_quality = good_quality and not template.artefact  # motion noise: no anomaly alert, nothing learnt
        calibrated = self.calibrator.update(sensor.calibration, error, good_quality)
        rhythm = None if beat is None else self.rhythm.update(sensor.rhythm, beat.r_peak_s, good_quality)
        score = float(config.beat_input(calibrated.score, template.score, None if rhythm is None else rhythm.score))
        fast_run_beat = rhythm is not None and config.fast_run_beat(template.score, rhythm.fast)
        transitions = self.policy.observe(key, score, calibrating=calibrated.calibrating, gross=calibrated.gross,
                                          good_quality=good_quality, fast_run_beat=fast_run_beat)
        self._dirty.add(key)
        return Outcome(calibrated, transitions, self.calibrator.phase(sensor.calibration),
                       self.calibrator.threshold_error(sensor.calibration, config.fire_level),
                       None if rhythm is None else rhythm.score, template.score, template.artefact,
                       self.policy.trigger(key))

    def _add(self, key: SensorKey, seq: int, offset: int) -> _Sensor:
        sensor = self._sensors[key] = _Sensor(self.calibrator.new_state(), seq, offset, self.clock())
        self._deleted.discard(key)
        self._evict_over_capacity()
        return sensor

    # -- evicted sensors' partial windows (the windower's PartialStore) --------------------------

    def keep_partial(self, key: SensorKey, partial: Partial | None) -> None:
        """The windower evicted the sensor: its partial window goes to the changelog with the next changes(),
        which the checkpoint flushes before it commits past the window's records."""
        sensor = self._sensors.get(key)
        if sensor is None:
            if partial is None:
                return
            sensor = self._add(key, -1, -1)  # no window applied yet: nothing is skipped as a replay
        else:
            self._sensors.move_to_end(key)
            sensor.last_seen = self.clock()
        sensor.partial = partial
        self._dirty.add(key)

    def partial(self, key: SensorKey) -> Partial | None:
        sensor = self._sensors.get(key)
        return None if sensor is None else sensor.partial

    def reset_policy(self, key: SensorKey) -> None:
        """Forget the sensor's policy state (e.g. its open alert was resolved on eviction), keeping its
        calibration; the change goes to the changelog with the next changes()."""
        self.policy.forget([key])
        if key in self._sensors:
            self._dirty.add(key)

    def calibrating(self) -> int:
        return sum(1 for s in self._sensors.values() if self.calibrator.phase(s.calibration) == CALIBRATING)

    def calibrated_threshold(self, key: SensorKey) -> float | None:
        sensor = self._sensors.get(key)
        return None if sensor is None else self.calibrator.threshold_error(sensor.calibration,
                                                                           self.policy.config.fire_level)

    # -- the changelog ---------------------------------------------------------------------------

    def changes(self) -> list[Change]:
        """The changelog records of everything changed since the last call (one per sensor)."""
        out: list[Change] = [(p, s.encode(), self.encode((p, s))) for p, s in sorted(self._dirty)]
        out += [(p, s.encode(), None) for p, s in sorted(self._deleted)]
        self._dirty.clear()
        self._deleted.clear()
        return out

    def encode(self, key: SensorKey) -> bytes:
        sensor = self._sensors[key]
        data = {"format": STATE_FORMAT, "model_version": self.model_version, "seq": sensor.seq,
                "offset": sensor.offset, "calibration": sensor.calibration.to_dict(),
                "policy": self.policy.snapshot(key)}
        if sensor.rhythm.last_r is not None:  # beat sensors only
            data["rhythm"] = sensor.rhythm.to_dict()
        if sensor.template.template is not None:
            data["template"] = sensor.template.to_dict()
        if sensor.partial is not None:  # float32 bytes, so the restored window is bit for bit the same
            data["partial"] = {"seq": sensor.partial.start_seq,
                               "values": base64.b64encode(sensor.partial.values.astype("<f4").tobytes()).decode()}
        return json.dumps(data, separators=(",", ":")).encode()

    def restore(self, partition: int, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
        """Replace the partition's sensors by the changelog's last record per key (in log order);
        returns how many sensors were restored."""
        self.drop_partitions({partition})
        latest: dict[str, bytes | None] = {}
        for key, value in records:
            if key is not None:
                latest[key.decode(errors="replace")] = value
        restored = 0
        for sensor_id, value in latest.items():
            if value is not None and self._load((partition, sensor_id), value):
                restored += 1
        self._evict_over_capacity()
        return restored

    def _load(self, key: SensorKey, value: bytes) -> bool:
        try:
            data = json.loads(value)
            if data.get("format") != STATE_FORMAT or data.get("model_version") != self.model_version:
                return False  # another model's baseline: the sensor calibrates again
            calibration = CalibrationState.from_dict(data["calibration"])
            if not (math.isfinite(calibration.location) and math.isfinite(calibration.scale)):
                return False
            sensor = _Sensor(calibration, int(data["seq"]), int(data["offset"]), self.clock(),
                             _partial_of(data.get("partial")), RhythmState.from_dict(data.get("rhythm", {})),
                             TemplateState.from_dict(data.get("template", {})))
            if data.get("policy") is not None:
                self.policy.restore(key, data["policy"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # (binascii.Error is a ValueError)
            log.warning("unreadable changelog record ignored",
                        extra={"sensor_id": key[1][:64], "error": str(exc)[:200]})
            return False
        self._sensors[key] = sensor
        return True

    # -- bounds ----------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Drop sensors idle for idle_timeout_s (tombstones go out with the next changes()); returns how many."""
        now, dropped = self.clock(), 0
        while self._sensors:
            key, sensor = next(iter(self._sensors.items()))
            if now - sensor.last_seen < self.idle_timeout_s:
                break
            self._delete(key)
            dropped += 1
        return dropped

    def _evict_over_capacity(self) -> None:
        while len(self._sensors) > self.max_sensors:
            self._delete(next(iter(self._sensors)))

    def _delete(self, key: SensorKey) -> None:
        del self._sensors[key]
        self.policy.forget([key])
        self._dirty.discard(key)
        self._deleted.add(key)

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget the sensors of revoked partitions (their changelog stays for the next owner)."""
        for key in [k for k in self._sensors if k[0] in partitions]:
            del self._sensors[key]
        self.policy.drop_partitions(partitions)
        self._dirty = {k for k in self._dirty if k[0] not in partitions}
        self._deleted = {k for k in self._deleted if k[0] not in partitions}


def _partial_of(data: Any) -> Partial | None:
    if data is None:
        return None
    values = np.frombuffer(base64.b64decode(data["values"], validate=True), dtype="<f4").astype(np.float32)
    return Partial(int(data["seq"]), values)


# -- building from the artefact and the settings -------------------------------------------------

def prior_of(scorer: Scorer) -> Prior:
    """The model's baseline from its artefact's validation error stats; without them, a prior that
    puts the model's threshold at the 95th percentile with a spread of FALLBACK_PRIOR_SCALE."""
    metadata = getattr(getattr(scorer, "artefact", None), "metadata", None) or {}
    stats = metadata.get("validation_errors")
    threshold = float(scorer.threshold)
    if isinstance(stats, Mapping):
        try:
            return Prior.from_stats(stats, threshold)
        except (KeyError, ValueError, TypeError):
            log.warning("the artefact's validation error stats are unusable; using the threshold-based prior")
    return Prior(math.log(threshold) - Z95 * FALLBACK_PRIOR_SCALE, FALLBACK_PRIOR_SCALE, threshold)


def policy_config(scorer: Scorer, settings: MonitorSettings) -> ScorePolicyConfig:
    """The artefact's operating point ("policy" in its metadata) when it has one, else the
    defaults; the MONITOR_ALERT_* settings that are set override either."""
    metadata = getattr(getattr(scorer, "artefact", None), "metadata", None) or {}
    stored = metadata.get("policy")
    fields = set(ScorePolicyConfig.__dataclass_fields__)
    values: dict[str, Any] = {k: v for k, v in stored.items() if k in fields} if isinstance(stored, Mapping) else {}
    overrides = {"fire_level": settings.alert_fire_level, "resolve_level": settings.alert_resolve_level,
                 "resolve_beats": settings.alert_resolve_beats, "gross_beats": settings.alert_gross_beats,
                 "rhythm_weight": settings.alert_rhythm_weight, "template_weight": settings.alert_template_weight,
                 "fast_run_beats": settings.alert_fast_run_beats, "fast_run_level": settings.alert_fast_run_level}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("resolve_level", 0.0) > values.get("fire_level", ScorePolicyConfig.fire_level):
        values["resolve_level"] = values.get("fire_level", ScorePolicyConfig.fire_level) / 2  # keep hysteresis valid
    return ScorePolicyConfig(**values)


def build_states(scorer: Scorer, settings: MonitorSettings,
                 clock: Callable[[], float] = time.monotonic) -> SensorStates:
    calibration = CalibrationConfig() if settings.calibration_warmup_beats is None else \
        CalibrationConfig(warmup_beats=settings.calibration_warmup_beats)
    # without quality gating, motion artefacts are scored like any beat too
    template = Template(None if settings.quality_gating else TemplateConfig(artefact_beats=0))
    return SensorStates(Calibrator(prior_of(scorer), calibration), ScorePolicy(policy_config(scorer, settings)),
                        scorer.model_version, idle_timeout_s=settings.state_idle_timeout_s,
                        max_sensors=settings.max_sensors, template=template, clock=clock)


# -- reading the changelog -----------------------------------------------------------------------

class Changelog(Protocol):
    """What the loop needs to restore state: the changelog's records of some partitions."""

    def read(self, partitions: Collection[int]) -> dict[int, list[tuple[bytes | None, bytes | None]]]: ...


class ChangelogReader:
    """Reads changelog partitions to their end with its own consumer (assign(), no group), so the
    group member's position and membership are untouched."""

    def __init__(self, settings: MonitorSettings, timeout_s: float = 30.0) -> None:
        self.topic = settings.state_topic
        self.timeout_s = timeout_s
        self.consumer = make_consumer(settings, group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest", client_id=f"{settings.client_id}-state")

    def partitions(self, topic: str) -> set[int] | None:
        parts: set[int] | None = self.consumer.partitions_for_topic(topic)
        return parts

    def read(self, partitions: Collection[int]) -> dict[int, list[tuple[bytes | None, bytes | None]]]:
        """Every record of the partitions, in log order; KafkaTimeoutError past timeout_s."""
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        out: dict[int, list[tuple[bytes | None, bytes | None]]] = {p: [] for p in partitions}
        if not tps:
            return out
        self.consumer.assign(tps)
        try:
            self.consumer.seek_to_beginning(*tps)
            end = self.consumer.end_offsets(tps)
            deadline = time.monotonic() + self.timeout_s
            remaining = {tp for tp in tps if self.consumer.position(tp) < end[tp]}
            while remaining:
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"changelog {self.topic} not read to its end in {self.timeout_s} s")
                for tp, records in self.consumer.poll(timeout_ms=200).items():
                    out[tp.partition].extend((r.key, r.value) for r in records)
                remaining = {tp for tp in remaining if self.consumer.position(tp) < end[tp]}
        finally:
            self.consumer.assign([])
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def check_state_topic(reader: ChangelogReader, settings: MonitorSettings, timeout_s: float = 30.0) -> str | None:
    """None when the changelog topic exists with as many partitions as the input topic, else why not."""
    deadline = time.monotonic() + timeout_s
    while True:
        state, inputs = reader.partitions(settings.state_topic), reader.partitions(settings.input_topic)
        if state is not None and inputs is not None:
            break
        if time.monotonic() > deadline:
            missing = settings.state_topic if state is None else settings.input_topic
            return f"topic {missing} does not exist"
        time.sleep(0.5)
    if len(state) != len(inputs):
        return (f"the state topic {settings.state_topic} has {len(state)} partitions, the input topic "
                f"{settings.input_topic} {len(inputs)}: they must be equal (state is partitioned like the input)")
    return None


__all__ = ["CALIBRATED", "CALIBRATING", "Changelog", "ChangelogReader", "Outcome", "SensorStates", "build_states",
           "check_state_topic", "policy_config", "prior_of"]
