"""Settings validation: illegal Kafka topic names are refused at start-up (not at the first send),
an invalid setting is reported by name without ever printing a value (secrets included), and the
HTTP server's bind address is configurable with a loopback default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from monitor.daemon.settings import TOPIC_SETTINGS, MonitorSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "hunter2-Zq8v-never-print-me"


def leaks_password(text: str) -> bool:
    """Any 5 characters of the password: pydantic's text shows a truncated prefix of an input."""
    return any(PASSWORD[i:i + 5] in text for i in range(len(PASSWORD) - 4))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("MONITOR_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.mark.parametrize("topic", TOPIC_SETTINGS)
@pytest.mark.parametrize("name", ["ecg samples", "ecg/samples", "ecg:samples", "ecg.sämples", ".", "..",
                                  "x" * 250, "ecg\nsamples"])
def test_every_topic_setting_refuses_an_illegal_kafka_topic_name(topic, name):
    with pytest.raises(ValidationError) as error:
        MonitorSettings(**{topic: name})
    assert [e["loc"] for e in error.value.errors()] == [(topic,)]
    assert "[a-zA-Z0-9._-]" in str(error.value.errors()[0]["msg"])


@pytest.mark.parametrize("name", ["x" * 249, "ecg.samples_v2-EU", "a", "..a", "_"])
def test_legal_topic_names_are_accepted(name):
    assert MonitorSettings(input_topic=name).input_topic == name


def test_an_empty_topic_is_refused_except_for_the_optional_scores_topic():
    assert MonitorSettings(scores_topic="").scores_topic == ""
    for topic in ("input_topic", "alerts_topic", "dlq_topic"):
        with pytest.raises(ValidationError):
            MonitorSettings(**{topic: ""})


def test_the_http_server_binds_to_loopback_unless_configured(monkeypatch):
    assert MonitorSettings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("MONITOR_METRICS_HOST", "0.0.0.0")
    assert MonitorSettings().metrics_host == "0.0.0.0"


def test_load_settings_names_the_fields_but_prints_no_value(monkeypatch, capsys):
    monkeypatch.setenv("MONITOR_SASL_PASSWORD", PASSWORD)
    monkeypatch.setenv("MONITOR_MAX_BATCH", f"not-a-number-{PASSWORD}")
    assert load_settings(None) is None
    out, err = capsys.readouterr()
    assert not leaks_password(out + err) and "not-a-number" not in out + err
    assert "MONITOR_MAX_BATCH" in err and "input_value" not in err

    monkeypatch.delenv("MONITOR_MAX_BATCH")  # a field error skips the model-level checks
    monkeypatch.setenv("MONITOR_ALERTS_TOPIC", MonitorSettings().input_topic)  # model-level: input is every setting
    assert load_settings(None) is None
    out, err = capsys.readouterr()
    assert not leaks_password(out + err) and "topics must differ" in err and "input_value" not in err


@pytest.mark.slow
@pytest.mark.parametrize("command", [["check", "--skip-broker"], ["run"]])
@pytest.mark.parametrize("source", ["environment", "env_file"])
@pytest.mark.parametrize("invalid, named", [({"MONITOR_ALERTS_TOPIC": "ecg.samples"}, "topics must differ"),
                                            ({"MONITOR_MAX_BATCH": "many"}, "MONITOR_MAX_BATCH")])
def test_no_command_prints_the_sasl_password_when_a_setting_is_invalid(command, source, invalid, named, tmp_path):
    secret = {"MONITOR_SASL_PASSWORD": PASSWORD}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    env.update(invalid, PYTHONPATH=str(REPO))
    env_file = tmp_path / "monitor.env"
    if source == "environment":
        env.update(secret)
        env_file.write_text("")
    else:
        env_file.write_text("".join(f"{k}={v}\n" for k, v in secret.items()))
    done = subprocess.run([sys.executable, "-m", "monitor", *command, "--env-file", str(env_file)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert not leaks_password(output)
    assert named in output and "Traceback" not in output
