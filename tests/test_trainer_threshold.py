"""Threshold methods, and the settings that choose them."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.metrics import f1_score

from trainer.settings import TrainerSettings
from trainer.threshold import choose_threshold


def test_percentile_of_normal_validation_errors():
    errors = np.arange(1, 101, dtype=float)
    value, method = choose_threshold(errors, "percentile", percentile=95)
    assert value == pytest.approx(np.percentile(errors, 95))
    assert method == {"method": "percentile", "percentile": 95}
    assert (errors > value).sum() == 5


def test_percentile_ignores_anomalous_validation_windows():
    errors = np.array([1.0, 2.0, 3.0, 100.0])
    value, _ = choose_threshold(errors, "percentile", percentile=100, anomalous=np.array([0, 0, 0, 1], bool))
    assert value == 3.0


def test_mean_plus_k_std():
    errors = np.random.default_rng(0).normal(1.0, 0.1, 500)
    value, method = choose_threshold(errors, "mean_std", k=2.5)
    assert value == pytest.approx(errors.mean() + 2.5 * errors.std(ddof=1))
    assert method == {"method": "mean_std", "k": 2.5}


def test_fixed_value_and_its_requirement():
    assert choose_threshold(np.ones(3), "fixed", value=0.7) == (0.7, {"method": "fixed"})
    with pytest.raises(ValueError, match="needs a positive value"):
        choose_threshold(np.ones(3), "fixed")


def test_f1_separable_sets_put_the_threshold_between_them():
    errors = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    anomalous = np.array([0, 0, 0, 1, 1], bool)
    value, method = choose_threshold(errors, "f1", anomalous=anomalous)
    assert 0.3 < value < 0.8
    assert method == {"method": "f1", "n_val_anomalous": 2}


def test_f1_threshold_is_as_good_as_any_cut():
    rng = np.random.default_rng(1)
    errors = np.concatenate([rng.normal(0, 1, 300), rng.normal(1.5, 1, 100)])
    anomalous = np.arange(400) >= 300
    value, _ = choose_threshold(errors, "f1", anomalous=anomalous)
    best = max(f1_score(anomalous, errors > t) for t in np.sort(errors))
    assert f1_score(anomalous, errors > value) == pytest.approx(best)


def test_f1_needs_both_classes_and_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="needs a validation set with both"):
        choose_threshold(np.ones(4), "f1")
    with pytest.raises(ValueError, match="needs a validation set with both"):
        choose_threshold(np.ones(4), "f1", anomalous=np.ones(4, bool))
    with pytest.raises(ValueError, match="unknown threshold method"):
        choose_threshold(np.ones(4), "median")


@pytest.mark.parametrize("env, message", [
    ({"TRAINER_THRESHOLD_METHOD": "fixed"}, "threshold_value"),
    ({"TRAINER_THRESHOLD_METHOD": "f1"}, "val_anomaly_fraction"),
    ({"TRAINER_THRESHOLD_PERCENTILE": "100"}, "threshold_percentile"),
    ({"TRAINER_EPOCHS": "0"}, "epochs"),
    ({"TRAINER_VAL_FRACTION": "0.45", "TRAINER_TEST_FRACTION": "0.45"}, "at least 10%"),
])
def test_bad_settings_name_the_setting(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=message):
        TrainerSettings()


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRAINER_EPOCHS", "7")
    monkeypatch.setenv("TRAINER_THRESHOLD_METHOD", "mean_std")
    settings = TrainerSettings()
    assert (settings.epochs, settings.threshold_method) == (7, "mean_std")
    assert TrainerSettings(epochs=3).epochs == 3  # explicit values win over the environment
