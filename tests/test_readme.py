"""The README's configuration and metrics tables match the code (operators configure from them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitor.daemon.metrics import Metrics
from monitor.daemon.settings import MonitorSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _section(name: str) -> str:
    match = re.search(rf"<!-- section:{name} -->(.*?)<!-- /section:{name} -->", README, re.S)
    assert match, f"README has no section {name!r}"
    return match.group(1)


def _table_rows(text: str) -> dict[str, list[str]]:
    """First cell (backticks stripped) -> the other cells, for every markdown table row."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1:
            rows[cells[0].strip("`")] = cells[1:]
    return rows


CONFIG = _table_rows(_section("monitor"))


@pytest.mark.parametrize("name", sorted(MonitorSettings.model_fields))
def test_every_setting_is_in_the_configuration_table_with_its_default(name):
    variable = f"MONITOR_{name.upper()}"
    assert variable in CONFIG, f"{variable} is missing from the README configuration table"
    default = MonitorSettings.model_fields[name].default
    documented = CONFIG[variable][0]
    if default is None or default == "":
        assert documented.startswith("("), f"{variable}: README default {documented!r}, code has none"
    else:
        text = documented.strip("`")
        same = float(text) == default if isinstance(default, (int, float)) else text == str(default)
        assert same, f"{variable}: README says {documented}, code says {default}"


def test_the_configuration_table_lists_no_setting_the_code_lacks():
    known = {f"MONITOR_{name.upper()}" for name in MonitorSettings.model_fields}
    assert {v for v in CONFIG if v.startswith("MONITOR_")} <= known


def test_the_metrics_table_lists_exactly_the_exported_metrics():
    suffix = {"counter": "_total", "info": "_info"}  # prometheus-client strips these from family names
    exported = {f.name + suffix.get(f.type, "") for f in Metrics(CollectorRegistry()).registry.collect()}
    documented = {name for name in _table_rows(_section("metrics")) if name.startswith("ecg_monitor_")}
    assert documented == exported
