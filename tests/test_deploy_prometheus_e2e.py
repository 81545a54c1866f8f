"""End to end against a real Prometheus: the dashboard's and the alert rules' PromQL on real data.

A monitor daemon (`python -m monitor run`) processes real ECG records (and one malformed record
per rejection reason) through the real broker. A real Prometheus server (Debian's package) on a
free loopback port, with deploy/prometheus/prometheus.yml's scrape job pointed at that monitor,
scrape and evaluation intervals of 1 s and the real rule files, scrapes it throughout. Then,
through Prometheus's HTTP API:

- every rule group loaded and every rule evaluated with health "ok";
- every dashboard query, with Grafana's variables substituted ($__rate_interval = 1m,
  $instance = the monitor's instance), is valid and returns data;
- every rule expression is valid as written, and returns data once its conditions are
  stripped: an alert condition (`x > 0.05`, `up == 0`) is empty on a healthy monitor by design,
  so the test evaluates the operands of its comparisons (`x`, `up`), split at top-level
  `and`/`or`/`unless` (see test_deploy_static.split_condition).

The expressions are queried exactly as written, ranges included ([5m], [10m], [1d]): a range
needs two samples inside it, which a 1 s scrape interval gives within seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from monitor.stream.wire import REJECT_REASONS
from monitor.tools.broker import free_port
from support import (MonitorProcess, Topics, load_ecg5000, malformed_records, monitor_env, produce,
                     stream_records, wait_for)
from test_deploy_static import JOB, alerting_rules, dashboard, dashboard_queries, grafana_to_promql, split_condition

pytestmark = [pytest.mark.prometheus, pytest.mark.kafka, pytest.mark.slow]

PROM_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
MAX_RECORD_BYTES = 65536


class PrometheusServer:
    """A real Prometheus on a free loopback port, configured from deploy/prometheus/prometheus.yml
    with the `ecg-monitor` job pointed at `target`, 1 s intervals and temporary storage."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.workdir = workdir
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def write_config(self) -> Path:
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROM_DIR / pattern) for pattern in config["rule_files"]]
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
        job["static_configs"] = [{"targets": [self.target]}]
        config["scrape_configs"] = [job]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: install Debian's 'prometheus' package (`make system-deps`)")
        config = self.write_config()
        with open(self.workdir / "prometheus.log", "wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log_text()}"
            try:
                return requests.get(f"{self.url}/-/ready", timeout=1).ok
            except requests.RequestException:
                return False

        wait_for(ready, timeout_s, message=lambda: f"prometheus not ready:\n{self.log_text()}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def api(self, path: str, **params) -> dict:
        """GET without parameters (/rules only answers GET), else POST (no URL length limit)."""
        url = f"{self.url}/api/v1/{path}"
        response = requests.post(url, data=params, timeout=30) if params else requests.get(url, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query at the current time; raises AssertionError when the expression is invalid."""
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


WARMUP = 5


@pytest.fixture(scope="module")
def scraped(broker, trained_model, ecg_data_dir, tmp_path_factory):
    """(prometheus, instance, windows sent): a monitor that processed real records, scraped by a
    real Prometheus with the rules loaded, both still running."""
    workdir = tmp_path_factory.mktemp("prometheus-e2e")
    topics = Topics.for_prefix(f"t{uuid.uuid4().hex[:10]}").create(broker.bootstrap, partitions=2)
    # Sensors calibrate on their first WARMUP beats (a short warm-up instead of 150, so the stream
    # stays short) and only then can an ordinary alert fire.
    env = monitor_env(broker.bootstrap, topics, trained_model, MONITOR_MAX_RECORD_BYTES=str(MAX_RECORD_BYTES),
                      MONITOR_CALIBRATION_WARMUP_BEATS=str(WARMUP))
    beats, labels = load_ecg5000(ecg_data_dir)
    normal, abnormal = beats[labels == 1], beats[labels != 1]
    streams = {f"patient-{i:02d}": normal[i * 6:(i + 1) * 6] for i in range(5)}
    # calibrated on normal beats, then anomalous beats: an alert fires
    streams["patient-99"] = np.concatenate([normal[30:30 + WARMUP], abnormal[:6]])
    windows = sum(len(b) for b in streams.values())

    with MonitorProcess(env, log_path=workdir / "monitor.log") as monitor, \
            PrometheusServer(workdir, f"127.0.0.1:{monitor.port}") as prometheus:
        def scrapes() -> float:
            return prometheus.value(f'count_over_time(up{{job="{JOB}"}}[10m])') or 0

        # Prometheus scrapes before, during and after the records, so rates see them arrive.
        wait_for(lambda: scrapes() >= 2, 60, message="prometheus never scraped the monitor")
        produce(broker.bootstrap, topics.input, stream_records(streams, chunk=35), pace_s=0.02)
        produce(broker.bootstrap, topics.input, malformed_records(max_bytes=MAX_RECORD_BYTES).values())
        wait_for(lambda: monitor.metric("ecg_monitor_windows_scored_total") >= windows, 90,
                 message=lambda: f"monitor scored {monitor.metric('ecg_monitor_windows_scored_total')} "
                                 f"of {windows} windows:\n{monitor.log_text()[-3000:]}")
        instance = f"127.0.0.1:{monitor.port}"
        seen_at = scrapes()
        wait_for(lambda: (prometheus.value("sum(ecg_monitor_windows_scored_total)") or 0) >= windows
                 and (prometheus.value("sum(ecg_monitor_invalid_records_total)") or 0) >= 6
                 and scrapes() >= seen_at + 3, 30, message="prometheus did not scrape the final counts")
        yield prometheus, instance, windows


def test_prometheus_scraped_the_records_the_monitor_processed(scraped):
    prometheus, instance, windows = scraped
    assert prometheus.value(f'up{{job="{JOB}", instance="{instance}"}}') == 1
    assert prometheus.value("sum(ecg_monitor_windows_scored_total)") == windows
    assert prometheus.value("sum(ecg_monitor_anomalous_windows_total)") >= 1
    assert prometheus.value('sum(ecg_monitor_alerts_total{state="firing"})') >= 1
    invalid = {r["metric"]["reason"]: float(r["value"][1])
               for r in prometheus.query("ecg_monitor_invalid_records_total")}
    # one malformed record per input reason; no sensor was refused for capacity
    assert invalid == {**dict.fromkeys(REJECT_REASONS, 1.0), "over_capacity": 0.0}
    (info,) = prometheus.query("ecg_monitor_build_info")
    assert info["metric"]["model_version"]


def test_every_rule_is_loaded_and_evaluates_without_error(scraped):
    prometheus, _, _ = scraped
    expected = {rule["alert"] for rule in alerting_rules()}

    def evaluated() -> list[dict]:
        rules = [r for group in prometheus.api("rules")["groups"] for r in group["rules"]]
        done = all(not r.get("lastEvaluation", "").startswith("0001-") for r in rules)
        return rules if done and rules else []

    rules = wait_for(evaluated, 30, message="rules not evaluated")
    assert {r["name"] for r in rules} == expected
    assert [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_every_dashboard_query_is_valid_and_returns_data(scraped):
    prometheus, instance, _ = scraped
    queries = dashboard_queries()
    assert len(queries) >= 25
    empty = [(where, expr) for where, expr in queries if not prometheus.query(grafana_to_promql(expr, instance))]
    assert empty == []
    # The `instance` variable's values: label_values(<metric>, instance).
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "instance"]
    metric = variable["definition"].split("(")[1].split(",")[0].strip()
    values = prometheus.api("series", **{"match[]": metric})
    assert instance in {series["instance"] for series in values}


def test_every_rule_expression_is_valid_and_its_operands_return_data(scraped):
    prometheus, _, _ = scraped
    empty = []
    for rule in alerting_rules():
        prometheus.query(rule["expr"])  # valid as written (empty: the alert condition does not hold)
        operands = split_condition(rule["expr"])
        assert operands, rule["alert"]
        empty += [(rule["alert"], operand) for operand in operands if not prometheus.query(operand)]
    assert empty == []


def test_a_healthy_monitor_fires_no_operational_alert(scraped):
    """The conditions of the alerts without a `for` long enough to hide them: a healthy monitor
    is up, ready and consuming, so these are empty."""
    prometheus, _, _ = scraped
    for rule in alerting_rules():
        if rule["alert"] in ("EcgMonitorDown", "EcgMonitorNotReady", "EcgMonitorNoRecordsProcessed"):
            assert prometheus.query(rule["expr"]) == [], rule["alert"]
    assert np.isfinite(prometheus.value('histogram_quantile(0.99, sum by (le) '
                                        '(rate(ecg_monitor_scoring_latency_seconds_bucket[5m])))'))
