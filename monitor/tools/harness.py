"""The monitor daemon (`python -m monitor run`) as a subprocess: its environment, readiness,
/metrics and stop. The demo, the tests and the benchmark all run the daemon through this.

    env = monitor_env(bootstrap_servers=broker.bootstrap, model_path=model, metrics_port=free_port())
    with DaemonProcess(env, log_path=work / "monitor.log") as daemon:   # started, /readyz answered 200
        scored = daemon.metrics().value("ecg_monitor_windows_scored_total")
        assert daemon.stop() == 0                                        # SIGTERM, then its exit code
    # leaving the block kills a daemon that is still running
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

#: The checkout this module belongs to: first on the daemon's PYTHONPATH, so the subprocess
#: runs the same code as its caller even where the package is not installed.
REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "MONITOR_"


class DaemonError(RuntimeError):
    """The daemon exited before it was ready, was not ready in time, did not stop, or its
    /metrics did not answer. The message ends with the tail of its log."""


def monitor_env(settings: Mapping[str, object] | None = None, **more: object) -> dict[str, str]:
    """MONITOR_* variables from setting names or variable names, values as strings; a None
    value leaves the variable out (the daemon's default applies):

        monitor_env(bootstrap_servers="kafka:9092", max_batch=2, torch_threads=None)
        == {"MONITOR_BOOTSTRAP_SERVERS": "kafka:9092", "MONITOR_MAX_BATCH": "2"}
    """
    merged = {**(settings or {}), **more}
    return {_variable(name): str(value) for name, value in merged.items() if value is not None}


def _variable(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name.upper()


def daemon_environment(monitor: Mapping[str, str]) -> dict[str, str]:
    """The daemon's whole environment: this process's without its MONITOR_* variables (a stray
    one in the caller's shell must not change a test, a benchmark or the demo), plus `monitor`,
    this checkout first on PYTHONPATH, and unbuffered output (the log is complete when read)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env.update(monitor)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def sample_key(name: str, labels: Mapping[str, str] | None = None) -> str:
    """'name', or 'name{a="x",b="y"}' with the labels sorted: how `Metrics` keys its samples."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class Metrics(dict[str, float]):
    """One scrape of /metrics: every sample's value by `sample_key`, e.g.
    metrics['ecg_monitor_alerts_total{state="firing"}'], plus lookups by name and labels."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self.samples = list(samples)
        super().__init__((sample_key(s.name, s.labels), float(s.value)) for s in self.samples)

    @classmethod
    def parse(cls, text: str) -> Metrics:
        """The Prometheus text exposition format, as the daemon serves it."""
        return cls(sample for family in text_string_to_metric_families(text) for sample in family.samples)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; 0.0 when absent, like a counter that never moved."""
        return self.get(sample_key(name, labels), 0.0)

    def total(self, name: str) -> float:
        """The sum over every label set of `name` (e.g. invalid records of all reasons)."""
        return sum(float(s.value) for s in self.samples if s.name == name)

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """A histogram's cumulative buckets as [(upper bound, count)], ascending (+Inf last)."""
        return sorted((float(s.labels["le"]), float(s.value)) for s in self.samples
                      if s.name == f"{histogram}_bucket")


class DaemonProcess:
    """`python -m monitor <command>` with the MONITOR_* variables `env` (see `daemon_environment`),
    stdout and stderr appended to `log_path`. Its metrics port is env's MONITOR_METRICS_PORT.

    The daemon runs in its own session, so a Ctrl-C in a terminal reaches only the caller, which
    then stops the daemon in order. `with DaemonProcess(...) as d` starts it and waits until it
    is ready; leaving the block kills it if it is still running."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, command: Sequence[str] = ("run",),
                 cwd: Path | None = None) -> None:
        self.env = dict(env)
        self.port = int(self.env[f"{PREFIX}METRICS_PORT"])
        self.log_path = Path(log_path)
        self.command = list(command)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        #: monotonic time of the last readiness probe that was not answered 200 (before
        #: it, no partition was assigned and nothing was scored)
        self.last_not_ready_at = time.monotonic()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.base_url}/metrics"

    @property
    def pid(self) -> int:
        return self._running().pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (or before it started), else its exit code (-N: killed by signal N)."""
        return None if self.process is None else self.process.poll()

    def start(self, wait_ready: bool = True, timeout_s: float = 120.0,
              stop: threading.Event | None = None) -> DaemonProcess:
        """Launch it and, with `wait_ready`, wait until it is ready; a daemon that does not get
        ready is killed before the DaemonError is raised."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "monitor", *self.command], cwd=self.cwd,
                                            env=daemon_environment(self.env), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        if wait_ready:
            try:
                self.wait_ready(timeout_s, stop)
            except BaseException:
                self.kill()
                raise
        return self

    def wait_ready(self, timeout_s: float = 120.0, stop: threading.Event | None = None) -> bool:
        """Poll /readyz until it answers 200 (True), or until `stop` is set (False).
        DaemonError when the daemon exits first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while stop is None or not stop.is_set():
            if self._running().poll() is not None:
                raise self.error(f"the monitor exited with code {self.returncode} before it was ready")
            probed_at = time.monotonic()
            if self.get("/readyz")[0] == 200:
                return True
            self.last_not_ready_at = probed_at
            if probed_at > deadline:
                raise self.error(f"the monitor was not ready within {timeout_s:g} s")
            if stop is not None:
                stop.wait(0.2)
            else:
                time.sleep(0.2)
        return False

    def get(self, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
        """(HTTP status, body) of a GET on the metrics server; status 0 when nothing answers."""
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout_s) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metrics(self) -> Metrics:
        status, body = self.get("/metrics")
        if status != 200:
            raise self.error(f"/metrics answered {status or 'nothing'}")
        return Metrics.parse(body)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of a fresh scrape (0.0 when absent)."""
        return self.metrics().value(name, **labels)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send `sig` (unless it has exited already) and return the exit code. A daemon still
        running after `timeout_s` is killed, and DaemonError says so."""
        process = self._running()
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise self.error(f"the monitor did not stop within {timeout_s:g} s of signal {sig}; killed it") from None

    def kill(self) -> int:
        """SIGKILL: no shutdown, as a crash or an OOM kill would end it. Returns -9."""
        return self.stop(signal.SIGKILL, timeout_s=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(empty log)"

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON lines of the log (MONITOR_LOG_FORMAT=json); other lines are skipped."""
        events = []
        for line in self.log_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def error(self, what: str) -> DaemonError:
        return DaemonError(f"{what}; the end of its log ({self.log_path}):\n{self.log_tail()}")

    def _running(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise DaemonError("the monitor was not started")
        return self.process

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.returncode is None and self.process is not None:
            self.kill()
