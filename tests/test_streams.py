"""The stream evaluation harness: every metric on tiny hand-made cases, and the fast policy
sweep equal to the beat-by-beat policy."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from support import usual_beat

from monitor.daemon.state_store import BeatInfo, SensorStates
from monitor.stream.calibration import CalibrationConfig, Calibrator, Prior
from monitor.stream.policy import FIRING, ScorePolicy, ScorePolicyConfig
from monitor.stream.template import TemplateConfig
from trainer.streams import (Scored, Stream, alerted_runs, annotated_stream, choose_operating_point, combine,
                             ecg5000_streams, event_stats, evaluate, fired, legacy_fired, nab_raw, nab_score,
                             nab_sigmoid, nab_windows, open_between, per_class_auroc, plot_operating_curve,
                             policy_alerts, run_policy)


def stream(labels: str, normal: str = "N", period: float = 1.0, errors=None) -> Stream:
    n = len(labels)
    return Stream("s", np.zeros(n) if errors is None else np.asarray(errors, float), np.array(list(labels)),
                  np.arange(n) * period, normal)


def scored(labels: str, scores) -> Scored:
    s = stream(labels)
    n = len(labels)
    return Scored(s, np.asarray(scores, float), np.zeros(n, bool), np.zeros(n, bool))


def test_runs_are_maximal_stretches_of_non_normal_beats():
    assert stream("NNVVNSNNVFV").runs == [(2, 4), (5, 6), (8, 11)]


def test_a_run_counts_once_with_its_delay_and_false_alerts_are_counted_over_normal_time():
    s = stream("NNNNNVVVNNNNNNNNNNNN", period=0.5)  # run at beats 5..7
    stats = event_stats(s, np.array([6, 7, 15]), settle_beats=2)  # two alerts in the run, one false
    assert (stats.runs, stats.detected, stats.delays_beats, stats.delays_s) == (1, 1, [1], [0.5])
    assert stats.false_alerts == 1
    assert stats.normal_hours == pytest.approx((20 - 3 - 2) * 0.5 / 3600)  # minus the run and 2 settle beats
    missed = event_stats(s, np.array([9]), settle_beats=2)
    assert missed.detected == 0 and missed.false_alerts == 0  # a late alert in the settle beats: not false
    graced = event_stats(s, np.array([9]), grace_beats=2, settle_beats=2)
    assert graced.detected == 1 and graced.delays_beats == [4]


def test_detection_is_also_counted_by_run_length_isolated_beats_couplets_and_runs():
    s = stream("NNVNNNNVVNNNNSSSSNNNNVNNNNVVVNNNN")  # lengths 1, 2, 4, 1, 3
    stats = event_stats(s, np.array([8, 15]), settle_beats=2)  # the couplet and the 4-beat run
    assert stats.by_length == {"1": (2, 0), "2": (1, 1), "3+": (2, 1)}
    assert stats.summary()["detection_by_length"]["3+"] == {"runs": 2, "detected": 1, "rate": 0.5}
    assert combine([stats, stats]).by_length == {"1": (4, 0), "2": (2, 2), "3+": (4, 2)}


def test_warm_up_beats_do_not_count_as_normal_time_but_alerts_there_are_false():
    stats = event_stats(stream("N" * 10), np.array([1]), warmup_beats=4)
    assert stats.false_alerts == 1 and stats.normal_hours == pytest.approx(6 / 3600)


def test_per_class_auroc_by_hand():
    # V beats all above the normal ones (1.0); S beats all below (0.0); F ties half (0.75 by hand)
    got = per_class_auroc([scored("NNNVVSF", [1, 2, 3, 5, 6, 0, 2])])
    assert got["V"] == 1.0 and got["S"] == 0.0
    assert got["F"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_nab_sigmoid_values_from_the_paper():
    assert nab_sigmoid(-1) == pytest.approx(0.98661, abs=1e-5)
    assert nab_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert nab_sigmoid(0) == 0 and nab_sigmoid(3.5) == -1


def test_nab_scores_by_hand():
    runs = [(50, 52)]
    assert nab_windows(100, runs) == [(46, 55)]  # width 0.1 * 100 / 1 window, centred on the run
    assert nab_score([(100, runs, [46])], probation_fraction=0) == pytest.approx(100)  # at the left edge
    assert nab_score([(100, runs, [])], probation_fraction=0) == pytest.approx(0)  # missed: the null detector
    late = nab_sigmoid(-0.1) / nab_sigmoid(-1)  # right edge: position -(55 - 55 + 1) / 10
    assert nab_score([(100, runs, [55])], probation_fraction=0) == pytest.approx(100 * (late + 1) / 2)
    assert nab_raw(100, runs, [10, 46])[0] == pytest.approx(1 - 0.11)  # a false positive before any window
    assert nab_raw(100, runs, [46, 99])[0] == pytest.approx(1 - 0.11)  # far after the window (> 3 widths)
    just_after = nab_raw(100, runs, [46, 57])[0]  # 2 beats past a 10-beat window: mild penalty
    assert just_after == pytest.approx(1 + 0.11 * nab_sigmoid(2 / 9))
    assert nab_raw(100, runs, [46], probation=60) == (0.0, 0)  # windows in the probation are not scored


@pytest.mark.parametrize("aggregate", ["mean", "ewma", "cusum"])
def test_fast_sweep_equals_the_beat_by_beat_policy(aggregate):
    rng = np.random.default_rng(0)
    for seed in range(25):
        rng = np.random.default_rng(seed)
        n = 300
        labels = np.array(["N"] * n)
        s = Stream("s", np.zeros(n), labels, np.arange(n, dtype=float), "N",
                   good_quality=rng.random(n) > 0.05)
        cal = np.arange(n) < rng.integers(0, 40)
        fast = rng.random(n) < 0.3 if seed % 2 else None  # fast-run beats (in runs of 3 now and then), or none
        sc = Scored(s, rng.standard_normal(n) * 2 + (rng.random(n) < 0.05) * 6, cal, rng.random(n) < 0.08, fast)
        config = ScorePolicyConfig(aggregate=aggregate, window=int(rng.integers(1, 5)), alpha=0.4, drift=1.0,
                                   fire_level=2.5, resolve_level=1.0, resolve_beats=int(rng.integers(1, 6)),
                                   fast_run_beats=int(rng.integers(0, 4)))
        exact = [i for i, t in policy_alerts(sc, config) if t == FIRING]
        assert fired(sc, config).tolist() == exact


def test_ecg5000_streams_place_runs_after_the_warm_up_and_are_reproducible():
    labels = np.array(["1"] * 50 + ["2"] * 10 + ["3"] * 10)
    errors = np.arange(len(labels), dtype=float)
    streams = ecg5000_streams(errors, labels, n_streams=3, minutes=20, runs_per_hour=30, warmup_beats=150, seed=1)
    again = ecg5000_streams(errors, labels, n_streams=3, minutes=20, runs_per_hour=30, warmup_beats=150, seed=1)
    for s, t in zip(streams, again, strict=True):
        assert np.array_equal(s.errors, t.errors)
        runs = s.runs
        assert len(runs) == 10 and runs[0][0] >= 150
        assert all(3 <= e - b <= 6 and len(set(s.labels[b:e])) == 1 for b, e in runs)
        assert all(b2 - e1 >= 60 for (_, e1), (b2, _) in zip(runs, runs[1:], strict=False))
        assert len(s) == 1200 and s.times_s[1] == 1.0
    normal_only = ecg5000_streams(errors, labels, n_streams=2, minutes=1)
    assert all(not s.anomalous.any() for s in normal_only)


def test_annotated_recordings_use_aami_classes():
    s = annotated_stream("r100", [0.1, 0.2, 0.9, 0.1], [0.0, 0.8, 1.4, 2.3], ["N", "A", "V", "L"])
    assert s.labels.tolist() == ["N", "S", "V", "N"] and s.runs == [(1, 3)]


def test_legacy_policy_fires_on_two_of_three_over_threshold():
    s = stream("NNNNNNNN", errors=[0, 1, 0, 1, 1, 1, 0, 0])
    assert legacy_fired(s, threshold=0.5).tolist() == [3]


def test_operating_point_meets_the_budget_on_its_streams_and_detects_clear_runs(tmp_path):
    rng = np.random.default_rng(0)
    prior = Prior(0.0, 1.0, threshold=math.exp(1.645))

    def make(n_streams: int, with_runs: bool) -> list[Stream]:
        out = []
        for i in range(n_streams):
            log_err = rng.standard_normal(3600)
            labels = np.array(["1"] * 3600, dtype=object)
            if with_runs:
                for start in range(300, 3500, 200):
                    log_err[start:start + 4] += 4
                    labels[start:start + 4] = "2"
            out.append(Stream(f"s{i}", np.exp(log_err), labels, np.arange(3600.0)))
        return out

    calibration = CalibrationConfig(warmup_beats=150)
    normal, _ = run_policy(make(6, False), prior, calibration)
    anomalous, _ = run_policy(make(4, True), prior, calibration)
    configs = [ScorePolicyConfig(aggregate="mean", window=w) for w in (1, 3)] + [ScorePolicyConfig(aggregate="ewma")]
    chosen, table = choose_operating_point(normal, anomalous, budget_per_hour=1.0, configs=configs, warmup_beats=150)
    assert sum(r["chosen"] for r in table) == 1
    row = next(r for r in table if r["chosen"])
    assert row["false_alerts_per_hour"] <= 1.0 and row["detection_rate"] > 0.9
    assert {"aggregate", "fire_level", "detection_rate", "mean_delay_beats", "mean_delay_s"} <= set(row)
    report = evaluate(anomalous, [fired(s, chosen) for s in anomalous], warmup_beats=150)
    assert report["detection_rate"] == row["detection_rate"] and report["per_beat_auroc"]["2"] > 0.95
    assert 0 < report["nab_standard"] <= 100
    assert plot_operating_curve(table, tmp_path / "curve.png", 1.0).stat().st_size > 0


def test_the_policy_input_adds_the_rhythm_score_at_its_weight_and_a_regular_stream_has_none():
    prior = Prior(math.log(0.1), 0.3, 0.3)
    errors = np.exp(np.random.default_rng(0).normal(math.log(0.1), 0.1, 400))
    regular = stream("N" * 400, errors=errors)  # one beat a second, as the ECG5000 streams
    times = np.cumsum(0.8 * (1 + np.random.default_rng(1).normal(0, 0.02, 400)))
    times[350:] -= 0.35  # beat 350 comes early
    premature = Stream("p", errors, np.array(["N"] * 350 + ["S"] + ["N"] * 49), times, "N")
    config = ScorePolicyConfig()
    (flat,), _ = run_policy([regular], prior, policy=config)
    (shape_only,), _ = run_policy([premature], prior, policy=replace(config, rhythm_weight=0.0))
    (both,), _ = run_policy([premature], prior, policy=config)
    (flat_shape,), _ = run_policy([regular], prior, policy=replace(config, rhythm_weight=0.0))
    assert np.array_equal(flat.scores, flat_shape.scores)
    added = both.scores - shape_only.scores
    assert added[350] > 2 and np.argmax(added) == 350 and added.min() >= 0


def test_beat_windows_raise_the_policy_input_to_the_template_score_as_the_daemon_does():
    """ECG5000 streams built with their beat windows carry each beat's template score (monitor.stream.template);
    the policy input is the larger of it and the calibrated shape score, and the same as the daemon's."""
    rng = np.random.default_rng(0)
    usual = usual_beat()
    windows = np.stack([usual + rng.normal(0, 0.03, 140) for _ in range(60)] + [-usual] * 20)[:, :, None]
    errors = np.exp(rng.normal(math.log(0.1), 0.1, 80))  # the shape score cannot tell the classes apart
    labels = np.array(["1"] * 60 + ["2"] * 20)
    prior, config = Prior(math.log(0.1), 0.3, 0.3), ScorePolicyConfig()
    made = ecg5000_streams(errors, labels, n_streams=2, minutes=10, runs_per_hour=30, seed=3, windows=windows)
    plain = ecg5000_streams(errors, labels, n_streams=2, minutes=10, runs_per_hour=30, seed=3)
    assert all(np.isnan(s.template_scores[:150]).all() for s in made)  # the template's warm-up
    (with_t, _), _ = run_policy(made, prior, policy=config)
    (shape, _), _ = run_policy(plain, prior, policy=config)
    (off, _), _ = run_policy(made, prior, policy=replace(config, template_weight=0.0))
    assert np.array_equal(off.scores, shape.scores)
    assert np.array_equal(with_t.scores, np.fmax(shape.scores, config.template_weight * made[0].template_scores))
    anomalous = made[0].anomalous[150:]
    assert with_t.scores[150:][anomalous].min() > shape.scores[150:][anomalous].max() + 3
    states = SensorStates(Calibrator(prior), ScorePolicy(config), "m")
    beats = zip(made[0].errors, made[0].times_s, windows_of(made[0], windows, errors), strict=True)
    daemon = [states.apply((0, "s"), i, i, float(e), True, BeatInfo(float(ts), 1.0, w))
              for i, (e, ts, w) in enumerate(beats)]
    weight = config.template_weight
    assert np.allclose([o.calibrated.score if o.template_score is None else
                        max(o.calibrated.score, weight * o.template_score) for o in daemon], with_t.scores)


