"""Smoke test of the benchmark code paths (`python -m bench --quick`): tiny sizes, real scorer,
real broker and daemon; checks the structure of what is written, never the timings."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from bench import beats, tally
from bench.__main__ import main as bench_main
from bench.scorer import MODELS, untrained_artefact
from monitor.core.artefact import Artefact
from monitor.core.model import ModelConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return untrained_artefact(ModelConfig()).save(tmp_path_factory.mktemp("bench") / "model.pt")


def _run(parts: str, model, ecg_data_dir, out) -> tuple[dict, str]:
    code = bench_main(["--quick", "--only", parts, "--model", str(model), "--data", str(ecg_data_dir),
                       "--out", str(out), "--threads", "1", "--device", "cpu"])
    assert code == 0
    assert (out / "quick-cpu.png").read_bytes().startswith(b"\x89PNG")  # the plot beside the tables
    return json.loads((out / "quick-cpu.json").read_text()), (out / "quick-cpu.md").read_text()


def test_quick_scorer_benchmark_writes_every_figure(model, ecg_data_dir, tmp_path):
    results, text = _run("scorer", model, ecg_data_dir, tmp_path)
    scorer = results["scorer"]
    assert [s["model"] for s in scorer["sweeps"]] == list(MODELS)
    for sweep in scorer["sweeps"]:
        assert sweep["loop_matches_batched"]  # the per-window loop and the scorer give the same errors
        assert [row["batch"] for row in sweep["batched"]] == list(scorer["sizes"]["batch_sizes"])
        assert all(row["windows_per_s"] > 0 and row["ratio_to_loop"] > 0 for row in sweep["batched"])
    names = [row["optimisation"] for row in scorer["optimisations"]]
    assert {"inference_mode (vs no_grad)", "torch.compile", "dynamic int8 (LSTM+Linear)"} <= set(names)
    for row in scorer["optimisations"]:
        assert row["kept"] in (True, False, None)
        if "error" not in row:
            assert set(row["models"]) == set(MODELS)
            assert 0.0 <= row["auroc_on"] <= 1.0
            assert math.isclose(row["auroc_delta"], row["auroc_on"] - row["auroc_off"])
    assert scorer["evaluation"]["windows"] > 0
    assert "| default (emb 32, hidden 64) |" in text and "| optimisation |" in text
    assert "batched scorer >= 20x per-window loop (default model)" in text


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_end_to_end_benchmark_runs_the_daemon_against_the_broker(model, ecg_data_dir, tmp_path):
    results, text = _run("e2e", model, ecg_data_dir, tmp_path)
    e2e = results["e2e"]
    assert e2e["drain"]["scored"] == e2e["backlog"]["windows"] > 0
    assert e2e["max_windows_per_s"] > 0 and e2e["ratio_to_raw_scorer"] > 0
    assert [row["load"] for row in e2e["latency"]] == [0.25, 0.5, 0.75]
    for row in e2e["latency"]:
        assert row["windows"] > 0 and row["windows_scored"] == row["windows"]
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["runs"] == len(row["p99_ms_per_run"]) == e2e["latency_runs"]["per_load"] >= 1
        assert set(row["cpu_cores"]) == {"daemon", "broker", "load generator"}
        assert all(cores >= 0 for cores in row["cpu_cores"].values())
    assert e2e["memory"]["active_sensors_at_last"] >= 200 and e2e["memory"]["rss_mib_at_last"] > 0
    assert e2e["daemon"]["exit_code"] == 0 and e2e["daemon"]["kafka_errors"] == 0
    assert "| daemon / raw scorer |" in text and "| 50% |" in text


def test_the_reliability_tally_sums_figures_per_test(tmp_path, monkeypatch):
    path = tmp_path / "tally.jsonl"
    tally.record("not written without the env var", records_tried=5)
    assert not path.exists()
    monkeypatch.setenv(tally.ENV, str(path))
    tally.record("a", records_tried=3, windows_lost=0)
    tally.record("a", records_tried=4, faults_injected=1)
    tally.record("b", records_tried=10, windows_lost=2)
    summary = tally.summarise(path)
    assert summary["tests"]["a"] == {"records_tried": 7, "windows_lost": 0, "faults_injected": 1}
    assert summary["totals"] == {"records_tried": 17, "windows_lost": 2, "faults_injected": 1}


@pytest.mark.skipif(not beats.RECORD.is_file(), reason="MIT-BIH record 100 not available")
def test_beats_segmenter_cost_is_measured_beside_fixed_windows():
    """`python -m bench.beats`, part 1 only (its --quick run takes over a minute): beat and fixed
    windowing of the same records of MIT-BIH record 100, costs per second of signal."""
    sizes = dataclasses.replace(beats.Sizes.for_run(quick=True), segmenter_seconds=30, turns=1)
    cost = beats.segmenter_cost(Artefact.load(beats.MODEL), sizes)
    assert cost["beats_per_turn"] > 0  # 30 s of signal, past the warm-up of detector and polarity
    assert set(cost["cpu_s_per_signal_s"]) == {"beats", "detector_alone", "fixed"}
    assert all(seconds > 0 for seconds in cost["cpu_s_per_signal_s"].values())
    assert cost["beats_vs_fixed_cost"] > 0


def test_the_noise_benchmark_marks_motion_noise_as_artefact_not_arrhythmia(record_100, tmp_path):
    """Record 100's first 6 minutes, clean and with smooth (< 8 Hz, in the ECG's band) random noise from minute 3
    to 5: with the artefact rule most beats in the noise are artefacts and raise a signal_quality alert, and the
    noise raises no more anomaly alerts than without it; the clean minutes are untouched."""
    import wfdb
    from scipy.signal import butter, sosfiltfilt

    from bench import noise

    signal = record_100[0][: 360 * 360]
    wave = sosfiltfilt(butter(2, 8, fs=360, output="sos"), np.random.default_rng(0).normal(size=len(signal)))
    noisy = signal.copy()
    noisy[180 * 360:300 * 360] += 0.6 * wave[180 * 360:300 * 360] / wave.std()
    for name, values in (("clean", signal), ("noisy", noisy)):
        wfdb.wrsamp(name, fs=360, units=["mV"], sig_name=["MLII"], p_signal=values[:, None], fmt=["16"],
                    adc_gain=[200.0], baseline=[0], write_dir=str(tmp_path))
    noise.main(["--clean", str(tmp_path / "clean.hea"), "--noisy", str(tmp_path / "noisy.hea"), "--out", str(tmp_path)])
    records = json.loads((tmp_path / "noise.json").read_text())["records"]
    assert (tmp_path / "noise.md").read_text().count("| noisy:MLII |") == 2  # a row per rule
    rule, off = (records["noisy:MLII"]["rules"][name] for name in ("artefact rule (shipped)", "no artefact rule"))
    clean = records["clean:MLII"]["rules"]["artefact rule (shipped)"]
    assert rule["beats in noise"] > 100 and rule["artefact beats in noise"] > rule["beats in noise"] / 2
    assert rule["artefact beats elsewhere"] == off["artefact beats in noise"] == clean["artefact beats elsewhere"] == 0
    assert rule["signal_quality alerts"] >= 1 and off["signal_quality alerts"] == 0
    assert rule["anomaly alerts in noise"] <= off["anomaly alerts in noise"]


def test_the_rates_benchmark_scores_a_record_resampled_as_it_scores_it_as_recorded(record_100, tmp_path):
    """Record 100's first 5 minutes, as recorded (360 Hz) and resampled to 128 Hz: a row per rate, nearly the same
    beats cut at both rates, and none of these clean beats called bad signal at either rate."""
    import wfdb

    from bench import rates

    signal, beats = record_100
    signal, beats = signal[: 300 * 360], beats[beats < 300 * 360]
    data = tmp_path / "data" / "r100"
    data.mkdir(parents=True)
    wfdb.wrsamp("r100", fs=360, units=["mV"], sig_name=["MLII"], p_signal=signal[:, None], fmt=["16"],
                adc_gain=[200.0], baseline=[0], write_dir=str(data))
    wfdb.wrann("r100", "atr", beats, symbol=["N"] * len(beats), write_dir=str(data))
    rates.main(["--data", str(tmp_path / "data"), "--rates", "128", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "rates.json").read_text())["rows"]
    assert list(rows) == ["as recorded", "128 Hz"]
    assert (tmp_path / "rates.md").read_text().count("| 128 Hz |") == 1
    cut = [row["beats"] for row in rows.values()]
    assert abs(cut[0] - cut[1]) <= 0.02 * cut[0] and cut[0] > 300
    assert all(sum(row["bad_quality_beats"].values()) == 0 for row in rows.values())


def test_the_rpeak_benchmark_pools_detectors_over_records_and_names_the_worst(record_100, tmp_path):
    """Two records cut from record 100's first 2 minutes, one with its reference beats moved 0.4 s late (no
    detector can match them): every detector is run on both, its pooled figures are the sums, and the worst record
    of each is the moved one."""
    import wfdb

    from bench import rpeaks

    signal, beats = record_100
    signal, beats = signal[: 120 * 360], beats[beats < 120 * 360 - 200]
    for name, truth in (("good", beats), ("moved", beats + 144)):
        folder = tmp_path / name
        folder.mkdir()
        wfdb.wrsamp(name, fs=360, units=["mV"], sig_name=["MLII"], p_signal=signal[:, None], fmt=["16"],
                    adc_gain=[200.0], baseline=[0], write_dir=str(folder))
        wfdb.wrann(name, "atr", truth, symbol=["N"] * len(truth), write_dir=str(folder))
    scores = rpeaks.run_records(tmp_path)
    summary = rpeaks.records_summary(scores)
    assert set(summary) == set(rpeaks.detectors())
    online = summary["online (sleepecg, monitor.stream.rpeaks)"]
    mine = [s for s in scores if s.detector == "online (sleepecg, monitor.stream.rpeaks)"]
    assert {s.case for s in mine} == {"good:MLII", "moved:MLII"}
    tp, fn = sum(s.tp for s in mine), sum(s.fn for s in mine)
    assert online["se"] == tp / (tp + fn) and 0.45 < online["se"] < 0.55  # all of one record, none of the other
    assert online["worst_se_record"] == online["worst_ppv_record"] == "moved:MLII" and online["records_below"] == 1
    assert "| online (sleepecg, monitor.stream.rpeaks) |" in rpeaks.records_markdown(scores, tmp_path)
