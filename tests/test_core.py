"""Unit tests for the shared core: settings validation, the scorer's contract, the CLI shell."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from monitor.core.artefact import Artefact
from monitor.cli import main as cli_main
from monitor.daemon.metrics import Metrics, metric_names
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.core.scoring import Scorer
from monitor.daemon.settings import MonitorSettings


def test_settings_read_environment_and_hide_secrets(monkeypatch):
    monkeypatch.setenv("MONITOR_BOOTSTRAP_SERVERS", "k1:9092, k2:9092")
    monkeypatch.setenv("MONITOR_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MONITOR_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("MONITOR_SASL_USERNAME", "svc")
    monkeypatch.setenv("MONITOR_SASL_PASSWORD", "hunter2")
    settings = MonitorSettings()
    assert "hunter2" not in repr(settings)
    options = settings.kafka_common()
    assert options["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert options["sasl_plain_password"] == "hunter2"


@pytest.mark.parametrize("env, message", [
    ({"MONITOR_DEVICE": "tpu"}, "device"),
    ({"MONITOR_ALERTS_TOPIC": "ecg.samples"}, "topics must differ"),
    ({"MONITOR_SECURITY_PROTOCOL": "SASL_SSL"}, "SASL_MECHANISM"),
    ({"MONITOR_MAX_BATCH": "0"}, "max_batch"),
])
def test_bad_settings_fail_with_a_message_naming_the_setting(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=message):
        MonitorSettings()


def _scorer(reduction: str = "mean_abs", max_batch: int = 4) -> Scorer:
    torch_config = ModelConfig(embedding_dim=4, hidden_dim=8)
    artefact = Artefact(torch_config, LSTMAutoencoder(torch_config).state_dict(), threshold=0.5,
                        normalisation={"kind": "zscore"}, reduction=reduction)
    return Scorer(artefact, device="cpu", max_batch=max_batch)


def test_scorer_batches_give_the_same_errors_as_one_by_one():
    scorer = _scorer(max_batch=4)
    windows = np.random.default_rng(0).normal(size=(10, 140))
    together = scorer.score(windows)
    alone = np.concatenate([scorer.score(w[None]) for w in windows])
    assert together.shape == (10,)
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_scorer_reductions_and_shapes():
    windows = np.random.default_rng(1).normal(size=(3, 140, 1))
    mean = _scorer("mean_abs").score(windows)
    total = _scorer("sum_abs").score(windows)
    assert (mean > 0).all() and (total > mean).all()
    with pytest.raises(ValueError, match="expected windows of shape"):
        _scorer().score(np.zeros((2, 100)))


def test_metrics_live_in_the_injected_registry():
    registry = CollectorRegistry()
    metrics = Metrics(registry, threshold=0.4)
    metrics.records.inc(3)
    assert registry.get_sample_value("ecg_monitor_records_total") == 3
    assert registry.get_sample_value("ecg_monitor_model_threshold") == 0.4
    assert "ecg_monitor_invalid_records_total" in metric_names(metrics)


def test_cli_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "check", "replay", "demo"):
        assert command in out