def windows_of(s: Stream, windows: np.ndarray, errors: np.ndarray) -> list[np.ndarray]:
    """The pool's window of each beat of an ECG5000 stream (its error identifies it: they are all distinct)."""
    row = {float(e): i for i, e in enumerate(errors)}
    return [windows[row[float(e)]] for e in s.errors]


def test_a_run_inside_an_alert_already_open_counts_as_alerting_though_not_as_detected():
    labels = "NNNNNVVVNNNNNNNNVVVNNNNNNNNNNNNVVVNNNNN"  # runs at 5-7, 16-18 and 31-33
    scores = np.zeros(len(labels))
    scores[5:19] = 10.0  # fires at 5, stays open through the second run, resolves after it
    config = ScorePolicyConfig(window=1, fire_level=3.0, resolve_level=1.0, resolve_beats=2)
    s = scored(labels, scores)
    is_open = open_between(policy_alerts(s, config), len(labels))
    assert np.flatnonzero(is_open).tolist() == list(range(5, 20))  # resolved at beat 20: 2 low beats after 18
    assert alerted_runs(s.stream, is_open) == (3, 2)
    assert alerted_runs(s.stream, is_open, warmup_beats=10) == (2, 1)
    assert event_stats(s.stream, fired(s, config)).detected == 1  # fired only within the first run


