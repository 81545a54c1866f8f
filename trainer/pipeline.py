"""The programmatic trainer: load -> split -> fit -> threshold -> evaluate -> save.

`fit_model()` is what `ecg-trainer fit`, the demo and the test fixtures call.

    >>> from trainer.pipeline import fit_model
    >>> outcome = fit_model(data="data/ECG5000", out="models/m.pt", epochs=5)  # doctest: +SKIP
    >>> outcome.report["test"]["auroc"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch

from monitor.core import normalise
from monitor.core.artefact import Artefact, weights_digest
from monitor.core.model import ModelConfig
from monitor.core.scoring import Scorer
from monitor.stream.beats import BeatConvention
from monitor.stream.calibration import Prior
from monitor.stream.policy import ScorePolicyConfig
from trainer import data as data_mod
from trainer import plots, recordings, streams
from trainer.evaluate import (beat_windows, error_stats, evaluate, evaluate_recording, operating_point,
                              pool_recordings, stream_figures, write_report)
from trainer.fit import FitResult, deterministic, torch_threads, train_autoencoder
from trainer.settings import TrainerSettings
from trainer.split import SplitData, recorded_split, split
from trainer.threshold import choose_threshold


@dataclass
class FitOutcome:
    path: Path
    artefact: Artefact
    report: dict[str, Any]  # what report.json holds
    fit: FitResult
    data: SplitData


#: How beats are cut from continuous recordings (the ECG5000 convention, docs/beats.md).
CONVENTION = BeatConvention()


def make_settings(settings: TrainerSettings | None = None, **overrides: Any) -> TrainerSettings:
    """Settings from the environment, a given object, and keyword overrides (highest priority).
    Beats of a recording are labelled with AAMI classes, so their normal label is always "N"."""
    s = TrainerSettings(**overrides) if settings is None else (
        TrainerSettings(**{**settings.model_dump(), **overrides}) if overrides else settings)
    if is_recording(s) and s.normal_label != recordings.NORMAL:
        s = TrainerSettings(**{**s.model_dump(), "normal_label": recordings.NORMAL})
    return s


def is_recording(s: TrainerSettings) -> bool:
    """Continuous recordings (cut into beats) rather than windows."""
    return recordings.is_recording(s.data, s.fs)


def windowing(s: TrainerSettings) -> dict[str, Any]:
    """The artefact's windowing convention, which the daemon reads: beats for recordings, else fixed windows."""
    return CONVENTION.to_dict() if is_recording(s) else {"kind": "fixed"}


def load_recordings(s: TrainerSettings) -> list[recordings.RecordingBeats]:
    return [recordings.cut(r, CONVENTION) for r in recordings.read(Path(str(s.data)), fs=s.fs, lead=s.lead)]


def load_dataset(s: TrainerSettings) -> data_mod.Dataset:
    """Windows from ECG5000 / a table, or the beats of recordings (detected and cut as the daemon does)."""
    if is_recording(s):
        return recordings.to_dataset(load_recordings(s), CONVENTION)
    return data_mod.load(s.data, cache_dir=s.cache_dir, label_column=s.label_column,
                         n_features=s.n_features, normal_label=s.normal_label, verify_digest=s.verify_digest)


def load_split(settings: TrainerSettings | None = None, **overrides: Any) -> SplitData:
    """Load the configured data (validated), optionally subsample, and split by the protocol."""
    s = make_settings(settings, **overrides)
    dataset = load_dataset(s)
    if s.limit is not None and s.limit < len(dataset.labels):
        rows = np.sort(np.random.default_rng(s.seed).choice(len(dataset.labels), s.limit, replace=False))
        dataset = dataset.take(rows, f"{dataset.source} (random {s.limit} of {len(dataset.labels)}, seed {s.seed})")
    try:
        return split(dataset, s.normal_label, s.seed, s.val_fraction, s.test_fraction, s.val_anomaly_fraction)
    except ValueError as exc:
        raise data_mod.DataError(f"{dataset.source}: {exc}") from None


def fit_model(settings: TrainerSettings | None = None, *, dataset: SplitData | None = None,
              **overrides: Any) -> FitOutcome:
    """Train, choose the threshold, evaluate on the held-out test set, save the artefact (and the
    report when report_dir is set). Keyword overrides are TrainerSettings fields."""
    s = make_settings(settings, **overrides)
    with deterministic(s.seed, s.torch_threads):  # scoring, too, runs on the configured threads
        return _fit_model(s, dataset)


