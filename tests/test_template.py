"""The per-sensor template score (monitor.stream.template): a beat unlike the sensor's own usual beat scores high,
its usual beats do not, a minority of ectopic beats (or an ectopic first beat) does not become the template, and
the state round-trips exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from monitor.stream.template import Template, TemplateConfig, TemplateState, score_windows

CONFIG = TemplateConfig()
T = np.linspace(0, 1, 140)
RR = 0.8  # seconds: the windows below span this R-R interval


def zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std(ddof=1)


def bump(centre: float, width: float, height: float) -> np.ndarray:
    return height * np.exp(-0.5 * ((T - centre) / width) ** 2)


NORMAL = zscore(bump(0.02, 0.012, -4) + bump(0.35, 0.05, 0.8) + bump(0.9, 0.03, 0.2))  # sharp QRS, T, P
ECTOPIC = zscore(bump(0.05, 0.05, -3) + bump(0.4, 0.08, -1.2))  # wide QRS, T opposite to it, no P


def beats(shape: np.ndarray, n: int, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([zscore(shape * rng.uniform(0.9, 1.1) + rng.normal(0, noise, 140)) for _ in range(n)])


def test_a_beat_unlike_the_sensors_own_scores_high_and_its_usual_beats_do_not():
    windows = beats(NORMAL, 400)
    windows[[250, 300, 301]] = beats(ECTOPIC, 3, seed=1)
    scores = score_windows(windows, RR).scores
    assert np.isnan(scores[:CONFIG.warmup_beats]).all()  # calibrating: no template score yet
    assert min(scores[[250, 300, 301]]) > 10
    usual = np.delete(scores[CONFIG.warmup_beats:], [100, 150, 151])
    assert np.percentile(usual, 99) < 3


@pytest.mark.parametrize("share", [0.0, 1 / 3])
def test_a_third_of_ectopic_beats_or_an_ectopic_first_beat_does_not_become_the_template(share: float):
    rng = np.random.default_rng(2)
    windows = beats(NORMAL, 300, seed=3)
    ectopic = np.flatnonzero(rng.random(300) < share)
    if len(ectopic):
        windows[ectopic] = beats(ECTOPIC, len(ectopic), seed=4)
    windows[0] = ECTOPIC  # the seed of the template
    template, state = Template(), TemplateState()
    scores = np.array([np.nan if (s := template.update(state, w, RR).score) is None else s for w in windows])
    assert state.template is not None
    assert np.mean(np.abs(state.template.astype(np.float64) - template.beat(NORMAL, RR))) < 0.1
    normal = np.setdiff1d(np.arange(CONFIG.warmup_beats, 300), ectopic)
    late = ectopic[ectopic >= CONFIG.warmup_beats]
    assert np.percentile(scores[normal], 95) < 3
    if len(late):
        assert scores[late].min() > np.percentile(scores[normal], 99)


def test_a_bad_quality_beat_has_no_score_and_teaches_nothing():
    template, state = Template(), TemplateState()
    for w in beats(NORMAL, 200):
        template.update(state, w, RR)
    before = json.dumps(state.to_dict())
    assert template.update(state, ECTOPIC, RR, good_quality=False).score is None
    assert json.dumps(state.to_dict()) == before


@pytest.mark.parametrize("split", [30, 120, 250])  # settling, calibrating, calibrated
def test_the_state_round_trips_through_json_and_continues_bit_for_bit(split: int):
    windows = beats(NORMAL, 300, seed=5)
    windows[[100, 260]] = ECTOPIC
    template, state = Template(), TemplateState()
    for w in windows[:split]:
        template.update(state, w, RR)
    copy = TemplateState.from_dict(json.loads(json.dumps(state.to_dict())))
    rest = windows[split:]
    assert [template.update(copy, w, RR) for w in rest] == [template.update(state, w, RR) for w in rest]
    # bounded after the warm-up: the template and the last 3 beats (96 base64 characters each), a few numbers
    assert state.warmup == [] and len(json.dumps(state.to_dict())) < 700


def test_a_change_of_heart_rate_alone_is_not_a_change_of_shape():
    """The same beat at another rate: its window is the same QRS and T in seconds over a longer R-R interval."""
    slow = 1.2

    def at_rate(rr: float) -> np.ndarray:
        """A QRS at 16 ms and a T wave at 280 ms after the window's start, on a window of R-R interval rr."""
        seconds = T * rr
        return zscore(-4 * np.exp(-0.5 * ((seconds - 0.016) / 0.01) ** 2)
                      + 0.8 * np.exp(-0.5 * ((seconds - 0.28) / 0.04) ** 2))

    template, state = Template(), TemplateState()
    for w in beats(at_rate(RR), 200):
        template.update(state, w, RR)
    same = template.update(state, at_rate(slow), slow).score
    stretched = template.update(state, at_rate(RR), slow).score  # the R-R axis read as seconds: the waves too long
    assert same is not None and stretched is not None and same < 3 < stretched


