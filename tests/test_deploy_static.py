"""Static checks of everything under deploy/: files parse, names and references agree.

No Docker engine or cluster runs in CI, so the images, the compose stack and the Kubernetes
manifests are checked by reading them: every reference points at something that exists, every
MONITOR_* variable is a real setting and validates, every metric the dashboard and the alert
rules use is one the monitor exports. The PromQL helpers here are shared with the end-to-end
test against a real Prometheus (test_deploy_prometheus_e2e.py).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from monitor.daemon.metrics import Metrics, metric_names
from monitor.daemon.settings import MonitorSettings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ecg-monitor.json"
RULE_FILES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
K8S = DEPLOY / "k8s"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile*"))

#: Series that Prometheus itself makes, not the monitor.
PROMETHEUS_SERIES = {"up"}
#: The job name the alert rules select on; every scrape config must produce it.
JOB = "ecg-monitor"


# ----------------------------------------------------------------------------- PromQL helpers

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
             "bool", "offset", "inf", "nan"}


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (a light tokenizer, enough for our queries):
    identifiers outside strings, label matchers, ranges and grouping clauses, that are not
    functions, aggregations or keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[match.end():].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(container: dict):
    for panel in container.get("panels", []):
        yield panel
        yield from _panels(panel)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title + refId, expr) for every query of every panel."""
    return [(f"{panel['title']} [{target['refId']}]", target["expr"])
            for panel in _panels(dashboard()) for target in panel.get("targets", []) if target.get("expr")]


def alerting_rules() -> list[dict]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules += group["rules"]
    return rules


def grafana_to_promql(expr: str, instance: str, rate_interval: str = "1m") -> str:
    """Substitute Grafana's variables the way Grafana would for one selected instance."""
    out = (expr.replace("$__rate_interval", rate_interval).replace("$__interval", "15s")
           .replace("${instance}", instance).replace("$instance", instance))
    assert "$" not in out, f"unsubstituted Grafana variable in {expr}"
    return out


def split_condition(expr: str) -> list[str]:
    """The operands of an alert condition that must return data: split at top-level `and`/`or`/
    `unless`, and keep the left-hand side of each top-level comparison (plus its right-hand
    side when that is not a plain number). `a > 0.05 and b > 3 * c` gives [a, b, 3 * c]."""
    parts, depth, start, i = [], 0, 0, 0
    text = " ".join(expr.split())
    tokens: list[tuple[str, str]] = []  # (kind, text): kind "expr" or an operator
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i = text.index('"', i + 1) + 1
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            op = re.match(r"(==|!=|>=|<=|>|<)(\s*bool)?|\b(and|or|unless)\b", text[i:])
            if op and not (ch in "=!" and text[i - 1: i + 1] == "=~"):
                if text[i:i + 2] not in ("=~", "!~"):
                    tokens.append(("expr", text[start:i]))
                    tokens.append(("set" if op.group(3) else "cmp", op.group()))
                    i += len(op.group())
                    start = i
                    continue
        i += 1
    tokens.append(("expr", text[start:]))
    for index, (kind, part) in enumerate(tokens):
        if kind != "expr":
            continue
        part = re.sub(r"^\s*(?:on|ignoring)\s*\([^)]*\)", "", part).strip()
        previous = tokens[index - 1][0] if index else "set"
        if previous == "cmp" and re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", part):
            continue
        parts.append(part)
    return parts


def test_promql_helpers():
    assert metric_names_in('sum by (le) (rate(ecg_monitor_x_bucket{instance=~"$instance"}[$__rate_interval]))'
                           ) == {"ecg_monitor_x_bucket"}
    assert metric_names_in("up{job=\"a\"} == 0 and on(instance) b offset 5m > 1e3") == {"up", "b"}
    assert metric_names_in("histogram_quantile(0.99, sum(rate(a[5m])) without (x)) / time()") == {"a"}
    assert split_condition("increase(a[5m]) == 0\nand b > 0") == ["increase(a[5m])", "b"]
    assert split_condition('x{l=~"a|b"} / y > 3 * (z) and (w) > 0.05') == ['x{l=~"a|b"} / y', "3 * (z)", "(w)"]
    assert split_condition('up{job="x"} == 0') == ['up{job="x"}']


