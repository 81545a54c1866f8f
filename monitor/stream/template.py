"""Per-sensor template score: how far a beat's shape is from this sensor's own usual beat.

The autoencoder's error says how far a beat is from the *training* patients' beats. On other patients
that is not enough: on the 48 other patients of the MIT-BIH Arrhythmia Database it scored ventricular
beats against the same patient's normal beats at a median per-patient AUROC of 0.80, below chance for
10 of 26 patients, because a smooth, wide ventricular beat can be easier to reconstruct than a
patient's sharp but unusual normal beat. The classic Holter answer carries across patients without
training: compare each beat with the patient's own dominant beat. Here:

    beat      the first `span_s` seconds of the beat window (its QRS, ST segment and T wave), taken from
              the window the way up the lead records it at `points` instants and z-scored: in seconds,
              not in the window's share of the R-R interval, because a QRS lasts the same whatever the
              heart rate, and on the R-R time axis a change of rate alone reads as a change of shape
    template  the per-sample running median of the sensor's beats, tracked by
              ``T += step * sign(beat - T)``; a median, so a minority of ectopic beats (up to a third in
              some patients) does not move it
    distance  mean |beat - T| (before the beat updates T)
    score     (log distance - location) / scale, against the sensor's own centre and spread of log
              distances (median, and the spread of the lower half: `lower_half_baseline`), learnt after
              the template has settled (beats `settle_beats` to `warmup_beats`), floor `min_scale`, from
              the sensor's *regular* beats (R-R within `regular_rr` of the warm-up's median: `regular`),
              because ectopic beats come early and end in a pause, and with a fifth to a third of them in
              the warm-up (frequent ventricular ectopy) the median lies among their distances and the spread
              read off below it comes out about 1.6 times the usual beats' own (MIT-BIH records 106, 208,
              228); a rhythm too irregular to tell (fewer than `MIN_REGULAR_BEATS` regular beats: atrial
              fibrillation, bigeminy) keeps every beat; the centre then follows the running median of log
              distances (`adapt_rate` scales a beat), since a patient's beats change slowly over hours
              (posture, rate, respiration), on regular beats only (R-R within `regular_rr` of the sensor's
              running median R-R, `rr_median`), so ectopic beats do not pull the centre up after the warm-up
              either

The first beat seeds the template; the step starts at `first_step` and falls linearly to `step` over
`settle_beats`, so an ectopic first beat is forgotten within the settling. Until the warm-up ends a beat
has no template score (None) and the policy takes the shape score alone.

Artefact (electrode motion, after the warm-up): a beat is *novel* when even the nearest of the template and the
sensor's last `recent_beats` beats lies `novel_level` (log units) beyond the sensor's usual distance (`usual`: the
centre as the warm-up left it, since the centre itself follows the sensor, and minutes of noise would move it);
a novel beat with at least `artefact_beats` novel beats among the last `artefact_window` (itself included) is an
*artefact*: beats unlike the usual beat and unlike each other. Ectopic beats are unlike the usual beat but like
each other (a run of ventricular beats from one focus, bigeminy: the beat two back), or come one at a time; motion
noise at the amplitude of the QRS (MIT-BIH Noise Stress Test record 118e06, 6 dB) makes every beat novel. An
artefact beat is scored but teaches nothing, and the daemon treats it as bad signal quality (reason `artefact`):
no anomaly alert, and the policy's rate-limited `signal_quality` alert. The first novel beats of a burst still
feed the policy, so motion noise can raise one anomaly alert as it starts, not one every few seconds
(docs/model-card.md, "Noise").

The alert policy's input for a beat window is max(calibrated shape score, template_weight x template score)
+ rhythm_weight x rhythm score (`ScorePolicyConfig.template_weight`, 0.7; docs/model-card.md, "Other
patients", has how it was chosen and what it gives on 48 other patients).

Bad-quality beats have no template score and teach nothing. The template and the last `recent_beats` beats are
kept in float16 (72 bytes each; the changelog carries them base64-encoded), updated from float16 every beat, so a
restored sensor continues bit for bit; everything is deterministic.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

__all__ = ["TemplateConfig", "TemplateState", "TemplateScore", "TemplateScores", "Template", "score_windows"]

#: Distances below this are treated as this (log of zero: a beat identical to the template).
MIN_DISTANCE = 1e-6
#: How far the 25th percentile of a normal distribution lies below its median, in SDs.
Z25 = 0.6745
#: Fewer regular beats than this in the warm-up (an irregular rhythm: atrial fibrillation, bigeminy): the baseline
#: is learnt from every beat.
MIN_REGULAR_BEATS = 30


@dataclass(frozen=True)
class TemplateConfig:
    span_s: float = 0.35  # seconds of the beat compared, from the window's start (2% of R-R before its R peak)
    points: int = 36  # instants they are taken at (10 ms apart)
    step: float = 0.02  # z units per beat per sample once settled: the template follows slow drift
    first_step: float = 0.3  # the step on the second beat, falling linearly to `step` over settle_beats
    settle_beats: int = 50  # the template only learns (its distances are not yet the sensor's normal)
    warmup_beats: int = 150  # log distances of beats settle_beats..warmup_beats set the baseline
    min_scale: float = 0.05  # floor of the spread (log units)
    adapt_rate: float = 0.3  # after the warm-up the centre moves this many scales a beat towards each distance
    #: a beat is regular when its R-R lies within this share of the median R-R (the warm-up's, for the baseline;
    #: the running one, `rr_median`, afterwards); only regular beats teach the baseline and move the centre
    #: (inf: every beat)
    regular_rr: float = 0.15
    rr_step: float = 0.01  # seconds a beat the running median R-R moves
    #: artefact (module docstring): the beats a beat is compared with besides the template, how far beyond the usual
    #: distance (log units: e^1.8 = 6 times) the nearest of them makes it novel, and how many novel beats among the
    #: last `artefact_window` make a novel beat an artefact (0: never)
    recent_beats: int = 3
    novel_level: float = 1.8
    artefact_beats: int = 3
    artefact_window: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.step <= self.first_step or not 1 <= self.settle_beats < self.warmup_beats - 2 \
                or self.min_scale <= 0 or self.span_s <= 0 or self.points < 2 or self.adapt_rate < 0 \
                or self.regular_rr <= 0 or self.rr_step <= 0 or self.recent_beats < 0 or self.novel_level <= 0 \
                or not 0 <= self.artefact_beats <= self.artefact_window:
            raise ValueError(f"invalid template config {self}")


@dataclass
class TemplateState:
    """One sensor's template; `to_dict()` is what a changelog record carries."""

    template: np.ndarray | None = None  # float16, `points` values; None before the first beat
    beats: int = 0  # good beats seen (saturates at the warm-up length)
    location: float = 0.0
    scale: float = 0.0  # 0 until the warm-up ends
    warmup: list[float] = field(default_factory=list)  # log distances, only while calibrating
    warmup_rr: list[float] = field(default_factory=list)  # their beats' R-R intervals (s)
    rr_median: float = 0.0  # the running median R-R (s); 0 before the second beat
    usual: float = 0.0  # the centre when the warm-up ended: the artefact rule's reference (noise must not move it)
    recent: list[np.ndarray] = field(default_factory=list)  # the last `recent_beats` beats (float16), newest last
    novel: list[bool] = field(default_factory=list)  # novel? for the last `artefact_window` beats after the warm-up

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"beats": self.beats, "location": self.location, "scale": self.scale,
                                "warmup": list(self.warmup), "warmup_rr": list(self.warmup_rr),
                                "rr_median": self.rr_median, "usual": self.usual,
                                "recent": [_encode(b) for b in self.recent],
                                "novel": [int(x) for x in self.novel]}
        if self.template is not None:
            data["template"] = _encode(self.template)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TemplateState:
        encoded = data.get("template")
        warmup = [float(x) for x in data.get("warmup", [])]
        # a record written before the R-R intervals were kept: its warm-up beats count as regular
        warmup_rr = [float(x) for x in data.get("warmup_rr", [math.nan] * len(warmup))]
        return cls(None if encoded is None else _decode(encoded), int(data.get("beats", 0)),
                   float(data.get("location", 0.0)), float(data.get("scale", 0.0)), warmup, warmup_rr,
                   float(data.get("rr_median", 0.0)), float(data.get("usual", data.get("location", 0.0))),
                   [_decode(b) for b in data.get("recent", [])],
                   [bool(x) for x in data.get("novel", [])])