def test_an_identical_beat_has_a_finite_score():
    template, state = Template(TemplateConfig(settle_beats=2, warmup_beats=10)), TemplateState()
    scores = [template.update(state, NORMAL, RR).score for _ in range(20)]
    assert all(s is not None and math.isfinite(s) for s in scores[10:])


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError):
        TemplateConfig(step=0)
    with pytest.raises(ValueError):
        TemplateConfig(settle_beats=150, warmup_beats=150)


def frequent_ectopy(n: int, seed: int, share: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """Beat windows and their R-R intervals: `share` of the beats ectopic (here a late extra wave, moderately unlike
    the usual beat), each ending in a compensatory pause (1.1 s) and cutting the beat before it short (0.5 s: the
    same waves in seconds); the usual beats 0.8 s apart."""
    rng = np.random.default_rng(seed)
    windows, rr = beats(NORMAL, n, seed=seed), np.full(n, RR)
    ectopic = np.flatnonzero(rng.random(n) < share)
    ectopic = ectopic[(ectopic > 1) & (np.diff(ectopic, prepend=-2) > 1)]  # none right after another
    windows[ectopic] = beats(zscore(NORMAL + bump(0.12, 0.04, 0.5)), len(ectopic), seed=seed + 1)
    cut_short = zscore(np.interp(T * 0.5 / RR, T, NORMAL))
    windows[ectopic - 1] = beats(cut_short, len(ectopic), seed=seed + 2)
    rr[ectopic], rr[ectopic - 1] = 1.1, 0.5
    return windows, rr


def learnt_baseline(windows: np.ndarray, rr: np.ndarray, config: TemplateConfig = CONFIG) -> TemplateState:
    template, state = Template(config), TemplateState()
    for w, r in zip(windows, rr, strict=True):
        template.update(state, w, float(r))
    assert not template.calibrating(state)
    return state


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_ectopic_beats_in_the_warm_up_do_not_set_the_baseline(seed: int):
    """The baseline comes from the regular beats (R-R near the median). Learnt from every beat, with a third of
    the warm-up ectopic, the median lies among the ectopic beats' distances and the centre starts higher, so later
    ectopic beats score lower; a regular rhythm learns the same baseline either way."""
    every_beat, n = TemplateConfig(regular_rr=math.inf), CONFIG.warmup_beats
    windows, rr = frequent_ectopy(2 * n, seed)
    warm = windows[:n], rr[:n]
    assert learnt_baseline(*warm).location < learnt_baseline(*warm, every_beat).location - 0.04
    late_ectopic = np.flatnonzero(rr == 1.1)[np.flatnonzero(rr == 1.1) >= n]
    regular, every = score_windows(windows, rr).scores, score_windows(windows, rr, config=every_beat).scores
    assert np.median(regular[late_ectopic]) > np.median(every[late_ectopic])
    usual = beats(NORMAL, n, seed=seed), np.full(n, RR)
    assert learnt_baseline(*usual).to_dict() == learnt_baseline(*usual, every_beat).to_dict()


def test_a_state_written_without_the_warm_ups_intervals_counts_its_beats_as_regular():
    windows, rr = frequent_ectopy(CONFIG.warmup_beats, seed=8)
    template, state = Template(), TemplateState()
    for w, r in zip(windows[:100], rr[:100], strict=True):
        template.update(state, w, float(r))
    old = state.to_dict()
    del old["warmup_rr"]
    restored = TemplateState.from_dict(old)
    assert len(restored.warmup_rr) == len(restored.warmup) and all(math.isnan(x) for x in restored.warmup_rr)
    for w, r in zip(windows[100:], rr[100:], strict=True):
        template.update(restored, w, float(r))
    assert not template.calibrating(restored) and restored.scale >= CONFIG.min_scale


def test_after_the_warm_up_the_centre_follows_the_regular_beats_only():
    """Ectopic beats (early, then a pause) do not pull the centre up after the warm-up; the running median R-R
    that tells them follows a change of heart rate within tens of beats."""
    n = CONFIG.warmup_beats
    ectopy, rr_ectopy = frequent_ectopy(400, seed=11)
    windows = np.concatenate([beats(NORMAL, n, seed=11), ectopy])
    rr = np.concatenate([np.full(n, RR), rr_ectopy])
    regular = learnt_baseline(windows, rr)
    every = learnt_baseline(windows, rr, TemplateConfig(regular_rr=math.inf))
    assert regular.scale == every.scale and regular.location < every.location - 0.05
    faster = learnt_baseline(beats(NORMAL, n + 40, seed=12), np.r_[np.full(n, RR), np.full(40, 0.6)])
    assert faster.rr_median == pytest.approx(0.6, abs=0.011)


def motion_noise(n: int, seed: int) -> np.ndarray:
    """Electrode motion at the QRS's amplitude: the usual beat under a different smooth random wave each time."""
    rng = np.random.default_rng(seed)
    smooth = np.exp(-0.5 * (np.arange(-12, 13) / 4) ** 2)
    return np.stack([zscore(NORMAL + 2 * zscore(np.convolve(rng.normal(size=140), smooth, "same"))) for _ in range(n)])


def test_motion_noise_is_an_artefact_after_its_first_beats_and_teaches_nothing():
    n, burst = CONFIG.warmup_beats + 50, 60
    windows = np.concatenate([beats(NORMAL, n, seed=20), motion_noise(burst, seed=21), beats(NORMAL, 40, seed=22)])
    template, state = Template(), TemplateState()
    out = [template.update(state, w, RR) for w in windows]
    artefact = np.array([o.artefact for o in out])
    assert not artefact[:n].any()
    assert not artefact[n:n + CONFIG.artefact_beats - 1].any()  # a burst's first beats are not known to be one yet
    assert artefact[n:n + burst].mean() > 0.8
    after = n + burst + CONFIG.artefact_window
    assert not artefact[after:].any()
    assert max(o.score for o in out[after:] if o.score is not None) < 3  # the usual beat still scores as usual


@pytest.mark.parametrize("pattern", ["run", "bigeminy", "isolated"])
def test_ectopic_beats_like_each_other_or_one_at_a_time_are_not_artefacts(pattern: str):
    """A run from one focus, or bigeminy (like the beat two back), or single ectopic beats: they score high against
    the usual beat, and none is taken for noise."""
    n = CONFIG.warmup_beats
    windows = beats(NORMAL, n + 60, seed=23)
    ectopic = {"run": np.arange(n + 10, n + 30), "bigeminy": np.arange(n + 10, n + 50, 2),
               "isolated": np.arange(n + 10, n + 60, 7)}[pattern]
    windows[ectopic] = beats(ECTOPIC, len(ectopic), seed=24)
    template, state = Template(), TemplateState()
    out = [template.update(state, w, RR) for w in windows]
    assert not any(o.artefact for o in out)
    assert min(out[i].score or 0.0 for i in ectopic) > 10


def test_a_state_written_before_the_artefact_rule_restores_with_its_centre_as_the_usual_distance():
    template, state = Template(), TemplateState()
    for w in beats(NORMAL, CONFIG.warmup_beats + 10, seed=25):
        template.update(state, w, RR)
    old = state.to_dict()
    for key in ("usual", "recent", "novel"):
        del old[key]
    restored = TemplateState.from_dict(old)
    assert restored.usual == state.location and restored.recent == [] and restored.novel == []
    assert not template.update(restored, NORMAL, RR).artefact
