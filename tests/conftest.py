"""Shared fixtures: the ECG5000 data, a real Kafka-protocol broker (Tansu), a small trained model."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    for candidate in (os.environ.get("ECG5000_DIR"), REPO.parent / "shared" / "data" / "ECG5000"):
        if candidate and Path(candidate, "ECG5000_TRAIN.txt").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def ecg_data_dir() -> Path:
    """The local ECG5000 copy: $ECG5000_DIR, else ../shared/data/ECG5000."""
    path = _data_dir()
    if path is None:
        pytest.fail("ECG5000 not found: set ECG5000_DIR to a directory holding ECG5000_TRAIN.txt/ECG5000_TEST.txt")
    return path


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A real Kafka-protocol broker (Tansu, in memory) on a free loopback port, for the whole session."""
    from monitor.broker import EmbeddedBroker

    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with EmbeddedBroker(log_path=log) as running:
        yield running


@pytest.fixture
def topic_prefix() -> str:
    """Unique topic-name prefix, so tests sharing the session broker never see each other's data."""
    return f"t{uuid.uuid4().hex[:10]}"
