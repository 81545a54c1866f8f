"""Multi-source training: beats from WFDB records and synthetic ECG in the serving convention,
augmentation that keeps the QRS, and an artefact that carries its beat convention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monitor.core.artefact import Artefact
from monitor.core.model import ModelConfig
from monitor.core.scoring import Scorer
from monitor.stream.beats import BeatConvention
from trainer import sources
from trainer.augment import Augmentation, augment

MITDB_100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "mitdb-100" / "100"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "monitor" / "models" / "default.pt"
R_INDEX = 3  # the convention puts the R peak on output sample 3 of 140


@pytest.fixture(scope="module")
def mit_normals() -> np.ndarray:
    return sources.recording_beats(sources.read_wfdb(MITDB_100), BeatConvention())


def test_a_positive_qrs_record_gives_beats_with_the_ecg5000_negative_qrs(mit_normals: np.ndarray) -> None:
    # record 100's MLII QRS points up; the recording's one polarity sign turns every beat like ECG5000's
    assert 2200 <= len(mit_normals) <= 2239  # normal beats only (33 A and 1 V left out)
    assert np.median(mit_normals.argmin(axis=1)) == R_INDEX
    assert np.median(mit_normals[:, R_INDEX]) < -2.0
    assert np.allclose(mit_normals.mean(axis=1), 0.0, atol=1e-4)
    assert np.allclose(mit_normals.std(axis=1, ddof=1), 1.0, atol=1e-4)


def test_synthetic_patients_are_cut_by_the_same_convention() -> None:
    beats = sources.synthetic_beats(2, seed=3, convention=BeatConvention(), duration_s=20)
    assert beats.shape[1] == 140 and len(beats) >= 20
    assert np.median(beats.argmin(axis=1)) == R_INDEX


def test_augmentation_varies_beats_but_never_flips_the_qrs(mit_normals: np.ndarray) -> None:
    beats = mit_normals[:200]
    out = augment(beats, np.random.default_rng(0), Augmentation(repolarisation_flip=0.5))
    assert out.shape == beats.shape and out.dtype == np.float32
    assert np.allclose(out.std(axis=1, ddof=1), 1.0, atol=1e-4)
    assert np.abs(out - beats).mean() > 0.05
    assert (out[:, :8].min(axis=1) < -1.5).mean() > 0.95  # the QRS stays negative
    again = augment(beats, np.random.default_rng(0), Augmentation(repolarisation_flip=0.5))
    assert np.array_equal(out, again)


def test_augmentation_flips_the_repolarisation_when_asked(mit_normals: np.ndarray) -> None:
    beats = mit_normals[:100]
    late = slice(60, 130)  # the T wave's part of the beat
    flipped = augment(beats, np.random.default_rng(1), Augmentation(time_warp=0, shift=0, wander=0, noise=0,
                                                                  repolarisation_scale=0, repolarisation_flip=1))
    correlation = [np.corrcoef(a[late], b[late])[0, 1] for a, b in zip(beats, flipped, strict=True)]
    assert np.median(correlation) < -0.9


def test_fit_sources_writes_an_artefact_that_carries_its_convention(tmp_path: Path,
                                                                     mit_normals: np.ndarray) -> None:
    convention = BeatConvention()
    data = sources.Sources(convention, {"mit100": mit_normals[:120],
                                        "synthetic": sources.synthetic_beats(1, 0, convention, duration_s=30)})
    recipe = sources.Recipe(model=ModelConfig(embedding_dim=4, hidden_dim=8), epochs=1)
    artefact, fit = sources.fit_sources(data, recipe, seed=0)
    loaded = Artefact.load(artefact.save(tmp_path / "m.pt"))
    assert BeatConvention.from_dict(loaded.metadata["windowing"]) == convention
    assert loaded.metadata["data"]["sources"] == {"mit100": 120, "synthetic": len(data.beats["synthetic"])}
    assert loaded.threshold > 0 and fit.best_epoch == 1
    assert Scorer(loaded, device="cpu").score(mit_normals[:5]).shape == (5,)


@pytest.mark.skipif(not DEFAULT_MODEL.is_file(), reason="no shipped model yet")
def test_the_shipped_model_loads_safely_is_small_and_records_its_beat_convention(mit_normals: np.ndarray) -> None:
    assert DEFAULT_MODEL.stat().st_size < 1_000_000
    artefact = Artefact.load(DEFAULT_MODEL)  # torch.load(weights_only=True) inside
    assert BeatConvention.from_dict(artefact.metadata["windowing"]).length == artefact.window_length
    errors = Scorer(artefact, device="cpu").score(mit_normals)
    assert (errors > artefact.threshold).mean() < 0.2  # a real patient's normal beats are mostly not flagged


def test_a_source_can_be_augmented_less_than_the_others(mit_normals: np.ndarray) -> None:
    # the reference patient's beats kept as they are, every other source augmented as usual
    none = Augmentation(time_warp=0, shift=0, wander=0, repolarisation_scale=0, noise=0)
    recipe = sources.Recipe(source_augmentation=(("ecg5000", none),))
    beats = mit_normals[:60]
    names = np.repeat(np.array(["ecg5000", "synthetic"]), 30)
    out = sources.augmenter(recipe, names, np.random.default_rng(0))(beats, 1)
    assert out.shape == beats.shape
    assert np.allclose(out[:30], beats[:30], atol=1e-4)
    assert np.abs(out[30:] - beats[30:]).mean() > 0.05


def test_a_repeated_source_weighs_more_in_training_and_keeps_its_validation_part(mit_normals: np.ndarray) -> None:
    data = sources.Sources(BeatConvention(), {"ecg5000": mit_normals[:100], "synthetic": mit_normals[100:200]})
    once = sources.train_val(data, sources.Recipe(), seed=0)
    twice = sources.train_val(data, sources.Recipe(source_repeats=(("ecg5000", 2),)), seed=0)
    assert np.array_equal(once[1], twice[1])  # the same validation beats
    assert list(np.unique(twice[2], return_counts=True)[1]) == [2 * 85, 85]
    assert np.array_equal(np.unique(twice[0][twice[2] == "ecg5000"], axis=0),
                          np.unique(once[0][once[2] == "ecg5000"], axis=0))  # copies, no new beats


def test_the_operating_point_is_chosen_on_ecg5000_validation_and_served_by_the_daemon(
        tmp_path: Path, mit_normals: np.ndarray, ecg_data_dir: Path) -> None:
    from monitor.daemon.settings import MonitorSettings
    from monitor.daemon.state_store import policy_config
    from trainer.evaluate import OPERATING_ANOMALY_FRACTION
    from trainer.split import recorded_split

    data = sources.Sources(BeatConvention(), {"mit100": mit_normals[:120]})
    artefact, _ = sources.fit_sources(data, sources.Recipe(model=ModelConfig(embedding_dim=4, hidden_dim=8), epochs=1))
    point = sources.add_operating_point(artefact, ecg_data_dir, split_seed=3, budget_per_hour=0.5)
    loaded = Artefact.load(artefact.save(tmp_path / "m.pt"))

    assert point["budget_per_hour"] == 0.5 and point["detection_measured"] and point["curve"]
    assert loaded.metadata["operating_point"]["chosen"] == point["chosen"] and "curve" not in loaded.metadata[
        "operating_point"]
    # the test part evaluate cuts leaves out the anomalous beats the point was chosen on
    assert recorded_split(loaded.metadata) == {"seed": 3, "val_fraction": 0.15, "test_fraction": 0.15,
                                               "val_anomaly_fraction": OPERATING_ANOMALY_FRACTION}
    served = policy_config(Scorer(loaded, device="cpu"), MonitorSettings(_env_file=None))
    assert served.fire_level == point["policy"]["fire_level"] and served.aggregate == point["policy"]["aggregate"]
