"""Evaluation through the same `Scorer` the monitor uses: the held-out test set, the alert policy's
operating point on validation streams, and annotated recordings (per AAMI class, R peaks, streams)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (average_precision_score, confusion_matrix, precision_recall_fscore_support,
                             roc_auc_score)

from monitor.core.artefact import Artefact
from monitor.core.scoring import Scorer
from monitor.stream.calibration import CalibrationConfig, Calibrator, Prior
from monitor.stream import quality
from monitor.stream.policy import FIRING, SIGNAL_QUALITY, ScorePolicyConfig
from trainer import streams
from trainer import data as data_mod
from trainer.data import ECG5000_CLASSES, BeatOrigin
from trainer.recordings import (AAMI_NAMES, NORMAL, UNMATCHED, VENTRICULAR, RecordingBeats, rpeak_accuracy,
                                sample_problems)
from trainer.split import split

#: Share of ECG5000's anomalous beats (stratified per class) a multi-source model's operating point is
#: chosen on; its test figures use the rest (`ecg5000_operating_point`).
OPERATING_ANOMALY_FRACTION = 0.3

#: Validation streams for the operating point: this many sensor-hours of normal beats, and as many
#: with injected anomalous runs (3-6 beats, 30 per hour) when validation holds anomalous beats.
VALIDATION_SENSOR_HOURS = 20
RUNS_PER_HOUR = 30


def error_stats(errors: np.ndarray) -> dict[str, float]:
    errors = np.asarray(errors, dtype=np.float64)
    if len(errors) == 0:
        return {"n": 0}
    return {"n": int(len(errors)), "mean": float(errors.mean()),
            "std": float(errors.std(ddof=1)) if len(errors) > 1 else 0.0,
            "min": float(errors.min()), "p50": float(np.percentile(errors, 50)),
            "p95": float(np.percentile(errors, 95)), "p99": float(np.percentile(errors, 99)),
            "max": float(errors.max())}


def metrics(errors: np.ndarray, labels: np.ndarray, normal_label: str, threshold: float) -> dict[str, Any]:
    """AUROC, AP, P/R/F1 at the threshold (anomaly = positive), confusion matrix, per-class rates."""
    labels = np.asarray(labels)
    truth = labels != normal_label
    predicted = errors > threshold
    both_classes = truth.any() and (~truth).any()
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, average="binary",
                                                               pos_label=True, zero_division=0)
    tn, fp, fn, tp = confusion_matrix(truth, predicted, labels=[False, True]).ravel()
    per_class = {}
    for label in sorted(set(labels), key=lambda s: (len(s), s)):
        rows = labels == label
        names = ECG5000_CLASSES if normal_label == "1" else AAMI_NAMES if normal_label == NORMAL else {}
        per_class[label] = {"name": names.get(label, label),
                            "n": int(rows.sum()), "flagged": int(predicted[rows].sum()),
                            "rate": float(predicted[rows].mean())}
    return {
        "threshold": float(threshold),
        "n": int(len(labels)), "n_normal": int((~truth).sum()), "n_anomalous": int(truth.sum()),
        "auroc": float(roc_auc_score(truth, errors)) if both_classes else None,
        "average_precision": float(average_precision_score(truth, errors)) if both_classes else None,
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "false_positive_rate": float(fp / max(fp + tn, 1)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        # rate = share flagged: detection rate for anomalous classes, false alarms for the normal one
        "per_class": per_class,
        "errors": {"normal": error_stats(errors[~truth]), "anomalous": error_stats(errors[truth])},
    }


def evaluate(scorer: Scorer, windows: np.ndarray, labels: np.ndarray, normal_label: str
             ) -> tuple[dict[str, Any], np.ndarray]:
    """(metrics, errors) of the scorer on labelled windows, at the scorer's threshold."""
    errors = scorer.score(windows)
    return metrics(errors, labels, normal_label, scorer.threshold), errors


