"""`ecg-monitor run`: the monitoring daemon.

One thread runs the loop (the HTTP server has its own):

    poll -> decode (bad -> dead-letter topic) -> per-sensor windows -> pending batch
    when the batch is full or its oldest window waited max_wait_ms:
        score -> signal quality -> per-sensor calibration -> alert policy -> send alerts (+ scores)
        -> flush -> send the changed sensor states to the changelog topic -> flush -> commit safe offsets

Delivery is at-least-once: an offset is committed only when every record below it is fully
processed and everything derived from it (alerts, scores, dead letters) is acknowledged by the
broker. The bookkeeping lives in monitor.stream.ledger (`Ledger`, `Checkpoint`); this loop tells
it what was read and sent, and gives it flush and commit. Kafka failures are counted, logged and retried with
backoff; the loop never exits because of them.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, cast

import numpy as np
from kafka import TopicPartition
from kafka.errors import KafkaError

from monitor import __version__
from monitor.stream.batching import Batcher
from monitor.daemon.http import Health, HttpServer
from monitor.daemon.kafka_io import (Outbox, RebalanceListener, commit_offsets, commit_offsets_async, make_consumer,
                                     make_producer)
from monitor.daemon.logs import setup_logging
from monitor.daemon.metrics import Metrics
from monitor.daemon.state_store import (BeatInfo, Changelog, ChangelogReader, SensorStates, build_states,
                                        check_state_topic)
from monitor.stream import quality
from monitor.core.scoring import ArtefactError, Scorer
from monitor.daemon.settings import MonitorSettings, load_settings
from monitor.stream.ledger import Checkpoint, Ledger
from monitor.stream.beat_windowing import SEGMENT_REASONS, BeatWindow, BeatWindower, beat_fields, convention_of
from monitor.stream.windowing import Window, Windower
from monitor.stream.wire import AlertRecord, AlertTrigger, DeadLetter, InvalidRecord, ScoreRecord, decode_input

log = logging.getLogger("monitor.daemon.loop")

AlertState = Literal["firing", "resolved", "signal_quality"]  # what ScorePolicy.observe returns

COMMIT_INTERVAL_S = 1.0  # commits are cheap but not free; at most one a second unless forced
HOUSEKEEPING_INTERVAL_S = 1.0  # idle eviction, reorder timeouts, gauges
LAG_INTERVAL_S = 5.0  # consumer lag and the broker probe behind /readyz
IDLE_POLL_S = 0.2  # poll timeout when nothing is pending: how quickly a stop request is seen
KAFKA_TIMEOUT_S = 5.0  # bound on one flush / commit, so the loop keeps turning
PROBE_TIMEOUT_S = 2.0  # bound on the periodic broker probe
REBALANCE_BUDGET_S = 3.0  # bound on the work a revocation does inside poll() (scoring, flush)
REJECT_LOG_INTERVAL_S = 10.0  # at most one warning per rejection reason this often


class Backoff:
    """Exponential backoff for retrying Kafka operations: 0.1 s doubling up to `cap_s`."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.first_s, self.cap_s, self.next_s = first_s, cap_s, first_s

    def fail(self) -> float:
        delay, self.next_s = self.next_s, min(self.cap_s, self.next_s * 2)
        return delay

    def ok(self) -> None:
        self.next_s = self.first_s