def _fit_model(s: TrainerSettings, dataset: SplitData | None) -> FitOutcome:
    started = time.perf_counter()
    split_data = dataset if dataset is not None else load_split(s)
    train, val, test = split_data.train, split_data.val, split_data.test
    norm = normalise.fit_normalisation(s.normalisation, train.windows)
    config = ModelConfig(window_length=train.windows.shape[1], n_features=train.windows.shape[2],
                         embedding_dim=s.embedding_dim, hidden_dim=s.hidden_dim, num_layers=s.num_layers)
    fit = train_autoencoder(normalise.apply(norm, train.windows), normalise.apply(norm, val.windows[val.normal]),
                            config, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, patience=s.patience,
                            lr_schedule=s.lr_schedule, grad_clip=s.grad_clip, forget_bias=s.forget_bias,
                            seed=s.seed, device=s.device if s.device != "auto" else _auto_device(),
                            threads=s.torch_threads, max_seconds=s.max_minutes * 60 if s.max_minutes else None,
                            progress=s.progress)

    artefact = Artefact(config, fit.state_dict, threshold=0.0, normalisation=norm, reduction=s.reduction,
                        model_version=model_version(config, fit.state_dict))
    scorer = Scorer(artefact, device="cpu")
    val_errors = scorer.score(val.windows)
    labelled = val.anomalous if val.anomalous.any() else None
    artefact.threshold, artefact.threshold_method = choose_threshold(
        val_errors, s.threshold_method, percentile=s.threshold_percentile, k=s.threshold_k,
        value=s.threshold_value, anomalous=labelled)
    test_metrics, test_errors = evaluate(scorer, test.windows, test.labels, s.normal_label)
    validation_errors = error_stats(val_errors[val.normal])
    origin = split_data.dataset.origin
    point = operating_point(val_errors, val.labels, s.normal_label,
                            Prior.from_stats(validation_errors, artefact.threshold), s.false_alert_budget, seed=s.seed,
                            windows=None if origin is None else val.windows,
                            origin=None if origin is None else origin.take(val.indices))

    report: dict[str, Any] = {
        "model_version": artefact.model_version,
        "threshold": {"value": artefact.threshold, **artefact.threshold_method},
        "validation_errors": validation_errors,
        "windowing": windowing(s),
        # the daemon's alert policy for this model (ScorePolicyConfig fields), chosen on validation streams
        "policy": point["policy"],
        "operating_point": point,
        "data": data_info(split_data, s),
        "test": test_metrics,
        "training": training_info(fit, s),
        "versions": versions(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    report["training"]["total_seconds"] = round(time.perf_counter() - started, 2)
    # A JSON round trip leaves only plain types, which torch.load(weights_only=True) accepts.
    # The whole curve stays in the report: the artefact keeps the chosen point.
    meta = {k: v for k, v in report.items() if k not in ("model_version", "threshold")}
    meta["operating_point"] = {k: v for k, v in point.items() if k != "curve"}
    artefact.metadata = json.loads(json.dumps(meta, default=str))
    path = artefact.save(s.out)
    if s.report_dir is not None:
        write_full_report(report, s.report_dir, scorer, split_data, test_errors, fit)
    return FitOutcome(path, artefact, report, fit, split_data)


def _auto_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_version(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """e.g. ecg-lstm-ae-e32h64-20251123094500-1a2b3c4d (the suffix is a digest of the weights)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    return f"ecg-lstm-ae-e{config.embedding_dim}h{config.hidden_dim}-{stamp}-{weights_digest(state_dict)[:8]}"


def data_info(split_data: SplitData, s: TrainerSettings) -> dict[str, Any]:
    ds = split_data.dataset
    names, counts = np.unique(ds.labels.astype(str), return_counts=True)
    return {"source": ds.source, "digest": ds.digest, "n_windows": int(len(ds.labels)),
            "window_length": ds.window_length, "n_features": ds.n_features, "normal_label": s.normal_label,
            "labels": {str(k): int(v) for k, v in zip(names, counts, strict=True)},
            "split": {"seed": split_data.seed, "val_fraction": s.val_fraction, "test_fraction": s.test_fraction,
                      "val_anomaly_fraction": s.val_anomaly_fraction, "limit": s.limit,
                      "train": len(split_data.train), "val": len(split_data.val), "test": len(split_data.test)}}


def training_info(fit: FitResult, s: TrainerSettings) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in s.model_dump().items()
                if k not in ("data", "cache_dir", "out", "report_dir", "progress")}
    return {"settings": settings, "best_epoch": fit.best_epoch, "best_val_loss": fit.best_val_loss,
            "epochs_run": len(fit.history), "stop_reason": fit.stop_reason,
            "fit_seconds": round(fit.fit_seconds, 2), "torch_threads": s.torch_threads or torch.get_num_threads(),
            "history": [{k: round(v, 6) for k, v in h.items()} for h in fit.history]}


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "platform": platform.platform()}


def write_full_report(report: dict[str, Any], directory: Path, scorer: Scorer, split_data: SplitData,
                      test_errors: np.ndarray, fit: FitResult) -> list[Path]:
    """report.json, report.md, loss_curves.png, error_histogram.png, reconstructions.png."""
    directory = Path(directory)
    test = split_data.test
    written = write_report(report, directory)
    written.append(plots.loss_curves(fit.history, fit.best_epoch, directory / "loss_curves.png"))
    written.append(plots.error_histogram(test_errors[test.normal], test_errors[test.anomalous],
                                         scorer.threshold, directory / "error_histogram.png"))
    written.append(reconstruction_plot(scorer, test, test_errors, directory / "reconstructions.png"))
    point = report["operating_point"]
    curve = [{**r, "detection_rate": np.nan if r["detection_rate"] is None else r["detection_rate"]}
             for r in point["curve"]]  # no anomalous validation beats: no detection line, the x axis remains
    written.append(streams.plot_operating_curve(curve, directory / "operating_curve.png", point["budget_per_hour"]))
    return written


def reconstruction_plot(scorer: Scorer, test, errors: np.ndarray, path: Path) -> Path:
    """Three normal and three anomalous test windows (the first of each, deterministic)."""
    rows = list(np.flatnonzero(test.normal)[:3]) + list(np.flatnonzero(test.anomalous)[:3])
    inputs, outputs = scorer.reconstruct(test.windows[rows])
    titles = [f"{'normal' if test.normal[r] else 'anomalous'} (class {test.labels[r]}), "
              f"error {errors[r]:.3f}" for r in rows]
    return plots.reconstructions(inputs, outputs, titles, path)


def evaluate_artefact(model: Path, settings: TrainerSettings | None = None, subset: str = "test",
                      **overrides: Any) -> dict[str, Any]:
    """Re-evaluate a saved artefact on data, split with the artefact's own seed and fractions so
    `subset="test"` is the same held-out test set it was evaluated on at fit time."""
    artefact = Artefact.load(model)
    overrides = {**recorded_split(artefact.metadata), **overrides}
    if "normal_label" not in overrides and "normal_label" in artefact.metadata.get("data", {}):
        overrides["normal_label"] = artefact.metadata["data"]["normal_label"]
    s = make_settings(settings, **overrides)
    if is_recording(s):
        return evaluate_recordings(artefact, s)
    split_data = load_split(s)
    part = {"test": split_data.test, "val": split_data.val, "train": split_data.train}.get(subset)
    if subset == "all":
        windows, labels = split_data.dataset.windows, split_data.dataset.labels
    elif part is not None:
        windows, labels = part.windows, part.labels
    else:
        raise ValueError(f"subset must be test, val, train or all, not {subset!r}")
    with torch_threads(s.torch_threads):
        result, errors = evaluate(Scorer(artefact, device="cpu"), windows, labels, s.normal_label)
    if artefact.metadata.get("validation_errors") and subset == "test" and (np.asarray(labels) != s.normal_label).any():
        result["streams"] = stream_figures(errors, labels, s.normal_label, *served_policy(artefact),
                                           windows=beat_windows(artefact, windows))
    return {"model_version": artefact.model_version, "subset": subset, "data_digest": split_data.dataset.digest,
            **result}


def served_policy(artefact: Artefact) -> tuple[Prior, ScorePolicyConfig]:
    """The calibration prior (its validation error stats) and the alert policy (its `policy`, else the
    defaults) the daemon serves this artefact with, without the MONITOR_ALERT_* overrides."""
    stored = artefact.metadata.get("policy")
    return (Prior.from_stats(artefact.metadata["validation_errors"], artefact.threshold),
            ScorePolicyConfig(**stored) if stored else ScorePolicyConfig())


def evaluate_recordings(artefact: Artefact, s: TrainerSettings) -> dict[str, Any]:
    """Each recording scored beat by beat, in order (`trainer.evaluate.evaluate_recording`), with the
    artefact's own alert policy and its calibration prior (its validation error stats)."""
    if not artefact.metadata.get("validation_errors"):
        raise ValueError("the model has no validation error stats (metadata validation_errors) to calibrate with")
    prior, policy = served_policy(artefact)
    convention = artefact.metadata.get("windowing", {"kind": "fixed"})
    if convention.get("kind") != "beats":
        raise ValueError(f"this model scores fixed windows (windowing {convention}), not beats of a recording: "
                         "train it on recordings, or evaluate it on windows")
    if BeatConvention.from_dict(convention) != CONVENTION:
        raise ValueError(f"the model's beat convention {convention} is not this trainer's {CONVENTION.to_dict()}")
    cuts = load_recordings(s)
    digest = recordings.to_dataset(cuts, CONVENTION).digest
    with torch_threads(s.torch_threads):
        scorer = Scorer(artefact, device="cpu")
        results = [evaluate_recording(scorer, c, prior, policy) for c in cuts]
    return {"model_version": artefact.model_version, "subset": "recording", "threshold": artefact.threshold,
            "data_digest": digest, "trained_on_this_data": artefact.metadata.get("data", {}).get("digest") == digest,
            "recordings": results, **({"pooled": pool_recordings(results)} if len(results) > 1 else {})}
