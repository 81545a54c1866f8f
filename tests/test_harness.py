"""The process harness the demo, the benchmark and the daemon tests run the monitor with
(monitor.tools.harness). Its broker-backed uses are covered by those suites; these need no broker."""

from __future__ import annotations

import pytest

from monitor.tools.broker import free_port
from monitor.tools.harness import REPO_ROOT, DaemonError, DaemonProcess, Metrics, daemon_environment, monitor_env

PAGE = """# HELP ecg_monitor_windows_scored_total Windows scored
# TYPE ecg_monitor_windows_scored_total counter
ecg_monitor_windows_scored_total 42.0
# HELP ecg_monitor_invalid_records_total Rejected records
# TYPE ecg_monitor_invalid_records_total counter
ecg_monitor_invalid_records_total{reason="schema"} 2.0
ecg_monitor_invalid_records_total{reason="not_json"} 3.0
# HELP ecg_monitor_end_to_end_latency_seconds Latency
# TYPE ecg_monitor_end_to_end_latency_seconds histogram
ecg_monitor_end_to_end_latency_seconds_bucket{le="0.5"} 4.0
ecg_monitor_end_to_end_latency_seconds_bucket{le="+Inf"} 5.0
ecg_monitor_end_to_end_latency_seconds_bucket{le="0.1"} 1.0
ecg_monitor_end_to_end_latency_seconds_count 5.0
ecg_monitor_end_to_end_latency_seconds_sum 1.5
"""


def test_metrics_by_key_by_labels_summed_and_as_histogram_buckets():
    metrics = Metrics.parse(PAGE)
    assert metrics["ecg_monitor_windows_scored_total"] == 42
    assert metrics['ecg_monitor_invalid_records_total{reason="schema"}'] == 2
    assert metrics.value("ecg_monitor_invalid_records_total", reason="not_json") == 3
    assert metrics.value("ecg_monitor_alerts_total", state="firing") == 0  # absent: a counter that never moved
    assert metrics.total("ecg_monitor_invalid_records_total") == 5
    assert metrics.buckets("ecg_monitor_end_to_end_latency_seconds") == [(0.1, 1), (0.5, 4), (float("inf"), 5)]


def test_monitor_env_takes_setting_names_or_variable_names_and_leaves_out_none():
    env = monitor_env({"max_batch": 2}, bootstrap_servers="k:9092", MONITOR_SCORES_TOPIC="", torch_threads=None)
    assert env == {"MONITOR_MAX_BATCH": "2", "MONITOR_BOOTSTRAP_SERVERS": "k:9092", "MONITOR_SCORES_TOPIC": ""}


def test_the_daemon_sees_only_the_settings_it_is_given(monkeypatch):
    monkeypatch.setenv("MONITOR_MAX_BATCH", "9")  # a stray setting in the caller's shell
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = daemon_environment({"MONITOR_MAX_WAIT_MS": "3"})
    assert env["MONITOR_MAX_WAIT_MS"] == "3" and "MONITOR_MAX_BATCH" not in env
    assert env["PYTHONPATH"].split(":") == [str(REPO_ROOT), "/elsewhere"]  # this checkout's code first


def test_a_daemon_that_exits_before_it_is_ready_fails_fast_with_its_log(tmp_path):
    env = monitor_env(model_path=tmp_path / "missing.pt", bootstrap_servers="127.0.0.1:1",
                      metrics_port=free_port(), log_format="text")
    daemon = DaemonProcess(env, tmp_path / "monitor.log")
    with pytest.raises(DaemonError, match=r"exited with code \d+ before it was ready") as failed:
        daemon.start(timeout_s=120)
    assert "missing.pt" in str(failed.value)  # the tail of its log says why
    assert daemon.returncode not in (None, 0)


def test_stopping_a_daemon_that_was_never_started_is_an_error(tmp_path):
    daemon = DaemonProcess(monitor_env(metrics_port=free_port()), tmp_path / "monitor.log")
    with pytest.raises(DaemonError, match="not started"):
        daemon.stop()
