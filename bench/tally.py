"""Figures from the reliability suite (records tried, faults injected, windows lost).

The tests call `record(...)` with what they measured. When ECG_RELIABILITY_TALLY names a file
(`python -m bench reliability` sets it), each call appends one JSON line there; otherwise it
does nothing, so a plain `pytest` run is unaffected.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

ENV = "ECG_RELIABILITY_TALLY"
FIGURES = ("records_tried", "faults_injected", "windows_expected", "windows_lost")


def record(test: str, **figures: int) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps({"test": test, **{k: int(v) for k, v in figures.items()}}) + "\n")


def summarise(path: Path) -> dict:
    """Per-test sums and the grand totals of every figure."""
    per_test: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            test = row.pop("test")
            for key, value in row.items():
                per_test[test][key] += value
    totals: dict[str, int] = defaultdict(int)
    for figures in per_test.values():
        for key, value in figures.items():
            totals[key] += value
    return {"tests": {t: dict(f) for t, f in per_test.items()}, "totals": dict(totals)}