def test_ventricular_runs_count_consecutive_ventricular_beats_only():
    """Three ventricular beats in a row (non-sustained VT) make a ventricular run; a run of mixed or atrial
    beats does not, and a ventricular triplet inside a longer mixed run still does."""
    labels = "NNVVVNNSSSNNVVSNNSVVVSNN"  # V runs at 2-4, 18-20 (inside the mixed run 17-21); S run at 7-9
    s = scored(labels, np.zeros(len(labels)))
    is_open = np.zeros(len(labels), dtype=bool)
    is_open[19] = True
    assert alerted_runs(s.stream, is_open, label="V") == (2, 1)
    assert alerted_runs(s.stream, is_open) == (4, 1)  # every run of 3+ non-normal beats
    assert alerted_runs(s.stream, is_open, label="S") == (1, 0)


@pytest.mark.parametrize("with_anomalies", [True, False])
def test_the_operating_point_keeps_the_policys_fixed_parts_and_serves_the_input_it_was_chosen_on(with_anomalies):
    from trainer.evaluate import operating_point

    rng = np.random.default_rng(0)
    labels = np.array(["1"] * 600 + (["2"] * 60 if with_anomalies else []))
    errors = np.exp(rng.normal(0.0, 0.3, len(labels)) + 3.0 * (labels == "2"))
    prior = Prior(0.0, 0.3, threshold=math.exp(0.5))
    base = ScorePolicyConfig(template_weight=0.0, rhythm_weight=0.2, resolve_beats=7)
    point = operating_point(errors, labels, "1", prior, budget_per_hour=1.0, base=base)
    policy = ScorePolicyConfig(**point["policy"])
    assert (policy.template_weight, policy.rhythm_weight, policy.resolve_beats) == (0.0, 0.2, 7)
    assert point["detection_measured"] is with_anomalies and point["budget_met"]