def _encode(values: np.ndarray) -> str:
    return base64.b64encode(values.astype("<f2").tobytes()).decode()


def _decode(encoded: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(encoded), dtype="<f2").astype(np.float16)


class TemplateScore(NamedTuple):
    """A beat against its sensor's template: the score (None while the sensor calibrates, and for a bad-quality
    beat) and whether the beat is an artefact (module docstring: then it taught nothing)."""

    score: float | None
    artefact: bool = False


class Template:
    """Pure functions of the config over per-sensor `TemplateState`s."""

    def __init__(self, config: TemplateConfig | None = None) -> None:
        self.config = config or TemplateConfig()
        self._instants = np.linspace(0.0, self.config.span_s, self.config.points)  # seconds from a window's start

    def update(self, state: TemplateState, window: np.ndarray, rr_s: float, good_quality: bool = True
               ) -> TemplateScore:
        """The score of this beat window (the way up its lead records it; its R-R interval `rr_s` is the window's
        duration) against the sensor's template, and whether it is an artefact; then learn from it (not from an
        artefact, nor from a bad-quality beat, which has no score)."""
        if not good_quality:
            return TemplateScore(None)
        beat = self.beat(window, rr_s)
        if state.template is None or len(state.template) != len(beat):
            state.template, state.beats, state.scale = beat.astype(np.float16), 1, 0.0
            state.warmup, state.warmup_rr, state.recent, state.novel = [], [], [], []
            return TemplateScore(None)
        current = state.template.astype(np.float32)
        log_distance = _log_distance(beat, current)
        score = (log_distance - state.location) / state.scale if state.scale > 0 else None
        artefact = self._artefact(state, beat, log_distance)
        if not artefact:
            state.template = (current + np.float32(self._step(state.beats)) * np.sign(beat - current)).astype(
                np.float16)
            self._learn(state, log_distance, rr_s)
        return TemplateScore(score, artefact)

    def _artefact(self, state: TemplateState, beat: np.ndarray, log_distance: float) -> bool:
        """Whether this beat is novel in a burst of novel beats (module docstring); remembers it either way."""
        c = self.config
        nearest = min([log_distance, *(_log_distance(beat, b.astype(np.float32)) for b in state.recent)])
        state.recent = [*state.recent, beat.astype(np.float16)][-c.recent_beats:] if c.recent_beats else []
        if state.scale == 0 or not c.artefact_beats:  # calibrating: the usual distance is not known yet
            return False
        novel = nearest - state.usual > c.novel_level
        state.novel = [*state.novel, novel][-c.artefact_window:]
        return novel and sum(state.novel) >= c.artefact_beats

    def beat(self, window: np.ndarray, rr_s: float) -> np.ndarray:
        """The first `span_s` seconds of a window that lasts `rr_s`, at `points` instants, z-scored (float32)."""
        values = np.asarray(window, dtype=np.float64).reshape(-1)
        at = self._instants * (len(values) / rr_s)
        beat = np.interp(at, np.arange(len(values)), values)  # a rate over 171 bpm: the window's end repeats
        spread = float(beat.std())
        out: np.ndarray = ((beat - beat.mean()) / (spread if spread > 0 else 1.0)).astype(np.float32)
        return out

    def calibrating(self, state: TemplateState) -> bool:
        return state.beats < self.config.warmup_beats

    def _step(self, beats: int) -> float:
        c = self.config
        return max(c.step, c.first_step * (1 - beats / c.settle_beats))

    def _learn(self, state: TemplateState, log_distance: float, rr_s: float) -> None:
        c = self.config
        is_regular = state.rr_median == 0 or abs(rr_s / state.rr_median - 1) <= c.regular_rr
        state.rr_median = rr_s if state.rr_median == 0 else state.rr_median + c.rr_step * float(
            np.sign(rr_s - state.rr_median))
        if not self.calibrating(state):
            # the centre follows the median of the regular beats' distances; the spread is fixed after the warm-up:
            # runs of ectopic beats must not widen it
            if is_regular:
                state.location += c.adapt_rate * state.scale * (1 if log_distance > state.location else -1)
            return
        state.beats += 1
        if state.beats > c.settle_beats:
            state.warmup.append(round(log_distance, 4))  # 4 decimals: the buffers ride in changelog records
            state.warmup_rr.append(round(rr_s, 4))
        if state.beats == c.warmup_beats:
            distances = np.asarray(state.warmup)
            kept = regular(np.asarray(state.warmup_rr), c.regular_rr)
            state.location, state.scale = lower_half_baseline(distances[kept] if kept.sum() >= MIN_REGULAR_BEATS
                                                              else distances)
            state.scale, state.usual = max(state.scale, c.min_scale), state.location
            state.warmup, state.warmup_rr = [], []


