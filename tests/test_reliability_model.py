"""Reliability: bad model files. Corrupt, truncated, from a newer format, missing fields, a
pickle that carries code, non-finite weights or threshold, or weights whose warm-up score is not
finite: each is refused with an error naming the file, no code from the file ever runs, `check`
reports it, and the daemon exits non-zero with that message instead of starting."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import tally
from monitor.core.artefact import Artefact, ArtefactError, _checksum
from monitor.core.model import LSTMAutoencoder, ModelConfig
from monitor.core.scoring import Scorer

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]


class RunsCode:
    """Unpickling this calls os.system: the payload a hostile model file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def good_model(path: Path) -> Path:
    config = ModelConfig(embedding_dim=4, hidden_dim=8)
    torch.manual_seed(0)
    return Artefact(config, LSTMAutoencoder(config).state_dict(), threshold=0.5,
                    normalisation={"kind": "zscore"}, model_version="test").save(path)


def payload_of(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def rewrite(path: Path, payload: dict, reseal: bool = True) -> Path:
    """Save a modified payload, with a fresh checksum unless `reseal` is False."""
    if reseal:
        payload["checksum"] = _checksum(payload)
    torch.save(payload, path)
    return path


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the error must contain)."""
    good = good_model(tmp / "good.pt")
    data = good.read_bytes()
    files: dict[str, tuple[Path, str]] = {}

    def write(name: str, content: bytes, expect: str) -> None:
        path = tmp / f"{name}.pt"
        path.write_bytes(content)
        files[name] = (path, expect)

    write("empty", b"", "corrupt or truncated")
    write("truncated_10_bytes", data[:10], "corrupt or truncated")
    write("truncated_half", data[: len(data) // 2], "corrupt or truncated")
    write("truncated_last_byte", data[:-1], "corrupt or truncated")
    middle = bytearray(data)
    for i in range(len(middle) // 3, len(middle) // 3 + 64):
        middle[i] ^= 0xFF
    write("bytes_flipped", bytes(middle), "corrupt")
    write("not_a_model", b"this is a text file, not a model\n" * 10, "corrupt or truncated")

    payload = payload_of(good)
    payload["state_dict"]["output.bias"] = payload["state_dict"]["output.bias"] + 1.0
    files["weights_tampered"] = (rewrite(tmp / "weights_tampered.pt", payload, reseal=False), "checksum mismatch")

    payload = payload_of(good)
    payload["format_version"] = 99
    files["newer_format_version"] = (rewrite(tmp / "newer.pt", payload), "format version 99 is newer")

    payload = payload_of(good)
    payload["format_version"] = "1"
    files["format_version_not_int"] = (rewrite(tmp / "version_str.pt", payload), "format version")

    payload = payload_of(good)
    payload["format"] = "someone-else/model"
    files["other_format"] = (rewrite(tmp / "other.pt", payload), "not an ECG monitor model")

    payload = payload_of(good)
    del payload["threshold"]
    files["missing_field"] = (rewrite(tmp / "missing.pt", payload), "missing fields ['threshold']")

    payload = payload_of(good)
    payload["reduction"] = "median"
    files["unknown_reduction"] = (rewrite(tmp / "reduction.pt", payload), "unknown reduction")

    for name, tensor, value in [("nan_weights", "output.bias", float("nan")),
                                ("inf_weights", "encoder_in.weight_hh_l0", float("-inf"))]:
        payload = payload_of(good)
        payload["state_dict"][tensor][0] = value
        files[name] = (rewrite(tmp / f"{name}.pt", payload), f"non-finite weights in {tensor}")

    for name, value in [("nan_threshold", float("nan")), ("inf_threshold", float("inf")),
                        ("zero_threshold", 0.0), ("negative_threshold", -0.5)]:
        payload = payload_of(good)
        payload["threshold"]["value"] = value
        files[name] = (rewrite(tmp / f"{name}.pt", payload), "threshold must be a finite number > 0")

    torch.save([1, 2, 3], tmp / "list.pt")
    files["top_level_not_dict"] = (tmp / "list.pt", "top level is list")

    marker = tmp / "code-ran"
    payload = payload_of(good)
    payload["metadata"] = {"evil": RunsCode(marker)}
    torch.save(payload, tmp / "pickle_in_torch_file.pt")
    files["code_in_torch_zip"] = (tmp / "pickle_in_torch_file.pt", "refused to load")
    (tmp / "raw_pickle.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    files["code_in_raw_pickle"] = (tmp / "raw_pickle.pt", "refused to load")
    torch.save(LSTMAutoencoder(ModelConfig(embedding_dim=4, hidden_dim=8)), tmp / "whole_module.pt")
    files["whole_module_pickled"] = (tmp / "whole_module.pt", "refused to load")

    files["missing_file"] = (tmp / "does-not-exist.pt", "not found")
    return files


def overflowing_model(path: Path) -> Path:
    """Finite weights whose reconstruction overflows float32: only the warm-up can tell."""
    payload = payload_of(good_model(path))
    payload["state_dict"]["output.bias"].fill_(3e38)
    return rewrite(path, payload)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return bad_files(tmp_path_factory.mktemp("bad-models"))


@pytest.fixture(scope="module")
def models_and_overflowing(models, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    path = overflowing_model(tmp_path_factory.mktemp("overflow") / "overflowing.pt")
    return {**models, "overflowing_weights": (path, "warm-up score is inf")}


def test_the_good_model_loads(tmp_path):
    assert Artefact.load(good_model(tmp_path / "m.pt")).model_version == "test"


def test_every_bad_model_file_is_refused_with_a_clear_error(models):
    refused = 0
    for name, (path, expect) in models.items():
        with pytest.raises(ArtefactError) as error:
            Artefact.load(path)
        message = str(error.value)
        assert message.startswith(str(path)), (name, message)
        assert expect in message, (name, message)
        refused += 1
    marker = next(iter(models.values()))[0].parent / "code-ran"
    assert not marker.exists(), "loading a model file ran code from it"
    tally.record("bad model file (loader)", records_tried=len(models), faults_injected=refused)
    assert refused == len(models)


def test_the_warm_up_of_a_good_model_scores_a_finite_number(tmp_path):
    score = Scorer.from_file(good_model(tmp_path / "m.pt"), device="cpu").warm_up()
    assert math.isfinite(score) and score >= 0


def test_a_model_whose_warm_up_score_is_not_finite_is_refused(tmp_path):
    path = overflowing_model(tmp_path / "overflowing.pt")
    scorer = Scorer.from_file(path, device="cpu")  # every weight is finite: the file loads
    with pytest.raises(ArtefactError) as error:
        scorer.warm_up()
    assert str(error.value).startswith(str(path)) and "warm-up score is inf" in str(error.value)
    tally.record("bad model file (warm-up)", records_tried=1, faults_injected=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nan_threshold", "nan_weights", "overflowing_weights"])
def test_check_reports_a_model_that_cannot_score(models_and_overflowing, name, tmp_path):
    path, expect = models_and_overflowing[name]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MONITOR_")},
           "MONITOR_MODEL_PATH": str(path), "MONITOR_DEVICE": "cpu", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "monitor", "check", "--skip-broker", "--env-file", "/dev/null"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"PROBLEM: model: {path}: " in done.stdout and expect in done.stdout, done.stdout


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_randomly_damaged_model_files_load_intact_or_are_refused(tmp_path, data):
    """Flip, cut or overwrite random bytes: the loader refuses the file or, when the damage
    missed everything that matters (zip padding, say), returns the exact original weights."""
    good = tmp_path / "good.pt"
    if not good.exists():
        good_model(good)
    content = bytearray(good.read_bytes())
    action = data.draw(st.sampled_from(["flip", "truncate", "overwrite"]))
    at = data.draw(st.integers(0, len(content) - 1))
    if action == "flip":
        content[at] ^= data.draw(st.integers(1, 255))
    elif action == "truncate":
        del content[at:]
    else:
        chunk = data.draw(st.binary(min_size=1, max_size=64))
        content[at:at + len(chunk)] = chunk
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(content))
    tally.record("bad model file (random damage)", records_tried=1, faults_injected=1)
    try:
        loaded = Artefact.load(damaged)
    except ArtefactError as error:
        assert str(error).startswith(str(damaged))
        return
    original = Artefact.load(good)
    assert loaded.state_dict.keys() == original.state_dict.keys()
    assert all(torch.equal(loaded.state_dict[k], original.state_dict[k]) for k in original.state_dict)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["truncated_half", "bytes_flipped", "newer_format_version",
                                  "code_in_torch_zip", "code_in_raw_pickle", "missing_file",
                                  "nan_threshold", "nan_weights", "overflowing_weights"])
def test_the_daemon_does_not_start_with_a_bad_model(models_and_overflowing, name, tmp_path):
    path, expect = models_and_overflowing[name]
    env = {**os.environ, "MONITOR_MODEL_PATH": str(path), "MONITOR_METRICS_PORT": "0",
           "MONITOR_BOOTSTRAP_SERVERS": "127.0.0.1:9", "MONITOR_DEVICE": "cpu",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "monitor", "run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    tally.record("bad model file (daemon)", records_tried=1, faults_injected=1)
    assert done.returncode != 0, output
    assert str(path) in output and expect in output, output
    assert "Traceback" not in output, output
    assert not (path.parent / "code-ran").exists()
