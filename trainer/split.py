"""The evaluation protocol's split (DESIGN.md): seeded, reproducible, disjoint.

Normal windows go 70/15/15 to train / validation / test; every anomalous window goes to test
(or, when `val_anomaly_fraction` > 0 for the opt-in F1 threshold, a stratified share of them
to validation). Training and the default threshold never see an anomaly label.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.data import Dataset


@dataclass(frozen=True)
class Part:
    windows: np.ndarray  # (n, window_length, n_features)
    labels: np.ndarray  # (n,) str
    indices: np.ndarray  # rows of the source Dataset
    normal_label: str

    @property
    def anomalous(self) -> np.ndarray:
        return self.labels != self.normal_label

    @property
    def normal(self) -> np.ndarray:
        return ~self.anomalous

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class SplitData:
    train: Part
    val: Part
    test: Part
    dataset: Dataset
    seed: int


#: The split options an artefact may record (`metadata["data"]["split"]`).
SPLIT_OPTIONS = ("seed", "val_fraction", "test_fraction", "val_anomaly_fraction", "limit")


def recorded_split(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ECG5000 split options a model was trained with, from its artefact's metadata, so its
    held-out test part can be cut again: `data.split` (`trainer fit`) or `data.ecg5000_split_seed`
    (`trainer.sources`, default fractions)."""
    data = metadata.get("data", {})
    split = {k: v for k, v in data.get("split", {}).items() if k in SPLIT_OPTIONS and v is not None}
    if "ecg5000_split_seed" in data:
        split["seed"] = data["ecg5000_split_seed"]
    return split


def split_indices(labels: np.ndarray, normal_label: str, seed: int, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, val_anomaly_fraction: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) row indices, each sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(labels == normal_label))
    if len(normal) < 3:
        raise ValueError(f"need at least 3 windows labelled {normal_label!r} (normal), found {len(normal)}")
    n_val = max(1, round(val_fraction * len(normal)))
    n_test = max(1, round(test_fraction * len(normal)))
    train, val, test = normal[n_val + n_test:], normal[:n_val], normal[n_val:n_val + n_test]
    val_anomalous, test_anomalous = [], []
    for label in sorted(set(labels[labels != normal_label])):
        rows = rng.permutation(np.flatnonzero(labels == label))
        k = round(val_anomaly_fraction * len(rows))
        val_anomalous.append(rows[:k])
        test_anomalous.append(rows[k:])
    val = np.concatenate([val, *val_anomalous])
    test = np.concatenate([test, *test_anomalous])
    return np.sort(train), np.sort(val).astype(int), np.sort(test).astype(int)


def split(dataset: Dataset, normal_label: str = "1", seed: int = 42, val_fraction: float = 0.15,
          test_fraction: float = 0.15, val_anomaly_fraction: float = 0.0) -> SplitData:
    train, val, test = split_indices(dataset.labels, normal_label, seed, val_fraction, test_fraction,
                                     val_anomaly_fraction)

    def part(rows: np.ndarray) -> Part:
        return Part(dataset.windows[rows], dataset.labels[rows], rows, normal_label)

    return SplitData(part(train), part(val), part(test), dataset, seed)
