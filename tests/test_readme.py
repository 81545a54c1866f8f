"""The documentation stays true to the code: the configuration, trainer and metrics tables match the
settings and the registry (operators configure from them), the README's two commands are the
Makefile's, and every relative link in README.md and docs/ leads somewhere."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitor.daemon.metrics import Metrics
from monitor.daemon.settings import MonitorSettings
from trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _section(path: Path, name: str) -> str:
    match = re.search(rf"<!-- section:{name} -->(.*?)<!-- /section:{name} -->", path.read_text(), re.S)
    assert match, f"{path.relative_to(ROOT)} has no section {name!r}"
    return match.group(1)


def _table_rows(text: str) -> dict[str, list[str]]:
    """First cell (backticks stripped) -> the other cells, for every markdown table row."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1:
            rows[cells[0].strip("`")] = cells[1:]
    return rows


# -- configuration and metrics tables ------------------------------------------------------------

CONFIG = _table_rows(_section(ROOT / "docs" / "configuration.md", "monitor"))


@pytest.mark.parametrize("name", sorted(MonitorSettings.model_fields))
def test_every_setting_is_in_the_configuration_table_with_its_default(name):
    variable = f"MONITOR_{name.upper()}"
    assert variable in CONFIG, f"{variable} is missing from the table in docs/configuration.md"
    default = MonitorSettings.model_fields[name].default
    documented = CONFIG[variable][0]
    if default is None or default == "":
        assert documented.startswith("("), f"{variable}: docs default {documented!r}, code has none"
    else:
        text = documented.strip("`")
        if isinstance(default, bool):  # documented as the env value: true / false
            same = text == str(default).lower()
        else:
            same = float(text) == default if isinstance(default, (int, float)) else text == str(default)
        assert same, f"{variable}: docs say {documented}, code says {default}"


def test_the_configuration_table_lists_no_setting_the_code_lacks():
    known = {f"MONITOR_{name.upper()}" for name in MonitorSettings.model_fields}
    assert {v for v in CONFIG if v.startswith("MONITOR_")} <= known


def test_the_trainer_table_lists_exactly_the_trainer_settings():
    rows = _table_rows(_section(ROOT / "docs" / "trainer.md", "trainer-settings"))
    documented = {cells[0].strip("`") for cells in rows.values() if cells[0].startswith("`TRAINER_")}
    assert documented == {f"TRAINER_{name.upper()}" for name in TrainerSettings.model_fields}


def test_the_metrics_table_lists_exactly_the_exported_metrics():
    suffix = {"counter": "_total", "info": "_info"}  # prometheus-client strips these from family names
    exported = {f.name + suffix.get(f.type, "") for f in Metrics(CollectorRegistry()).registry.collect()}
    rows = _table_rows(_section(ROOT / "docs" / "metrics.md", "metrics"))
    assert {name for name in rows if name.startswith("ecg_monitor_")} == exported


# -- the two commands ----------------------------------------------------------------------------

def test_the_readme_commands_are_makefile_targets_and_ci_runs_make_test():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    documented = set()
    for page in [README, *DOCS]:
        documented |= set(re.findall(r"^make ([\w-]+)", page.read_text(), re.M))
    assert {"demo", "test"} <= documented, "the README shows `make demo` and `make test`"
    assert documented <= targets, f"documented make targets missing from the Makefile: {documented - targets}"
    assert "make test" in (ROOT / ".ci" / "run").read_text(), "the README says CI runs exactly `make test`"


# -- links ---------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1 -2 for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M):
        slug = "".join(c for c in heading.lower() if unicodedata.category(c)[0] in "LN" or c in " -_")
        slug = slug.replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_an_existing_file_and_heading(page):
    broken = []
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M))
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"
