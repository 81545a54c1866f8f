"""Trainer data loading: every layout, validation of bad files, the download path, the split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainer import data as data_mod
from trainer.data import DataError, load, load_ucr_file
from trainer.split import recorded_split, split, split_indices


@pytest.fixture(scope="module")
def ecg(ecg_data_dir):
    return load(ecg_data_dir)


def _rows(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """First n beats of a shared UCR .txt file as (labels, values)."""
    frame = pd.read_csv(path, sep=r"\s+", header=None, nrows=n)
    return frame.iloc[:, 0].to_numpy(), frame.iloc[:, 1:].to_numpy()


def _write_tsv(path: Path, labels, values) -> None:
    pd.DataFrame(np.column_stack([labels, values])).to_csv(path, sep="\t", header=False, index=False,
                                                           float_format="%.7e")


def _write_arff(path: Path, labels, values) -> None:
    head = ["@relation ECG5000"] + [f"@attribute att{i} numeric" for i in range(values.shape[1])]
    head += ["@attribute target {1,2,3,4,5}", "@data"]
    body = [",".join(f"{v:.7e}" for v in row) + f",{int(y)}" for y, row in zip(labels, values, strict=True)]
    path.write_text("\n".join(head + body) + "\n")


def test_shared_ecg5000_is_validated_and_has_the_reference_digest(ecg):
    assert ecg.windows.shape == (5000, 140, 1)
    assert ecg.digest == data_mod.ECG5000_DIGEST
    assert {label: int((ecg.labels == label).sum()) for label in "12345"} == \
        {"1": 2919, "2": 1767, "3": 96, "4": 194, "5": 24}


def test_txt_tsv_and_arff_layouts_parse_to_the_same_values_and_digest(ecg_data_dir, tmp_path):
    labels, values = _rows(ecg_data_dir / "ECG5000_TRAIN.txt", 40)
    for split_name, rows in (("TRAIN", slice(0, 30)), ("TEST", slice(30, 40))):
        (tmp_path / "tsv").mkdir(exist_ok=True)
        (tmp_path / "arff").mkdir(exist_ok=True)
        (tmp_path / "txt").mkdir(exist_ok=True)
        _write_tsv(tmp_path / "tsv" / f"Beats_{split_name}.tsv", labels[rows], values[rows])
        _write_arff(tmp_path / "arff" / f"Beats_{split_name}.arff", labels[rows], values[rows])
        np.savetxt(tmp_path / "txt" / f"Beats_{split_name}.txt", np.column_stack([labels[rows], values[rows]]),
                   fmt="%16.7e", delimiter="")
    loaded = {kind: load(tmp_path / kind) for kind in ("txt", "tsv", "arff")}
    for dataset in loaded.values():
        np.testing.assert_array_equal(dataset.windows[:, :, 0], values)
        assert list(dataset.labels) == [str(int(y)) for y in labels]
    assert len({d.digest for d in loaded.values()}) == 1


def test_csv_and_parquet_windows_with_labels_and_several_channels(tmp_path):
    rng = np.random.default_rng(0)
    windows = rng.normal(size=(12, 50, 3))  # (n, length, channels)
    columns = windows.transpose(0, 2, 1).reshape(12, -1)  # channel-major
    frame = pd.DataFrame(columns, columns=[f"c{c}_t{t}" for c in range(3) for t in range(50)])
    frame.insert(0, "state", ["ok"] * 8 + ["bad"] * 4)
    frame.to_csv(tmp_path / "w.csv", index=False)
    frame.to_parquet(tmp_path / "w.parquet")
    for name in ("w.csv", "w.parquet"):
        dataset = load(tmp_path / name, label_column="state", n_features=3, normal_label="ok")
        np.testing.assert_allclose(dataset.windows, windows)
        assert dataset.n_features == 3 and list(dataset.labels[-4:]) == ["bad"] * 4


def test_csv_without_labels_is_all_normal(tmp_path):
    pd.DataFrame(np.ones((5, 20)) * np.arange(20)).to_csv(tmp_path / "w.csv", index=False)
    dataset = load(tmp_path / "w.csv", normal_label="1")
    assert dataset.windows.shape == (5, 20, 1) and set(dataset.labels) == {"1"}


def test_a_corrupted_ecg5000_copy_is_caught_by_the_digest(ecg_data_dir, tmp_path):
    shutil.copy(ecg_data_dir / "ECG5000_TEST.txt", tmp_path)
    lines = (ecg_data_dir / "ECG5000_TRAIN.txt").read_text().splitlines(keepends=True)
    lines[7] = lines[7][:-5] + "9e+00\n"  # one sample changed, the layout intact
    (tmp_path / "ECG5000_TRAIN.txt").write_text("".join(lines))
    with pytest.raises(DataError, match="differ from the reference.*TRAINER_VERIFY_DIGEST"):
        load(tmp_path)
    assert load(tmp_path, verify_digest=False).windows.shape == (5000, 140, 1)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace("\n", " 1.0\n", 1), "wrong column count: line 1 has 142 fields, expected 141"),
    (lambda t: t.replace(t.split("\n")[3], " ".join(t.split("\n")[3].split()[:-1]), 1), "line 4 has 140 fields"),
    (lambda t: t.replace(t.split()[5], "nan", 1), "NaN/inf"),
    (lambda t: "", "empty file"),
    (lambda t: t.replace("1.0000000e+00", "7.0000000e+00", 1), "unknown ECG5000 labels"),
    (lambda t: t.replace("1.0000000e+00", "1.5000000e+00", 1), "unknown ECG5000 labels"),
])
def test_bad_ucr_files_give_clear_errors_naming_the_file(ecg_data_dir, tmp_path, damage, message):
    shutil.copy(ecg_data_dir / "ECG5000_TEST.txt", tmp_path)
    text = (ecg_data_dir / "ECG5000_TRAIN.txt").read_text()
    (tmp_path / "ECG5000_TRAIN.txt").write_text(damage(text))
    with pytest.raises(DataError, match=message) as caught:
        load(tmp_path)
    assert str(tmp_path) in str(caught.value)


@pytest.mark.parametrize("content, kwargs, message", [
    ("label,a,b,c\n1,0.1,0.2,0.3\n1,0.1,,0.3\n", {}, "NaN/inf"),
    ("label,a,b,c\n1,0.1,0.2,0.3\n", {"n_features": 2}, "do not divide into 2 channel"),
    ("label,a,b\n", {}, "no windows"),
    ("", {}, "cannot read"),
    ("label,a,b\n2,0.1,0.2\n3,0.3,0.4\n", {}, "no window has the normal label '1'"),
    ("label,a,b\n1,0.1,zero\n", {}, "non-numeric"),
])
def test_bad_csv_files_give_clear_errors(tmp_path, content, kwargs, message):
    (tmp_path / "w.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load(tmp_path / "w.csv", **kwargs)


def test_missing_files_and_unknown_formats(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no \*_TRAIN"):
        load(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="unknown data format"):
        load(tmp_path / "x.json")


def test_offline_download_fails_naming_the_local_copy_setting(tmp_path, monkeypatch):
    import pooch

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(DataError, match="could not download ECG5000.*TRAINER_DATA"):
        load(None, cache_dir=tmp_path)


def test_a_cached_download_is_used_without_the_network(ecg_data_dir, tmp_path, monkeypatch):
    import pooch

    monkeypatch.setattr(pooch, "retrieve", lambda *a, **k: pytest.fail("must not download"))
    cached = tmp_path / "ECG5000" / "extracted"
    cached.mkdir(parents=True)
    for name in ("ECG5000_TRAIN.txt", "ECG5000_TEST.txt"):
        shutil.copy(ecg_data_dir / name, cached)
    assert load(None, cache_dir=tmp_path).digest == data_mod.ECG5000_DIGEST


def test_split_follows_the_protocol_and_is_reproducible_and_disjoint(ecg):
    parts = split(ecg, "1", seed=42)
    train, val, test = (set(p.indices) for p in (parts.train, parts.val, parts.test))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 5000
    assert (len(train), len(val), len(test)) == (2043, 438, 438 + 2081)
    assert not parts.train.anomalous.any() and not parts.val.anomalous.any()
    assert parts.test.anomalous.sum() == 2081  # every anomalous beat is in test
    again = split(ecg, "1", seed=42)
    np.testing.assert_array_equal(again.val.indices, parts.val.indices)
    other = split(ecg, "1", seed=43)
    assert set(other.val.indices) != val


def test_a_models_recorded_split_gives_back_its_held_out_test_part(ecg):
    # `trainer fit` records data.split; trainer.sources (the shipped model) its ECG5000 split seed
    fit = {"data": {"split": {"seed": 7, "val_fraction": 0.15, "test_fraction": 0.15, "limit": None, "train": 2043}}}
    assert recorded_split(fit) == {"seed": 7, "val_fraction": 0.15, "test_fraction": 0.15}
    assert recorded_split({"data": {"ecg5000_split_seed": 1}}) == {"seed": 1}
    train = set(split(ecg, "1", seed=1).train.indices)
    assert not train & set(split(ecg, "1", **recorded_split({"data": {"ecg5000_split_seed": 1}})).test.indices)
    assert recorded_split({}) == {}


def test_labelled_validation_takes_a_share_of_every_anomalous_class(ecg):
    train, val, test = split_indices(ecg.labels, "1", 0, val_anomaly_fraction=0.2)
    for label, total in (("2", 1767), ("3", 96), ("4", 194), ("5", 24)):
        assert (ecg.labels[val] == label).sum() == round(0.2 * total)
    assert not set(val) & set(test) and (ecg.labels[train] == "1").all()


def test_load_ucr_file_refuses_a_file_without_values(tmp_path):
    (tmp_path / "X_TRAIN.tsv").write_text("1\n2\n")
    with pytest.raises(DataError, match="no windows"):
        load_ucr_file(tmp_path / "X_TRAIN.tsv")


def _serve_zip(tmp_path: Path, files: dict[str, bytes]):
    """A real HTTP server on loopback serving ECG5000.zip built from `files`; returns (url, server)."""
    import functools
    import http.server
    import threading
    import zipfile

    root = tmp_path / "www"
    root.mkdir()
    with zipfile.ZipFile(root / "ECG5000.zip", "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/ECG5000.zip", server


def test_download_fetches_unzips_and_verifies_over_http(ecg_data_dir, tmp_path, monkeypatch):
    files = {name: (ecg_data_dir / name).read_bytes() for name in ("ECG5000_TRAIN.txt", "ECG5000_TEST.txt")}
    url, server = _serve_zip(tmp_path, files)
    monkeypatch.setattr(data_mod, "ECG5000_URL", url)
    try:
        cache = tmp_path / "cache"
        assert load(None, cache_dir=cache).digest == data_mod.ECG5000_DIGEST
        server.shutdown()  # the second load must come from the cache
        assert load(None, cache_dir=cache).digest == data_mod.ECG5000_DIGEST
    finally:
        server.server_close()


def test_a_corrupted_download_is_caught_by_the_digest(ecg_data_dir, tmp_path, monkeypatch):
    train = (ecg_data_dir / "ECG5000_TRAIN.txt").read_bytes()
    first_value = train.index(b"e", 20) - 9  # a digit of the first sample of the first beat
    damaged = train[:first_value] + (b"9" if train[first_value:first_value + 1] != b"9" else b"8") \
        + train[first_value + 1:]
    url, server = _serve_zip(tmp_path, {"ECG5000_TRAIN.txt": damaged,
                                        "ECG5000_TEST.txt": (ecg_data_dir / "ECG5000_TEST.txt").read_bytes()})
    monkeypatch.setattr(data_mod, "ECG5000_URL", url)
    try:
        with pytest.raises(DataError, match="differ from the reference copy.*corrupt"):
            load(None, cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()
