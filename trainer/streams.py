"""Stream evaluation: per-beat errors -> calibration -> alert policy -> stream metrics.

Used by the trainer's report, the benchmark and the tests. A `Stream` is one sensor's beats in
order: reconstruction errors, class labels and beat times. Streams come from ECG5000 (held-out
beats concatenated at one beat per second, with injected runs of anomalous beats) or from an
annotated recording (`annotated_stream`, AAMI classes). The same `Calibrator` and `ScorePolicy`
the monitor uses turn errors into alerts; `evaluate` reports:

- per-beat AUROC of each anomalous class against the normal beats (calibrated scores);
- event-level detection: an *anomalous run* (maximal stretch of non-normal beats) counts once and
  is detected when an alert fires within it (plus `grace_beats`); delay in beats (0 = on its
  first beat) and in seconds (beat times, processing latency not included);
- false alerts per sensor-hour: alerts that fire outside the runs (and `settle_beats` after
  each run), over the time outside them and after each sensor's warm-up;
- the NAB score, standard profile (`nab_score`).

`choose_operating_point` sweeps policy parameters on validation streams and picks the most
sensitive point within a false-alert budget; `plot_operating_curve` draws the curve.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from monitor.stream.calibration import CalibrationConfig, Calibrator, Prior
from monitor.stream import rhythm, template
from monitor.stream.policy import FIRING, RESOLVED, AlertPolicy, ScorePolicy, ScorePolicyConfig

#: MIT-BIH beat annotation symbols -> AAMI EC57 classes (N normal, S supraventricular ectopic,
#: V ventricular ectopic, F fusion, Q unknown/paced).
AAMI = {**dict.fromkeys("NLRej", "N"), **dict.fromkeys("AaJS", "S"), **dict.fromkeys("VE", "V"), "F": "F",
        **dict.fromkeys("/fQ", "Q")}


@dataclass(frozen=True)
class Stream:
    """One sensor's beats, in order."""

    sensor_id: str
    errors: np.ndarray  # (n,) reconstruction error per beat
    labels: np.ndarray  # (n,) class per beat (str)
    times_s: np.ndarray  # (n,) beat time in seconds
    normal_label: str = "1"
    good_quality: np.ndarray | None = None  # (n,) bool; None: all good
    #: (n,) each beat's score against the sensor's own template (monitor.stream.template; NaN while it calibrates),
    #: computed in stream order from the beat windows; None: no windows (fixed windows, or errors only)
    template_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def anomalous(self) -> np.ndarray:
        return np.asarray(self.labels != self.normal_label)

    @property
    def runs(self) -> list[tuple[int, int]]:
        """Maximal stretches [start, end) of non-normal beats."""
        return runs_of(self.anomalous)


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate(([0], np.asarray(mask, dtype=np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def annotated_stream(sensor_id: str, errors: np.ndarray, times_s: np.ndarray, symbols: Sequence[str],
                     good_quality: np.ndarray | None = None, windows: np.ndarray | None = None,
                     rr_s: np.ndarray | None = None, template_config: template.TemplateConfig | None = None) -> Stream:
    """A recording's beats (MIT-BIH symbols, or AAMI classes already) as a stream with normal "N"; with its beat
    `windows` (the way up the lead records them) and their R-R intervals, each beat's template score too (and its
    artefacts marked bad)."""
    labels = np.asarray([AAMI.get(s, s) for s in symbols], dtype=object)
    scores = None
    if windows is not None and rr_s is not None:
        scores, good_quality = _with_template(windows, rr_s, good_quality, template_config)
    return Stream(sensor_id, np.asarray(errors, dtype=np.float64), labels, np.asarray(times_s, dtype=np.float64),
                  "N", good_quality, scores)


def _with_template(windows: np.ndarray, rr_s: np.ndarray | float, good_quality: np.ndarray | None,
                   config: template.TemplateConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The template scores of a stream's beat windows, and its signal quality with the template's artefact beats
    marked bad (the daemon treats them so: monitor.daemon.state_store)."""
    scores, artefact = template.score_windows(windows, rr_s, good_quality, config)
    return scores, ~artefact if good_quality is None else np.asarray(good_quality, dtype=bool) & ~artefact


def ecg5000_streams(errors: np.ndarray, labels: np.ndarray, *, n_streams: int, minutes: float = 60,
                    runs_per_hour: float = 0, run_lengths: tuple[int, int] = (3, 6), warmup_beats: int = 150,
                    min_gap: int = 60, beat_period_s: float = 1.0, normal_label: str = "1",
                    seed: int = 0, windows: np.ndarray | None = None) -> list[Stream]:
    """Streams of a pool of scored ECG5000 beats at one beat per `beat_period_s`: the normal beats
    reshuffled and concatenated (each used once per pass), with `runs_per_hour` injected runs of
    anomalous beats (length uniform in `run_lengths`, one class per run, the class drawn in
    proportion to the pool, beats drawn from it) after the warm-up, at least `min_gap` beats apart.
    With the pool's beat `windows` (a model served on beat windows), each stream has its template scores."""
    errors, labels = np.asarray(errors, dtype=np.float64), np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(labels == normal_label)
    anomalous = np.flatnonzero(labels != normal_label)
    n_beats = round(minutes * 60 / beat_period_s)
    n_runs = round(runs_per_hour * minutes / 60)
    if n_runs and (len(anomalous) == 0 or warmup_beats + n_runs * (run_lengths[1] + min_gap) > n_beats):
        raise ValueError(f"cannot place {n_runs} runs in {n_beats} beats (or no anomalous beats)")
    streams, order = [], np.empty(0, dtype=np.int64)
    for s in range(n_streams):
        while len(order) < n_beats:
            order = np.concatenate([order, rng.permutation(normal)])
        rows, order = order[:n_beats].copy(), order[n_beats:]
        for start, length in _run_slots(rng, n_beats, n_runs, run_lengths, warmup_beats, min_gap):
            cls = labels[rng.choice(anomalous)]
            rows[start:start + length] = rng.choice(np.flatnonzero(labels == cls), length)
        scores, good = (None, None) if windows is None else _with_template(windows[rows], beat_period_s, None)
        streams.append(Stream(f"ecg5000-{seed}-{s}", errors[rows], labels[rows], np.arange(n_beats) * beat_period_s,
                              normal_label, good, scores))
    return streams


def _run_slots(rng: np.random.Generator, n_beats: int, n_runs: int, lengths: tuple[int, int], warmup: int,
               gap: int) -> list[tuple[int, int]]:
    """Run starts spread at random: the free beats are split at random among the gaps."""
    if n_runs == 0:
        return []
    run_len = rng.integers(lengths[0], lengths[1] + 1, n_runs)
    free = n_beats - warmup - int(run_len.sum()) - n_runs * gap
    extra = np.diff(np.concatenate(([0], np.sort(rng.integers(0, free + 1, n_runs)))))
    starts = warmup + np.cumsum(extra + gap) + np.concatenate(([0], np.cumsum(run_len)[:-1]))
    return list(zip(starts.tolist(), run_len.tolist(), strict=True))


# -- calibration and policy over a stream --------------------------------------------------------------------------

@dataclass(frozen=True)
class Scored:
    """A stream after per-sensor calibration."""

    stream: Stream
    scores: np.ndarray
    calibrating: np.ndarray  # bool; a prefix of the stream
    gross: np.ndarray  # bool
    #: bool per beat: a beat of a fast run (`ScorePolicyConfig.fast_run_beat`); None: none (fixed windows, or no
    #: beat times, as in `calibrate`'s output before `policy_input`)
    fast_run_beats: np.ndarray | None = None


def calibrate(stream: Stream, calibrator: Calibrator) -> Scored:
    state = calibrator.new_state()
    good = stream.good_quality if stream.good_quality is not None else np.ones(len(stream), dtype=bool)
    out = [calibrator.update(state, e, g) for e, g in zip(stream.errors.tolist(), good.tolist(), strict=True)]
    scores, calibrating, gross = (np.asarray(col) for col in zip(*out, strict=True)) if out else (np.empty(0),) * 3
    return Scored(stream, scores.astype(np.float64), calibrating.astype(bool), gross.astype(bool))


def policy_alerts(scored: Scored, config: ScorePolicyConfig) -> list[tuple[int, str]]:
    """(beat index, transition) of `ScorePolicy` over one scored stream, beat by beat (exact)."""
    policy, key = ScorePolicy(config), (0, scored.stream.sensor_id)
    good = scored.stream.good_quality
    fast = scored.fast_run_beats
    out = []
    for i, (score, cal, gross) in enumerate(zip(scored.scores.tolist(), scored.calibrating.tolist(),
                                                scored.gross.tolist(), strict=True)):
        ok = True if good is None else bool(good[i])
        out += [(i, t) for t in policy.observe(key, score, calibrating=cal, gross=gross, good_quality=ok,
                                               fast_run_beat=fast is not None and bool(fast[i]))]
    return out


def open_between(transitions: list[tuple[int, str]], n_beats: int) -> np.ndarray:
    """Per beat, whether an anomaly alert is open at it, from a stream's `policy_alerts` transitions: from the
    beat that fires it up to the one before the beat that resolves it."""
    is_open = np.zeros(n_beats, dtype=bool)
    since: int | None = None
    for i, transition in transitions:
        if transition == FIRING:
            since = i
        elif transition == RESOLVED and since is not None:
            is_open[since:i], since = True, None
    if since is not None:
        is_open[since:] = True
    return is_open


def alerted_runs(stream: Stream, is_open: np.ndarray, min_length: int = 3, warmup_beats: int = 0,
                 label: str | None = None) -> tuple[int, int]:
    """(runs of at least `min_length` non-normal beats starting after the warm-up, how many have an anomaly
    alert open at one of their beats). Unlike `event_stats`' detection, a run inside an alert that is already
    open counts: what a clinician watching the sensor sees. With `label`, runs of beats of that class only
    (label "V", min_length 3: ventricular tachycardia, non-sustained or longer)."""
    stretches = stream.runs if label is None else runs_of(np.asarray(stream.labels) == label)
    runs = [(a, b) for a, b in stretches if b - a >= min_length and a >= warmup_beats]
    return len(runs), sum(bool(is_open[a:b].any()) for a, b in runs)


def fired(scored: Scored, config: ScorePolicyConfig) -> np.ndarray:
    """Beat indices where `ScorePolicy` fires an anomaly alert: the same as `policy_alerts`, computed
    from the aggregate series (the aggregate does not depend on the alert state), so a parameter
    sweep over many sensor-hours runs in seconds. tests/test_streams.py checks the equality."""
    return _fire_events(_Prepared.of(scored, config), config)


@dataclass(frozen=True)
class _Prepared:
    """What the alert events of one stream depend on, besides the levels."""

    index: np.ndarray  # beats that feed the policy (bad-quality beats leave the anomaly state untouched)
    value: np.ndarray  # the aggregate after each of them (0 while calibrating: not fed)
    calibrating: np.ndarray
    gross: np.ndarray
    gross_run: np.ndarray
    fast: np.ndarray  # a fast-run beat (fed: not calibrating)
    fast_run: np.ndarray

    @classmethod
    def of(cls, scored: Scored, config: ScorePolicyConfig) -> _Prepared:
        good = scored.stream.good_quality
        keep = np.ones(len(scored.scores), dtype=bool) if good is None else np.asarray(good, dtype=bool)
        index = np.flatnonzero(keep)
        calibrating = scored.calibrating[index]
        value = aggregate_series(scored.scores[index][~calibrating], config)
        value = np.concatenate([np.zeros(int(calibrating.sum())), value])  # calibrating is a prefix
        fast = np.zeros(len(keep), dtype=bool) if scored.fast_run_beats is None else \
            np.asarray(scored.fast_run_beats, dtype=bool) & ~scored.calibrating
        return cls(index, value, calibrating, scored.gross[index], _run_lengths(scored.gross & keep)[index],
                   fast[index], _run_lengths(fast & keep)[index])


def _fire_events(p: _Prepared, config: ScorePolicyConfig) -> np.ndarray:
    fast_run = (p.fast_run >= config.fast_run_beats) if config.fast_run_beats else np.zeros_like(p.fast)
    above = (p.gross_run >= config.gross_beats) | (((p.value > config.fire_level) | fast_run) & ~p.calibrating)
    quiet = (p.value < config.resolve_level) & ~p.gross & ~p.fast
    # quiet_ends: beats j whose m last beats are all quiet (an alert fired before j-m+1 resolves at j)
    m = config.resolve_beats
    quiet_count = np.concatenate(([0], np.cumsum(quiet)))
    quiet_ends = np.flatnonzero(quiet_count[m:] - quiet_count[:-m] == m) + m - 1
    events, closed_at = [], -1
    for i in np.flatnonzero(above).tolist():
        if i > closed_at:
            events.append(i)
            k = np.searchsorted(quiet_ends, i + m)
            closed_at = int(quiet_ends[k]) if k < len(quiet_ends) else len(p.value)
    return p.index[np.asarray(events, dtype=np.int64)]


def _run_lengths(mask: np.ndarray) -> np.ndarray:
    """Length of the run of True ending at each index (0 where False)."""
    count = np.cumsum(mask)
    reset = np.maximum.accumulate(np.where(~mask, count, 0))
    return np.asarray(count - reset)


def aggregate_series(scores: np.ndarray, config: ScorePolicyConfig) -> np.ndarray:
    """The policy's aggregate after each fed beat, in the policy's own arithmetic."""
    x = scores.tolist()
    if config.aggregate == "mean":
        w = config.window
        padded = [0.0] * (w - 1) + x
        return np.asarray([sum(padded[i:i + w]) / w for i in range(len(x))]) if w > 1 else np.asarray(x) / 1
    if config.aggregate == "ewma":
        a = config.alpha
        return np.asarray(list(itertools.accumulate(x, lambda v, s: a * s + (1 - a) * v, initial=0.0))[1:])
    d = config.drift
    return np.asarray(list(itertools.accumulate(x, lambda v, s: max(0.0, v + s - d), initial=0.0))[1:])


def legacy_fired(stream: Stream, threshold: float, k: int = 2, n: int = 3, m: int = 3) -> np.ndarray:
    """Today's policy (k of n beats over the model threshold, resolve after m normal ones)."""
    policy, key = AlertPolicy(k, n, m), (0, stream.sensor_id)
    flags = (stream.errors > threshold).tolist()
    return np.asarray([i for i, f in enumerate(flags) if policy.observe(key, f, i) == FIRING], dtype=np.int64)


# -- metrics ---------------------------------------------------------------------------------------------------------

def per_class_auroc(scored: Iterable[Scored]) -> dict[str, float]:
    """AUROC of each anomalous class against the normal beats, per beat, pooled over streams."""
    items = list(scored)
    scores = np.concatenate([s.scores for s in items])
    labels = np.concatenate([s.stream.labels.astype(str) for s in items])
    normal = items[0].stream.normal_label
    out = {}
    for cls in sorted(set(labels) - {normal}):
        rows = (labels == normal) | (labels == cls)
        if (labels == normal).any():
            out[cls] = float(roc_auc_score(labels[rows] == cls, scores[rows]))
    return out


@dataclass(frozen=True)
class EventStats:
    runs: int
    detected: int
    delays_beats: list[int]
    delays_s: list[float]
    false_alerts: int
    normal_hours: float
    by_class: dict[str, tuple[int, int]]  # class -> (runs, detected)
    #: run length ("1": an isolated beat, "2": a couplet, "3+": a run) -> (runs, detected); the alert policy
    #: aggregates several beats, so isolated beats are not meant to alert and runs are
    by_length: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def detection_rate(self) -> float:
        return self.detected / self.runs if self.runs else float("nan")

    @property
    def false_alerts_per_hour(self) -> float:
        return self.false_alerts / self.normal_hours if self.normal_hours else float("nan")

    def summary(self) -> dict[str, Any]:
        def mean(v: Sequence[float]) -> float | None:
            return float(np.mean(v)) if len(v) else None

        return {"runs": self.runs, "detected": self.detected, "detection_rate": self.detection_rate,
                "mean_delay_beats": mean(self.delays_beats), "mean_delay_s": mean(self.delays_s),
                "p90_delay_beats": float(np.percentile(self.delays_beats, 90)) if self.delays_beats else None,
                "false_alerts": self.false_alerts, "normal_hours": self.normal_hours,
                "false_alerts_per_hour": self.false_alerts_per_hour,
                "detection_by_class": count_rates(self.by_class), "detection_by_length": count_rates(self.by_length)}


def count_rates(counts: dict[str, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    return {k: {"runs": r, "detected": d, "rate": d / r if r else None} for k, (r, d) in sorted(counts.items())}


def run_length(start: int, end: int) -> str:
    """The `EventStats.by_length` bucket of the run [start, end)."""
    return "3+" if end - start >= 3 else str(end - start)


def event_stats(stream: Stream, alerts: np.ndarray, *, grace_beats: int = 0, settle_beats: int = 10,
                warmup_beats: int = 0) -> EventStats:
    """Detection of each run by alerts (beat indices of firing transitions) and false alerts
    outside the runs. The first `warmup_beats` count for neither time nor (anomaly-free) runs:
    alerts there still count as false."""
    alerts = np.sort(np.asarray(alerts, dtype=np.int64))
    n, runs = len(stream), stream.runs
    excluded = np.zeros(n, dtype=bool)
    excluded[:warmup_beats] = True
    delays_b: list[int] = []
    delays_s: list[float] = []
    by_class: dict[str, tuple[int, int]] = {}
    by_length: dict[str, tuple[int, int]] = {}
    detected = 0
    for start, end in runs:
        excluded[start:min(n, end + settle_beats)] = True
        hit = alerts[(alerts >= start) & (alerts < end + grace_beats)]
        cls = str(_majority(stream.labels[start:end]))
        r, d = by_class.get(cls, (0, 0))
        if len(hit):
            detected += 1
            delays_b.append(int(hit[0] - start))
            delays_s.append(float(stream.times_s[min(hit[0], n - 1)] - stream.times_s[start]))
        by_class[cls] = (r + 1, d + int(len(hit) > 0))
        r, d = by_length.get(run_length(start, end), (0, 0))
        by_length[run_length(start, end)] = (r + 1, d + int(len(hit) > 0))
    inside_runs = np.zeros(n, dtype=bool)
    for start, end in runs:
        inside_runs[start:min(n, end + max(grace_beats, settle_beats))] = True
    false = int(np.sum(~inside_runs[alerts[alerts < n]]))
    return EventStats(len(runs), detected, delays_b, delays_s, false, _hours(stream, ~excluded), by_class, by_length)


def _majority(labels: np.ndarray) -> Any:
    values, counts = np.unique(labels.astype(str), return_counts=True)
    return values[np.argmax(counts)]


def _hours(stream: Stream, mask: np.ndarray) -> float:
    """Time covered by the masked beats: each beat lasts until the next (the last: the median RR)."""
    if len(stream) == 0:
        return 0.0
    rr = np.diff(stream.times_s)
    durations = np.concatenate([rr, [float(np.median(rr)) if len(rr) else 0.0]])
    return float(durations[mask].sum() / 3600)


def combine(stats: Iterable[EventStats]) -> EventStats:
    items = list(stats)
    return EventStats(sum(s.runs for s in items), sum(s.detected for s in items),
                      [d for s in items for d in s.delays_beats], [d for s in items for d in s.delays_s],
                      sum(s.false_alerts for s in items), sum(s.normal_hours for s in items),
                      add_counts([s.by_class for s in items]), add_counts([s.by_length for s in items]))


def add_counts(counts: Iterable[dict[str, tuple[int, int]]]) -> dict[str, tuple[int, int]]:
    """(runs, detected) pairs summed key by key."""
    out: dict[str, tuple[int, int]] = {}
    for c in counts:
        for k, (r, d) in c.items():
            r0, d0 = out.get(k, (0, 0))
            out[k] = (r0 + r, d0 + d)
    return out


# -- NAB score -------------------------------------------------------------------------------------------------------

#: NAB's standard application profile (Lavin & Ahmad 2015, "Evaluating Real-time Anomaly Detection
#: Algorithms - the Numenta Anomaly Benchmark", IEEE ICMLA; github.com/numenta/NAB).
NAB_STANDARD = {"tp": 1.0, "fp": 0.11, "fn": 1.0}


def nab_sigmoid(y: float) -> float:
    """NAB's scaled sigmoid: 2 / (1 + e^(5y)) - 1; y = -1 at a window's left edge (0.987),
    0 at its right edge (0), > 0 after it (towards -1; -1 beyond 3 window widths)."""
    return -1.0 if y > 3.0 else 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


def nab_windows(n: int, runs: Sequence[tuple[int, int]], window_fraction: float = 0.1) -> list[tuple[int, int]]:
    """NAB windows [left, right] (inclusive): width = window_fraction * n / number of windows,
    centred on each run (widened to the run itself when longer), clipped to the stream."""
    if not runs:
        return []
    width = window_fraction * n / len(runs)
    out = []
    for start, end in runs:
        half = max(width, end - start) / 2
        centre = (start + end - 1) / 2
        out.append((max(0, math.ceil(centre - half)), min(n - 1, math.floor(centre + half))))
    return out


def nab_raw(n: int, runs: Sequence[tuple[int, int]], detections: Sequence[int],
            profile: dict[str, float] = NAB_STANDARD, probation: int = 0,
            window_fraction: float = 0.1) -> tuple[float, int]:
    """(raw NAB score, number of scored windows) of one stream, as NAB's Sweeper scores it: the
    earliest detection in a window earns A_TP * sigmoid(position) / sigmoid(-1); a window without
    one costs A_FN; a detection outside windows costs A_FP * sigmoid(distance past the preceding
    window in its widths), or A_FP when no window precedes it. Detections and windows in the
    first `probation` beats are not scored (NAB: 15% of the data)."""
    windows = [w for w in nab_windows(n, runs, window_fraction) if w[0] >= probation]
    max_tp = nab_sigmoid(-1.0)
    score = 0.0
    for left, right in windows:
        inside = [d for d in detections if left <= d <= right]
        width = right - left + 1
        score += profile["tp"] * nab_sigmoid(-(right - min(inside) + 1) / width) / max_tp if inside \
            else -profile["fn"]
    for d in detections:
        if d < probation or any(left <= d <= right for left, right in windows):
            continue
        before = [w for w in windows if w[1] < d]
        if not before:
            score -= profile["fp"]
        else:
            left, right = max(before, key=lambda w: w[1])
            score += profile["fp"] * nab_sigmoid(abs(right - d) / max(right - left, 1))
    return score, len(windows)


def nab_score(streams: Sequence[tuple[int, Sequence[tuple[int, int]], Sequence[int]]],
              profile: dict[str, float] = NAB_STANDARD, probation_fraction: float = 0.15) -> float:
    """Normalised NAB score over (length, runs, detections) per stream: 100 * (raw - null) /
    (perfect - null), with null = a detector that never fires (-A_FN per window) and perfect =
    every window detected at its left edge (A_TP per window)."""
    raw, windows = 0.0, 0
    for n, runs, detections in streams:
        r, w = nab_raw(n, runs, detections, profile, probation=int(probation_fraction * n))
        raw, windows = raw + r, windows + w
    null, perfect = -profile["fn"] * windows, profile["tp"] * windows
    return 100 * (raw - null) / (perfect - null) if windows else float("nan")


# -- the whole evaluation --------------------------------------------------------------------------------------------

def evaluate(scored: Sequence[Scored], alerts: Sequence[np.ndarray], *, grace_beats: int = 0,
             settle_beats: int = 10, warmup_beats: int = 0) -> dict[str, Any]:
    """Per-class AUROC, events, delays, false alerts per sensor-hour and NAB over scored streams
    and their alerts (firing beat indices, e.g. from `fired`)."""
    stats = combine(event_stats(s.stream, a, grace_beats=grace_beats, settle_beats=settle_beats,
                                warmup_beats=warmup_beats) for s, a in zip(scored, alerts, strict=True))
    nab = nab_score([(len(s.stream), s.stream.runs, a.tolist()) for s, a in zip(scored, alerts, strict=True)])
    return {"per_beat_auroc": per_class_auroc(scored), **stats.summary(),
            "nab_standard": nab if math.isfinite(nab) else None}


# -- operating point -------------------------------------------------------------------------------------------------

#: The parameter of each aggregate that the sweep varies.
PARAM = {"mean": "window", "ewma": "alpha", "cusum": "drift"}

def candidate_configs(base: ScorePolicyConfig | None = None) -> list[ScorePolicyConfig]:
    """The aggregates swept by default (fire levels are found per aggregate)."""
    base = base or ScorePolicyConfig()
    return ([replace(base, aggregate="mean", window=w) for w in (1, 2, 3, 4)]
            + [replace(base, aggregate="ewma", alpha=a) for a in (0.3, 0.5, 0.7)]
            + [replace(base, aggregate="cusum", drift=d) for d in (0.5, 1.0, 2.0)])


def operating_curve(normal: Sequence[Scored], anomalous: Sequence[Scored], config: ScorePolicyConfig,
                    levels: Iterable[float], *, resolve_fraction: float = 0.5, grace_beats: int = 0,
                    warmup_beats: int = 0) -> list[dict[str, Any]]:
    """One row per fire level: false alerts per sensor-hour on `normal` streams, detection rate and
    delay of the runs in `anomalous` streams."""
    rows = []
    prepared_normal = [(s.stream, _Prepared.of(s, config)) for s in normal]
    prepared_anomalous = [(s.stream, _Prepared.of(s, config)) for s in anomalous]
    for level in levels:
        c = replace(config, fire_level=float(level), resolve_level=float(level) * resolve_fraction)
        fa = combine(event_stats(s, _fire_events(p, c), warmup_beats=warmup_beats) for s, p in prepared_normal)
        ev = combine(event_stats(s, _fire_events(p, c), grace_beats=grace_beats, warmup_beats=warmup_beats)
                     for s, p in prepared_anomalous)
        rows.append({**_params(c), "false_alerts_per_hour": fa.false_alerts_per_hour,
                     "detection_rate": ev.detection_rate,
                     "mean_delay_beats": float(np.mean(ev.delays_beats)) if ev.delays_beats else None,
                     "mean_delay_s": float(np.mean(ev.delays_s)) if ev.delays_s else None})
    return rows


def _params(c: ScorePolicyConfig) -> dict[str, Any]:
    return {"aggregate": c.aggregate, "param": asdict(c)[PARAM[c.aggregate]], "fire_level": c.fire_level,
            "resolve_level": c.resolve_level}


def default_levels(normal: Sequence[Scored], config: ScorePolicyConfig, n: int = 24) -> np.ndarray:
    """Fire levels spanning the top of the normal streams' aggregate: from its 99th percentile to
    just above its maximum (log-spaced in exceedance)."""
    values = np.concatenate([aggregate_series(s.scores[~s.calibrating], config) for s in normal])
    exceed = np.geomspace(1e-2, 0.5 / len(values), n)
    return np.unique(np.quantile(values, 1 - exceed))


def choose_operating_point(normal: Sequence[Scored], anomalous: Sequence[Scored], budget_per_hour: float = 1.0,
                           configs: Sequence[ScorePolicyConfig] | None = None, *, resolve_fraction: float = 0.5,
                           grace_beats: int = 0, warmup_beats: int = 0
                           ) -> tuple[ScorePolicyConfig, list[dict[str, Any]]]:
    """The most sensitive policy whose false alerts per sensor-hour on `normal` stay within the
    budget (highest detection rate, then shortest delay), and the whole curve (list of rows)."""
    table: list[dict[str, Any]] = []
    for config in configs or candidate_configs():
        table += operating_curve(normal, anomalous, config, default_levels(normal, config),
                                 resolve_fraction=resolve_fraction, grace_beats=grace_beats,
                                 warmup_beats=warmup_beats)
    within = [r for r in table if r["false_alerts_per_hour"] <= budget_per_hour]
    if not within:
        raise ValueError(f"no candidate stays within {budget_per_hour} false alerts per hour")
    best = max(within, key=lambda r: (r["detection_rate"], -(r["mean_delay_beats"] or 0.0)))
    for row in table:
        row["chosen"] = row is best
    base = (configs or candidate_configs())[0]
    chosen = replace(base, aggregate=best["aggregate"], fire_level=best["fire_level"],
                     resolve_level=best["resolve_level"], **{PARAM[best["aggregate"]]: best["param"]})
    return chosen, table


def plot_operating_curve(table: Sequence[dict[str, Any]], path: Path, budget_per_hour: float | None = None) -> Path:
    """Detection rate and mean delay vs false alerts per sensor-hour, one line per aggregate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_det, ax_delay) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, rows in itertools.groupby(sorted(table, key=lambda r: (r["aggregate"], r["param"])),
                                       key=lambda r: (r["aggregate"], r["param"])):
        rows_sorted = sorted(rows, key=lambda r: r["false_alerts_per_hour"])
        fa = [max(r["false_alerts_per_hour"], 1e-2) for r in rows_sorted]
        label = f"{key[0]} {key[1]:g}"
        ax_det.plot(fa, [100 * r["detection_rate"] for r in rows_sorted], marker=".", label=label)
        ax_delay.plot(fa, [r["mean_delay_beats"] if r["mean_delay_beats"] is not None else np.nan
                           for r in rows_sorted], marker=".", label=label)
    for row in table:
        if row.get("chosen"):
            ax_det.plot(max(row["false_alerts_per_hour"], 1e-2), 100 * row["detection_rate"], "k*", ms=14,
                        label="chosen")
    for ax, ylabel in ((ax_det, "anomalous runs detected within the run (%)"), (ax_delay, "mean delay (beats)")):
        ax.set_xscale("log")
        ax.set_xlabel("false alerts per sensor-hour (0 drawn at 0.01)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if budget_per_hour is not None:
            ax.axvline(budget_per_hour, color="grey", ls="--")
    ax_det.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_policy(streams: Sequence[Stream], prior: Prior, calibration: CalibrationConfig | None = None,
               policy: ScorePolicyConfig | None = None) -> tuple[list[Scored], list[np.ndarray]]:
    """The policy's input for each stream (`policy_input`) and the policy over it: (scored streams, firing beat
    indices)."""
    calibrator, config = Calibrator(prior, calibration), policy or ScorePolicyConfig()
    scored = [policy_input(s, calibrator, config) for s in streams]
    return scored, [fired(s, config) for s in scored]


def policy_input(stream: Stream, calibrator: Calibrator, config: ScorePolicyConfig) -> Scored:
    """What the daemon feeds the policy for each beat (`ScorePolicyConfig.beat_input`): the calibrated shape score,
    for beat windows raised to the template score at its weight, plus the rhythm score at its weight (ECG5000
    streams, one beat a second, have none); and which beats are fast-run beats (`fast_run_beat`)."""
    scored = calibrate(stream, calibrator)
    fast_runs = config.fast_run_beats and stream.template_scores is not None
    beats = rhythm.score_times(stream.times_s, stream.good_quality) if len(stream) and (
        config.rhythm_weight or fast_runs) else None
    prematurity = beats.score if beats is not None and config.rhythm_weight else None
    fast = config.fast_run_beat(stream.template_scores, beats.fast) if beats is not None and fast_runs else None
    return replace(scored, scores=config.beat_input(scored.scores, stream.template_scores, prematurity),
                   fast_run_beats=fast)
