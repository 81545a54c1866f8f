"""The scorer: windows in, reconstruction errors out. Used by the trainer's evaluation and
by the daemon, so offline and online scores are the same numbers."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from monitor.core import normalise
from monitor.core.artefact import Artefact, ArtefactError
from monitor.core.model import LSTMAutoencoder

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available (torch "
                           f"{torch.__version__}); use device 'cpu' or 'auto'")
    return torch.device(device)


class Scorer:
    """`score(windows) -> errors`, one error per window, in the units of `threshold`."""

    def __init__(self, artefact: Artefact, device: str = "auto", max_batch: int = 1024) -> None:
        self.artefact = artefact
        self.device = resolve_device(device)
        self.max_batch = max_batch
        self.model = LSTMAutoencoder(artefact.config)
        self.model.load_state_dict(artefact.state_dict)
        self.model.to(self.device).eval()
        #: Where the artefact came from (for error messages); None when built in memory.
        self.source: Path | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], device: str = "auto", max_batch: int = 1024) -> Scorer:
        scorer = cls(Artefact.load(Path(path)), device=device, max_batch=max_batch)
        scorer.source = Path(path)
        return scorer

    def warm_up(self) -> float:
        """Score one synthetic window (a sine wave) and return its score; ArtefactError naming the
        file when it is not finite (finite weights can still overflow float32, and a model that
        scores NaN never alerts). Also makes the first real batch as fast as the rest."""
        wave = np.sin(np.linspace(0.0, 2 * np.pi, self.window_length, dtype=np.float32))
        score = float(self.score(np.repeat(wave[None, :, None], self.n_features, axis=2))[0])
        if not math.isfinite(score):
            raise ArtefactError(f"{self.source or 'model'}: warm-up score is {score}, not a finite number: "
                                "the weights overflow float32 on an ordinary window")
        return score

    @property
    def window_length(self) -> int:
        return self.artefact.window_length

    @property
    def n_features(self) -> int:
        return self.artefact.n_features

    @property
    def threshold(self) -> float:
        return self.artefact.threshold

    @property
    def model_version(self) -> str:
        return self.artefact.model_version

    def prepare(self, windows: np.ndarray) -> np.ndarray:
        """Shape-check to (n, window_length, n_features) float32 and normalise as in training."""
        x = np.asarray(windows, dtype=np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        if x.ndim != 3 or x.shape[1:] != (self.window_length, self.n_features):
            raise ValueError(f"expected windows of shape (n, {self.window_length}) or "
                             f"(n, {self.window_length}, {self.n_features}), got {np.shape(windows)}")
        return normalise.apply(self.artefact.normalisation, x)

    def _forward(self, x: np.ndarray) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Yield (slice, input, reconstruction) tensors, max_batch windows at a time."""
        with torch.inference_mode():
            for start in range(0, len(x), self.max_batch):
                rows = slice(start, start + self.max_batch)
                batch = torch.from_numpy(x[rows]).to(self.device, non_blocking=True)
                yield rows, batch, self.model(batch)

    def reconstruct(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalised input, reconstruction), both (n, window_length, n_features)."""
        x = self.prepare(windows)
        out = np.empty_like(x)
        for rows, _, recon in self._forward(x):
            out[rows] = recon.float().cpu().numpy()
        return x, out

    def score(self, windows: np.ndarray) -> np.ndarray:
        """Reconstruction error per window (float64, shape (n,))."""
        x = self.prepare(windows)
        errors = np.empty(len(x), dtype=np.float64)
        reduce = torch.mean if self.artefact.reduction == "mean_abs" else torch.sum
        for rows, batch, recon in self._forward(x):
            errors[rows] = reduce((recon - batch).abs(), dim=(1, 2)).double().cpu().numpy()
        return errors

    def is_anomalous(self, errors: np.ndarray) -> np.ndarray:
        return np.asarray(errors) > self.threshold


__all__ = ["Scorer", "ArtefactError", "resolve_device", "DEVICES"]
