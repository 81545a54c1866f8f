"""The Prometheus config and alert rules in deploy/prometheus, checked by the real promtool.

`promtool test rules` runs deploy/prometheus/tests/*.yml: every alert has a case where it fires
and one where it does not; the last test here checks that this stays true as rules are added.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROM_DIR = REPO / "deploy" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))

pytestmark = pytest.mark.prometheus


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's 'prometheus' package (`make system-deps`)")
    return path


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def alerting_rules() -> list[dict]:
    rules = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules += [rule for rule in group["rules"] if "alert" in rule]
    return rules


def test_deploy_ships_rules_and_rule_tests():
    assert RULE_FILES and RULE_TESTS
    assert len(alerting_rules()) >= 6


def test_promtool_check_config(promtool):
    result = run_promtool(promtool, "check", "config", "prometheus.yml")
    # The config's rule_files glob must pick up the rules, so `check config` checks them too.
    for path in RULE_FILES:
        assert f"rules/{path.name}" in result.stdout


def test_promtool_check_rules(promtool):
    run_promtool(promtool, "check", "rules", *[str(p.relative_to(PROM_DIR)) for p in RULE_FILES])


def test_promtool_rule_unit_tests(promtool):
    result = run_promtool(promtool, "test", "rules", *[str(p.relative_to(PROM_DIR)) for p in RULE_TESTS])
    assert "SUCCESS" in result.stdout


def test_every_alert_has_summary_description_and_severity():
    for rule in alerting_rules():
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), rule["alert"]
        assert annotations.get("description", "").strip(), rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("critical", "warning", "info"), rule["alert"]


def test_every_alert_is_unit_tested_firing_and_not_firing():
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        suite = yaml.safe_load(path.read_text())
        tested_files = {(path.parent / f).resolve() for f in suite["rule_files"]}
        assert tested_files == {p.resolve() for p in RULE_FILES}, f"{path.name} must load every rule file"
        for case in suite["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerting_rules()}
    assert names - fires == set(), "alerts without a unit test where they fire"
    assert names - quiet == set(), "alerts without a unit test where they do not fire"
    assert (fires | quiet) - names == set(), "unit tests for alerts that do not exist"
