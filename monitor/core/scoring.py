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


def padded_batch(n: int, max_batch: int) -> int:
    """The batch size `n` windows are scored at: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...
    (two per octave), at most max_batch. On CPU torch's oneDNN caches a compiled LSTM kernel per input
    shape (up to 1024 of them, about 1 MB each at 64 windows, more for larger batches), so scoring every
    batch size as it came grew the daemon's memory for as long as new sizes turned up (the 30-minute
    soak: +75 MB at max_batch 64; at 512 it passes 400 MB). With these sizes there are at most 18 shapes
    up to 512, for at most half as many rows again per batch."""
    if n >= max_batch:
        return max_batch
    power = 1 << (n - 1).bit_length()  # the next power of two >= n
    between = power * 3 // 4  # 1.5 x the power of two below it
    return min(between if power >= 4 and n <= between else power, max_batch)


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
        window = np.repeat(wave[None, :, None], self.n_features, axis=2)
        score = float(self.score(window)[0])
        if not math.isfinite(score):
            raise ArtefactError(f"{self.source or 'model'}: warm-up score is {score}, not a finite number: "
                                "the weights overflow float32 on an ordinary window")
        # Every padded batch size once, so the per-shape kernels are built (and memory reaches its
        # plateau) at start-up, not over the first hours of varied load.
        for size in sorted({padded_batch(n, self.max_batch) for n in range(2, self.max_batch + 1)}):
            self.score(np.repeat(window, size, axis=0))
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
        """Yield (slice, input, reconstruction) tensors, max_batch windows at a time, each chunk padded
        with zero windows to a `padded_batch` size (the padding is cut off again)."""
        with torch.inference_mode():
            for start in range(0, len(x), self.max_batch):
                rows = slice(start, start + self.max_batch)
                chunk = x[rows]
                n, size = len(chunk), padded_batch(len(chunk), self.max_batch)
                if size > n:
                    chunk = np.concatenate((chunk, np.zeros((size - n, *chunk.shape[1:]), dtype=chunk.dtype)))
                batch = torch.from_numpy(chunk).to(self.device, non_blocking=True)
                yield rows, batch[:n], self.model(batch)[:n]

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


__all__ = ["Scorer", "ArtefactError", "resolve_device", "DEVICES", "padded_batch"]
