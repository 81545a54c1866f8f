"""The trainer's artefact: contents, round trip, offline == online scores, refusal of bad files."""

from __future__ import annotations

import io
import re
import struct
import zipfile

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monitor.core.artefact import Artefact, ArtefactError
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.core.scoring import Scorer
from monitor.core import normalise
from trainer.fit import torch_threads
from trainer.data import ECG5000_DIGEST

from conftest import TINY_MODEL


def test_artefact_records_what_the_monitor_and_an_auditor_need(trained_model):
    artefact = Artefact.load(trained_model)
    meta = artefact.metadata
    assert re.fullmatch(r"ecg-lstm-ae-e16h32-\d{14}-[0-9a-f]{8}", artefact.model_version)
    assert artefact.threshold_method == {"method": "percentile", "percentile": TINY_MODEL["threshold_percentile"]}
    assert artefact.normalisation == {"kind": "zscore"} and artefact.reduction == "mean_abs"
    assert meta["data"]["digest"] == ECG5000_DIGEST
    assert meta["data"]["split"]["train"] == 2043 and meta["data"]["split"]["seed"] == 42
    assert set(meta["versions"]) >= {"python", "torch", "numpy"}
    assert meta["validation_errors"]["n"] == 438
    assert meta["validation_errors"]["p95"] <= artefact.threshold <= meta["validation_errors"]["p99"]
    training = meta["training"]
    assert training["settings"]["embedding_dim"] == 16 and training["fit_seconds"] > 0
    assert 1 <= training["best_epoch"] <= training["epochs_run"]
    for key in ("auroc", "average_precision", "precision", "recall", "f1", "confusion_matrix", "per_class"):
        assert key in meta["test"]


def test_offline_metrics_are_what_the_scorer_gives_online(trained_model, ecg_dataset):
    scorer = Scorer.from_file(trained_model, device="cpu", max_batch=97)
    test = ecg_dataset.test
    with torch_threads(1):  # two threads on a busy 2-core CI box are several times slower
        errors = scorer.score(test.windows[:, :, 0])  # 2-D windows, as a stream delivers them
    stored = Artefact.load(trained_model).metadata["test"]
    assert roc_auc_score(test.anomalous, errors) == pytest.approx(stored["auroc"], abs=1e-9)
    assert int(scorer.is_anomalous(errors[test.anomalous]).sum()) == stored["confusion_matrix"]["tp"]


@pytest.mark.parametrize("kind", ["zscore", "global", "none"])
def test_training_normalisation_is_exactly_the_scorers(kind):
    windows = np.random.default_rng(0).normal(3.0, 2.0, size=(20, 30, 2))
    spec = normalise.fit_normalisation(kind, windows)
    config = ModelConfig(window_length=30, n_features=2, embedding_dim=2, hidden_dim=4)
    scorer = Scorer(Artefact(config, LSTMAutoencoder(config).state_dict(), 1.0, normalisation=spec), device="cpu")
    np.testing.assert_array_equal(normalise.apply(spec, windows), scorer.prepare(windows))


def test_a_tampered_artefact_is_refused(trained_model, tmp_path):
    payload = torch.load(trained_model, weights_only=True)
    payload["threshold"]["value"] *= 10  # e.g. someone silencing alerts
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(ArtefactError, match="tampered.pt: checksum mismatch"):
        Artefact.load(tmp_path / "tampered.pt")
    raw = bytearray(trained_model.read_bytes())
    raw[_inside_the_weights(bytes(raw))] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(raw))
    with pytest.raises(ArtefactError, match="flipped.pt"):
        Artefact.load(tmp_path / "flipped.pt")


def _inside_the_weights(raw: bytes) -> int:
    """An offset in the middle of the largest stored tensor: the middle of the file may be zip padding, whose
    bytes nothing reads (so flipping one there changes nothing), depending on the metadata's size."""
    info = max(zipfile.ZipFile(io.BytesIO(raw)).infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # runs at unpickling time with a plain torch.load


def test_a_pickle_carrying_code_is_refused_without_running_it(trained_model, tmp_path):
    payload = torch.load(trained_model, weights_only=True)
    marker = tmp_path / "pwned"
    payload["metadata"]["evil"] = _Exploit(marker)
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ArtefactError, match="evil.pt: refused to load"):
        Artefact.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_round_trip_keeps_weights_and_scores(trained_model, tmp_path, ecg_dataset):
    artefact = Artefact.load(trained_model)
    copy = Artefact.load(artefact.save(tmp_path / "copy.pt"))
    assert copy.describe() == artefact.describe()
    windows = ecg_dataset.val.windows[:50]
    np.testing.assert_array_equal(Scorer(copy, device="cpu").score(windows),
                                  Scorer(artefact, device="cpu").score(windows))
