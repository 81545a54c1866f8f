"""The trainer on continuous recordings: loaders, AAMI labels, fit on an excerpt of MIT-BIH record 100,
evaluate on the whole record (per-class figures, R peaks, the alert policy), the operating point."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import wfdb

from monitor.core.artefact import Artefact
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.daemon.settings import SHIPPED_MODEL_PATH
from monitor.stream.beat_windowing import BeatWindower
from monitor.stream.beats import BeatConvention
from monitor.stream.policy import ScorePolicyConfig
from monitor.stream.wire import InputRecord
from trainer import recordings
from trainer.cli import build_parser, main
from trainer.data import DataError

REPO = Path(__file__).resolve().parents[1]
RECORD_100 = REPO.parent / "shared" / "data" / "mitdb-100" / "100.hea"
EXCERPT_S = 300

needs_record = pytest.mark.skipif(not RECORD_100.is_file(), reason="MIT-BIH record 100 not available")


@pytest.fixture(scope="module")
def record_100() -> recordings.Recording:
    if not RECORD_100.is_file():
        pytest.skip("MIT-BIH record 100 not available")
    return recordings.read(RECORD_100)[0]


@pytest.fixture(scope="module")
def excerpt(record_100, tmp_path_factory) -> Path:
    """The first 5 minutes of record 100 (both leads, with its .atr beats) written as a WFDB record."""
    out = tmp_path_factory.mktemp("excerpt")
    n = int(EXCERPT_S * record_100.fs)
    record = wfdb.rdrecord(str(RECORD_100.with_suffix("")), sampto=n)
    wfdb.wrsamp("ex100", fs=record.fs, units=record.units, sig_name=record.sig_name, p_signal=record.p_signal,
                fmt=["16"] * record.n_sig, adc_gain=[200.0] * record.n_sig, baseline=[0] * record.n_sig,
                write_dir=str(out))
    ann = wfdb.rdann(str(RECORD_100.with_suffix("")), "atr", sampto=n - 1)
    wfdb.wrann("ex100", "atr", ann.sample, symbol=ann.symbol, write_dir=str(out))
    return out / "ex100.hea"


# -- loaders -----------------------------------------------------------------------------------------------

@needs_record
def test_a_wfdb_record_reads_one_lead_and_its_reference_beats_as_aami_classes(record_100):
    assert record_100.fs == 360 and record_100.lead == "MLII" and record_100.duration_s == pytest.approx(1805.6, 0.1)
    classes, counts = np.unique(record_100.annotations.classes, return_counts=True)
    assert dict(zip(classes, counts, strict=True)) == {"N": 2239, "S": 33, "V": 1}
    v5 = recordings.read(RECORD_100, lead="V5")[0]
    assert v5.lead == "V5" and not np.array_equal(v5.signal, record_100.signal)
    with pytest.raises(DataError, match="no lead 'V1'.*MLII, V5"):
        recordings.read(RECORD_100, lead="V1")


@needs_record
def test_a_directory_reads_every_record(excerpt):
    found = recordings.read(excerpt.parent)
    assert [r.name for r in found] == ["ex100:MLII"] and found[0].annotations is not None
    assert recordings.is_recording(excerpt.parent) and recordings.is_recording(excerpt)


def test_aami_mapping_of_beat_symbols_and_non_beats_dropped():
    ann = wfdb.Annotation("x", "atr", np.arange(12), symbol=list("NLRAaJSVEF/+"))
    mapped = recordings.aami_annotations(ann)
    assert mapped.classes.tolist() == list("NNNSSSSVVFQ")  # "+" (rhythm change) is no beat
    assert mapped.samples.tolist() == list(range(11))


def test_beats_take_the_class_of_the_reference_beat_within_150_ms():
    ref = recordings.Annotations(np.array([1000, 2000, 3000]), np.array(["N", "V", "N"], dtype=object))
    labels = recordings.label_beats(np.array([1010, 1950, 3100]), ref, fs=360.0)  # 3100: 278 ms away
    assert labels.tolist() == ["N", "V", recordings.UNMATCHED]
    assert recordings.label_beats(np.array([5]), None, 360.0).tolist() == ["N"]  # no annotations: normal


@needs_record
@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npy"])
def test_a_signal_file_with_fs_is_one_continuous_lead(record_100, tmp_path, suffix):
    x = record_100.signal[: 60 * 360]
    path = tmp_path / f"sig{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    else:
        frame = pd.DataFrame({"time": np.arange(len(x)) / 360, "ecg": x})
        frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    assert not recordings.is_recording(path) or suffix == ".npy"  # without fs a table is windows
    (rec,) = recordings.read(path, fs=360.0)
    assert rec.fs == 360.0 and rec.annotations is None and np.allclose(rec.signal, x)
    cut = recordings.cut(rec, BeatConvention())
    # about 75 beats, less the 14 that only set the polarity (as in the daemon); no annotations: all normal
    assert 45 <= len(cut.beats) <= 65 and set(cut.labels) == {"N"}


def test_a_multi_column_table_needs_lead_and_a_signal_file_needs_fs(tmp_path):
    path = tmp_path / "two.csv"
    pd.DataFrame({"I": np.zeros(10), "II": np.ones(10)}).to_csv(path, index=False)
    with pytest.raises(DataError, match="--lead"):
        recordings.read(path, fs=250.0)
    assert recordings.read(path, fs=250.0, lead="II")[0].signal.tolist() == [1.0] * 10
    np.save(tmp_path / "x.npy", np.zeros(10))
    with pytest.raises(DataError, match="--fs"):
        recordings.read(tmp_path / "x.npy")


# -- fit and evaluate --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(excerpt, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("fit")
    argv = ["fit", "--data", str(excerpt), "--out", str(out / "m.pt"), "--report-dir", str(out / "report"),
            "--epochs", "3", "--embedding-dim", "8", "--hidden-dim", "16", "--batch-size", "32", "--no-progress"]
    assert main(argv) == 0
    return out / "m.pt", out / "report"


def test_fit_on_a_recording_trains_on_its_normal_beats_and_records_the_beat_convention(fitted):
    model, report_dir = fitted
    artefact = Artefact.load(model)
    meta = artefact.metadata
    assert BeatConvention.from_dict(meta["windowing"]) == BeatConvention()
    assert meta["data"]["normal_label"] == "N" and meta["data"]["labels"]["S"] >= 1
    split = meta["data"]["split"]
    assert split["train"] + split["val"] <= meta["data"]["labels"]["N"]  # only normal beats trained on
    ScorePolicyConfig(**meta["policy"])  # a valid policy for the daemon
    assert meta["operating_point"]["budget_per_hour"] == 1.0 and "curve" not in meta["operating_point"]


def test_the_report_has_the_operating_curve_as_table_and_plot(fitted):
    _, report_dir = fitted
    report = json.loads((report_dir / "report.json").read_text())
    point = report["operating_point"]
    assert point["budget_met"] and point["chosen"]["false_alerts_per_hour"] <= 1.0
    assert len(point["curve"]) > 5 and point["validation_streams"]["sensor_hours"] >= 10
    (recording,) = point["validation_streams"]["recordings"]  # its streams: that patient at his own rate
    assert recording["name"] == "ex100:MLII" and 0.7 < recording["beat_period_s"] < 0.95
    assert "## Alert policy operating point" in (report_dir / "report.md").read_text()
    assert (report_dir / "operating_curve.png").stat().st_size > 0


def test_evaluate_on_record_100_gives_per_class_figures_and_r_peak_accuracy(fitted, capsys):
    model, _ = fitted
    assert main(["evaluate", "--model", str(model), "--data", str(RECORD_100), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not result["trained_on_this_data"]
    (rec,) = result["recordings"]
    assert set(rec["per_class"]) == {"N", "S", "V"}
    assert rec["per_class"]["N"]["n"] >= 2200 and rec["per_class"]["S"]["n"] >= 30  # 33, less the warm-up
    assert 0 <= rec["per_class"]["S"]["auroc_vs_normal"] <= 1 and 0 <= rec["per_class"]["V"]["rate"] <= 1
    assert rec["rpeaks"]["sensitivity"] >= 0.995 and rec["rpeaks"]["ppv"] >= 0.995
    stream = rec["stream"]
    assert stream["normal_hours"] > 0.3 and stream["false_alerts_per_hour"] is not None
    assert stream["runs"] >= 1 and "S" in stream["per_beat_auroc"]


def test_evaluate_checks_each_beats_signal_quality_as_the_daemon_does(excerpt, tmp_path, capsys):
    """Record 100's first 5 minutes with a clipping amplifier from 3:20 to 4:00 (its R peaks flattened at the
    signal's 90th percentile): those beats are bad (saturation), counted by reason, and raise a signal_quality
    alert, not an anomaly alert."""
    record = wfdb.rdrecord(str(excerpt.with_suffix("")))
    signal = record.p_signal.copy()
    clipped = slice(int(200 * record.fs), int(240 * record.fs))
    signal[clipped] = np.minimum(signal[clipped], np.percentile(signal, 90, axis=0))
    wfdb.wrsamp("clip100", fs=record.fs, units=record.units, sig_name=record.sig_name, p_signal=signal,
                fmt=["16"] * record.n_sig, adc_gain=[200.0] * record.n_sig, baseline=[0] * record.n_sig,
                write_dir=str(tmp_path))
    ann = wfdb.rdann(str(excerpt.with_suffix("")), "atr")
    wfdb.wrann("clip100", "atr", ann.sample, symbol=ann.symbol, write_dir=str(tmp_path))
    assert main(["evaluate", "--model", str(SHIPPED_MODEL_PATH), "--data", str(tmp_path / "clip100.hea"),
                 "--json"]) == 0
    stream = json.loads(capsys.readouterr().out)["recordings"][0]["stream"]
    assert stream["bad_quality_beats"]["saturation"] >= 30  # about 50 beats in 40 s
    assert stream["signal_quality_alerts"] >= 1
    main(["evaluate", "--model", str(SHIPPED_MODEL_PATH), "--data", str(tmp_path / "clip100.hea")])
    assert "signal quality: " in capsys.readouterr().out


def test_a_database_folder_may_link_its_records_in(excerpt, tmp_path):
    """Records linked into the folder are read (Path.rglob skips links before Python 3.13); a link back up the
    tree is not followed round."""
    store, database = tmp_path / "store" / "rec", tmp_path / "db"
    store.mkdir(parents=True)
    database.mkdir()
    for suffix in (".hea", ".dat", ".atr"):
        (store / ("ex100" + suffix)).write_bytes(excerpt.with_suffix(suffix).read_bytes())
    (database / "rec").symlink_to(store, target_is_directory=True)
    (database / "loop").symlink_to(database, target_is_directory=True)
    assert recordings.is_recording(database)
    assert [r.name for r in recordings.read(database)] == ["ex100:MLII"]


def test_evaluate_on_a_database_pools_the_patients_figures(fitted, excerpt, tmp_path, capsys):
    """One folder per record (as mirrors of PhysioNet databases hold them): every record is read, and the
    pooled figures are the per-recording ones summed, with the per-patient AUROC spread."""
    model, _ = fitted
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for suffix in (".hea", ".dat", ".atr"):
            (tmp_path / folder / ("ex100" + suffix)).write_bytes(excerpt.with_suffix(suffix).read_bytes())
    assert recordings.is_recording(tmp_path)
    assert main(["evaluate", "--model", str(model), "--data", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    streams = [r["stream"] for r in result["recordings"]]
    pooled = result["pooled"]
    assert pooled["recordings"] == 2 and pooled["beats"] == sum(r["beats"] for r in result["recordings"])
    for key in ("alerts", "false_alerts", "runs", "detected"):
        assert pooled[key] == sum(s[key] for s in streams)
    assert pooled["normal_hours"] == pytest.approx(sum(s["normal_hours"] for s in streams))
    assert sum(v["runs"] for v in pooled["detection_by_length"].values()) == pooled["runs"] > 0
    assert set(pooled["detection_by_length"]) <= {"1", "2", "3+"}
    assert set(pooled["policy_input_auroc_by_class"]) <= set(pooled["auroc_by_class"])
    assert pooled["runs_3plus"]["runs"] == sum(s["runs_3plus"]["runs"] for s in streams)
    assert pooled["runs_3plus"]["alerting"] <= pooled["runs_3plus"]["runs"]
    for key in ("runs", "alerting"):
        assert pooled["ventricular_runs_3plus"][key] == sum(s["ventricular_runs_3plus"][key] for s in streams)
    most = pooled["runs_3plus"]["most_runs"]
    assert most["runs"] == max(s["runs_3plus"]["runs"] for s in streams)
    assert most["recording"] in {r["recording"] for r in result["recordings"]}
    assert pooled["detection_by_class"]["S"]["runs"] == 2 * streams[0]["detection_by_class"]["S"]["runs"]
    main(["evaluate", "--model", str(model), "--data", str(tmp_path)])
    assert "all 2 recordings" in capsys.readouterr().out


@needs_record
def test_a_fixed_window_model_refuses_to_score_a_recording(tmp_path, capsys):
    config = ModelConfig(window_length=140, embedding_dim=2, hidden_dim=4)
    Artefact(config, LSTMAutoencoder(config).state_dict(), threshold=1.0,
             metadata={"validation_errors": {"p50": 0.1, "p95": 0.2}}).save(tmp_path / "m.pt")
    assert main(["evaluate", "--model", str(tmp_path / "m.pt"), "--data", str(RECORD_100)]) == 2
    assert "scores fixed windows" in capsys.readouterr().err


def test_help_describes_recordings_and_the_false_alert_budget(capsys):
    parser = build_parser()
    for command, flags in (("fit", ("--fs", "--lead", "--false-alert-budget", "WFDB")),
                           ("evaluate", ("--fs", "--lead", "R-peak"))):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag in flags:
            assert flag in text, (command, flag)


# -- the demo on a real recording --------------------------------------------------------------------------

@pytest.mark.kafka
@pytest.mark.slow
def test_the_demo_streams_a_recording_end_to_end_with_a_model_of_its_own(excerpt, tmp_path):
    """No --model and no shipped one: the demo trains a beats model from the record (cached), streams it to
    two sensors through the real broker and daemon, and summarises; nothing is left running."""
    command = [sys.executable, "-m", "monitor", "demo", "--source", str(excerpt), "--sensors", "2",
               "--duration", "60", "--rate", "max", "--record-ms", "100", "--cache-dir", str(tmp_path),
               "--metrics-port", "0", "--json"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout)
    assert summary["recording"] == "ex100:MLII" and summary["fs"] == 360 and summary["sensors"] == 2
    assert summary["records_sent"] == 2 * 60 * 10  # 100 ms records
    # one window per beat in beats mode (75 bpm; the daemon scores none for the first seconds of a sensor)
    assert 2 * 30 <= summary["windows_scored"] <= 2 * 80
    assert 60 <= summary["heart_rate_bpm"] <= 90 and not summary["interrupted"]
    model = Path(summary["model"]["path"])
    assert model == SHIPPED_MODEL_PATH or model == tmp_path / "models" / "demo-ex100-lead0.pt"
    for address in (summary["bootstrap"], f"127.0.0.1:{urlparse(summary['metrics_url']).port}"):
        host, port = address.rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=1).close()


@needs_record
def test_offline_beats_are_the_beats_the_daemon_cuts_from_the_stream(record_100):
    """The trainer's beats of a recording equal the daemon windower's on the same signal streamed in
    100 ms records (5 minutes of record 100): the same R peaks, spans and windows, bit for bit."""
    excerpt = recordings.Recording("ex", record_100.signal[: 300 * 360], 360.0, "MLII")
    offline = recordings.cut(excerpt, BeatConvention()).beats
    windower, streamed = BeatWindower(BeatConvention()), []
    for offset, seq in enumerate(range(0, len(excerpt.signal), 36)):
        record = InputRecord(sensor_id="s", seq=seq, values=excerpt.signal[seq:seq + 36].tolist(), fs=360.0)
        streamed += windower.add(0, offset, record)[0]
    assert len(offline) == len(streamed) > 300
    assert offline.r_peak.tolist() == [w.r_peak_seq for w in streamed]
    assert offline.start.tolist() == [w.start_seq for w in streamed]
    assert np.array_equal(offline.windows, np.stack([w.values for w in streamed]))
