"""Window normalisation: fitted by the trainer, written into the artefact, and applied by this
one function both in training and online (`Scorer.prepare`), so the two cannot drift apart."""

from __future__ import annotations

from typing import Any

import numpy as np


def fit_normalisation(kind: str, train: np.ndarray) -> dict[str, Any]:
    """The artefact's `normalisation` entry; "global" learns per-feature mean/std from train."""
    if kind == "global":
        mean = train.mean(axis=(0, 1))
        std = np.maximum(train.std(axis=(0, 1)), 1e-6)
        return {"kind": "global", "mean": mean.tolist(), "std": std.tolist()}
    if kind in ("zscore", "none"):
        return {"kind": kind}
    raise ValueError(f"unknown normalisation {kind!r}")


def apply(spec: dict[str, Any], windows: np.ndarray) -> np.ndarray:
    """Windows (n, length, features) as contiguous float32, normalised by the artefact's `spec`:
    "zscore" each window to mean 0 / std 1 (sample std), "global" by the training set's mean/std
    per feature, "none" unchanged."""
    x: np.ndarray = np.asarray(windows, dtype=np.float32)
    if spec["kind"] == "zscore":
        mean = x.mean(axis=1, keepdims=True)
        std = x.std(axis=1, ddof=1, keepdims=True)
        x = (x - mean) / np.maximum(std, 1e-6)
    elif spec["kind"] == "global":
        x = (x - np.asarray(spec["mean"], dtype=np.float32)) / np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(x)