def test_validation_streams_of_recordings_keep_one_patient_per_sensor():
    """Beats of two recordings: patient b's normal beats reconstruct as badly as patient a's ventricular ones.
    Reshuffled together, a's ventricular beats hide among b's normal ones; streamed one patient per sensor, as
    the daemon sees them, each sensor calibrates to its own patient and the runs are found."""
    from trainer.data import BeatOrigin
    from trainer.evaluate import operating_point

    rng = np.random.default_rng(0)
    labels = np.array((["N"] * 400 + ["V"] * 40) * 2)
    recording = np.repeat([0, 1], 440)
    errors = np.exp(1.5 * recording + rng.normal(0.0, 0.2, len(labels)) + 1.5 * (labels == "V"))
    origin = BeatOrigin(recording, ("a", "b"), np.where(recording == 0, 0.8, 0.6), np.zeros(len(labels), bool))
    prior, base = Prior(0.75, 0.5, threshold=math.exp(1.5)), ScorePolicyConfig(template_weight=0.0, rhythm_weight=0.0)
    pooled = operating_point(errors, labels, "N", prior, 1.0, base=base)
    per_patient = operating_point(errors, labels, "N", prior, 1.0, base=base, origin=origin)
    assert per_patient["budget_met"] and pooled["budget_met"]
    assert per_patient["chosen"]["detection_rate"] > pooled["chosen"]["detection_rate"] + 0.2
    described = per_patient["validation_streams"]
    assert [(r["name"], r["beat_period_s"], r["sensor_hours"]) for r in described["recordings"]] == [
        ("a", 0.8, 10.0), ("b", 0.6, 10.0)]
    assert "recordings" not in pooled["validation_streams"]


