"""`ecg-monitor run`: the monitoring daemon.

One thread runs the loop (the HTTP server has its own):

    poll -> decode (bad -> dead-letter topic) -> per-sensor windows -> pending batch
    when the batch is full or its oldest window waited max_wait_ms:
        score -> alert policy -> send alerts (+ scores) -> flush -> commit safe offsets

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
from monitor.stream.policy import AlertPolicy
from monitor.core.scoring import ArtefactError, Scorer
from monitor.daemon.settings import MonitorSettings, load_settings
from monitor.stream.ledger import Checkpoint, Ledger
from monitor.stream.windowing import Window, Windower
from monitor.stream.wire import AlertRecord, DeadLetter, InvalidRecord, ScoreRecord, decode_input

log = logging.getLogger("monitor.daemon.loop")

AlertState = Literal["firing", "resolved"]  # what AlertPolicy.observe returns for a transition

COMMIT_INTERVAL_S = 1.0  # commits are cheap but not free; at most one a second unless forced
HOUSEKEEPING_INTERVAL_S = 1.0  # idle eviction, reorder timeouts, gauges
LAG_INTERVAL_S = 5.0  # consumer lag and the broker probe behind /readyz
IDLE_POLL_S = 0.2  # poll timeout when nothing is pending: how quickly a stop request is seen
KAFKA_TIMEOUT_S = 5.0  # bound on one flush / commit, so the loop keeps turning
PROBE_TIMEOUT_S = 2.0  # bound on the periodic broker probe
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

    def __init__(self, settings: MonitorSettings, scorer: Scorer, consumer: Any, producer: Any,
                 metrics: Metrics, health: Health | None = None, *,
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
                                 idle_timeout_s=settings.sensor_idle_timeout_s, clock=clock)
        self.batcher = Batcher(settings.max_batch, settings.max_wait_ms / 1000, clock=clock)
        self.policy = AlertPolicy(settings.alert_k, settings.alert_n, settings.resolve_m, settings.replay_max_windows)
        self.outbox = Outbox(producer, self._kafka_error)
        self.ledger = Ledger([self.windower, self.batcher], guard=self.policy)
        self._backoff = Backoff()
        self.checkpoint = Checkpoint(self.ledger, self.outbox.flush, self._commit, interval_s=COMMIT_INTERVAL_S,
                                     retry_delay=self._backoff.fail, on_delivered=self._observe_latency, clock=clock)
        self.stop_requested = False
        self._latency_ts: list[float] = []  # ts of windows sent but not yet flushed
        self._stats_seen = dict(vars(self.windower.stats))
        self._last_housekeeping = self._last_lag = self._last_kafka_error = -float("inf")
        self._reject_logged: dict[str, tuple[float, int]] = {}  # reason -> (last warning, rejected since)

    # -- lifecycle -----------------------------------------------------------------------------

    def subscribe(self) -> None:
        listener = RebalanceListener(self._on_revoked, self._on_assigned, self._on_lost)
        self.consumer.subscribe([self.settings.input_topic], listener=listener)

    def request_stop(self) -> None:
        """Called from a signal handler: only sets flags; the loop does the work."""
        self.stop_requested = True
        self.health.stopping = True

    def run(self) -> int:
        self.subscribe()
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
            return
        wait = self.batcher.wait_s()
        records = self._poll(IDLE_POLL_S if wait is None else min(wait, IDLE_POLL_S))
        if records:
            self._process(records)
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
            records: dict[TopicPartition, list[Any]] = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            self._kafka_error("poll", exc)
            self._sleep(self._backoff.fail())
            return {}
        return records

    def _process(self, records: dict[TopicPartition, list[Any]]) -> None:
        count = 0
        for batch in records.values():
            for record in batch:
                self._handle(record)
            count += len(batch)
            self.ledger.read(batch[-1].partition, batch[-1].offset)
        self.metrics.records.inc(count)
        self.metrics.last_processed.set(time.time())

    def _handle(self, record: Any) -> None:
        try:
            decoded = decode_input(record.key, record.value, self.settings.max_record_bytes)
        except InvalidRecord as error:
            self._reject(record, error)
            return
        windows, evicted = self.windower.add(record.partition, record.offset, decoded)
        if windows:
            self.batcher.extend(windows)
        if evicted:
            self.policy.forget(evicted)

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
        self.metrics.scoring_latency.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        anomalous = errors > self.threshold
        self.metrics.windows_scored.inc(len(batch))
        self.metrics.anomalous_windows.inc(int(anomalous.sum()))
        for error in errors.tolist():
            self.metrics.reconstruction_error.observe(error)
        now = time.time()
        for window, error, flag in zip(batch, errors.tolist(), anomalous.tolist(), strict=True):
            self.ledger.sent(window.partition, window.first_offset)  # scored: its outputs now hold the commit
            transition = self.policy.observe(window.key, flag, window.first_offset)
            if self.settings.scores_topic:
                self._send_score(window, error, flag, now)
            if transition:
                self._send_alert(window, transition, error, now)
            if window.ts is not None:
                self._latency_ts.append(window.ts)

    def _send_score(self, window: Window, error: float, flag: bool, now: float) -> None:
        record = ScoreRecord(sensor_id=window.sensor_id, window_start_seq=window.start_seq,
                             window_end_seq=window.end_seq, score=error, threshold=self.threshold,
                             anomalous=flag, model_version=self.scorer.model_version, scored_at=now)
        self.outbox.send(self.settings.scores_topic, window.sensor_id.encode(), record.to_bytes())
        self.metrics.scores_published.inc()

    def _send_alert(self, window: Window, state: str, error: float, now: float) -> None:
        alert = AlertRecord(alert_id=AlertRecord.make_id(window.sensor_id, window.start_seq, state),
                            sensor_id=window.sensor_id, state=cast(AlertState, state),
                            window_start_seq=window.start_seq, window_end_seq=window.end_seq, score=error,
                            threshold=self.threshold, model_version=self.scorer.model_version, detected_at=now)
        self.outbox.send(self.settings.alerts_topic, window.sensor_id.encode(), alert.to_bytes())
        self.metrics.alerts.labels(state=state).inc()
        log.info("alert", extra={"alert_id": alert.alert_id, "state": state, "score": round(error, 5)})

    # -- delivery: the ledger's checkpoint flushes, then commits through here ---------------------

    def _observe_latency(self) -> None:
        if self._latency_ts:
            now = time.time()
            for ts in self._latency_ts:
                self.metrics.end_to_end_latency.observe(max(0.0, now - ts))
            self._latency_ts.clear()

    def _commit(self, offsets: dict[int, int], timeout_s: float) -> bool:
        try:
            commit_offsets(self.consumer, self.settings.input_topic, offsets, timeout_s)
        except KafkaError as exc:
            self._kafka_error("commit", exc)
            return False
        self.metrics.commits.inc()
        self._kafka_ok()
        return True

    # -- rebalances ----------------------------------------------------------------------------

    def _input_partitions(self, partitions: set[TopicPartition]) -> set[int]:
        return {tp.partition for tp in partitions if tp.topic == self.settings.input_topic}

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        partitions = self._input_partitions(revoked)
        log.info("partitions revoked", extra={"partitions": sorted(partitions)})
        while len(self.batcher):
            self._score_batch()
        if self.checkpoint.flush(KAFKA_TIMEOUT_S):
            # This runs on kafka-python's IO thread: an async commit (a blocking one would raise).
            offsets = self.ledger.to_commit(partitions)
            if offsets:
                commit_offsets_async(self.consumer, self.settings.input_topic, offsets)
        # (after a lost membership kafka-python itself restarts from the commit)
        self.ledger.revoke(partitions)
        self._count_assigned()

    def _on_lost(self, lost: set[TopicPartition]) -> None:
        """Forced out of the group: committing would fail; the new owner replays from the last commit."""
        partitions = self._input_partitions(lost)
        log.warning("partitions lost", extra={"partitions": sorted(partitions)})
        self.ledger.lose(partitions)
        self._count_assigned()

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        # kafka-python keeps the fetch position of a partition that stays assigned across a
        # rebalance, but revoking it threw away its buffered samples: re-read it from the offset
        # below which everything was delivered, or those samples' windows would never be scored.
        resume = self.ledger.resume_points(self._input_partitions(assigned))
        for partition, offset in resume.items():
            self.consumer.seek(TopicPartition(self.settings.input_topic, partition), offset)
        self._count_assigned()
        log.info("partitions assigned", extra={"partitions": sorted(tp.partition for tp in assigned)})

    def _count_assigned(self) -> None:
        count = len(self.consumer.assignment())
        self.health.assigned = count
        self.metrics.assigned_partitions.set(count)

    # -- housekeeping and errors ---------------------------------------------------------------

    def _housekeeping(self) -> None:
        windows, evicted = self.windower.sweep()
        if windows:
            self.batcher.extend(windows)
        if evicted:
            self.policy.forget(evicted)
        self._sync_stats()
        self.metrics.active_sensors.set(len(self.windower))
        if self.clock() - self._last_lag >= LAG_INTERVAL_S:
            self._last_lag = self.clock()
            self._update_lag()
        if self.clock() - self._last_kafka_error > 2 * KAFKA_TIMEOUT_S:
            self.health.kafka_ok = True

    def _sync_stats(self) -> None:
        """Windowing counts -> metrics (the windower stays free of Prometheus)."""
        now = vars(self.windower.stats)
        seen = self._stats_seen
        m = self.metrics
        for name, counter in (("samples", m.samples), ("duplicate_samples", m.duplicate_samples),
                              ("gaps", m.sequence_gaps), ("reordered_records", m.reordered_records),
                              ("evicted_sensors", m.evicted_sensors)):
            if now[name] > seen[name]:
                counter.inc(now[name] - seen[name])
        self._stats_seen = dict(now)

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
    monitor = Monitor(settings, scorer, clients[0], clients[1], metrics, health)
    metrics.ready.set_function(lambda: float(health.readyz()[0]))
    # Everything alive now (torch, the model, the clients) lives as long as the process: keep it
    # out of the garbage collector's full passes, which would otherwise stall the loop scanning it.
    gc.freeze()
    try:
        return monitor.run()
    finally:
        http.stop()


def load_scorer(settings: MonitorSettings) -> Scorer:
    """Load the artefact and run one warm-up batch, so the first real batch is not slow."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    scorer = Scorer.from_file(settings.model_path, device=settings.device, max_batch=settings.max_batch)
    scorer.warm_up()  # also refuses a model whose score is not finite (ArtefactError)
    log.info("model loaded", extra={"path": str(settings.model_path), "model_version": scorer.model_version,
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
