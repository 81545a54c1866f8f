"""Evaluation on the held-out test set, through the same `Scorer` the monitor uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (average_precision_score, confusion_matrix, precision_recall_fscore_support,
                             roc_auc_score)

from monitor.core.scoring import Scorer
from trainer.data import ECG5000_CLASSES


def error_stats(errors: np.ndarray) -> dict[str, float]:
    errors = np.asarray(errors, dtype=np.float64)
    if len(errors) == 0:
        return {"n": 0}
    return {"n": int(len(errors)), "mean": float(errors.mean()), "std": float(errors.std(ddof=1)) if len(errors) > 1 else 0.0,
            "min": float(errors.min()), "p50": float(np.percentile(errors, 50)),
            "p95": float(np.percentile(errors, 95)), "p99": float(np.percentile(errors, 99)), "max": float(errors.max())}


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
        per_class[label] = {"name": ECG5000_CLASSES.get(label, label) if normal_label == "1" else label,
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


def evaluate(scorer: Scorer, windows: np.ndarray, labels: np.ndarray, normal_label: str) -> tuple[dict[str, Any], np.ndarray]:
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
    lines = [f"# Model report: {report.get('model_version', '')}", "",
             f"Data: `{report.get('data', {}).get('source', '')}` (digest `{report.get('data', {}).get('digest', '')[:16]}`)", "",
             "## Test set (normal-test + anomalous)", "", "| metric | value |", "| --- | --- |"]
    for key in ("n", "n_normal", "n_anomalous", "auroc", "average_precision", "precision", "recall", "f1",
                "false_positive_rate", "threshold"):
        lines.append(f"| {key} | {_fmt(m[key])} |")
    lines += ["", "Confusion matrix (positive = anomalous):", "", "| | predicted normal | predicted anomalous |",
              "| --- | --- | --- |", f"| normal | {cm['tn']} | {cm['fp']} |", f"| anomalous | {cm['fn']} | {cm['tp']} |",
              "", "## Share flagged per class", "", "| class | name | n | flagged | rate |", "| --- | --- | --- | --- | --- |"]
    for label, row in m["per_class"].items():
        lines.append(f"| {label} | {row['name']} | {row['n']} | {row['flagged']} | {row['rate']:.4f} |")
    training = report.get("training", {})
    if training:
        threshold = dict(report.get("threshold", {}))
        value = threshold.pop("value", m["threshold"])
        lines += ["", "## Training", "", f"- threshold {value:.4f}: " + ", ".join(f"{k} {v}" for k, v in threshold.items()),
                  f"- best epoch {training.get('best_epoch')} of {training.get('epochs_run')} "
                  f"({training.get('stop_reason')}), fit time {training.get('fit_seconds', 0):.1f} s"]
    return "\n".join(lines) + "\n"