def test_a_beats_origin_turns_its_windows_back_the_way_up_the_lead_records_them():
    from trainer.data import BeatOrigin

    origin = BeatOrigin(np.array([0, 0, 1]), ("a", "b"), np.array([0.8, 0.8, 0.6]), np.array([False, True, True]))
    windows = np.arange(12.0).reshape(3, 4, 1)
    assert origin.recorded(windows)[:, :, 0].tolist() == [[0, 1, 2, 3], [-4, -5, -6, -7], [-8, -9, -10, -11]]
    assert origin.take(np.array([2])).names == ("a", "b") and origin.take(np.array([2])).rr_s.tolist() == [0.6]


def test_motion_noise_raises_no_anomaly_alert_once_known_and_the_trainer_sees_it_as_the_daemon_does():
    """Beats unlike the usual one and unlike each other (electrode motion) are artefacts: bad signal quality, so
    after a burst's first beats no anomaly alert, a signal_quality one instead; the trainer's stream marks the same
    beats and fires where the daemon does."""
    rng = np.random.default_rng(5)
    smooth = np.exp(-0.5 * (np.arange(-12, 13) / 4) ** 2)

    def wave() -> np.ndarray:
        w = np.convolve(rng.normal(size=140), smooth, "same")
        return 2 * (w - w.mean()) / w.std()

    clean = [usual_beat() + rng.normal(0, 0.03, 140) for _ in range(400)]
    windows = np.stack(clean[:300] + [usual_beat() + wave() for _ in range(120)] + clean[300:])
    errors = np.exp(rng.normal(math.log(0.1), 0.1, len(windows)))
    errors[300:420] *= 5  # the model's error rises in the noise too
    times, rr = np.arange(len(windows)) * 0.8, np.full(len(windows), 0.8)
    stream = annotated_stream("s", errors, times, ["N"] * len(windows), windows=windows, rr_s=rr)
    assert stream.good_quality is not None
    artefact = ~stream.good_quality
    assert not artefact[:300].any() and artefact[300:420].mean() > 0.8
    prior, config = Prior(math.log(0.1), 0.3, 0.3), ScorePolicyConfig()
    states = SensorStates(Calibrator(prior), ScorePolicy(config), "m")
    daemon = [states.apply((0, "s"), i, i, float(e), True, BeatInfo(float(t), 0.8, w))
              for i, (e, t, w) in enumerate(zip(errors, times, windows, strict=True))]
    assert all(o is not None for o in daemon)
    outcomes = [o for o in daemon if o is not None]
    assert [o.artefact for o in outcomes] == artefact.tolist()
    fires = [i for i, o in enumerate(outcomes) if FIRING in o.transitions]
    assert not [i for i in fires if 300 + TemplateConfig().artefact_window <= i < 420]
    assert any("signal_quality" in o.transitions for o in outcomes[300:420])
    _, (trainer_fires,) = run_policy([stream], prior, policy=config)
    assert trainer_fires.tolist() == fires