def write_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """report.json (everything) and report.md (a human summary)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "report.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md_path = directory / "report.md"
    md_path.write_text(to_markdown(report))
    return [json_path, md_path]


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def to_markdown(report: dict[str, Any]) -> str:
    m = report["test"]
    cm = m["confusion_matrix"]
    data = report.get("data", {})
    lines = [f"# Model report: {report.get('model_version', '')}", "",
             f"Data: `{data.get('source', '')}` (digest `{data.get('digest', '')[:16]}`)", "",
             "## Test set (normal-test + anomalous)", "", "| metric | value |", "| --- | --- |"]
    for key in ("n", "n_normal", "n_anomalous", "auroc", "average_precision", "precision", "recall", "f1",
                "false_positive_rate", "threshold"):
        lines.append(f"| {key} | {_fmt(m[key])} |")
    lines += ["", "Confusion matrix (positive = anomalous):", "", "| | predicted normal | predicted anomalous |",
              "| --- | --- | --- |", f"| normal | {cm['tn']} | {cm['fp']} |",
              f"| anomalous | {cm['fn']} | {cm['tp']} |", "", "## Share flagged per class", "",
              "| class | name | n | flagged | rate |", "| --- | --- | --- | --- | --- |"]
    for label, row in m["per_class"].items():
        lines.append(f"| {label} | {row['name']} | {row['n']} | {row['flagged']} | {row['rate']:.4f} |")
    training = report.get("training", {})
    if training:
        threshold = dict(report.get("threshold", {}))
        value = threshold.pop("value", m["threshold"])
        lines += ["", "## Training", "",
                  f"- threshold {value:.4f}: " + ", ".join(f"{k} {v}" for k, v in threshold.items()),
                  f"- best epoch {training.get('best_epoch')} of {training.get('epochs_run')} "
                  f"({training.get('stop_reason')}), fit time {training.get('fit_seconds', 0):.1f} s"]
    if "operating_point" in report:
        lines += operating_markdown(report["operating_point"])
    return "\n".join(lines) + "\n"


# -- the alert policy's operating point ---------------------------------------------------------------------------

def operating_point(errors: np.ndarray, labels: np.ndarray, normal_label: str, prior: Prior, budget_per_hour: float,
                    *, beat_period_s: float = 1.0, seed: int = 0, windows: np.ndarray | None = None,
                    base: ScorePolicyConfig | None = None, origin: BeatOrigin | None = None) -> dict[str, Any]:
    """The calibrated ScorePolicy for a false-alert budget, chosen on streams of *validation* beats
    (trainer.streams): their normal beats reshuffled into sensor-hours at one beat per `beat_period_s`, and,
    when validation holds anomalous beats (val_anomaly_fraction > 0), streams with injected runs of them.

    With anomalous validation beats every aggregate is swept and the most sensitive point within the budget
    wins (`choose_operating_point`). Without, detection cannot be measured: the default aggregate is kept and
    its lowest fire level within the budget chosen (for one aggregate a lower level never detects less).
    When no level meets the budget, the one with the fewest false alerts is kept and `budget_met` is false.
    windows: the beats' windows when the model is served on beat windows (its policy input has the template score).
    base: the policy's fixed parts (input weights, resolve and quality rules; default `ScorePolicyConfig()`): the
    streams' inputs are computed with its weights and every candidate keeps them, so the point is chosen on the
    input it will be served with.
    origin: beats cut from recordings (`Dataset.origin` of these rows; their windows are then read from it): each
    recording makes its own streams, as one sensor is one patient in the daemon, at its median R-R interval and
    with its beats the way up its lead records them (the template score's view); the sensor-hours are shared
    among the recordings, at least one each.
    """
    errors, labels = np.asarray(errors, dtype=np.float64), np.asarray(labels).astype(str)
    warmup = CalibrationConfig().warmup_beats
    calibrator, base = Calibrator(prior), base or ScorePolicyConfig()
    minutes = 60.0
    pools = _stream_pools(labels, normal_label, beat_period_s, windows, origin)
    with_runs = [p for p in pools if (labels[p.rows] != normal_label).any()]

    def scored(chosen: list[_Pool], runs_per_hour: float, stream_seed: int) -> list[streams.Scored]:
        out = []
        for pool in chosen:
            made = streams.ecg5000_streams(errors[pool.rows], labels[pool.rows], n_streams=pool.sensors,
                                           minutes=minutes, runs_per_hour=runs_per_hour, warmup_beats=warmup,
                                           beat_period_s=pool.beat_period_s, normal_label=normal_label,
                                           seed=stream_seed + 1000 * pool.index, windows=pool.windows)
            out += [streams.policy_input(s, calibrator, base) for s in made]
        return out

    normal = scored(pools, 0, seed)
    measured = bool(with_runs)
    if measured:
        anomalous = scored(with_runs, RUNS_PER_HOUR, seed + 1)
        try:
            config, table = streams.choose_operating_point(normal, anomalous, budget_per_hour,
                                                           streams.candidate_configs(base), warmup_beats=warmup)
        except ValueError:
            config, table = _fewest_false_alerts(normal, anomalous, warmup, base)
    else:
        table = streams.operating_curve(normal, [], base, streams.default_levels(normal, base), warmup_beats=warmup)
        within = [r for r in table if r["false_alerts_per_hour"] <= budget_per_hour]
        best = min(within, key=lambda r: r["fire_level"]) if within else min(
            table, key=lambda r: (r["false_alerts_per_hour"], -r["fire_level"]))
        for row in table:
            row["chosen"] = row is best
        config = replace(base, fire_level=best["fire_level"], resolve_level=best["resolve_level"])
    chosen = next(r for r in table if r.get("chosen"))
    described: dict[str, Any] = {
        "sensor_hours": sum(p.sensors for p in pools) * minutes / 60, "with_runs": sum(p.sensors for p in with_runs),
        "runs_per_hour": RUNS_PER_HOUR if measured else 0,
        "beat_period_s": float(np.median([p.beat_period_s for p in pools])), "warmup_beats": warmup,
        "normal_beats": int((labels == normal_label).sum()), "anomalous_beats": int((labels != normal_label).sum())}
    if origin is not None:
        described["recordings"] = [{"name": p.name, "sensor_hours": p.sensors * minutes / 60,
                                    "beat_period_s": p.beat_period_s,
                                    "normal_beats": int((labels[p.rows] == normal_label).sum()),
                                    "anomalous_beats": int((labels[p.rows] != normal_label).sum())} for p in pools]
    return {"budget_per_hour": budget_per_hour, "budget_met": chosen["false_alerts_per_hour"] <= budget_per_hour,
            "detection_measured": measured, "policy": asdict(config), "chosen": _json_row(chosen),
            "curve": [_json_row(r) for r in table], "validation_streams": described}


@dataclass(frozen=True)
class _Pool:
    """Validation beats that make streams together (one patient): rows, streams, beat period, windows."""

    index: int
    name: str
    rows: np.ndarray
    sensors: int
    beat_period_s: float
    windows: np.ndarray | None


def _stream_pools(labels: np.ndarray, normal_label: str, beat_period_s: float, windows: np.ndarray | None,
                  origin: BeatOrigin | None) -> list[_Pool]:
    """One pool of every row (windows, ECG5000), or one per recording with normal validation beats."""
    if origin is None:
        return [_Pool(0, "all", np.arange(len(labels)), VALIDATION_SENSOR_HOURS, beat_period_s, windows)]
    recorded = origin.recorded(windows) if windows is not None else None
    present = [r for r in range(len(origin.names)) if (labels[origin.recording == r] == normal_label).any()]
    sensors = max(1, round(VALIDATION_SENSOR_HOURS / max(1, len(present))))
    pools = []
    for r in present:
        rows = np.flatnonzero(origin.recording == r)
        pools.append(_Pool(r, origin.names[r], rows, sensors, float(np.median(origin.rr_s[rows])),
                           None if recorded is None else recorded[rows]))
    return pools


#: Held-out test streams (`stream_figures`): sensor-hours of each kind per seed, and the seeds.
TEST_SENSOR_HOURS, TEST_STREAM_SEEDS = 20, (0, 1, 2)


def stream_figures(errors: np.ndarray, labels: np.ndarray, normal_label: str, prior: Prior,
                   policy: ScorePolicyConfig, windows: np.ndarray | None = None) -> dict[str, Any]:
    """The alert policy over streams of *test* beats at one beat per second (trainer.streams), as a ward
    would see it: per seed, false alerts per sensor-hour on streams of normal beats, and the share of
    injected anomalous runs (3-6 beats, RUNS_PER_HOUR) that raise an alert within the run, with the delay.
    windows: as in `operating_point`."""
    errors, labels = np.asarray(errors, dtype=np.float64), np.asarray(labels).astype(str)
    warmup = CalibrationConfig().warmup_beats

    def figures(runs_per_hour: float, seed: int) -> dict[str, Any]:
        made = streams.ecg5000_streams(errors, labels, n_streams=TEST_SENSOR_HOURS, runs_per_hour=runs_per_hour,
                                       warmup_beats=warmup, normal_label=normal_label, seed=seed, windows=windows)
        return streams.evaluate(*streams.run_policy(made, prior, policy=policy), warmup_beats=warmup)

    per_seed = []
    for seed in TEST_STREAM_SEEDS:
        normal, runs = figures(0, seed), figures(RUNS_PER_HOUR, seed + 100)
        per_seed.append({"seed": seed, "false_alerts_per_hour": normal["false_alerts_per_hour"],
                         "detection_rate": runs["detection_rate"], "mean_delay_beats": runs["mean_delay_beats"]})
    return {"policy": asdict(policy), "sensor_hours_per_seed": TEST_SENSOR_HOURS, "runs_per_hour": RUNS_PER_HOUR,
            "per_seed": [_json_row(r) for r in per_seed],
            "false_alerts_per_hour": float(np.mean([r["false_alerts_per_hour"] for r in per_seed])),
            "detection_rate": float(np.mean([r["detection_rate"] for r in per_seed]))}


def ecg5000_operating_point(scorer: Scorer, ecg5000_dir: Path, split_seed: int, *, budget_per_hour: float = 1.0,
                            anomaly_fraction: float = OPERATING_ANOMALY_FRACTION
                            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The operating point of a model trained on ECG5000's train part (split `split_seed`) among other
    sources, chosen on streams of ECG5000's validation normals and `anomaly_fraction` of its anomalous
    beats; and the split to record in the artefact, so its test part leaves those anomalies out.
    (The normals' split does not depend on `anomaly_fraction`: the training beats stay the same.)"""
    record: dict[str, Any] = {"seed": split_seed, "val_fraction": 0.15, "test_fraction": 0.15,
                              "val_anomaly_fraction": anomaly_fraction}
    val = split(data_mod.load(ecg5000_dir), "1", **record).val
    prior = Prior.from_stats(scorer.artefact.metadata["validation_errors"], scorer.threshold)
    return operating_point(scorer.score(val.windows), val.labels, "1", prior, budget_per_hour,
                           windows=beat_windows(scorer.artefact, val.windows)), record


def beat_windows(artefact: Artefact, windows: np.ndarray) -> np.ndarray | None:
    """The windows, when the daemon serves this artefact on beat windows (its policy input then has the template
    score: trainer.streams.policy_input); None for fixed windows."""
    return windows if artefact.metadata.get("windowing", {}).get("kind") == "beats" else None


def _fewest_false_alerts(normal: list[streams.Scored], anomalous: list[streams.Scored], warmup: int,
                         base: ScorePolicyConfig) -> tuple[ScorePolicyConfig, list[dict[str, Any]]]:
    table: list[dict[str, Any]] = []
    for config in streams.candidate_configs(base):
        table += streams.operating_curve(normal, anomalous, config, streams.default_levels(normal, config),
                                         warmup_beats=warmup)
    best = min(table, key=lambda r: (r["false_alerts_per_hour"], -r["detection_rate"]))
    for row in table:
        row["chosen"] = row is best
    chosen = replace(base, aggregate=best["aggregate"], fire_level=best["fire_level"],
                     resolve_level=best["resolve_level"], **{streams.PARAM[best["aggregate"]]: best["param"]})
    return chosen, table


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (no runs to detect) as null, so report.json stays valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def operating_markdown(point: dict[str, Any]) -> list[str]:
    """The curve as a table: per aggregate, its most sensitive level within the budget (or its quietest)."""
    budget = point["budget_per_hour"]
    lines = ["", "## Alert policy operating point", "",
             f"Validation streams only ({point['validation_streams']['sensor_hours']:g} sensor-hours of normal beats"
             + (f" of {len(point['validation_streams']['recordings'])} recording(s), one per sensor"
                if "recordings" in point["validation_streams"] else "")
             + (f", {point['validation_streams']['with_runs']} with {point['validation_streams']['runs_per_hour']:g} "
                "injected anomalous runs per hour" if point["detection_measured"] else
                "; no anomalous validation beats, so detection is not measured: set val_anomaly_fraction")
             + f"); budget {budget:g} false alerts per sensor-hour"
             + ("" if point["budget_met"] else " (NOT met: the quietest point is kept)") + ".", "",
             "| aggregate | param | fire level | false alerts / h | runs detected | mean delay (beats) "
             "| mean delay (s) | |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in point["curve"]:
        groups.setdefault((row["aggregate"], row["param"]), []).append(row)
    for rows in groups.values():
        within = [r for r in rows if r["false_alerts_per_hour"] <= budget]
        shown = [r for r in rows if r.get("chosen")] or (
            [min(within, key=lambda r: r["fire_level"])] if within else
            [min(rows, key=lambda r: r["false_alerts_per_hour"])])
        for r in shown:
            lines.append(f"| {r['aggregate']} | {r['param']:g} | {r['fire_level']:.3f} | "
                         f"{r['false_alerts_per_hour']:.2f} | {_pct(r['detection_rate'])} | "
                         f"{_fmt(r['mean_delay_beats'])} | {_fmt(r['mean_delay_s'])} | "
                         f"{'**chosen**' if r.get('chosen') else ''} |")
    lines += ["", "All levels: report.json `operating_point.curve`; plot: operating_curve.png."]
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


# -- annotated recordings ------------------------------------------------------------------------------------------

def evaluate_recording(scorer: Scorer, cut: RecordingBeats, prior: Prior,
                       policy: ScorePolicyConfig | None = None) -> dict[str, Any]:
    """One recording, scored beat by beat in order as the daemon would: per AAMI class (normal vs each class
    present) AUROC and share flagged at the model threshold; R-peak sensitivity / PPV against the reference
    beats; and the calibrated ScorePolicy over the beat stream (trainer.streams: false alerts per hour outside
    stretches with non-normal beats, event detection, NAB). Beats matching no reference beat are left out of
    the per-class figures and count as non-normal in the stream (an alert there is not called false)."""
    rec = cut.recording
    errors = scorer.score(cut.beats.windows[:, :, None])
    labels = cut.labels.astype(str)
    flagged = errors > scorer.threshold
    normal = labels == NORMAL
    per_class: dict[str, Any] = {}
    for cls in sorted(set(labels) - {UNMATCHED}, key=lambda c: "NSVFQ".find(c)):
        rows = labels == cls
        auroc = None
        if cls != NORMAL and normal.any():
            pair = normal | rows
            auroc = float(roc_auc_score(rows[pair], errors[pair]))
        per_class[cls] = {"name": AAMI_NAMES.get(cls, cls), "n": int(rows.sum()), "flagged": int(flagged[rows].sum()),
                          "rate": float(flagged[rows].mean()), "auroc_vs_normal": auroc}
    problems = sample_problems(cut)
    clean_samples = np.array([p is None for p in problems], dtype=bool)
    stream = streams.annotated_stream(rec.name, errors, cut.beats.r_peak / rec.fs, labels.tolist(), clean_samples,
                                      windows=cut.beats.recorded_windows(), rr_s=cut.beats.rr_s)
    warmup, policy = CalibrationConfig().warmup_beats, policy or ScorePolicyConfig()
    scored = streams.policy_input(stream, Calibrator(prior), policy)
    transitions = streams.policy_alerts(scored, policy)  # exact, beat by beat: open alerts, signal quality
    fired = np.array([i for i, t in transitions if t == FIRING], dtype=np.int64)
    stream_metrics = streams.evaluate([scored], [fired], warmup_beats=warmup)
    is_open = streams.open_between(transitions, len(stream))
    long_runs, alerting = streams.alerted_runs(stream, is_open, warmup_beats=warmup)
    v_runs, v_alerting = streams.alerted_runs(stream, is_open, warmup_beats=warmup, label=VENTRICULAR)
    artefact = clean_samples & ~np.asarray(stream.good_quality, dtype=bool)  # the template's motion artefacts
    bad_beats = {**Counter(p for p in problems if p), quality.ARTEFACT: int(artefact.sum())}
    return {"recording": rec.name, "fs": rec.fs, "duration_s": rec.duration_s, "beats": int(len(labels)),
            "unmatched_beats": int((labels == UNMATCHED).sum()), "polarity": int(cut.polarity),
            "threshold": float(scorer.threshold), "per_class": per_class,
            "rpeaks": rpeak_accuracy(cut) if rec.annotations is not None else None,
            "heart_rate_bpm": {"median": float(60 / np.median(cut.beats.rr_s))} if len(cut.beats) else None,
            "stream": {"policy": asdict(policy), "warmup_beats": warmup,
                       "alerts": int(len(fired)), **_json_row(stream_metrics),
                       "runs_3plus": {"runs": long_runs, "alerting": alerting},
                       "ventricular_runs_3plus": {"runs": v_runs, "alerting": v_alerting},
                       "bad_quality_beats": bad_beats,
                       "signal_quality_alerts": sum(t == SIGNAL_QUALITY for _, t in transitions)},
            "errors": {"normal": error_stats(errors[normal]), "other": error_stats(errors[~normal])}}


def pool_recordings(results: list[dict[str, Any]], min_class_beats: int = 10) -> dict[str, Any]:
    """Figures over several recordings (`evaluate_recording` results, one patient each): alert and run counts
    summed (runs of 3+ also for the recording that holds the most of them; ventricular runs apart), false
    alerts per hour over the summed normal hours; per class, the spread of the per-recording AUROC (over
    recordings with at least `min_class_beats` of that class), since patients are what varies: of the raw
    errors, and of the alert policy's input (calibrated score + rhythm, after the warm-up)."""
    streams_ = [r["stream"] for r in results]
    counts = {k: sum(s[k] for s in streams_) for k in ("alerts", "false_alerts", "runs", "detected")}
    long_runs: dict[str, Any] = {k: sum(s["runs_3plus"][k] for s in streams_) for k in ("runs", "alerting")}
    # one patient with frequent ectopy can hold a third of all runs (MIT-BIH 232: 167 of 414), and one alert
    # left open there covers dozens of them: the pooled count is read with and without that recording
    most = max(results, key=lambda r: r["stream"]["runs_3plus"]["runs"], default=None)
    long_runs["most_runs"] = None if most is None else {"recording": most["recording"], **most["stream"]["runs_3plus"]}
    v_runs = {k: sum(s["ventricular_runs_3plus"][k] for s in streams_) for k in ("runs", "alerting")}
    bad_beats = sum((Counter(s["bad_quality_beats"]) for s in streams_), Counter())
    normal_hours = float(sum(s["normal_hours"] for s in streams_))
    aurocs: dict[str, list[float]] = {}
    policy_aurocs: dict[str, list[float]] = {}  # of the policy's input: calibrated score (+ template, rhythm)
    for r in results:
        for cls, row in r["per_class"].items():
            if row["auroc_vs_normal"] is not None and row["n"] >= min_class_beats:
                aurocs.setdefault(cls, []).append(row["auroc_vs_normal"])
                if r["stream"]["per_beat_auroc"].get(cls) is not None:
                    policy_aurocs.setdefault(cls, []).append(r["stream"]["per_beat_auroc"][cls])
    return {"recordings": len(results), "hours": sum(r["duration_s"] for r in results) / 3600,
            "beats": sum(r["beats"] for r in results), **counts, "normal_hours": normal_hours,
            "false_alerts_per_hour": counts["false_alerts"] / normal_hours if normal_hours else None,
            "detection_rate": counts["detected"] / counts["runs"] if counts["runs"] else None,
            "detection_by_class": _pooled_rates([s["detection_by_class"] for s in streams_]),
            "detection_by_length": _pooled_rates([s["detection_by_length"] for s in streams_]),
            "runs_3plus": long_runs, "ventricular_runs_3plus": v_runs, "bad_quality_beats": dict(bad_beats),
            "signal_quality_alerts": sum(s["signal_quality_alerts"] for s in streams_),
            "auroc_by_class": _spread(aurocs), "policy_input_auroc_by_class": _spread(policy_aurocs),
            "min_class_beats": min_class_beats}


def without_most(runs_3plus: dict[str, Any]) -> tuple[int, int] | None:
    """(alerting, runs) of pooled runs of 3+ (`pool_recordings`' "runs_3plus") without the recording that holds
    the most of them; None when no recording has any."""
    most = runs_3plus.get("most_runs")
    if not most or not most["runs"]:
        return None
    return runs_3plus["alerting"] - most["alerting"], runs_3plus["runs"] - most["runs"]


def _spread(aurocs: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per class: over how many recordings, median, min and how many below chance."""
    return {cls: {"recordings": len(v), "median": float(np.median(v)), "min": float(min(v)),
                  "below_chance": int(sum(a < 0.5 for a in v))}
            for cls, v in sorted(aurocs.items(), key=lambda kv: "NSVFQ".find(kv[0]))}


def _pooled_rates(rows: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """{key: {runs, detected, rate}} rows (EventStats.summary) summed over recordings."""
    return streams.count_rates(streams.add_counts({k: (v["runs"], v["detected"]) for k, v in row.items()}
                                                  for row in rows))