# ----------------------------------------------------------------------------- parsing

def test_every_yaml_and_json_file_in_deploy_parses():
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json")]
    assert len(files) >= 15
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert documents, f"{path} is empty"


# ----------------------------------------------------------------------------- metric names

def test_every_metric_in_the_dashboard_and_the_rules_is_exported_by_the_monitor():
    exported = metric_names(Metrics(CollectorRegistry()))
    used: dict[str, set[str]] = {}
    for where, expr in dashboard_queries():
        for name in metric_names_in(expr):
            used.setdefault(name, set()).add(where)
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.match(r"label_values\((\w+)\s*,", variable["definition"]).group(1)
            used.setdefault(metric, set()).add(f"variable {variable['name']}")
    for rule in alerting_rules():
        for name in metric_names_in(rule["expr"]):
            used.setdefault(name, set()).add(rule.get("alert") or rule.get("record"))
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported | PROMETHEUS_SERIES}
    assert unknown == {}, "metric names that the monitor does not export"
    assert len(used) >= 15


def test_dashboard_covers_what_operators_need():
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for metric in ("ecg_monitor_records_total", "ecg_monitor_invalid_records_total", "ecg_monitor_windows_scored_total",
                   "ecg_monitor_anomalous_windows_total", "ecg_monitor_alerts_total",
                   "ecg_monitor_reconstruction_error_bucket", "ecg_monitor_model_threshold",
                   "ecg_monitor_scoring_latency_seconds_bucket", "ecg_monitor_end_to_end_latency_seconds_bucket",
                   "ecg_monitor_batch_size_windows_bucket", "ecg_monitor_consumer_lag_records",
                   "ecg_monitor_active_sensors", "ecg_monitor_build_info",
                   "ecg_monitor_signal_quality_windows_total", "ecg_monitor_calibrating_sensors"):
        assert metric in exprs, metric
    assert "by (reason)" in exprs and "by (state)" in exprs
    heatmaps = [p for p in _panels(dashboard()) if p["type"] == "heatmap"]
    assert any(t.get("format") == "heatmap" and "reconstruction_error_bucket" in t["expr"]
               for p in heatmaps for t in p["targets"])


def test_dashboard_variables_datasource_and_layout():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query" and variables["instance"]["includeAll"]
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    assert uid and variables["datasource"]["current"]["value"] == uid
    ids = []
    for panel in _panels(board):
        ids.append(panel["id"])
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert board["uid"] and board["title"]


# ----------------------------------------------------------------------------- compose

def compose() -> dict:
    """The compose file as docker compose sees it with no variables set (each ${VAR:-default})."""
    text = re.sub(r"(?<!\$)\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", COMPOSE.read_text())
    return yaml.safe_load(text)


def _settings(env: dict, monkeypatch) -> MonitorSettings:
    """Validate MONITOR_* variables exactly as the monitor reads them at start-up."""
    for key in list(os.environ):
        if key.startswith("MONITOR_"):
            monkeypatch.delenv(key)
    fields = {f"MONITOR_{name.upper()}" for name in MonitorSettings.model_fields}
    unknown = {k for k in env if k.startswith("MONITOR_")} - fields
    assert unknown == set(), "not monitor settings (typo?)"
    for key, value in env.items():
        if key.startswith("MONITOR_"):
            monkeypatch.setenv(key, str(value))
    return MonitorSettings(_env_file=None)


def _seconds(text) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(text).strip())
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60}[unit]


def test_compose_references_only_services_and_volumes_it_defines():
    stack = compose()
    services, volumes = stack["services"], set(stack.get("volumes") or {})
    used_volumes = set()
    for name, service in services.items():
        depends = service.get("depends_on", [])
        for dependency in depends if isinstance(depends, list) else depends.keys():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} uses undefined volume {source}"
                used_volumes.add(source)
        if "build" in service:
            build = service["build"]
            context = (DEPLOY / build["context"]).resolve()
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.M | re.I)
            assert build.get("target") in stages, f"{name}: no stage {build.get('target')} in {dockerfile.name}"
        assert "image" in service or "build" in service, name
    assert used_volumes == volumes, f"volumes defined but unused: {volumes - used_volumes}"
    assert {"kafka", "kafka-init", "trainer", "monitor", "replayer", "prometheus", "grafana"} <= services.keys()


