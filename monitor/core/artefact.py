"""The model artefact: one self-describing file with everything the monitor needs.

Saved with `torch.save` and loaded with `torch.load(weights_only=True)`, so loading
never runs code from the file. A SHA-256 over the weights and metadata catches
corruption and tampering. See docs/trainer.md, "The model artefact".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monitor.core.model import ModelConfig

FORMAT_NAME = "ecg-monitor/lstm-autoencoder"
FORMAT_VERSION = 1

#: Reductions of the per-sample absolute error into one score per window.
REDUCTIONS = ("mean_abs", "sum_abs")
#: How a window is normalised before scoring: "none", "zscore" (each window to mean 0 / std 1,
#: as the ECG5000 beats are) or "global" (fixed mean/std per feature from the training set).
NORMALISATIONS = ("none", "zscore", "global")

REQUIRED_FIELDS = ("format", "format_version", "model_version", "config", "state_dict",
                   "normalisation", "reduction", "threshold", "checksum")


class ArtefactError(Exception):
    """A model file that cannot be used; the message names the file and the cause."""


@dataclass
class Artefact:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    threshold: float
    threshold_method: dict[str, Any] = field(default_factory=lambda: {"method": "fixed"})
    normalisation: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    reduction: str = "mean_abs"
    model_version: str = "unversioned"
    #: Free-form, JSON-safe facts: validation error stats, data digest, evaluation, versions, training.
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def window_length(self) -> int:
        return self.config.window_length

    @property
    def n_features(self) -> int:
        return self.config.n_features

    def _payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_version": self.model_version,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "normalisation": self.normalisation,
            "reduction": self.reduction,
            "threshold": {"value": float(self.threshold), **self.threshold_method},
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves half a model."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = self._payload()
        payload["checksum"] = _checksum(payload)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Artefact:
        path = Path(path)
        payload = _read(path)
        missing = [f for f in REQUIRED_FIELDS if f not in payload]
        if payload.get("format") != FORMAT_NAME and "format" in payload:
            raise ArtefactError(f"{path}: not an ECG monitor model (format {payload.get('format')!r})")
        if missing:
            raise ArtefactError(f"{path}: model file is missing fields {missing}")
        version = payload["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtefactError(f"{path}: format version {version!r} is newer than this monitor "
                                f"understands ({FORMAT_VERSION}); upgrade ecg-monitor")
        if payload["checksum"] != _checksum(payload):
            raise ArtefactError(f"{path}: checksum mismatch: the file was modified or corrupted")
        try:
            threshold = dict(payload["threshold"])
            value = float(threshold.pop("value"))
            artefact = cls(
                config=ModelConfig.from_dict(payload["config"]),
                state_dict=payload["state_dict"],
                threshold=value,
                threshold_method=threshold,
                normalisation=dict(payload["normalisation"]),
                reduction=str(payload["reduction"]),
                model_version=str(payload["model_version"]),
                metadata=dict(payload.get("metadata") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtefactError(f"{path}: malformed field: {exc}") from None
        if artefact.reduction not in REDUCTIONS:
            raise ArtefactError(f"{path}: unknown reduction {artefact.reduction!r}")
        if artefact.normalisation.get("kind") not in NORMALISATIONS:
            raise ArtefactError(f"{path}: unknown normalisation {artefact.normalisation!r}")
        _check_finite(path, artefact)
        return artefact

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary for `trainer info` and `monitor check`."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model_version": self.model_version,
            "config": self.config.to_dict(),
            "parameters": int(sum(t.numel() for t in self.state_dict.values())),
            "normalisation": self.normalisation,
            "reduction": self.reduction,
            "threshold": {"value": self.threshold, **self.threshold_method},
            **self.metadata,
        }


def _check_finite(path: Path, artefact: Artefact) -> None:
    """A NaN weight makes every score NaN, and a NaN threshold makes every comparison false: either
    way the daemon would never alert. (A checksum only proves the file is the one that was written.)"""
    for name, tensor in artefact.state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise ArtefactError(f"{path}: non-finite weights in {name}")
    if not (math.isfinite(artefact.threshold) and artefact.threshold > 0):
        raise ArtefactError(f"{path}: threshold must be a finite number > 0, not {artefact.threshold}")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtefactError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any pickle that would import or call code.
        lines = str(exc).splitlines()
        why = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise ArtefactError(f"{path}: refused to load: the file carries code or objects that are "
                            f"not plain weights ({why[:200]})") from None
    except Exception as exc:  # noqa: BLE001 - garbage bytes raise all sorts (RuntimeError, EOFError, IndexError, ...)
        raise ArtefactError(f"{path}: corrupt or truncated model file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(payload, dict):
        raise ArtefactError(f"{path}: not an ECG monitor model (top level is {type(payload).__name__})")
    return payload


def _checksum(payload: dict[str, Any]) -> str:
    """SHA-256 over every field but the weights (as sorted JSON), then the weights."""
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "checksum")}
    return weights_digest(payload["state_dict"], header=json.dumps(meta, sort_keys=True, default=str).encode())


def weights_digest(state_dict: Mapping[str, torch.Tensor], header: bytes = b"") -> str:
    """SHA-256 (hex) of `header`, then each tensor in name order: its name, shape and bytes.
    The artefact's checksum and the digest in a model version are both this one hash."""
    digest = hashlib.sha256(header)
    for name in sorted(state_dict):
        tensor = state_dict[name]
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