class Monitor:
    """The main loop. Consumer, producer, scorer and metrics are injected; so are the monotonic
    clock and the sleep (tests drive the loop in fake time)."""

    windower: Windower | BeatWindower  # fixed windows or one per heartbeat (MONITOR_WINDOWING)

    def __init__(self, settings: MonitorSettings, scorer: Scorer, consumer: Any, producer: Any,
                 metrics: Metrics, health: Health | None = None, *, changelog: Changelog | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self.scorer = scorer
        self.consumer = consumer
        self.producer = producer
        self.metrics = metrics
        self.health = health or Health(max_age_s=settings.healthz_max_age_s, model_loaded=True)
        self.clock, self._sleep_s = clock, sleep
        self.threshold = float(scorer.threshold)
        self.windower = Windower(scorer.window_length, settings.hop, reorder_slots=settings.reorder_slots,
                                 reorder_timeout_s=settings.reorder_timeout_s, max_sensors=settings.max_sensors,
                                 idle_timeout_s=settings.sensor_idle_timeout_s, clock=clock,
                                 reorder_max_bytes=settings.reorder_max_bytes, max_seq_gap=settings.max_seq_gap,
                                 evict_min_idle_s=settings.evict_min_idle_s)
        convention = convention_of(scorer.artefact.metadata.get("windowing"), settings.windowing,
                                   scorer.window_length)
        if convention is not None:
            self.windower = BeatWindower(convention, default_fs=settings.default_fs,
                                         reorder_slots=settings.reorder_slots,
                                         reorder_timeout_s=settings.reorder_timeout_s, max_sensors=settings.max_sensors,
                                         idle_timeout_s=settings.sensor_idle_timeout_s, clock=clock,
                                         evict_min_idle_s=settings.evict_min_idle_s)
        self.batcher = Batcher(settings.max_batch, settings.max_wait_ms / 1000, clock=clock)
        # Per-sensor calibration and alert policy, restored from the changelog topic on assignment
        # (`changelog` None: no restore, every sensor starts fresh; unit tests over fakes).
        self.states: SensorStates = build_states(scorer, settings, clock)
        if isinstance(self.windower, Windower):  # an evicted sensor's partial window is kept in its state record
            self.windower.partials = self.states
        self.changelog = changelog
        self._unrestored: set[int] = set()  # assigned partitions whose state could not be read yet (paused)
        # Dead letters that can never be produced are dropped after counting (the record is already
        # judged bad; holding the commit for it would stop the partition); alerts and scores are not.
        self.outbox = Outbox(producer, self._kafka_error, droppable={settings.dlq_topic},
                             on_unproducible=self._unproducible)
        self.ledger = Ledger([self.windower, self.batcher])
        self._backoff = Backoff()
        self.checkpoint = Checkpoint(self.ledger, self._flush, self._commit, interval_s=COMMIT_INTERVAL_S,
                                     retry_delay=self._backoff.fail, on_delivered=self._observe_latency, clock=clock)
        self.stop_requested = False
        self._latency_ts: list[float] = []  # ts of windows sent but not yet flushed
        self._stats_seen = dict(vars(self.windower.stats))
        self._last_housekeeping = self._last_lag = self._last_kafka_error = -float("inf")
        self._reject_logged: dict[str, tuple[float, int]] = {}  # reason -> (last warning, rejected since)
        self.health.progress_timeout_s = settings.progress_timeout_s
        self._lag = 0  # records behind, from the last probe
        self._progress_positions: dict[int, int] = {}
        self._paused: set[TopicPartition] = set()  # partitions this loop paused (backpressure, missing topics)
        self._backpressure = False
        self._last_topic_check = -float("inf")
        self._segments_logged: set[tuple[int, str]] = set()  # sensors whose new segment was logged
        self._unproducible_logged: set[tuple[str, str]] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    def subscribe(self) -> None:
        listener = RebalanceListener(self._guarded_revoked, self._guarded_assigned, self._guarded_lost)
        self.consumer.subscribe([self.settings.input_topic], listener=listener)

    def request_stop(self) -> None:
        """Called from a signal handler: only sets flags; the loop does the work."""
        self.stop_requested = True
        self.health.stopping = True

    def run(self) -> int:
        self.subscribe()
        self._check_outputs()  # before the first poll: not ready, and nothing sent, while one is missing
        log.info("monitor running", extra={"input_topic": self.settings.input_topic,
                                           "group_id": self.settings.group_id,
                                           "model_version": self.scorer.model_version})
        while not self.stop_requested:
            self.step()
        return self.shutdown()

    def step(self) -> None:
        """One loop iteration: poll, process, maybe score a batch, housekeeping."""
        self.health.beat()
        self.metrics.loop_heartbeat.set(time.time())
        if self.checkpoint.undelivered and not self.checkpoint(force=True):
            self._sleep(self._backoff.fail())  # earlier output not delivered: stop consuming until it is
            self._check_outputs()
            self._watch_progress()  # no progress while it lasts: /healthz fails after progress_timeout_s
            return
        self._flow_control()
        wait = self.batcher.wait_s()
        records = self._poll(IDLE_POLL_S if wait is None else min(wait, IDLE_POLL_S))
        if records:
            self._process(records)
            self._flow_control()
        if self.batcher.due():
            self._score_batch()
            self.checkpoint()
        now = self.clock()
        if now - self._last_housekeeping >= HOUSEKEEPING_INTERVAL_S:
            self._last_housekeeping = now
            self._housekeeping()
            self.checkpoint()

    def shutdown(self) -> int:
        """Finish the pending batch, flush, commit, close; bounded by shutdown_timeout_s."""
        budget = self.settings.shutdown_timeout_s
        deadline = self.clock() + budget * 0.8  # the rest is for closing the clients
        watchdog = threading.Timer(budget, _give_up, args=(budget,))
        watchdog.daemon = True
        watchdog.start()
        log.info("stopping: finishing the batch in flight", extra={"pending_windows": len(self.batcher)})
        while len(self.batcher) and self.clock() < deadline:
            self._score_batch()
        clean = False
        while self.clock() < deadline:
            if self.checkpoint(force=True, timeout_s=min(KAFKA_TIMEOUT_S, max(0.1, deadline - self.clock()))):
                clean = True
                break
            self._sleep(min(self._backoff.fail(), max(0.0, deadline - self.clock())), interruptible=False)
        committed = dict(self.ledger.committed)  # closing revokes the partitions, which clears this
        remaining_ms = int(max(0.5, budget * 0.2) * 1000)
        for close in (partial(self.consumer.close, autocommit=False, timeout_ms=remaining_ms),
                      partial(self.producer.close, timeout=remaining_ms / 1000)):
            try:
                close()
            except Exception:  # closing must not turn a clean stop into a crash
                log.exception("error while closing a Kafka client")
        watchdog.cancel()
        log.info("stopped", extra={"clean": clean, "committed": committed})
        return 0 if clean else 1

    # -- input ---------------------------------------------------------------------------------

    def _poll(self, timeout_s: float) -> dict[TopicPartition, list[Any]]:
        try:
            # At most as many records as the pending queue has room for windows (a record completes
            # one window or more), so one poll cannot overfill it.
            room = max(1, self.settings.max_pending_windows - len(self.batcher))
            records: dict[TopicPartition, list[Any]] = self.consumer.poll(
                timeout_ms=int(timeout_s * 1000), max_records=min(room, self.settings.max_poll_records))
        except KafkaError as exc:
            self._kafka_error("poll", exc)
            self._sleep(self._backoff.fail())
            return {}
        return records

    def _process(self, records: dict[TopicPartition, list[Any]]) -> None:
        count = 0
        for tp, batch in records.items():
            for record in batch:
                if len(self.batcher) >= self.settings.max_pending_windows:
                    self.consumer.seek(tp, record.offset)  # full: the rest is fetched again after scoring
                    break
                self._handle(record)
                self.ledger.read(record.partition, record.offset)
                count += 1
        self.metrics.records.inc(count)
        self.metrics.last_processed.set(time.time())

    def _handle(self, record: Any) -> None:
        try:
            decoded = decode_input(record.key, record.value, self.settings.max_record_bytes)
        except InvalidRecord as error:
            self._reject(record, error)
            return
        try:
            windows, _evicted = self.windower.add(record.partition, record.offset, decoded)
        except InvalidRecord as error:  # beat windows: a record without fs and no MONITOR_DEFAULT_FS
            self._reject(record, error)
            return
        if windows:
            self.batcher.extend(windows)

    def _reject(self, record: Any, error: InvalidRecord) -> None:
        self.metrics.invalid_records.labels(reason=error.reason).inc()
        letter = DeadLetter.of(error, record.topic, record.partition, record.offset, record.key, record.value,
                               max_value_bytes=self.settings.dlq_max_value_bytes)
        self.outbox.send(self.settings.dlq_topic, letter.key(), letter.to_bytes(), letter.headers())  # capped key
        self.ledger.sent(record.partition, record.offset)
        self.metrics.dead_letters.inc()
        # A burst of bad records must not flood the log: one warning per reason every 10 s.
        last, since = self._reject_logged.get(error.reason, (-float("inf"), 0))
        fields = {"reason": error.reason, "detail": error.detail[:200], "partition": record.partition,
                  "offset": record.offset}
        if self.clock() - last >= REJECT_LOG_INTERVAL_S:
            log.warning("record rejected to the dead-letter topic",
                        extra={**fields, "rejected_since_last_log": since + 1})
            self._reject_logged[error.reason] = (self.clock(), 0)
        else:
            log.debug("record rejected to the dead-letter topic", extra=fields)
            self._reject_logged[error.reason] = (last, since + 1)

    # -- scoring and alerts --------------------------------------------------------------------

    def _score_batch(self) -> None:
        batch = self.batcher.take()
        if not batch:
            return
        started = time.perf_counter()
        errors = self.scorer.score(np.stack([w.values for w in batch]))
        errors, batch = self._finite_scores(errors, batch)
        self.metrics.scoring_latency.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        anomalous = errors > self.threshold
        self.metrics.windows_scored.inc(len(batch))
        self.metrics.anomalous_windows.inc(int(anomalous.sum()))
        for error in errors.tolist():
            self.metrics.reconstruction_error.observe(error)
        now = time.time()
        problems = self._quality(batch)
        for window, error, flag, bad in zip(batch, errors.tolist(), anomalous.tolist(), problems, strict=True):
            self.ledger.sent(window.partition, window.first_offset)  # scored: its outputs now hold the commit
            if isinstance(window, BeatWindow):
                self.metrics.rr_interval.observe(window.rr_s)
            self._calibrate_and_alert(window, error, flag, bad, now)
            if window.ts is not None:
                self._latency_ts.append(window.ts)

    def _calibrate_and_alert(self, window: Window, error: float, flag: bool, bad: str | None, now: float) -> None:
        """Per-sensor calibration (`bad`: the window's signal-quality problem) -> policy -> score record and alerts."""
        beat = BeatInfo(window.r_peak_seq / window.fs, window.rr_s, window.recorded_values) \
            if isinstance(window, BeatWindow) else None  # beat windows have a rhythm and a template
        outcome = self.states.apply(window.key, window.start_seq, window.last_offset, error, bad is None, beat)
        if outcome is None:  # the restored state already reflects this window: its outputs were delivered
            return
        if outcome.artefact:  # clean samples, but a beat unlike the usual one and the last ones: motion noise
            bad = quality.ARTEFACT
        if bad is not None:
            self.metrics.signal_quality_windows.labels(reason=bad).inc()
        if self.settings.scores_topic:
            record = ScoreRecord(sensor_id=window.sensor_id, window_start_seq=window.start_seq,
                                 window_end_seq=window.end_seq, score=error, threshold=self.threshold,
                                 anomalous=flag, model_version=self.scorer.model_version, scored_at=now,
                                 **beat_fields(window),
                                 calibrated_score=_finite(outcome.calibrated.score),
                                 calibration=cast(Literal["calibrating", "calibrated"], outcome.phase),
                                 calibrated_threshold=_finite(outcome.calibrated_threshold), quality=bad,
                                 rhythm_score=outcome.rhythm_score, template_score=outcome.template_score)
            self.outbox.send(self.settings.scores_topic, window.sensor_id.encode(), record.to_bytes())
            self.metrics.scores_published.inc()
        for state in outcome.transitions:
            alert = AlertRecord(alert_id=AlertRecord.make_id(window.sensor_id, window.start_seq, state,
                                                             window.partition, window.last_offset),
                                sensor_id=window.sensor_id, state=cast(AlertState, state),
                                window_start_seq=window.start_seq, window_end_seq=window.end_seq, score=error,
                                threshold=self.threshold, model_version=self.scorer.model_version, detected_at=now,
                                **beat_fields(window),
                                calibrated_score=_finite(outcome.calibrated.score),
                                calibrated_threshold=_finite(outcome.calibrated_threshold), quality=bad,
                                rhythm_score=outcome.rhythm_score, template_score=outcome.template_score,
                                trigger=cast(AlertTrigger, outcome.trigger) if state == "firing" else None)
            self.outbox.send(self.settings.alerts_topic, window.sensor_id.encode(), alert.to_bytes())
            self.metrics.alerts.labels(state=state).inc()
            if alert.trigger is not None:
                self.metrics.alert_triggers.labels(trigger=alert.trigger).inc()
            log.info("alert", extra={"alert_id": alert.alert_id, "state": state, "trigger": alert.trigger,
                                     "score": round(error, 5),
                                     "calibrated_score": round(outcome.calibrated.score, 3)})

    def _quality(self, batch: list[Window]) -> list[str | None]:
        """Each window's signal-quality problem (lead_off, flat, saturation, noise; `artefact` comes later, from the
        sensor's template) or None, on its
        raw samples (a beat window carries them as `raw`; a fixed window's values are raw). The
        batch is checked at once: one window at a time, numpy's per-call overhead made it 10x slower."""
        if not self.settings.quality_gating:
            return [None] * len(batch)
        segments = [w.values if (raw := getattr(w, "raw", None)) is None else raw for w in batch]
        rates = [getattr(w, "fs", None) or self.settings.default_fs or float(len(values))
                 for w, values in zip(batch, segments, strict=True)]
        return [q.reason for q in quality.check_segments(segments, rates)]

    # -- delivery: the ledger's checkpoint flushes, then commits through here ---------------------

    def _observe_latency(self) -> None:
        if self._latency_ts:
            now = time.time()
            for ts in self._latency_ts:
                self.metrics.end_to_end_latency.observe(max(0.0, now - ts))
            self._latency_ts.clear()

    def _flush(self, timeout_s: float) -> bool:
        """The checkpoint's flush: outputs first, then the changelog records of the sensors they
        changed, so a state on the broker never reflects an output that could still be lost, and
        the commit that follows covers both (see monitor.daemon.state_store)."""
        if not self.outbox.flush(timeout_s):
            return False
        changes = self.states.changes()
        for partition, key, value in changes:
            self.outbox.send(self.settings.state_topic, key, value, partition=partition)
        return not changes or self.outbox.flush(timeout_s)

    def _commit(self, offsets: dict[int, int], timeout_s: float) -> bool:
        try:
            commit_offsets(self.consumer, self.settings.input_topic, offsets, timeout_s)
        except KafkaError as exc:
            self._kafka_error("commit", exc)
            return False
        self.metrics.commits.inc()
        self.health.progressed()
        self._kafka_ok()
        return True

    # -- rebalances ----------------------------------------------------------------------------

    def _input_partitions(self, partitions: set[TopicPartition]) -> set[int]:
        return {tp.partition for tp in partitions if tp.topic == self.settings.input_topic}

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        partitions = self._input_partitions(revoked)
        log.info("partitions revoked", extra={"partitions": sorted(partitions)})
        # Bounded: this runs inside poll(). Windows left unscored are dropped with the partition's
        # state below; its resume point (the safe offset) is below them, so they are re-read.
        deadline = self.clock() + REBALANCE_BUDGET_S
        while len(self.batcher) and self.clock() < deadline:
            self._score_batch()
        if self.checkpoint.flush(max(0.1, min(KAFKA_TIMEOUT_S, deadline - self.clock()))):
            # This runs on kafka-python's IO thread: an async commit (a blocking one would raise).
            offsets = self.ledger.to_commit(partitions)
            if offsets:
                commit_offsets_async(self.consumer, self.settings.input_topic, offsets)
        # (after a lost membership kafka-python itself restarts from the commit)
        self.ledger.revoke(partitions)
        self.states.drop_partitions(partitions)  # the next owner restores them from the changelog
        self._unrestored -= partitions
        self._count_assigned()

    def _on_lost(self, lost: set[TopicPartition]) -> None:
        """Forced out of the group: committing would fail; the new owner replays from the last commit."""
        partitions = self._input_partitions(lost)
        log.warning("partitions lost", extra={"partitions": sorted(partitions)})
        self.ledger.lose(partitions)
        self.states.drop_partitions(partitions)
        self._unrestored -= partitions
        self._count_assigned()

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        # kafka-python keeps the fetch position of a partition that stays assigned across a
        # rebalance, but revoking it threw away its buffered samples: re-read it from the offset
        # below which everything was delivered, or those samples' windows would never be scored.
        partitions = self._input_partitions(assigned)
        resume = self.ledger.resume_points(partitions)
        for partition, offset in resume.items():
            self.consumer.seek(TopicPartition(self.settings.input_topic, partition), offset)
        self._restore(partitions)
        self._count_assigned()
        self._flow_control()  # a missing output topic or a full queue holds new partitions too, before poll fetches
        log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})

    def _restore(self, partitions: set[int]) -> None:
        """Read the partitions' changelog to its end and restore their sensors before any of their
        records is processed; while that fails, the partitions stay paused (retried on housekeeping)."""
        if self.changelog is None or not partitions:
            return
        tps = [TopicPartition(self.settings.input_topic, p) for p in sorted(partitions)]
        try:
            records = self.changelog.read(partitions)
        except KafkaError as exc:
            self._kafka_error("restore", exc)
            self.consumer.pause(*tps)
            self._unrestored |= partitions
            return
        restored = sum(self.states.restore(p, rows) for p, rows in records.items())
        self.metrics.state_restored_sensors.inc(restored)
        if partitions & self._unrestored:
            self.consumer.resume(*(set(tps) - self._paused))  # unless flow control holds them too
            self._unrestored -= partitions
        log.info("sensor state restored", extra={"partitions": sorted(partitions), "sensors": restored})

    def _count_assigned(self) -> None:
        count = len(self.consumer.assignment())
        self.health.assigned = count
        self.metrics.assigned_partitions.set(count)

    # -- reliability: guarded rebalance callbacks, flow control, progress, output topics ---------

    def _guarded_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            self._on_revoked(revoked)
        except Exception:  # noqa: BLE001 - raised inside poll() it would crash the loop
            self._rebalance_failed("revoked")
            self.ledger.revoke(self._input_partitions(revoked))  # drop the state; resume at the safe offset

    def _guarded_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            self._on_assigned(assigned)
        except Exception:  # noqa: BLE001
            self._rebalance_failed("assigned")

    def _guarded_lost(self, lost: set[TopicPartition]) -> None:
        try:
            self._on_lost(lost)
        except Exception:  # noqa: BLE001
            self._rebalance_failed("lost")
            self.ledger.lose(self._input_partitions(lost))

    def _rebalance_failed(self, callback: str) -> None:
        self.metrics.rebalance_errors.inc()
        log.exception("rebalance callback failed; its partitions' state is dropped (re-read from the safe offset)",
                      extra={"callback": callback})

    def _flow_control(self) -> None:
        """Pause fetching while the pending-window queue is full (resume below half of it) or an
        output topic is missing; a paused consumer still polls, so it keeps its group membership."""
        pending, limit = len(self.batcher), self.settings.max_pending_windows
        full = pending >= limit or (self._backpressure and pending > limit // 2)
        if full and not self._backpressure:
            self.metrics.backpressure_pauses.inc()
        self._backpressure = full
        assigned = set(self.consumer.assignment())
        if full or self.health.missing_topics:
            fresh = assigned - set(self.consumer.paused())
            if fresh:
                self.consumer.pause(*fresh)
                self._paused |= fresh
        elif self._paused:
            unrestored = {TopicPartition(self.settings.input_topic, p) for p in self._unrestored}
            self.consumer.resume(*(self._paused & assigned - unrestored))  # those wait for their state
            self._paused.clear()

    def _finite_scores(self, errors: np.ndarray, batch: list[Window]) -> tuple[np.ndarray, list[Window]]:
        """Only finite scores go on to the policy, the metrics and the scores topic. A non-finite one
        (the model overflowed) is counted and logged; its window is skipped, not taken for normal."""
        finite = np.isfinite(errors)
        if finite.all():
            return errors, batch
        bad = [w for w, ok in zip(batch, finite.tolist(), strict=True) if not ok]
        self.metrics.non_finite_scores.inc(len(bad))
        log.warning("non-finite scores; windows skipped", extra={
            "count": len(bad), "sensor_id": bad[0].sensor_id, "window_start_seq": bad[0].start_seq})
        return errors[finite], [w for w, ok in zip(batch, finite.tolist(), strict=True) if ok]

    def _unproducible(self, topic: str, reason: str, exc: BaseException) -> None:
        """An output that can never be produced: counted; logged once per topic and reason."""
        kind = {self.settings.dlq_topic: "dlq", self.settings.alerts_topic: "alerts"}.get(topic, "scores")
        self.metrics.unproducible_outputs.labels(topic=kind, reason=reason).inc()
        if (topic, reason) not in self._unproducible_logged:
            self._unproducible_logged.add((topic, reason))
            policy = "dropped" if kind == "dlq" else "retried; offsets are not committed past it"
            log.error("output record cannot be produced", extra={
                "topic": topic, "reason": reason, "policy": policy, "error": f"{type(exc).__name__}: {exc}"[:300]})

    def _watch_progress(self) -> None:
        """Tell /healthz whether there is work and whether the loop gets through it: progress is
        records consumed with every output delivered (or nothing to do)."""
        positions = dict(self.ledger.positions)
        moved, self._progress_positions = positions != self._progress_positions, positions
        work = self._lag > 0 or len(self.batcher) > 0 or self.checkpoint.undelivered
        # A missing output topic is reported by /readyz; a restart would not create it.
        if not work or (moved and not self.checkpoint.undelivered) or self.health.missing_topics:
            self.health.progressed()
        self.health.has_work = work

    def _check_outputs(self) -> None:
        """Not ready while an output topic is missing; its records wait (no send() blocking for
        metadata) and fetching pauses. Checked every topic_check_interval_s."""
        now = self.clock()
        if now - self._last_topic_check < self.settings.topic_check_interval_s or not self.health.kafka_ok:
            return  # not while Kafka is unreachable: kafka-python's metadata request would block until it is back
        self._last_topic_check = now
        topics = [t for t in (self.settings.alerts_topic, self.settings.dlq_topic, self.settings.scores_topic) if t]
        try:
            missing = tuple(t for t in topics if not self.consumer.partitions_for_topic(t))
        except KafkaError as exc:
            self._kafka_error("metadata", exc)
            return
        if missing != self.health.missing_topics:
            if missing:
                log.error("output topics missing: not ready, not consuming", extra={"topics": list(missing)})
            else:
                log.info("output topics present", extra={"topics": topics})
        self.health.missing_topics = missing
        self.outbox.missing = set(missing)

    def _resolve_evicted(self, evicted: list[tuple[int, str]]) -> None:
        """A sensor evicted for idleness with its alert open gets a `resolved` alert (its span is
        empty: the window it would have completed next, score 0), so no alert is orphaned by a sensor
        that went away; its policy state is forgotten (calibration stays in the state store)."""
        starts: dict[tuple[int, str], int] = getattr(self.windower, "evicted_at", {})
        now = time.time()
        for key in evicted:
            if not self.states.policy.is_open(key):
                continue
            seq, position = starts.get(key, 0), self.ledger.positions.get(key[0], 0)
            alert = AlertRecord(alert_id=AlertRecord.make_id(key[1], seq, "resolved", key[0], position),
                                sensor_id=key[1],
                                state="resolved", window_start_seq=seq, window_end_seq=seq, score=0.0,
                                threshold=self.threshold, model_version=self.scorer.model_version, detected_at=now)
            self.outbox.send(self.settings.alerts_topic, key[1].encode(), alert.to_bytes())
            self.ledger.sent(key[0], position)
            self.states.reset_policy(key)  # the changelog learns it too: a restart does not reopen it
            self.metrics.alerts.labels(state="resolved").inc()
            log.info("alert resolved: sensor evicted while firing", extra={"alert_id": alert.alert_id})
        starts.clear()

    def _log_segments(self) -> None:
        """A sensor's new segment (reboot, seq jump) is logged once per sensor."""
        segments: list[Any] = getattr(self.windower, "new_segments", [])
        for segment in segments:
            if segment.key not in self._segments_logged and len(self._segments_logged) < 100_000:
                self._segments_logged.add(segment.key)
                log.warning("sensor seq restarted: new segment", extra={
                    "sensor_id": segment.key[1], "partition": segment.key[0], "reason": segment.reason,
                    "expected_seq": segment.previous_next_seq, "seq": segment.seq})
        segments.clear()

    # -- housekeeping and errors ---------------------------------------------------------------

    def _housekeeping(self) -> None:
        windows, evicted = self.windower.sweep()
        if windows:
            self.batcher.extend(windows)
        self._resolve_evicted(evicted)
        self.states.sweep()  # calibrations idle past MONITOR_STATE_IDLE_TIMEOUT_S: tombstones
        self.metrics.calibrating_sensors.set(self.states.calibrating())
        if self._unrestored:
            self._restore(set(self._unrestored))
        self._sync_segments()
        self._sync_stats()
        self._log_segments()
        self.metrics.active_sensors.set(len(self.windower))
        self.metrics.pending_windows.set(len(self.batcher))
        self.metrics.buffered_bytes.set(getattr(self.windower, "memory_bytes", lambda: 0)())
        self._watch_progress()
        if self.clock() - self._last_lag >= LAG_INTERVAL_S:
            self._last_lag = self.clock()
            self._update_lag()
        self._check_outputs()  # after the probe, which tells whether the broker answers
        if self.clock() - self._last_kafka_error > 2 * KAFKA_TIMEOUT_S:
            self.health.kafka_ok = True

    def _sync_stats(self) -> None:
        """Windowing counts -> metrics (the windower stays free of Prometheus)."""
        now = vars(self.windower.stats)
        seen = self._stats_seen
        m = self.metrics
        for name, counter in (("samples", m.samples), ("duplicate_samples", m.duplicate_samples),
                              ("gaps", m.sequence_gaps), ("reordered_records", m.reordered_records),
                              ("evicted_sensors", m.evicted_sensors), ("evicted_samples", m.evicted_samples)):
            if now.get(name, 0) > seen.get(name, 0):
                counter.inc(now[name] - seen.get(name, 0))
        self._stats_seen = dict(now)

    def _sync_segments(self) -> None:
        """Segment and beat counts -> metrics; before _sync_stats, which takes the new baseline. A windower
        counts segments started for a reason as `<reason>_segments`, beat windowers their beats as `beats`."""
        now, seen = vars(self.windower.stats), self._stats_seen
        for reason in SEGMENT_REASONS:
            name = f"{reason}_segments"
            if now.get(name, 0) > seen.get(name, 0):
                self.metrics.segments_started.labels(reason=reason).inc(now[name] - seen.get(name, 0))
        if now.get("beats", 0) > seen.get("beats", 0):
            self.metrics.beats.inc(now["beats"] - seen.get("beats", 0))

    def _update_lag(self) -> None:
        """Lag from the high watermarks that fetches bring back; an end_offsets request doubles as
        the broker probe behind /readyz (poll() alone does not report an outage)."""
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        try:
            self.consumer.end_offsets(assigned, timeout_ms=int(PROBE_TIMEOUT_S * 1000))
        except KafkaError as exc:
            self._kafka_error("probe", exc)
            return
        self._kafka_ok()
        lag = 0
        for tp in assigned:
            high = self.consumer.highwater(tp)
            position = self.ledger.positions.get(tp.partition)
            if high is not None and position is not None:
                lag += max(0, high - position)
        self.metrics.consumer_lag.set(lag)
        self._lag = lag

    def _kafka_error(self, operation: str, exc: Exception) -> None:
        self.metrics.kafka_errors.labels(operation=operation).inc()
        self.health.kafka_ok = False
        self._last_kafka_error = self.clock()
        log.warning("kafka operation failed; will retry", extra={
            "operation": operation, "error": f"{type(exc).__name__}: {exc}"[:300]})

    def _kafka_ok(self) -> None:
        self._backoff.ok()
        if self.clock() - self._last_kafka_error > KAFKA_TIMEOUT_S:
            self.health.kafka_ok = True

    def _sleep(self, seconds: float, interruptible: bool = True) -> None:
        """Sleep in small steps, keeping the heartbeat fresh and (unless told not to) ending early on a stop request."""
        end = self.clock() + seconds
        while not (interruptible and self.stop_requested) and self.clock() < end:
            self.health.beat()
            self._sleep_s(min(0.1, max(0.0, end - self.clock())))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _give_up(budget: float) -> None:
    log.error("graceful stop exceeded its budget; exiting now", extra={"shutdown_timeout_s": budget})
    logging.shutdown()
    os._exit(1)


# -- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env-file", default=".env", help="dotenv file read after the environment (MONITOR_* names)")


def main(args: argparse.Namespace) -> int:
    settings = load_settings(args.env_file)
    if settings is None:
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        scorer = load_scorer(settings)
    except (ArtefactError, RuntimeError) as exc:
        log.error("cannot load the model", extra={"error": str(exc)})
        return 1
    metrics = Metrics(threshold=scorer.threshold)
    metrics.build_info.info({"version": __version__, "model_version": scorer.model_version,
                             "device": str(scorer.device)})
    health = Health(max_age_s=settings.healthz_max_age_s, model_loaded=True)
    http = HttpServer(settings.metrics_host, settings.metrics_port, metrics.registry, health).start()
    log.info("http listening", extra={"port": http.port})
    monitor: Monitor | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        if monitor is not None and not monitor.stop_requested:
            log.info("stop requested", extra={"signal": signal.Signals(signum).name})
            monitor.request_stop()
        else:
            os._exit(128 + signum)  # a second signal (or one during start-up) ends it now

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    clients = connect(settings, health)
    if clients is None:
        http.stop()
        return 0
    changelog = open_changelog(settings)
    if changelog is None:
        for client in clients:
            client.close()
        http.stop()
        return 1
    monitor = Monitor(settings, scorer, clients[0], clients[1], metrics, health, changelog=changelog)
    metrics.ready.set_function(lambda: float(health.readyz()[0]))
    # Everything alive now (torch, the model, the clients) lives as long as the process: keep it
    # out of the garbage collector's full passes, which would otherwise stall the loop scanning it.
    gc.freeze()
    try:
        return monitor.run()
    finally:
        changelog.close()
        http.stop()


def open_changelog(settings: MonitorSettings) -> ChangelogReader | None:
    """The reader of the state topic, once the topic is checked (it must exist with as many
    partitions as the input topic); None after logging why not."""
    try:
        changelog = ChangelogReader(settings)
    except KafkaError as exc:
        log.error("cannot open the state topic", extra={"error": str(exc)[:300]})
        return None
    problem = check_state_topic(changelog, settings)
    if problem is not None:
        log.error("the state topic is not usable", extra={"error": problem, "state_topic": settings.state_topic})
        changelog.close()
        return None
    return changelog


def load_scorer(settings: MonitorSettings) -> Scorer:
    """Load the artefact and run one warm-up batch, so the first real batch is not slow."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    scorer = Scorer.from_file(settings.model_file, device=settings.device, max_batch=settings.max_batch)
    scorer.warm_up()  # also refuses a model whose score is not finite (ArtefactError)
    log.info("model loaded", extra={"path": str(settings.model_file), "model_version": scorer.model_version,
                                    "window_length": scorer.window_length, "threshold": scorer.threshold,
                                    "device": str(scorer.device)})
    return scorer


def _make_clients(settings: MonitorSettings) -> tuple[Any, Any]:
    consumer = make_consumer(settings)
    try:
        return consumer, make_producer(settings)
    except BaseException:
        consumer.close(autocommit=False)
        raise


def connect(settings: MonitorSettings, health: Health) -> tuple[Any, Any] | None:
    """Create consumer and producer, retrying with backoff while the broker is unreachable
    (a down broker must not crash-loop the daemon). None if a stop signal came first."""
    backoff = Backoff(first_s=0.5, cap_s=5.0)
    stop = {"flag": False}
    previous = {s: signal.signal(s, lambda *_: stop.update(flag=True)) for s in (signal.SIGTERM, signal.SIGINT)}
    health.kafka_ok = False
    try:
        while not stop["flag"]:
            health.beat()
            try:
                return _make_clients(settings)
            except KafkaError as exc:
                health.kafka_ok = False
                delay = backoff.fail()
                log.warning("cannot reach Kafka; retrying", extra={"error": str(exc)[:300], "retry_in_s": delay})
                end = time.monotonic() + delay
                while not stop["flag"] and time.monotonic() < end:
                    health.beat()
                    time.sleep(0.1)
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        health.kafka_ok = True