def test_compose_variables_are_documented_and_shell_dollars_escaped():
    text = COMPOSE.read_text()
    variables = set(re.findall(r"\$\{(\w+)(?::?-[^}]*)?\}", text))
    documented = set(re.findall(r"^(\w+)=", (DEPLOY / ".env.example").read_text(), re.M))
    assert variables - documented == set(), "compose variables missing from deploy/.env.example"
    assert documented - variables == set(), ".env.example documents variables compose does not use"
    # A bare $name would be interpolated by compose, not by the container's shell.
    code = "\n".join(line.split(" #")[0] for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.findall(r"(?<!\$)\$(?![{$])", code) == []


def test_compose_kafka_is_kraft_and_creates_the_monitor_topics(monkeypatch):
    services = compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka["environment"]
    settings = _settings(services["monitor"]["environment"], monkeypatch)
    script = " ".join(services["kafka-init"]["command"])
    for topic in (settings.input_topic, settings.alerts_topic, settings.dlq_topic):
        assert re.search(rf"--topic {re.escape(topic)}\s", script), f"kafka-init does not create {topic}"
    assert settings.bootstrap_servers.split(":")[0] in services


def test_compose_monitor_settings_trainer_and_shutdown(monkeypatch):
    services = compose()["services"]
    monitor = services["monitor"]
    settings = _settings(monitor["environment"], monkeypatch)
    assert _seconds(monitor["stop_grace_period"]) > settings.shutdown_timeout_s
    # The trainer writes the artefact where the monitor reads it, on a shared volume.
    trainer_script = " ".join(services["trainer"]["command"])
    assert f"--out {settings.model_path}" in trainer_script
    models_dir = str(settings.model_path.parent)
    volume_of = lambda service: {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}  # noqa: E731
    assert volume_of(services["trainer"])[models_dir] == volume_of(monitor)[models_dir]
    assert monitor["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert any(p.endswith(f":{settings.metrics_port}") for p in monitor["ports"])
    replay = services["replayer"]["command"]
    assert replay[0] == "replay" and "--bootstrap-servers=kafka:9092" in replay


def test_compose_prometheus_and_grafana_wiring(monkeypatch):
    services = compose()["services"]
    settings = _settings(services["monitor"]["environment"], monkeypatch)
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == JOB)
    assert job["static_configs"][0]["targets"] == [f"monitor:{settings.metrics_port}"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in services["prometheus"]["volumes"]}
    assert mounts["./prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    grafana_mounts = {m.split(":")[0]: m.split(":")[1] for m in services["grafana"]["volumes"]}
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ecg-monitor.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == grafana_mounts["./grafana/dashboards"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    host_port = datasource["datasources"][0]["url"].split("//")[1]
    assert host_port.split(":")[0] in services and host_port.endswith(":9090")


# ----------------------------------------------------------------------------- Dockerfiles

def _dockerfile_stages(path: Path) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    lines = re.sub(r"\\\n", " ", path.read_text()).splitlines()
    stages: dict[str, list[str]] = {}
    current = None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = match.group(1) or f"stage{len(stages)}"
            stages[current] = []
        if current:
            stages[current].append(line)
    return stages


def _arg_defaults(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S*)", path.read_text(), re.M))


def _dockerignore() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch(p, pattern) or fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_and_clutter_out_of_the_context():
    patterns = _dockerignore()
    for path in (".env", "deploy/.env", ".git/config", ".venv/bin/python", "monitor/__pycache__/x.pyc", "tests/x.py"):
        assert _ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "monitor/daemon/loop.py", "trainer/cli.py", "models/ecg-lstm-ae.pt"):
        assert not _ignored(path, patterns), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_exist_user_healthcheck_entrypoint(dockerfile, monkeypatch):
    stages = _dockerfile_stages(dockerfile)
    args = _arg_defaults(dockerfile)
    patterns = _dockerignore()
    scripts = re.findall(r'^(ecg-[\w-]+)\s*=', (REPO / "pyproject.toml").read_text(), re.M)
    final = list(stages)[-1]
    assert final == "monitor", "the daemon must be the default (last) target"
    for name, instructions in stages.items():
        for line in instructions:
            copy = re.match(r"COPY\s+(?!--from)(?:--\S+\s+)*(.+)\s+(\S+)$", line)
            if copy:
                for source in copy.group(1).split():
                    source = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], source).rstrip("/")
                    assert (REPO / source).exists(), f"{dockerfile.name}:{name} copies missing {source}"
                    assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
        is_runtime = any(line.startswith("ENTRYPOINT") for line in instructions)
        if not is_runtime:
            continue
        users = [line.split()[1] for line in instructions if line.startswith("USER")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{name} must run as non-root"
        entrypoint = json.loads(next(line for line in instructions if line.startswith("ENTRYPOINT"))[10:])
        assert entrypoint[0] in scripts, f"{name}: {entrypoint[0]} is not a console script"
        env_lines = " ".join(line for line in instructions if line.startswith("ENV"))
        env = dict(re.findall(r"(MONITOR_\w+)=(\S+)", env_lines))
        settings = _settings(env, monkeypatch)
        if name == "monitor":
            healthcheck = next(line for line in instructions if line.startswith("HEALTHCHECK"))
            assert "/healthz" in healthcheck
            assert f"EXPOSE {settings.metrics_port}" in instructions
            assert str(settings.model_path).startswith("/models/")


def _build_chain(stages: dict[str, list[str]], name: str) -> list[str]:
    """The instructions that make stage `name`: its FROM ancestors' first, then its own."""
    base = re.match(r"FROM\s+(\S+)", stages[name][0], re.I).group(1)
    return (_build_chain(stages, base) if base in stages else []) + stages[name]


def _venv_source(stages: dict[str, list[str]], name: str) -> str:
    """The stage whose /opt/venv the runtime stage `name` copies."""
    return next(re.match(r"COPY\s+--from=(\S+)\s+/opt/venv", line).group(1) for line in stages[name]
                if re.match(r"COPY\s+--from=\S+\s+/opt/venv", line))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_daemon_image_installs_neither_the_tools_nor_the_trainer(dockerfile):
    """The daemon never imports monitor.tools (replayer, demo, embedded broker, harness) or the
    trainer (tests/test_architecture.py checks that); its image does not carry them."""
    stages = _dockerfile_stages(dockerfile)
    build = _build_chain(stages, _venv_source(stages, "monitor"))
    assert not [line for line in build if re.match(r"COPY\s+(?!--from).*\btrainer\b", line)], "trainer copied"
    copies_monitor = any(re.match(r"COPY\s+monitor\s", line) for line in build)
    install = next(line for line in build if "pip install ." in line)
    assert copies_monitor and re.search(r"rm -rf monitor/tools\s*&&\s*pip install \.", install), install


def test_the_trainer_image_keeps_the_replayer():
    stages = _dockerfile_stages(DEPLOY / "docker" / "Dockerfile")
    build = _build_chain(stages, _venv_source(stages, "trainer"))
    assert any(re.match(r"COPY\s+trainer\s", line) for line in build)
    assert not any("monitor/tools" in line for line in build), "`ecg-monitor replay` runs in the trainer image"


def test_one_version_source_and_image_tags_that_follow_it():
    from monitor import __version__

    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^dynamic\s*=\s*\[[^]]*"version"', pyproject, re.M)
    assert re.search(r'^version\s*=\s*\{\s*attr\s*=\s*"monitor.__version__"\s*\}', pyproject, re.M)
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M), "a second, literal version"
    tags = {}
    for path in [*DEPLOY.rglob("*"), REPO / "Makefile"]:
        if path.is_file() and path.suffix not in (".json", ".png"):
            for tag in re.findall(r"ecg-(?:monitor|trainer):(?:\$\{ECG_VERSION:-)?(\d+\.\d+\.\d+)", path.read_text()):
                tags.setdefault(tag, set()).add(str(path.relative_to(REPO)))
    assert tags and set(tags) == {__version__}, f"image tags other than {__version__}: {tags}"


