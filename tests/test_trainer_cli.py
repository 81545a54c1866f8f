"""The trainer CLI end to end: fit a tiny model on a subset of ECG5000, evaluate, info, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from monitor.core.artefact import Artefact
from monitor.core.scoring import Scorer
from monitor.stream.policy import ScorePolicyConfig
from trainer.cli import main


@pytest.fixture(scope="module")
def tiny_run(ecg_data_dir, tmp_path_factory):
    """`fit` on 400 random beats with a tiny net; returns (model path, report dir, stdout)."""
    out = tmp_path_factory.mktemp("cli")
    argv = ["fit", "--data", str(ecg_data_dir), "--out", str(out / "m.pt"), "--report-dir", str(out / "report"),
            "--limit", "400", "--epochs", "2", "--embedding-dim", "4", "--hidden-dim", "8", "--seed", "5",
            "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINER_BATCH_SIZE", "64")  # settings from the environment apply to the CLI
        captured = subprocess.run([sys.executable, "-m", "trainer", *argv], capture_output=True, text=True,
                                  timeout=300)
    assert captured.returncode == 0, captured.stderr
    return out / "m.pt", out / "report", captured.stdout


def test_fit_writes_the_artefact_and_the_report(tiny_run):
    model, report_dir, stdout = tiny_run
    assert f"saved {model}" in stdout and "AUROC" in stdout
    for name in ("report.json", "report.md", "loss_curves.png", "error_histogram.png", "reconstructions.png"):
        assert (report_dir / name).stat().st_size > 0, name
    report = json.loads((report_dir / "report.json").read_text())
    assert report["data"]["n_windows"] == 400 and report["training"]["epochs_run"] == 2
    assert report["training"]["settings"]["batch_size"] == 64
    assert "| auroc |" in (report_dir / "report.md").read_text()
    assert Scorer.from_file(model, device="cpu").model_version == report["model_version"]


def test_evaluate_json_reproduces_the_fit_time_test_metrics(tiny_run, ecg_data_dir, capsys):
    model, report_dir, _ = tiny_run
    assert main(["evaluate", "--model", str(model), "--data", str(ecg_data_dir), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    fitted = json.loads((report_dir / "report.json").read_text())["test"]
    for key in ("auroc", "average_precision", "precision", "recall", "f1", "threshold"):
        assert result[key] == pytest.approx(fitted[key]), key
    assert result["n"] == fitted["n"]
    streams = result["streams"]  # the model's own alert policy over streams of its held-out test beats
    assert streams["policy"] == Artefact.load(model).metadata["policy"] and len(streams["per_seed"]) == 3
    assert 0 <= streams["detection_rate"] <= 1 and streams["false_alerts_per_hour"] >= 0


def test_info_prints_the_metadata(tiny_run, capsys):
    model, _, _ = tiny_run
    assert main(["info", "--model", str(model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["embedding_dim"] == 4 and info["threshold"]["method"] == "percentile"
    assert "history" not in info["training"] and info["data"]["split"]["limit"] == 400


@pytest.mark.parametrize("argv, message", [
    (["info", "--model", "/nonexistent/m.pt"], "model file not found"),
    (["fit", "--data", "/nonexistent/ecg"], "no such file or directory"),
    (["fit", "--threshold-method", "fixed"], "threshold_value"),
])
def test_errors_are_one_clear_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ecg-trainer: error:") and message in err


def test_help_shows_defaults_and_environment_names():
    shown = subprocess.run([sys.executable, "-m", "trainer", "fit", "--help"], capture_output=True, text=True,
                           timeout=120).stdout
    assert "--embedding-dim N" in shown and "(default: 32; env TRAINER_EMBEDDING_DIM)" in shown
    assert "--threshold-method {percentile,mean_std,fixed,f1}" in shown


def test_fit_on_windows_records_fixed_windowing_and_the_alert_policy_for_the_budget(tiny_run):
    model, report_dir, stdout = tiny_run
    meta = Artefact.load(model).metadata
    assert meta["windowing"] == {"kind": "fixed"}
    policy = ScorePolicyConfig(**meta["policy"])  # what the daemon needs to build the policy
    report = json.loads((report_dir / "report.json").read_text())
    point = report["operating_point"]
    assert point["policy"] == meta["policy"] and point["budget_per_hour"] == 1.0
    # no anomalous validation beats by default: false alerts measured on validation streams, detection not
    assert not point["detection_measured"] and point["chosen"]["detection_rate"] is None
    assert point["chosen"]["false_alerts_per_hour"] <= 1.0 and point["chosen"]["fire_level"] == policy.fire_level
    assert (report_dir / "operating_curve.png").stat().st_size > 0
    assert "alert policy: mean (3)" in stdout
