"""The layout's promises: imports run one way (core <- stream <- daemon; core <- trainer; tools on
top), the daemon never loads the tools or the trainer, and an install without the optional
extras says what to install instead of printing a traceback."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: package -> the project packages its modules may import (the root `monitor` holds __version__)
ALLOWED = {
    "monitor.core": {"monitor.core"},
    "monitor.stream": {"monitor.core", "monitor.stream"},
    "monitor.daemon": {"monitor", "monitor.core", "monitor.stream", "monitor.daemon"},
    "trainer": {"monitor.core", "monitor.stream", "trainer"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every monitor.* / trainer.* module a file imports, at any depth of the code (function-local
    imports count too), resolved to the module: `from monitor.core import normalise` gives
    monitor.core.normalise."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                is_module = (REPO / submodule.replace(".", "/")).with_suffix(".py").is_file() or \
                    (REPO / submodule.replace(".", "/")).is_dir()
                found.add(submodule if is_module else node.module)
    return {name for name in found if name.split(".")[0] in ("monitor", "trainer")}


def package_of(module: str) -> str:
    """The ALLOWED key (or the root `monitor`) a module belongs to."""
    return next((p for p in ALLOWED if module == p or module.startswith(p + ".")),
                "monitor.tools" if module.startswith("monitor.tools") else module)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    files = sorted((REPO / package.replace(".", "/")).rglob("*.py"))
    assert files, package
    wrong = {}
    for path in files:
        bad = {m for m in project_imports(path) if package_of(m) not in ALLOWED[package]}
        if bad:
            wrong[str(path.relative_to(REPO))] = sorted(bad)
    assert wrong == {}, f"{package} may import only {sorted(ALLOWED[package])}"


def test_the_import_check_sees_every_kind_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import monitor.core.model\nfrom monitor.core import normalise\nfrom trainer.data import load\n"
                      "def f():\n    from monitor.tools import replay\n")
    assert project_imports(sample) == {"monitor.core.model", "monitor.core.normalise", "trainer.data",
                                       "monitor.tools.replay"}
    assert [package_of(m) for m in sorted(project_imports(sample))] == [
        "monitor.core", "monitor.core", "monitor.tools", "trainer"]


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)


def test_the_daemon_and_its_commands_never_import_the_tools_or_the_trainer():
    code = ("import json, sys; import monitor.daemon.loop, monitor.daemon.check, monitor.cli; "
            "monitor.cli.build_parser(['run']); monitor.cli.build_parser(['check']); "
            "print(json.dumps(sorted(sys.modules)))")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert "monitor.daemon.loop" in loaded
    assert [m for m in loaded if m.startswith(("monitor.tools", "trainer"))] == []


def _cli_without(modules: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """`ecg-monitor ARGV` in a fresh interpreter where importing each of `modules` fails as if it
    were not installed (a None entry in sys.modules makes `import x` raise ModuleNotFoundError)."""
    code = ("import sys, json; sys.modules.update(dict.fromkeys(json.loads(sys.argv[1]))); "
            "from monitor.cli import main; raise SystemExit(main(sys.argv[2:]))")
    return _python(code, json.dumps(modules), *argv)


@pytest.mark.parametrize(("command", "missing", "extra"), [
    ("replay", "pandas", "train"),
    ("replay", "tqdm", "train"),
    ("demo", "rich", "demo"),
    ("demo", "pooch", "train"),
])
def test_a_tool_without_its_extra_names_the_extra_to_install(command, missing, extra):
    done = _cli_without([missing], command, "--help")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"pip install 'ecg-monitor[{extra}]'" in done.stderr and f"'{missing}'" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_daemon_only_install_runs_the_daemon_and_says_where_the_tools_are():
    """The runtime image has neither monitor.tools nor the trainer."""
    without_tools = ["monitor.tools", "trainer"]
    for command in ("run", "check"):
        done = _cli_without(without_tools, command, "--help")
        assert done.returncode == 0 and "usage: ecg-monitor" in done.stdout, done.stderr
    done = _cli_without(without_tools, "replay", "--help")
    assert done.returncode == 2 and "daemon only" in done.stderr and "Traceback" not in done.stderr
    assert "pip install 'ecg-monitor[demo,train]'" in done.stderr


def test_a_missing_required_package_is_a_bug_and_keeps_its_traceback():
    done = _cli_without(["kafka"], "replay", "--help")  # kafka-python is a core dependency
    assert done.returncode == 1 and "Traceback" in done.stderr and "kafka" in done.stderr


def test_one_default_cache_directory_for_the_trainer_the_replayer_and_the_demo(monkeypatch, tmp_path):
    from monitor.tools import demo
    from trainer.data import default_cache_dir
    from trainer.settings import TrainerSettings

    monkeypatch.delenv("ECG_MONITOR_CACHE", raising=False)
    assert TrainerSettings.model_fields["cache_dir"].default == default_cache_dir()
    monkeypatch.setenv("ECG_MONITOR_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.parse_args([]).cache_dir == tmp_path
