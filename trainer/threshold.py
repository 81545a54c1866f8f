"""Choosing the anomaly threshold from validation errors. A window is anomalous when its
error is strictly greater than the threshold (`Scorer.is_anomalous`)."""

from __future__ import annotations

from typing import Any

import numpy as np

METHODS = ("percentile", "mean_std", "fixed", "f1")


def choose_threshold(errors: np.ndarray, method: str = "percentile", *, percentile: float = 99.0,
                     k: float = 3.0, value: float | None = None,
                     anomalous: np.ndarray | None = None) -> tuple[float, dict[str, Any]]:
    """(threshold, description for the artefact). `errors` are validation errors; the
    normal-only methods use the normal ones, `f1` needs `anomalous` labels for all of them."""
    errors = np.asarray(errors, dtype=np.float64)
    normal = errors if anomalous is None else errors[~np.asarray(anomalous, dtype=bool)]
    if method == "f1":
        if anomalous is None or not np.any(anomalous) or np.all(anomalous):
            raise ValueError("threshold method 'f1' needs a validation set with both normal and "
                             "anomalous windows (set val_anomaly_fraction > 0)")
        threshold = f1_optimal(errors, np.asarray(anomalous, dtype=bool))
        return threshold, {"method": "f1", "n_val_anomalous": int(np.sum(anomalous))}
    if len(normal) == 0:
        raise ValueError("no normal validation errors to choose a threshold from")
    if method == "percentile":
        return float(np.percentile(normal, percentile)), {"method": "percentile", "percentile": percentile}
    if method == "mean_std":
        return float(normal.mean() + k * normal.std(ddof=1)), {"method": "mean_std", "k": k}
    if method == "fixed":
        if value is None or not value > 0:
            raise ValueError("threshold method 'fixed' needs a positive value")
        return float(value), {"method": "fixed"}
    raise ValueError(f"unknown threshold method {method!r}; choose one of {METHODS}")


def f1_optimal(errors: np.ndarray, anomalous: np.ndarray) -> float:
    """The threshold t maximising F1 of (errors > t); t is halfway between neighbouring errors."""
    order = np.sort(np.unique(errors))
    candidates = np.concatenate([[order[0] - 1e-12], (order[:-1] + order[1:]) / 2])
    sorted_anomalous = np.sort(errors[anomalous])
    sorted_normal = np.sort(errors[~anomalous])
    tp = len(sorted_anomalous) - np.searchsorted(sorted_anomalous, candidates, side="right")
    fp = len(sorted_normal) - np.searchsorted(sorted_normal, candidates, side="right")
    fn = len(sorted_anomalous) - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return float(candidates[int(np.argmax(f1))])
