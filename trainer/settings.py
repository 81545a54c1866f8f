"""The trainer's settings: command-line flags, environment (prefix TRAINER_) and `.env`.

Every field is also a `--flag` of `ecg-trainer fit` (see trainer/cli.py), and the table in
docs/trainer.md lists them with their defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.data import default_cache_dir

ThresholdMethod = Literal["percentile", "mean_std", "fixed", "f1"]


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", frozen=True)

    # Data
    data: Path | None = Field(None, description="ECG5000 directory (.txt/.tsv/.arff), a CSV/Parquet file "
                                                "of windows, a WFDB record (.hea) or a directory of them, or a "
                                                "one-lead CSV/Parquet/NPY signal with fs; empty = download ECG5000 "
                                                "into cache_dir")
    fs: float | None = Field(None, gt=0, description="Sampling rate (Hz) of a CSV/Parquet/NPY signal: the file is "
                                                     "then one continuous lead, cut into beats")
    lead: str | None = Field(None, description="Lead (WFDB signal name, or table column) of a multi-lead "
                                               "recording; empty = the first (WFDB) or the only column")
    cache_dir: Path = Field(default_cache_dir(), description="Where the ECG5000 download is kept")
    label_column: str = Field("label", description="CSV/Parquet: name of the optional label column")
    normal_label: str = Field("1", description="The label of normal windows (ECG5000: class 1)")
    n_features: int = Field(1, ge=1, description="CSV/Parquet: channels per window (columns are channel-major)")
    verify_digest: bool = Field(True, description="Refuse an ECG5000 copy whose parsed values differ from the "
                                                  "reference")
    limit: int | None = Field(None, ge=10, description="Use a random subset of this many windows (quick runs)")

    # Split (the evaluation protocol in DESIGN.md)
    seed: int = Field(42, description="Seeds the split, weight init and batch order")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of normal windows for validation")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of normal windows for the test set")
    val_anomaly_fraction: float = Field(0.0, ge=0, lt=1, description="Share of anomalous windows moved into "
                                                                     "validation (needed by threshold_method=f1)")

    # Model
    embedding_dim: int = Field(32, ge=1)
    hidden_dim: int = Field(64, ge=1)
    num_layers: int = Field(1, ge=1)

    # Optimisation
    epochs: int = Field(50, ge=1, description="Most epochs to train")
    batch_size: int = Field(16, ge=1, description="Windows per training step")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="cosine: decay lr to 0 over epochs")
    forget_bias: float | None = Field(3.0, description="Initial LSTM forget-gate bias (long memory from the "
                                                       "start: much faster training); empty = PyTorch's init")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; empty = no clipping")
    patience: int = Field(10, ge=1, description="Stop after this many epochs without a better validation loss")
    max_minutes: float | None = Field(None, gt=0, description="Stop training after this long (best weights kept)")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    torch_threads: int | None = Field(1, ge=1, description="torch CPU threads; 1 is fastest for these small "
                                                           "LSTMs on a shared machine; empty = torch default")

    # Scoring and threshold
    normalisation: Literal["zscore", "none", "global"] = Field("zscore", description="Applied to every window "
                                                               "before scoring, in training and in the monitor")
    reduction: Literal["mean_abs", "sum_abs"] = "mean_abs"
    threshold_method: ThresholdMethod = "percentile"
    threshold_percentile: float = Field(95.0, gt=0, lt=100, description="percentile: of validation normal errors")
    threshold_k: float = Field(3.0, gt=0, description="mean_std: threshold = mean + k * std")
    threshold_value: float | None = Field(None, gt=0, description="fixed: the threshold")

    # Alert policy (the operating point written to the report and the artefact)
    false_alert_budget: float = Field(1.0, gt=0, description="False alerts per sensor-hour allowed on validation "
                                                             "streams; the most sensitive policy within it is chosen")

    # Outputs
    out: Path = Field(Path("models/ecg-lstm-ae.pt"), description="Model artefact to write")
    report_dir: Path | None = Field(None, description="report.json, report.md and PNG plots; empty = none")
    progress: bool = Field(True, description="Show a tqdm progress bar")

    @model_validator(mode="after")
    def _check(self) -> TrainerSettings:
        if self.threshold_method == "fixed" and self.threshold_value is None:
            raise ValueError("threshold_method=fixed needs threshold_value (TRAINER_THRESHOLD_VALUE)")
        if self.threshold_method == "f1" and self.val_anomaly_fraction <= 0:
            raise ValueError("threshold_method=f1 needs a labelled validation set: "
                             "set val_anomaly_fraction (TRAINER_VAL_ANOMALY_FRACTION) > 0")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        return self