def _log_distance(beat: np.ndarray, other: np.ndarray) -> float:
    return math.log(max(float(np.mean(np.abs(beat - other))), MIN_DISTANCE))


def regular(rr_s: np.ndarray, tolerance: float) -> np.ndarray:
    """The beats whose R-R interval lies within `tolerance` of the median (unknown, NaN: regular). An ectopic
    beat's window ends in its compensatory pause, and the beat before it is cut short by its early onset."""
    known = np.isfinite(rr_s)
    if not known.any():
        return np.ones(len(rr_s), dtype=bool)
    ratio = rr_s / np.median(rr_s[known])
    kept: np.ndarray = ~known | (np.abs(ratio - 1) <= tolerance)
    return kept


def lower_half_baseline(log_distances: np.ndarray) -> tuple[float, float]:
    """(median, spread read off the lower half as a normal SD). Ectopic beats only ever lie *farther* from the
    template, so with a third of them (bigeminy, trigeminy) a two-sided spread (MAD) would widen to the gap
    between the two kinds of beat; below the median there are only the sensor's usual beats (`regular` keeps a
    large share of ectopic beats from moving the median itself)."""
    median = float(np.median(log_distances))
    return median, (median - float(np.percentile(log_distances, 25))) / Z25


class TemplateScores(NamedTuple):
    """`score_windows`' result: per beat, the score (NaN where there is none) and whether it is an artefact."""

    scores: np.ndarray
    artefact: np.ndarray


def score_windows(windows: np.ndarray, rr_s: np.ndarray | float, good_quality: np.ndarray | None = None,
                  config: TemplateConfig | None = None) -> TemplateScores:
    """The template score of every beat window of one sensor's stream (the way up its lead records them), in
    order, from a fresh state, and which beats are artefacts: what the daemon computes beat by beat (the trainer's
    stream evaluation uses it). rr_s: each window's R-R interval, or one for all."""
    template, state = Template(config), TemplateState()
    rows = np.asarray(windows).reshape(len(windows), -1)  # as given: the daemon's are float32
    rr = np.broadcast_to(np.asarray(rr_s, dtype=np.float64), (len(rows),))
    good = np.ones(len(rows), dtype=bool) if good_quality is None else np.asarray(good_quality, dtype=bool)
    out = [template.update(state, row, float(r), bool(ok)) for row, r, ok in zip(rows, rr, good, strict=True)]
    return TemplateScores(np.array([math.nan if x.score is None else x.score for x in out], dtype=np.float64),
                          np.array([x.artefact for x in out], dtype=bool))