# ----------------------------------------------------------------------------- Kubernetes

def k8s_objects() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((K8S / resource).read_text()):
            objects[(document["kind"], document["metadata"]["name"])] = document
    listed = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == set(kustomization["resources"]), "every manifest is in kustomization.yaml"
    return objects


def _k8s_settings(objects, monkeypatch) -> MonitorSettings:
    env = dict(objects[("ConfigMap", "ecg-monitor-config")]["data"])
    env.update(objects[("Secret", "ecg-monitor-secrets")]["stringData"])
    return _settings(env, monkeypatch)


def test_k8s_deployment_probes_resources_and_shutdown(monkeypatch):
    objects = k8s_objects()
    settings = _k8s_settings(objects, monkeypatch)
    deployment = objects[("Deployment", "ecg-monitor")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names["metrics"] == settings.metrics_port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    kinds = {"configMapRef": "ConfigMap", "secretRef": "Secret"}
    refs = {(kinds[key], value["name"]) for ref in container["envFrom"] for key, value in ref.items()}
    assert refs == {("ConfigMap", "ecg-monitor-config"), ("Secret", "ecg-monitor-secrets")}
    assert refs <= objects.keys()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= {name for kind, name in objects if kind == "PersistentVolumeClaim"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.model_path.parent) in mounts


def test_k8s_replicas_do_not_exceed_input_partitions(monkeypatch):
    objects = k8s_objects()
    settings = _k8s_settings(objects, monkeypatch)
    script = objects[("Job", "ecg-kafka-topics")]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    line = next(line for line in script.splitlines() if '"$MONITOR_INPUT_TOPIC"' in line and "--create" in line)
    partitions = int(re.search(r"--partitions (\d+)", line).group(1))
    assert settings.input_topic == "ecg.samples"
    assert 1 <= objects[("Deployment", "ecg-monitor")]["spec"]["replicas"] <= partitions
    for topic in ("MONITOR_ALERTS_TOPIC", "MONITOR_DLQ_TOPIC"):
        assert f'"${topic}"' in script
    # per-sensor state is partitioned like the input (the daemon refuses to start otherwise)
    state = next(line for line in script.splitlines() if '"$MONITOR_STATE_TOPIC"' in line and "--create" in line)
    assert int(re.search(r"--partitions (\d+)", state).group(1)) == partitions
    assert "--config cleanup.policy=compact" in state and settings.state_topic == "ecg.monitor.state"


def _topic_creations(script: str) -> list[dict]:
    """Each `kafka-topics.sh --create` line as {"topic", "replication", "configs"}."""
    creations = []
    for line in script.splitlines():
        if "--create" in line:
            creations.append({"topic": re.search(r"--topic (\S+)", line).group(1),
                              "replication": int(re.search(r"--replication-factor (\d+)", line).group(1)),
                              "configs": dict(re.findall(r"--config (\S+?)=(\S+)", line))})
    return creations


def test_k8s_topics_are_replicated_three_times_with_two_in_sync_replicas_required():
    """acks=all only means "on two brokers" with min.insync.replicas=2; topics created earlier
    (--if-not-exists leaves them alone) get the setting from kafka-configs.sh --alter."""
    objects = k8s_objects()
    script = objects[("Job", "ecg-kafka-topics")]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    creations = _topic_creations(script)
    assert {c["topic"] for c in creations} == {'"$MONITOR_INPUT_TOPIC"', '"$MONITOR_ALERTS_TOPIC"',
                                               '"$MONITOR_DLQ_TOPIC"', '"$MONITOR_STATE_TOPIC"'}
    for creation in creations:
        assert creation["replication"] == 3 and creation["configs"].get("min.insync.replicas") == "2", creation
        assert re.search(rf"--alter --entity-type topics --entity-name {re.escape(creation['topic'])} "
                         r"--add-config min\.insync\.replicas=2", script), creation


def test_compose_topics_on_its_single_broker_require_one_in_sync_replica():
    script = "\n".join(compose()["services"]["kafka-init"]["command"])
    creations = _topic_creations(script)
    assert len(creations) == 4
    by_topic = {c["topic"]: c for c in creations}
    assert by_topic["ecg.monitor.state"]["configs"]["cleanup.policy"] == "compact"
    partitions = dict(re.findall(r"--topic (\S+) --partitions (\S+)", script))
    assert partitions["ecg.monitor.state"] == partitions["ecg.samples"]  # state is partitioned like the input
    for creation in creations:  # 2 would refuse every acks=all write on one broker
        assert creation["replication"] == 1 and creation["configs"].get("min.insync.replicas") == "1", creation


def test_containers_bind_the_http_server_to_every_interface(monkeypatch):
    """The code defaults to loopback; probes and scrapes reach a container from outside."""
    assert _settings(compose()["services"]["monitor"]["environment"], monkeypatch).metrics_host == "0.0.0.0"
    assert _k8s_settings(k8s_objects(), monkeypatch).metrics_host == "0.0.0.0"
    for dockerfile in DOCKERFILES:
        assert "MONITOR_METRICS_HOST=0.0.0.0" in dockerfile.read_text(), dockerfile.name


def test_torch_is_at_least_2_6_where_weights_only_loading_is_safe():
    """CVE-2025-32434: torch.load(weights_only=True) could run code before 2.6."""
    pyproject = (REPO / "pyproject.toml").read_text()
    (spec,) = re.findall(r'"torch(>=[^"]*)"', pyproject)
    assert tuple(int(p) for p in re.match(r">=(\d+)\.(\d+)", spec).groups()) >= (2, 6), spec


def test_k8s_service_servicemonitor_and_training_job(monkeypatch):
    objects = k8s_objects()
    settings = _k8s_settings(objects, monkeypatch)
    pod_template = objects[("Deployment", "ecg-monitor")]["spec"]["template"]
    service = objects[("Service", "ecg-monitor-metrics")]
    assert service["spec"]["selector"].items() <= pod_template["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics" and port["port"] == settings.metrics_port

    monitor = objects[("ServiceMonitor", "ecg-monitor")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    # The job label the alert rules select on.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == JOB
    assert all(f'job="{JOB}"' in r["expr"] for r in alerting_rules() if "up{" in r["expr"])

    train = objects[("Job", "ecg-trainer")]["spec"]["template"]["spec"]
    (trainer,) = train["containers"]
    assert trainer["image"].startswith("ecg-trainer:") and trainer["args"][0] == "fit"
    assert trainer["args"][trainer["args"].index("--out") + 1] == str(settings.model_path)
    assert {v["persistentVolumeClaim"]["claimName"] for v in train["volumes"] if "persistentVolumeClaim" in v} \
        == {"ecg-models"}


def test_k8s_kustomize_renders():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (the other k8s tests read the manifests directly)")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert sorted(kinds) == sorted(kind for kind, _ in k8s_objects())


# ----------------------------------------------------------------------------- systemd

def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / "ecg-monitor.service")
    return parser


def test_systemd_unit_and_environment_file(monkeypatch):
    unit = _unit()
    service = unit["Service"]
    env_file = DEPLOY / "systemd" / "ecg-monitor.env"
    env = dict(re.findall(r"^(\w+)=(.*)$", env_file.read_text(), re.M))
    settings = _settings(env, monkeypatch)
    assert _seconds(service["TimeoutStopSec"]) > settings.shutdown_timeout_s
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecStart"].endswith("ecg-monitor run")
    assert service["User"] not in ("root", "0")
    assert Path(service["EnvironmentFile"].lstrip("-")).name == env_file.name
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (the unit is still parsed above)")
    # verify insists that ExecStart exists: point it at a binary this machine has.
    text = (DEPLOY / "systemd" / "ecg-monitor.service").read_text()
    unit = tmp_path / "ecg-monitor.service"
    unit.write_text(re.sub(r"/opt/ecg-monitor/bin/ecg-monitor", shutil.which("true"), text))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ecg-monitor.service" not in result.stderr, result.stderr
