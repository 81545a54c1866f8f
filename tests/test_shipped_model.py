"""The model shipped with the package: `ecg-monitor run` works with no MONITOR_MODEL_PATH."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch

import numpy as np

from monitor.core.artefact import Artefact
from monitor.core.scoring import Scorer
from monitor.daemon.settings import SHIPPED_MODEL_PATH, MonitorSettings
from monitor.stream.beats import BeatConvention
from tests.conftest import REPO


def test_settings_without_a_model_path_load_the_shipped_model():
    settings = MonitorSettings(_env_file=None)
    assert settings.model_path is None and settings.model_file == SHIPPED_MODEL_PATH
    assert SHIPPED_MODEL_PATH.is_file()
    assert MonitorSettings(_env_file=None, model_path="elsewhere.pt").model_file.name == "elsewhere.pt"


def test_the_shipped_model_scores_beat_windows_of_its_convention():
    artefact = Artefact.load(SHIPPED_MODEL_PATH)  # torch.load(weights_only=True) and the checksum
    convention = BeatConvention.from_dict(artefact.metadata["windowing"])
    scorer = Scorer.from_file(SHIPPED_MODEL_PATH, device="cpu")
    assert scorer.window_length == convention.length
    assert np.isfinite(scorer.warm_up())


def test_the_shipped_model_is_package_data():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["monitor"]
    relative = SHIPPED_MODEL_PATH.relative_to(REPO / "monitor").as_posix()
    assert any(fnmatch(relative, pattern) for pattern in patterns)
